"""The offloading decision (docs/design.md#decision-model): the total-time model and its online estimators, sans-I/O.

Nothing here performs I/O or reads a clock: callers pass measurements and the time. A test keeps it that way
(no paho, httpx, asyncio, sqlite, socket or time imports).
"""

from agent.decision.model import (
    CLOUD_TERMS,
    LOCAL_TERMS,
    Decision,
    Direction,
    Placement,
    Policy,
    Reason,
    Target,
    Task,
)

__all__ = [
    "CLOUD_TERMS",
    "LOCAL_TERMS",
    "Decision",
    "Direction",
    "Placement",
    "Policy",
    "Reason",
    "Target",
    "Task",
]

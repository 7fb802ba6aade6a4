"""The offloading decision (docs/design.md#decision-model): the total-time model and its online estimators, sans-I/O.

Nothing here performs I/O or reads a clock: callers pass measurements and the time. Its parameters are plain
values (:class:`DecisionParams`), so importing it loads neither the settings (pydantic) nor any I/O module;
tests keep it that way (tests/test_decision_policy.py).
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
from agent.decision.params import DEFAULT_KINDS, DecisionParams, KindParams, ParamsSource

__all__ = [
    "CLOUD_TERMS",
    "DEFAULT_KINDS",
    "LOCAL_TERMS",
    "Decision",
    "DecisionParams",
    "Direction",
    "KindParams",
    "ParamsSource",
    "Placement",
    "Policy",
    "Reason",
    "Target",
    "Task",
]

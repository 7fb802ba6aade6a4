"""The agent's exception tree.

    AgentError
    ├── ConfigError          a setting is invalid: start-up stops with exit status 78 (EX_CONFIG)
    ├── PayloadError         a device message cannot become a result; ``reason`` is the dead-letter code
    │   ├── InvalidJson      reason ``invalid_json``
    │   └── InvalidPayload   reason ``invalid_payload``
    ├── UnknownTask          no task for this topic or name; reason ``unknown_task``
    └── StoreError           the durable store cannot be opened or written
        └── StoreFull        the configured bound is reached; intake pauses, nothing is dropped
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """A setting is invalid. ``variable`` names the environment variable at fault."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


class PayloadError(AgentError):
    """A message's content cannot be processed; ``reason`` is the dead-letter reason code."""

    reason = "invalid_payload"


class InvalidJson(PayloadError):
    reason = "invalid_json"


class InvalidPayload(PayloadError):
    reason = "invalid_payload"


class UnknownTask(AgentError):
    reason = "unknown_task"


class StoreError(AgentError):
    """The durable store failed."""


class StoreFull(StoreError):
    """The store holds as many tasks or bytes as it may."""

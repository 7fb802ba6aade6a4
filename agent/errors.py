"""The agent's exception tree.

    AgentError
    ├── ConfigError          settings are invalid or unknown: start-up stops with exit status 78 (EX_CONFIG)
    ├── PayloadError         a device message cannot become a result; ``reason`` is the dead-letter code
    │   ├── InvalidJson      reason ``invalid_json``
    │   └── InvalidPayload   reason ``invalid_payload``
    ├── UnknownTask          no task for this topic or name; reason ``unknown_task``
    └── StoreError           the store's writer was handed an operation it does not know (a bug); a store that
                             cannot be opened is a ConfigError, a failed commit is retried, and a full store
                             pauses intake (``Store.has_room``): none of those raise

Subtrees drawn where they are defined (docs/contributing.md): ``CloudError`` (agent/cloud/_errors.py),
``ObjectStoreError`` (agent/archive/s3.py), and the archive's ``SegmentError`` (a sealed segment that does
not read back as written) and ``QueryError`` (a query that cannot be answered whole).
"""

from __future__ import annotations

from collections.abc import Sequence


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """Settings are invalid. ``problems`` lists every (variable, problem) found, so that an operator fixes them
    in one go; ``variable`` and ``problem`` are the first's. Its text is one ``variable: problem`` line each."""

    def __init__(self, variable: str, problem: str, *more: tuple[str, str]) -> None:
        self.problems = [(variable, problem), *more]
        super().__init__("\n".join(f"{name}: {text}" for name, text in self.problems))
        self.variable = variable
        self.problem = problem

    @classmethod
    def listing(cls, problems: Sequence[tuple[str, str]]) -> ConfigError:
        """One error for several problems (at least one)."""
        first, *more = problems
        return cls(*first, *more)


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
    """The durable store was used wrongly (see the tree above)."""


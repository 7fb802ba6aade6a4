"""Logging: structlog for the agent, the standard library's ``logging`` for third parties, one output.

Every event, whether from ``get_logger(...)`` or from a library logging through ``logging`` (paho, httpx,
uvicorn), runs through the same chain and ends as one line on one stream:

    merge contextvars → level → (logger name) → UTC timestamp → exception text → redaction → recent problems
    → renderer

The renderer is JSON lines when the stream is not a terminal (journald captures stdout) and structlog's
``ConsoleRenderer`` on a terminal; ``EDGE_AGENT_LOG__FORMAT`` forces either. Redaction runs last before
rendering so nothing added earlier (tracebacks included) escapes it. Warnings and errors are also kept, redacted,
in a small table of recent problems that ``edge-agent status`` shows (:data:`PROBLEMS`).

In parts: ``_structlog`` (structlog without rich), ``_redaction``, ``_problems``, ``_logger`` (the module-level
loggers) and ``_output`` (the chain and the stream).
"""

from agent.telemetry._logger import get_logger
from agent.telemetry._output import configure_logging
from agent.telemetry._problems import PROBLEMS, RecentProblems
from agent.telemetry._redaction import MASK, redact_event, register_secret, warn_if_world_readable

__all__ = [
    "MASK",
    "PROBLEMS",
    "RecentProblems",
    "configure_logging",
    "get_logger",
    "redact_event",
    "register_secret",
    "warn_if_world_readable",
]

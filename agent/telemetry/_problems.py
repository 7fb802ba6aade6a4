"""The latest warnings and errors, one entry per event, for ``edge-agent status``."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from agent.telemetry._structlog import EventDict, WrappedLogger

_PROBLEM_LEVELS = frozenset(("warning", "error", "critical"))
_PROBLEM_OWN_KEYS = frozenset(("event", "level", "timestamp", "logger"))
_PROBLEM_DETAIL_CHARS = 300


class RecentProblems:
    """The latest warning and error events, one entry per event name and level with how often it came.

    A structlog processor (after redaction, so nothing secret is kept). One entry per event rather than one
    per occurrence: a flood of ``dead_letter`` warnings must not push the one ``mqtt_subscribe_refused`` that
    explains it out of the table. Events below the warning level cost one set lookup; warnings are rare.
    """

    def __init__(self, size: int = 20) -> None:
        self._size = size
        self._entries: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()  # warnings come from the event loop, the store writer and library threads

    def __call__(self, _logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        level = event_dict.get("level")
        if level in _PROBLEM_LEVELS:
            self.record(str(level), event_dict)
        return event_dict

    def record(self, level: str, event_dict: Mapping[str, Any]) -> None:
        event = str(event_dict.get("event", ""))
        detail = " ".join(f"{key}={_short(value)}" for key, value in event_dict.items()
                          if key not in _PROBLEM_OWN_KEYS)
        key = (event, level)
        with self._lock:
            entry = self._entries.pop(key, None)
            count = 1 if entry is None else entry["count"] + 1
            self._entries[key] = {
                "time": str(event_dict.get("timestamp", "")), "level": level, "event": event,
                "logger": str(event_dict.get("logger", "")), "count": count,
                "detail": detail[:_PROBLEM_DETAIL_CHARS],
            }
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)

    def latest(self) -> list[dict[str, Any]]:
        """Newest first: time (UTC, ISO 8601) of the latest occurrence, level, event, logger, count, detail."""
        with self._lock:
            return [dict(entry) for entry in reversed(self._entries.values())]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def _short(value: Any) -> str:
    # A traceback: the exception raised says what went wrong (as text, its last line; rendered for JSON, the
    # first of a list of exception dicts, its causes after it).
    if isinstance(value, list) and value and isinstance(value[0], dict) and "exc_type" in value[0]:
        value = f"{value[0]['exc_type']}: {value[0].get('exc_value', '')}"
    elif isinstance(value, str) and value.startswith("Traceback"):
        value = value.rstrip().rsplit("\n", 1)[-1]
    text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= 120 else text[:119] + "…"


PROBLEMS = RecentProblems()

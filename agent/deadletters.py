"""Dead letters kept for a second chance: the copy each one leaves in the store, and its log lines.

Every dead letter gets an id from the store (``Store.new_dead_letter_id``), published in its dead-letter message
as ``id``, and its payload is kept in the store's ``dead_letters`` table, bounded by
``EDGE_AGENT_DEAD_LETTERS__MAX_COUNT`` and ``__MAX_BYTES`` (oldest dropped first), so that a message rejected by
a route mistake can be replayed once the routes are fixed (``edge-agent dead-letters``,
``agent/deadletter_admin.py``). The copy is written by the store's writer in the same group commit as the
dead-letter message, so the hot path pays only for a tuple.

Each dead letter is logged, at most :data:`LOG_FIRST` a reason per :data:`LOG_WINDOW_S`; the rest of a window
are counted and summed up in one line, so a device sending garbage cannot flood the journal.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from agent.telemetry import get_logger

log = get_logger("agent.deadletters")

# A too_large payload is kept only this far: enough to tell which device sent it and in what format, little
# enough that a flood of oversized messages does not push every other dead letter out of the bound. Such a
# copy is marked truncated and cannot be replayed.
TRUNCATED_KEEP = 4096
LOG_FIRST = 10  # dead letters logged one by one per reason and window
LOG_WINDOW_S = 60.0
DROPS_LOG_EVERY_S = 60.0
REPLAY_BATCH = 500  # requested replays read and re-admitted at once (each second)
REASONS = ("too_large", "unknown_task", "invalid_json", "invalid_payload", "task_failed")


class DeadLetter(NamedTuple):
    """What the store keeps of one dead letter, beside the dead-letter message that names ``id``."""

    id: int
    reason: str
    detail: str
    # The payload to keep (ingress). None: the task row's input, which the writer copies in SQL (dispatcher).
    payload: bytes | None = None
    truncated: bool = False


class Replay(NamedTuple):
    """A kept dead letter that ``edge-agent dead-letters replay`` asked to run again."""

    id: int
    topic: str
    payload: bytes


@dataclass(slots=True)
class _Window:
    started: float
    logged: int = 0
    suppressed: int = 0


class DeadLetterLog:
    """Logs dead letters, the first :data:`LOG_FIRST` of each reason per window one by one, then counts.

    Runs on the event loop. :meth:`flush` (called every second) writes the summary of a window that ended,
    so the count comes even when the flood stops.
    """

    def __init__(self, first: int = LOG_FIRST, window_s: float = LOG_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._first = first
        self._window_s = window_s
        self._clock = clock
        self._windows: dict[str, _Window] = {}

    def record(self, reason: str, event: str = "dead_letter", **fields: Any) -> None:
        now = self._clock()
        window = self._windows.get(reason)
        if window is None or now - window.started >= self._window_s:
            if window is not None:
                self._summarise(reason, window)
            window = self._windows[reason] = _Window(now)
        if window.logged < self._first:
            window.logged += 1
            log.warning(event, reason=reason, **fields)
        else:
            window.suppressed += 1

    def flush(self, force: bool = False) -> None:
        """``force``: end every window now (at a stop), so no count goes unreported."""
        now = self._clock()
        for reason, window in list(self._windows.items()):
            if force or now - window.started >= self._window_s:
                self._summarise(reason, window)
                del self._windows[reason]

    def _summarise(self, reason: str, window: _Window) -> None:
        if window.suppressed:
            log.warning("dead_letters_suppressed", reason=reason, suppressed=window.suppressed,
                        logged=window.logged, window_s=self._window_s)


class DropLog:
    """Logs kept dead letters that the bound dropped: at once for the first, then at most once a minute, each
    line with the number dropped since the one before."""

    def __init__(self, every_s: float = DROPS_LOG_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._every_s = every_s
        self._clock = clock
        self._reported = 0
        self._at: float | None = None

    def check(self, dropped: int, force: bool = False, **fields: Any) -> None:
        """``dropped``: the store's running count; ``fields``: what the line says besides."""
        if dropped <= self._reported:
            return
        now = self._clock()
        if force or self._at is None or now - self._at >= self._every_s:
            log.warning("dead_letters_dropped", dropped=dropped - self._reported, dropped_total=dropped, **fields)
            self._reported, self._at = dropped, now

"""Where the archive meets the intake: rows handed to the store, then appended once their commit is durable.

Ingress calls :meth:`Tap.submitted` with each hand-over to the store, on the event loop; the store's writer
thread calls :meth:`Tap.committed` from its post-commit hook with the number of ingress rows the commit wrote.
The store writes hand-overs whole and in order (one ``ingest`` operation each), so the first hand-overs waiting
here are exactly those the commit made durable.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Protocol

from agent.archive.segment import Record
from agent.store import NewTask


class _Route(Protocol):
    @property
    def topic(self) -> str: ...


class _Appender(Protocol):
    def append(self, by_route: dict[str, list[Record]]) -> None: ...


class Tap:
    def __init__(self, match: Callable[[str], _Route | None], archived: Callable[[], frozenset[str]],
                 intake: _Appender) -> None:
        """``match``: a topic's route (the first that matches, as ingress routes it); ``archived``: the filters
        of the routes that keep their inputs now (a reload may change them)."""
        self._match = match
        self._archived = archived
        self._intake = intake
        # (rows handed over, their archive records by route): deque appends and pops are thread-safe.
        self._waiting: collections.deque[tuple[int, dict[str, list[Record]]]] = collections.deque()
        self._carry = 0  # rows of a commit counted against the next hand-over (never expected; kept honest)

    def submitted(self, rows: Sequence[NewTask]) -> None:  # event loop
        archived = self._archived()
        by_route: dict[str, list[Record]] = {}
        if archived:
            for row in rows:
                if row.payload is None or row.out_topic is not None:
                    continue  # a dead letter: its copy is kept by the dead-letter table, not here
                route = self._match(row.topic)
                if route is not None and route.topic in archived:
                    by_route.setdefault(route.topic, []).append(
                        Record(row.received_at, row.topic, row.payload, row.task_id))
        self._waiting.append((len(rows), by_route))

    def committed(self, rows: int) -> None:  # store writer thread, before the commit reaches the loop
        rows += self._carry
        merged: dict[str, list[Record]] = {}
        while self._waiting and self._waiting[0][0] <= rows:
            count, by_route = self._waiting.popleft()
            rows -= count
            for route, records in by_route.items():
                merged.setdefault(route, []).extend(records)
        self._carry = rows
        if merged:
            self._intake.append(merged)

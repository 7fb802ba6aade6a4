"""The ``dead_letters`` table as the store's writer keeps it: each dead letter's copy, written in the group commit
of its dead-letter message, held to its bound (oldest dropped first), forgotten when replayed.

``edge-agent dead-letters`` (agent/deadletter_admin.py) reads and marks the same table through a connection of
its own; the writer notices its changes by SQLite's ``data_version``.
"""

from __future__ import annotations

import dataclasses
import itertools
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from agent.deadletters import Replay
from agent.store._schema import DEAD_LETTER_ID_KEY
from agent.store._sql import chunks, copy_dead_sql, forget_dead_sql, keep_dead_sql

REPLAY_READ_BYTES = 16 * 1024 * 1024  # payloads one read of requested replays hands over at most


@dataclass(slots=True)
class DeadLetterTotals:
    """The kept dead letters as the writer counts them; read by the metrics thread."""

    kept: int = 0
    bytes: int = 0
    dropped: int = 0  # dropped by the bound since the start
    top: int = 0  # the highest id committed (also kept in meta, for when its copy is gone)


class DeadLetterTable:
    """The writer's side of the dead-letter copies (its connection, its thread), and their ids (event loop)."""

    def __init__(self, db: sqlite3.Connection, max_count: int, max_bytes: int) -> None:
        self._db = db
        self._max_count = max_count
        self._max_bytes = max_bytes
        # Replaced as a whole after each commit that changed it, so the metrics thread reads one consistent copy.
        self.totals = self._count(DeadLetterTotals())
        row = db.execute("SELECT value FROM meta WHERE key=?", (DEAD_LETTER_ID_KEY,)).fetchone()
        self.totals.top = max(self.totals.top, int(row[0] or 0) if row is not None else 0)
        # Ids are given out on the event loop (the dead-letter message carries one before its commit). One that
        # was committed is never given again, even after its copy was dropped, purged or replayed; one lost in
        # a crash before its commit was never published either.
        self._ids = itertools.count(self.totals.top + 1)
        self.version = db.execute("PRAGMA data_version").fetchone()[0]  # restored when a group rolls back
        if self._over_bound(self.totals):  # the bound may have been lowered since
            db.execute("BEGIN IMMEDIATE")
            totals = dataclasses.replace(self.totals)
            self._bound(totals)
            db.execute("COMMIT")
            self.totals = totals

    def new_id(self) -> int:
        return next(self._ids)

    def keep(self, kept: list[Any], copied: list[Any], replayed: list[int]) -> DeadLetterTotals:
        """Keep a group's dead letters (``kept``: 9 values each from ingress; ``copied``: 4 from the
        dispatcher, whose input is copied from its task row), forget those ``replayed``, and hold the bound: in
        the group's transaction (dead letters are rare, and a flood of them shares the group's fsync). Returns
        the totals the commit makes true."""
        db = self._db
        totals = dataclasses.replace(self.totals)
        self._refresh(totals)
        if replayed:
            for rows, chunk in chunks(replayed, 1):
                db.execute(forget_dead_sql(rows), chunk)
            self._count(totals)
        top = max(max(kept[::9], default=0), max(copied[::4], default=0))
        if self._max_count > 0:
            now = time.time()
            for rows, chunk in chunks(kept, 9):
                sizes = db.execute(keep_dead_sql(rows), [now, *chunk]).fetchall()
                totals.kept += len(sizes)
                totals.bytes += sum(size for (size,) in sizes)
            for rows, chunk in chunks(copied, 4):
                sizes = db.execute(copy_dead_sql(rows), [now, *chunk]).fetchall()
                totals.kept += len(sizes)
                totals.bytes += sum(size for (size,) in sizes)
            self._bound(totals)
        if top > totals.top:
            totals.top = top
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (DEAD_LETTER_ID_KEY, str(top)))
        return totals

    def read_replays(self, limit: int) -> list[Replay]:
        """The oldest dead letters asked to replay, in the order they were received (a read between groups)."""
        totals = dataclasses.replace(self.totals)
        self._refresh(totals)  # so the gauges follow a purge or replay soon
        self.totals = totals
        replays: list[Replay] = []
        held = 0
        for row_id, topic, payload in self._db.execute(
                "SELECT id, topic, payload FROM dead_letters WHERE replay=1 AND truncated=0 "
                "ORDER BY received_at, id LIMIT ?", (limit,)):
            replays.append(Replay(int(row_id), str(topic), bytes(payload)))
            held += len(payload)
            if held >= REPLAY_READ_BYTES:
                break
        return replays

    def _count(self, totals: DeadLetterTotals) -> DeadLetterTotals:
        kept, size, top = self._db.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0), coalesce(max(id), 0) FROM dead_letters").fetchone()
        totals.kept, totals.bytes, totals.top = int(kept), int(size), max(totals.top, int(top))
        return totals

    def _over_bound(self, totals: DeadLetterTotals) -> bool:
        return totals.kept > self._max_count or totals.bytes > self._max_bytes

    def _bound(self, totals: DeadLetterTotals) -> None:
        """Drop the oldest kept dead letters until the bound holds (in the writer's transaction). Those waiting
        for a replay are spared: they leave the table at the replay's commit anyway."""
        if not self._over_bound(totals):
            return
        cut = dropped = freed = 0
        for row_id, size in self._db.execute(
                "SELECT id, length(payload) FROM dead_letters WHERE replay=0 ORDER BY id"):
            cut, dropped, freed = row_id, dropped + 1, freed + size
            if totals.kept - dropped <= self._max_count and totals.bytes - freed <= self._max_bytes:
                break
        if dropped:
            self._db.execute("DELETE FROM dead_letters WHERE replay=0 AND id<=?", (cut,))
            totals.kept -= dropped
            totals.bytes -= freed
            totals.dropped += dropped

    def _refresh(self, totals: DeadLetterTotals) -> None:
        """Count again when another connection (``edge-agent dead-letters``) changed the table since."""
        version = self._db.execute("PRAGMA data_version").fetchone()[0]
        if version != self.version:
            self.version = version
            self._count(totals)

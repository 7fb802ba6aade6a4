"""The task rows' transitions, written a group at a time in one transaction (see agent/store/__init__.py for
the states): new rows in (``PENDING``, or a dead letter straight to ``OUTBOX``), outputs committed (``PENDING``
→ ``OUTBOX``), outputs the broker acknowledged (→ ``PUBLISHED``, a tombstone), and old tombstones pruned."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from agent.errors import StoreError
from agent.store._dead_letters import DeadLetterTable, DeadLetterTotals
from agent.store._readback import HandOffs
from agent.store._rows import Committed, Op, OutboxEntry, TaskRef
from agent.store._schema import OUTBOX
from agent.store._sql import chunks, complete_sql, insert_dead_sql, insert_sql, published_sql
from agent.telemetry import get_logger

log = get_logger("agent.store")

TOMBSTONES_KEPT = 70_000  # > 65,535 packet ids, so any id the broker may still redeliver is remembered
PRUNE_EVERY = 100  # ingested rows between prunes, each dropping at most twice as many old tombstones


class RowTransitions:
    """The writer's state of the task table (its thread only): the next row id and outbox sequence number, what
    commits hand off, and when to prune."""

    def __init__(self, db: sqlite3.Connection, dead_letters: DeadLetterTable, next_id: int, next_seq: int) -> None:
        self._db = db
        self._dead_letters = dead_letters
        self._next_id = next_id  # row ids are assigned here, so a group's rows go in with one INSERT
        self._next_seq = next_seq
        self.hand_offs = HandOffs()
        self._since_prune = 0

    def write(self, batch: list[Op]) -> tuple[Committed, int, DeadLetterTotals | None]:
        """Commit a group of writes, trying again until it commits; returns what it made durable, the bytes it
        released, and the kept dead letters' new totals when they changed."""
        next_id, next_seq, version = self._next_id, self._next_seq, self._dead_letters.version
        while True:
            committed = Committed()
            try:
                self._db.execute("BEGIN IMMEDIATE")
                released_bytes, dead_letters = self._apply(batch, committed)
                prune = self._since_prune + committed.ingested >= PRUNE_EVERY
                if prune:
                    self._prune()  # in the group's transaction: no fsync of its own
                self._db.execute("COMMIT")
                break
            except sqlite3.Error as exc:
                # Disk full or I/O error: nothing was acknowledged for this group, so retrying loses nothing;
                # the broker keeps our unacknowledged messages meanwhile.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                self._next_id, self._next_seq, self._dead_letters.version = next_id, next_seq, version
                log.error("store_commit_failed", error=str(exc), retry_in_s=1.0)
                time.sleep(1.0)
        self._since_prune = 0 if prune else self._since_prune + committed.ingested
        return committed, released_bytes, dead_letters

    def _apply(self, batch: list[Op], committed: Committed) -> tuple[int, DeadLetterTotals | None]:
        """Write a group as a few multi-row statements; returns the bytes it released (the rows: in
        ``committed.released``), and the kept dead letters' new totals when they changed.

        One statement per kind rather than one per row: sqlite3 lets go of the GIL for every statement it
        steps, and each time this thread then waits for the event loop to hand the GIL back.
        """
        # Flat parameter lists (11, 15, 4 and 1 values a row), cut into statements by chunks().
        inserts: list[Any] = []
        dead: list[Any] = []
        completes: list[Any] = []
        published: list[int] = []
        kept: list[Any] = []  # dead letters' copies: 9 values a row from ingress …
        copied: list[Any] = []  # … 4 from the dispatcher, whose input the writer copies from the task row
        replayed: list[int] = []
        released_rows = released_bytes = 0
        tasks, outbox, hand_offs = committed.tasks, committed.outbox, self.hand_offs
        for op in batch:
            if op.kind == "stop_hand_off":
                hand_offs.stop(*op.args)
                continue
            if op.kind == "ingest":
                rows, acks, replays = op.args
                for row in rows:
                    row_id = self._next_id
                    self._next_id += 1
                    if row.out_topic is not None:  # a dead letter: straight to the outbox, its copy kept aside
                        assert row.out_payload is not None
                        seq = self._take_seq()
                        dead.extend((row_id, row.task_id, row.topic, None, None, None, None, row.size,
                                     row.received_at, row.mid, row.crc, OUTBOX, row.out_topic, row.out_payload, seq))
                        if hand_offs.outbox:
                            outbox.append(OutboxEntry(row_id, row.out_topic, row.out_payload, seq))
                        copy = row.dead_letter
                        if copy is not None:
                            kept.extend((copy.id, row.task_id, row.topic, copy.reason, copy.detail, row.size,
                                         row.received_at, copy.payload or b"", int(copy.truncated)))
                    else:
                        assert row.kind is not None and row.placement is not None
                        options = row.options or {}
                        inserts.extend((row_id, row.task_id, row.topic, row.kind, row.placement,
                                        row.route_options, row.payload, row.size,
                                        row.received_at, row.mid, row.crc))
                        if hand_offs.tasks:
                            tasks.append(TaskRef(row_id, row.task_id, row.topic, row.kind, row.placement, options,
                                                 row.payload, row.size, row.received_at))
                committed.acks.extend(acks)
                committed.ingested += len(rows)
                replayed.extend(replays)
            elif op.kind == "complete":
                for row_id, copy in op.args[1]:
                    copied.extend((copy.id, copy.reason, copy.detail, row_id))
                for row_id, size, out_topic, out_payload in op.args[0]:
                    seq = self._take_seq()
                    completes.extend((row_id, out_topic, out_payload, seq))
                    # The input leaves the store and the result takes its place in the byte count.
                    released_bytes += size - len(out_payload)
                    if hand_offs.outbox:
                        outbox.append(OutboxEntry(row_id, out_topic, out_payload, seq))
            elif op.kind == "published":
                (pairs,) = op.args
                for row_id, out_size in pairs:
                    published.append(row_id)
                    released_bytes += out_size
                released_rows += len(pairs)
            else:  # pragma: no cover - programming error
                raise StoreError(f"unknown store operation {op.kind}")
        committed.released = released_rows
        db = self._db
        for rows, chunk in chunks(inserts, 11):
            db.execute(insert_sql(rows), chunk)
        for rows, chunk in chunks(dead, 15):
            db.execute(insert_dead_sql(rows), chunk)
        # Before the completes below, which drop the inputs the dispatcher's dead letters keep.
        dead_letters = self._dead_letters.keep(kept, copied, replayed) if kept or copied or replayed else None
        for rows, chunk in chunks(completes, 4):
            db.execute(complete_sql(rows), chunk)
        for rows, chunk in chunks(published, 1):
            db.execute(published_sql(rows), chunk)
        return released_bytes, dead_letters

    def _take_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    def _prune(self) -> None:
        """Drop old tombstones; keep enough to recognise any packet id the broker could still redeliver.

        A bounded number per call, often: one big DELETE after a long backlog held the writer, and with it
        every acknowledgement and result, for hundreds of milliseconds. Run inside a group's transaction every
        ``PRUNE_EVERY`` ingested rows: a prune of 2,000 rows with its own commit took 4 – 13 ms, which the
        commits behind it waited for; 200 rows take a tenth of that and share the group's fsync.
        """
        try:
            self._db.execute(
                "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE state=2 AND id < ? ORDER BY id LIMIT ?)",
                (self._next_id - TOMBSTONES_KEPT, 2 * PRUNE_EVERY),
            )
        except sqlite3.Error as exc:
            log.warning("store_prune_failed", error=str(exc))


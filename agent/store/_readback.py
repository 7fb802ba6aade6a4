"""Read-back: a reader (the dispatcher, the publisher) whose in-memory queue overflowed reads the store back in
order, then takes the commits' hand-offs again. Both sides of that switch are here: :class:`ReadBack` for the
reader, :class:`HandOffs` and the page reads for the writer."""

from __future__ import annotations

import operator
import sqlite3
from typing import Any

import orjson

from agent.store._rows import OutboxEntry, TaskRef

INLINE_READ_BYTES = 4096  # read-backs carry inputs up to this size; larger ones are read when they run

# Pages (see read_page): the rows as one JSON array, each with its payload's length, and their payloads
# concatenated in the same order (JSON cannot hold arbitrary bytes; hex doubled them and cost a conversion each
# way). SQLite writes a REAL with 15 significant digits, so received_at comes back to about 10 µs, finer than
# the timings need.
PENDING_PAGE = (
    "SELECT json_group_array(json_array(id, task_id, topic, kind, placement, json(coalesce(options, 'null')), size, "
    "received_at, CASE WHEN size <= ?1 THEN length(CAST(payload AS BLOB)) END)), "
    "CAST(group_concat(CASE WHEN size <= ?1 THEN payload END, '') AS BLOB) "
    "FROM (SELECT * FROM tasks WHERE id > ?2 AND state=0 ORDER BY id LIMIT ?3)"
)
OUTBOX_PAGE = (
    "SELECT json_group_array(json_array(id, out_topic, length(CAST(out_payload AS BLOB)), out_seq)), "
    "CAST(group_concat(out_payload, '') AS BLOB) "
    "FROM (SELECT id, out_topic, out_payload, out_seq FROM tasks WHERE state=1 AND out_seq > ? ORDER BY out_seq "
    "LIMIT ?)"
)



def read_pending(db: sqlite3.Connection, after_id: int, limit: int) -> list[TaskRef]:
    """Up to ``limit`` pending tasks after row ``after_id``, in row order."""
    return [TaskRef(r[0], r[1], r[2], r[3], r[4], {**r[5], "topic": r[2]} if r[5] else {"topic": r[2]}, r[8], r[6],
                    r[7])
            for r in read_page(db, PENDING_PAGE, (INLINE_READ_BYTES, after_id, limit), 8)]


def read_outbox(db: sqlite3.Connection, after_seq: int, limit: int) -> list[OutboxEntry]:
    """Up to ``limit`` outbox entries after ``after_seq``, in commit order."""
    return [OutboxEntry(r[0], r[1], r[2], r[3]) for r in read_page(db, OUTBOX_PAGE, (after_seq, limit), 2, order=3)]


def read_page(db: sqlite3.Connection, sql: str, params: tuple[Any, ...], blob: int, order: int = 0) -> list[list[Any]]:
    """A page of rows built by SQLite in one step of the statement, not one per row (each step lets go of
    the GIL, and while the event loop is busy each hand-back waits for its switch interval). Column
    ``blob`` holds a payload's length, and is replaced by the payload cut from the concatenation: both
    aggregates are fed the rows in one pass, so in the same order. Sorted afterwards, since SQL does not
    promise which order that is."""
    page, payloads = db.execute(sql, params).fetchone()
    rows: list[list[Any]] = orjson.loads(page)
    at = 0
    for row in rows:
        size = row[blob]
        if size is not None:
            row[blob] = payloads[at:at + size]
            at += size
    if at != (len(payloads) if payloads is not None else 0):
        raise sqlite3.DatabaseError(f"read-back payloads do not add up ({at} of {len(payloads or b'')} bytes)")
    rows.sort(key=operator.itemgetter(order))
    return rows


class HandOffs:
    """Whether commits hand their new tasks / outbox entries to the reader at all (writer thread only).

    Off while the reader has spilled and reads the store back anyway; on again at the read that catches up,
    which in the writer's order comes before any commit it has not seen.
    """

    __slots__ = ("_caught_up", "outbox", "tasks")

    def __init__(self) -> None:
        self.tasks = True
        self.outbox = True
        # The commit count at each one's last catching-up read: a stop older than that read is stale.
        self._caught_up = {"tasks": -1, "outbox": -1}

    def stop(self, what: str, commit: int) -> None:
        """The reader of ``what`` spilled at the hand-off of commit number ``commit``."""
        if commit > self._caught_up[what]:
            if what == "tasks":
                self.tasks = False
            else:
                self.outbox = False

    def caught_up(self, what: str, commit: int) -> None:
        """A read of ``what`` came back short after commit number ``commit``: the reader has it all."""
        if what == "tasks":
            self.tasks = True
        else:
            self.outbox = True
        self._caught_up[what] = commit


class ReadBack:
    """The bookkeeping of an in-memory queue whose overflow stays in the store and is read back in order.

    Items reach the queue as hand-offs after each commit, or, while ``spilled``, only by reading the store
    from ``cursor`` on. The switch back is safe because reads are barriers in the writer's order (see
    ``GroupWriter._run``): every commit handed off before a read's reply is in that read, every later one arrives
    after it. A reply shorter than asked for therefore means the store holds nothing newer, and hand-offs can
    be taken again. Starts spilled: at start the store is the truth.
    """

    __slots__ = ("cursor", "loading", "spilled")

    def __init__(self) -> None:
        self.spilled = True
        self.loading = False
        self.cursor = 0  # id (tasks) or seq (outbox) of the newest item held or read

    @property
    def settled(self) -> bool:
        """Caught up with the store: not spilled, and no read under way."""
        return not self.spilled and not self.loading

    def hand_off(self, room: bool, last: int) -> bool:
        """A commit's items arrive: True when the caller keeps them (``last`` is their newest key)."""
        if self.spilled or not room:
            self.spilled = True  # the store has them; a later read picks them up in order
            return False
        self.cursor = last
        return True

    def start_read(self) -> bool:
        """True when the caller should issue a read from ``cursor`` (none is under way)."""
        if self.loading:
            return False
        self.loading = True
        return True

    def read(self, count: int, limit: int, last: int | None) -> None:
        """A read's reply of ``count`` items (``last``: the newest key among them) has been taken in."""
        self.loading = False
        if last is not None:
            self.cursor = last
        if count < limit:
            self.spilled = False


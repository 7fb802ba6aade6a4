"""The multi-row statements a group commit writes with (agent/store/_transitions.py), and how it cuts its rows
into them."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from agent.store._schema import PENDING

CHUNKS = (8, 64, 512)  # rows per statement: the three shapes of each statement


def chunks(values: list[Any], width: int) -> Iterable[tuple[int, list[Any]]]:
    """A flat parameter list of ``width`` values a row, as statements of CHUNKS rows, the last one padded with
    NULL rows (which the statements skip).

    Few statements per group: sqlite3 lets go of the GIL for every one, and while the event loop is busy each
    hand-back waits up to the interpreter's switch interval. Few shapes: sqlite3 keeps every statement it
    prepared in its cache.
    """
    total = len(values) // width
    big = CHUNKS[-1]
    start = 0
    while total - start >= big:
        yield big, values[start * width:(start + big) * width]
        start += big
    rest = total - start
    if rest:
        size = next(size for size in CHUNKS if size >= rest)
        yield size, values[start * width:] + [None] * ((size - rest) * width)


# Only "?" placeholders and the state constants are formatted into these statements (hence the S608 waivers).
def rows_of(rows: int, columns: int) -> str:
    """The VALUES list of a multi-row statement: ``rows`` groups of ``columns`` placeholders."""
    return ",".join(["(" + ",".join("?" * columns) + ")"] * rows)


@functools.cache
def insert_sql(rows: int) -> str:
    # Pending rows: the state and the empty result columns are written here, not bound (a bound value costs
    # the writer the GIL; this runs for every message).
    values = rows_of(rows, 11)
    return ("INSERT INTO tasks (id, task_id, topic, kind, placement, options, payload, size, received_at, "  # noqa: S608
            f"mid, crc, state) SELECT *, {PENDING} FROM (VALUES {values}) WHERE column1 IS NOT NULL")


@functools.cache
def insert_dead_sql(rows: int) -> str:
    values = rows_of(rows, 15)
    return ("INSERT INTO tasks (id, task_id, topic, kind, placement, options, payload, size, received_at, "  # noqa: S608
            f"mid, crc, state, out_topic, out_payload, out_seq) SELECT * FROM (VALUES {values}) "
            "WHERE column1 IS NOT NULL")


@functools.cache
def keep_dead_sql(rows: int) -> str:
    # OR IGNORE: an id already kept (only a hand-edited store has one) must not stop every commit after it.
    values = rows_of(rows, 9)
    return ("INSERT OR IGNORE INTO dead_letters (id, task_id, topic, reason, detail, size, received_at, "  # noqa: S608
            f"payload, truncated, dead_at) SELECT *, ?1 FROM (VALUES {values}) WHERE column1 IS NOT NULL "
            "RETURNING length(payload)")


@functools.cache
def copy_dead_sql(rows: int) -> str:
    # The task's input, still in its pending row (the complete in the same transaction drops it afterwards).
    values = rows_of(rows, 4)
    return ("INSERT OR IGNORE INTO dead_letters (id, task_id, topic, reason, detail, size, received_at, "  # noqa: S608
            "dead_at, payload, truncated) SELECT v.column1, t.task_id, t.topic, v.column2, v.column3, t.size, "
            f"t.received_at, ?1, t.payload, 0 FROM (VALUES {values}) AS v JOIN tasks AS t ON t.id = v.column4 "
            "WHERE t.state = 0 AND t.payload IS NOT NULL RETURNING length(payload)")


@functools.cache
def forget_dead_sql(rows: int) -> str:
    return f"DELETE FROM dead_letters WHERE id IN ({','.join('?' * rows)})"  # noqa: S608


@functools.cache
def complete_sql(rows: int) -> str:
    values = rows_of(rows, 4)
    return ("UPDATE tasks SET state=1, payload=NULL, out_topic=v.column2, out_payload=v.column3, "  # noqa: S608
            f"out_seq=v.column4 FROM (VALUES {values}) AS v WHERE tasks.id=v.column1 AND tasks.state=0")


@functools.cache
def published_sql(rows: int) -> str:
    # state 0 too: a result published without the outbox (egress.Publisher.offer) turns its pending row into
    # the tombstone directly.
    return (f"UPDATE tasks SET state=2, payload=NULL, out_payload=NULL WHERE state<2 "  # noqa: S608
            f"AND id IN ({','.join('?' * rows)})")


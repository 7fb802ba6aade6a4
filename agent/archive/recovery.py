"""At start, before the store's writer runs: inputs the store committed whose journal write a crash cut short.

The store commits first and the archive appends in the same post-commit hook, so a crash between the two
leaves an archive route's input pending in the store and absent from the archive. Such inputs are appended
again, unless recovery found them in a journal or a recent segment (task ids are unique).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from agent.archive.catalog import Catalog
from agent.archive.intake import Intake
from agent.archive.segment import Record, file_chunks, read_segment
from agent.telemetry import get_logger

log = get_logger(__name__)


class _Route(Protocol):
    @property
    def topic(self) -> str: ...


def pending_inputs(store_path: Path) -> list[Record]:
    """The store's pending inputs, oldest first, read on a read-only connection of our own."""
    if not store_path.exists():
        return []
    db = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT received_at, topic, payload, task_id FROM tasks WHERE state = 0 "
                          "AND payload IS NOT NULL ORDER BY id").fetchall()
    except sqlite3.OperationalError:  # a store not created yet
        return []
    finally:
        db.close()
    return [Record(float(at), topic, bytes(payload), task_id) for at, topic, payload, task_id in rows]


def reconcile(store_path: Path, intake: Intake, catalog: Catalog, match: Callable[[str], _Route | None],
              archived: frozenset[str]) -> int:
    """Append the pending inputs of archive routes that the archive lacks; returns how many."""
    missing: dict[str, list[Record]] = {}
    for record in pending_inputs(store_path):
        route = match(record.topic)
        if route is not None and route.topic in archived and record.task_id not in intake.recovered_ids:
            missing.setdefault(route.topic, []).append(record)
    if not missing:
        return 0
    appended = 0
    for name, records in missing.items():
        # A pending input older than the last seal may be in a sealed segment still on the gateway.
        oldest = min(r.received_at for r in records)
        seen: set[str] = set()
        for entry in catalog.entries(route=name):
            path = intake.directory(name) / f"{entry.segment_id}.seg"
            if entry.last_at >= oldest and entry.place != "cloud" and path.exists():
                seen.update(r.task_id for r in read_segment(file_chunks(path)))
        fresh = [r for r in records if r.task_id not in seen]
        if fresh:
            intake.append({name: fresh})
            appended += len(fresh)
    if appended:
        log.warning("archive_inputs_recovered", inputs=appended,
                    detail="committed before a crash, not yet in the archive: appended now")
    return appended

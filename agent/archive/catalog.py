"""The archive's catalog: where each sealed segment is, what was decided for it, and the queries that read it.

SQLite in WAL mode in the archive's directory, shared by the agent (its manager thread seals, places and
deletes) and `edge-agent archive query` (a process of its own, which records its reads so the agent learns the
retrieval rate). A segment's place moves ``gateway`` → ``uploading`` → ``cloud`` in committed steps, so a crash
at any point leaves a state the manager resumes from (agent/archive/manager.py).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from agent.archive.segment import SegmentInfo

Place = Literal["gateway", "uploading", "cloud"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS segments (
    route      TEXT    NOT NULL,
    segment_id TEXT    NOT NULL,
    count      INTEGER NOT NULL,
    first_at   REAL    NOT NULL,
    last_at    REAL    NOT NULL,
    raw_bytes  INTEGER NOT NULL,
    size       INTEGER NOT NULL,
    sha256     TEXT    NOT NULL,
    sealed_at  REAL    NOT NULL,
    place      TEXT    NOT NULL,
    object_key TEXT,
    decision   TEXT,
    PRIMARY KEY (route, segment_id)
);
CREATE INDEX IF NOT EXISTS segments_time ON segments (first_at);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS reads (
    route    TEXT NOT NULL,
    at       REAL NOT NULL,
    bytes    INTEGER NOT NULL,
    fraction REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Entry:
    """A catalog row: a sealed segment and where it is."""

    route: str
    segment_id: str
    count: int
    first_at: float
    last_at: float
    raw_bytes: int
    size: int
    sha256: str
    sealed_at: float
    place: Place
    object_key: str | None
    decision: dict[str, Any] | None


_COLUMNS = ("route, segment_id, count, first_at, last_at, raw_bytes, size, sha256, sealed_at, place, object_key, "
            "decision")
# The column list is a constant: no input reaches these strings.
_SELECT = f"SELECT {_COLUMNS} FROM segments"  # noqa: S608


def _entry(row: Sequence[Any]) -> Entry:
    values = list(row)
    values[11] = json.loads(values[11]) if values[11] else None
    return Entry(*values)


class Catalog:
    """Thread-safe: each thread gets its own connection (SQLite connections are not shared across threads)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.executescript(_SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=True)
            db.execute("PRAGMA busy_timeout = 30000")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")  # a place change must survive a power cut
            self._local.db = db
        return db

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    def add(self, info: SegmentInfo, sealed_at: float) -> None:
        self._db().execute(
            "INSERT OR IGNORE INTO segments VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'gateway', NULL, NULL)",
            (info.route, info.segment_id, info.count, info.first_at, info.last_at, info.raw_bytes, info.size,
             info.sha256, sealed_at))

    def known(self, route: str) -> set[str]:
        return {r[0] for r in self._db().execute("SELECT segment_id FROM segments WHERE route = ?", (route,))}

    def get(self, route: str, segment_id: str) -> Entry | None:
        row = self._db().execute(_SELECT + " WHERE route = ? AND segment_id = ?",
                                 (route, segment_id)).fetchone()
        return _entry(row) if row else None

    def entries(self, route: str | None = None, place: Place | None = None) -> list[Entry]:
        sql, args = _SELECT + " WHERE 1", []
        if route is not None:
            sql += " AND route = ?"
            args.append(route)
        if place is not None:
            sql += " AND place = ?"
            args.append(place)
        return [_entry(r) for r in self._db().execute(sql + " ORDER BY first_at, segment_id", args)]

    def overlapping(self, start: float, end: float) -> list[Entry]:
        return [_entry(r) for r in self._db().execute(
            _SELECT + " WHERE last_at >= ? AND first_at <= ? ORDER BY first_at, segment_id",
            (start, end))]

    def set_place(self, route: str, segment_id: str, place: Place, object_key: str | None = None) -> None:
        self._db().execute("UPDATE segments SET place = ?, object_key = coalesce(?, object_key) "
                           "WHERE route = ? AND segment_id = ?", (place, object_key, route, segment_id))

    def set_decision(self, route: str, segment_id: str, decision: dict[str, Any]) -> None:
        self._db().execute("UPDATE segments SET decision = ? WHERE route = ? AND segment_id = ?",
                           (json.dumps(decision), route, segment_id))

    def forget(self, route: str, segment_id: str) -> None:
        self._db().execute("DELETE FROM segments WHERE route = ? AND segment_id = ?", (route, segment_id))

    def disk_bytes(self) -> int:
        """What the sealed segments on the gateway occupy (``uploading`` ones are still on disk)."""
        row = self._db().execute("SELECT coalesce(sum(size), 0) FROM segments WHERE place != 'cloud'").fetchone()
        return int(row[0])

    def get_meta(self, key: str) -> str | None:
        row = self._db().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self._db().execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def record_read(self, route: str, at: float, read_bytes: int, fraction: float) -> None:
        self._db().execute("INSERT INTO reads VALUES (?, ?, ?, ?)", (route, at, read_bytes, fraction))

    def reads_since(self, rowid: int) -> Iterator[tuple[int, str, float, int, float]]:
        """Reads recorded after ``rowid`` (the manager feeds them to each route's estimator once)."""
        yield from self._db().execute("SELECT rowid, route, at, bytes, fraction FROM reads WHERE rowid > ? "
                                      "ORDER BY rowid", (rowid,))

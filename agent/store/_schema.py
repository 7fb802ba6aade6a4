"""The store's tables, the row states, and the migrations that bring an older store to this version in place."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from agent.errors import ConfigError
from agent.telemetry import get_logger

log = get_logger("agent.store")

PENDING, OUTBOX, PUBLISHED = 0, 1, 2  # a row's ``state``: see agent/store/__init__.py
SCHEMA_VERSION = 2
DEAD_LETTER_ID_KEY = "dead_letter_id"  # meta: the highest dead-letter id given out, never to be given again

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id          INTEGER PRIMARY KEY,
    task_id     TEXT    NOT NULL,
    topic       TEXT    NOT NULL,
    kind        TEXT,
    placement   TEXT,
    options     TEXT,
    payload     BLOB,
    size        INTEGER NOT NULL,
    received_at REAL    NOT NULL,
    mid         INTEGER,
    crc         INTEGER,
    state       INTEGER NOT NULL,
    out_topic   TEXT,
    out_payload BLOB,
    out_seq     INTEGER
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- State a task keeps between messages (sensor.stats windows), saved now and then and at a clean stop.
CREATE TABLE IF NOT EXISTS task_state (
    kind     TEXT NOT NULL,
    key      TEXT NOT NULL,
    state    BLOB NOT NULL,
    saved_at REAL NOT NULL,
    PRIMARY KEY (kind, key)
) WITHOUT ROWID;
-- The publisher reads a backlog of results back in commit order.
CREATE INDEX IF NOT EXISTS outbox_order ON tasks (out_seq) WHERE state = 1;
"""

# Each step brings a store of the version before it to its own version, in place and in one transaction with
# the new version number: statements, not a script (executescript would commit half-way).
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: (
        # Dead letters' payloads for `edge-agent dead-letters` (agent/deadletter_admin.py). ``payload`` is the
        # whole message, or its first bytes when ``truncated``; ``replay`` is set by the command and cleared,
        # with the row, by the commit that re-admits it as a new task.
        """CREATE TABLE IF NOT EXISTS dead_letters (
            id          INTEGER PRIMARY KEY,
            task_id     TEXT    NOT NULL,
            topic       TEXT    NOT NULL,
            reason      TEXT    NOT NULL,
            detail      TEXT    NOT NULL,
            size        INTEGER NOT NULL,
            received_at REAL    NOT NULL,
            dead_at     REAL    NOT NULL,
            payload     BLOB    NOT NULL,
            truncated   INTEGER NOT NULL DEFAULT 0,
            replay      INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX IF NOT EXISTS dead_letters_replay ON dead_letters (received_at, id) WHERE replay = 1",
    ),
}


def open_store(state_dir: Path, path: Path, synchronous: str) -> sqlite3.Connection:
    """The writer's connection to the store at ``path``, made or upgraded to :data:`SCHEMA_VERSION`."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.execute("PRAGMA busy_timeout=5000")
        # 512 KiB of page cache, not SQLite's 2 MiB: the rows written are appended and read back in order, so the
        # OS page cache serves them as well; measured 1 MB less peak RSS, the same throughput.
        db.execute("PRAGMA cache_size=-512")
        db.executescript(_SCHEMA)
        _migrate(db, path)
    except (OSError, sqlite3.Error) as exc:
        raise ConfigError("EDGE_AGENT_STATE_DIR", f"cannot open the store at {path}: {exc}") from exc
    return db


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
    # No row: a new store, which _SCHEMA has just made at version 1.
    version = 1 if row is None else int(row[0])
    if version > SCHEMA_VERSION:
        raise ConfigError("EDGE_AGENT_STATE_DIR", f"the store {path} has schema {version}, newer than this "
                          f"version of the agent knows ({SCHEMA_VERSION}): run the newer version, or move the "
                          "store aside")
    if row is not None and version == SCHEMA_VERSION:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        for step in range(version + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[step]:
                db.execute(statement)
        db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    if row is not None:
        log.info("store_schema_upgraded", store=str(path), old=version, new=SCHEMA_VERSION)


def ensure_writable(state_dir: Path) -> None:
    """Fail early, naming the variable, when the state directory cannot hold the store."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        probe = state_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError("EDGE_AGENT_STATE_DIR", f"{state_dir} is not writable: {exc.strerror}") from exc

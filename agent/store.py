"""The durable inbox and outbox: one SQLite table in WAL mode, written by one thread that commits in groups.

A row is one task through its life::

    state 0 PENDING    input committed; the inbound QoS 1 message is acknowledged only after this commit
    state 1 OUTBOX     result (or dead letter) committed, input dropped; waiting for the broker's PUBACK
    state 2 PUBLISHED  tombstone: keeps the inbound (mid, topic, crc) → task_id so a redelivered message that
                       was already committed keeps its task_id instead of becoming a second task

Dead letters also leave a copy of their payload in the ``dead_letters`` table (agent/deadletters.py), written
in the same group commit as their dead-letter message and bounded on its own.

A light task's result usually skips state 1: published straight away, its row goes from 0 to 2 when the broker
acknowledges it (see ``egress.Publisher.offer``).

Every write goes through :meth:`Store.submit` to the writer thread, which drains whatever has queued up,
applies it in one transaction and only then runs the post-commit actions (acknowledgements, hand-offs).
Under load the groups grow by themselves; when idle a single message commits alone, so latency stays low.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import operator
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from agent.deadletters import DeadLetter, Replay
from agent.errors import ConfigError, StoreError
from agent.telemetry import get_logger

log = get_logger(__name__)

PENDING, OUTBOX, PUBLISHED = 0, 1, 2
SCHEMA_VERSION = 2
MAX_GROUP = 4000  # operations per transaction: bounds the time acknowledgements wait behind one commit
# A group of this many new rows is committed without waiting out the commit interval: the broker may allow no
# more unacknowledged messages than this (Mosquitto's max_inflight_messages defaults to 20), and then waiting
# for more would only stall it.
GATHER_ROWS = 16
INLINE_READ_BYTES = 4096  # read-backs carry inputs up to this size; larger ones are read when they run
TOMBSTONES_KEPT = 70_000  # > 65,535 packet ids, so any id the broker may still redeliver is remembered
PRUNE_EVERY = 100  # ingested rows between prunes, each dropping at most twice as many old tombstones
REPLAY_READ_BYTES = 16 * 1024 * 1024  # payloads one read of requested replays hands over at most
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


class NewTask(NamedTuple):
    """A message accepted by ingress, not yet committed. ``out_*`` set means it is a dead letter already."""

    task_id: str
    topic: str
    kind: str | None
    placement: str | None
    options: dict[str, Any] | None
    payload: bytes | None
    size: int
    received_at: float
    mid: int | None
    crc: int | None
    out_topic: str | None = None
    out_payload: bytes | None = None
    # The route's options as JSON, without the topic (the row has it), built once per route: what the row
    # keeps of ``options``, so the writer does not serialise a dict for every message.
    route_options: str | None = None
    dead_letter: DeadLetter | None = None  # a dead letter's copy to keep


class TaskRef(NamedTuple):
    """A committed pending task as the dispatcher sees it; ``payload`` may be None when it was spilled."""

    id: int
    task_id: str
    topic: str
    kind: str
    placement: str
    options: dict[str, Any]
    payload: bytes | None
    size: int
    received_at: float


class OutboxEntry(NamedTuple):
    id: int
    topic: str
    payload: bytes
    seq: int


@dataclass
class Committed:
    """What one group commit made durable, handed to the post-commit hook."""

    acks: list[tuple[int, int]] = field(default_factory=list)  # (mid, qos)
    tasks: list[TaskRef] = field(default_factory=list)
    outbox: list[OutboxEntry] = field(default_factory=list)
    released: int = 0
    ingested: int = 0  # rows inserted from ingress
    number: int = 0  # the commit's sequence number (Store.commits after it)


CommitHook = Callable[[Committed], None]

# A finished task's output: (row id, input size, result or dead-letter topic, its payload).
Finished = tuple[int, int, str, bytes]


@dataclass(slots=True)
class DeadLetterTotals:
    """The kept dead letters as the writer counts them; read by the metrics thread."""

    kept: int = 0
    bytes: int = 0
    dropped: int = 0  # dropped by the bound since the start
    top: int = 0  # the highest id committed (also kept in meta, for when its copy is gone)


_BARRIERS = frozenset({"load_pending", "load_outbox", "load_replays", "call"})

# Read-backs (see Store._read_page): the rows as one JSON array, each with its payload's length, and their
# payloads concatenated in the same order (JSON cannot hold arbitrary bytes; hex doubled them and cost a
# conversion each way). SQLite writes a REAL with 15 significant digits, so received_at comes back to about
# 10 µs, finer than the timings need.
_PENDING_PAGE = (
    "SELECT json_group_array(json_array(id, task_id, topic, kind, placement, json(coalesce(options, 'null')), size, "
    "received_at, CASE WHEN size <= ?1 THEN length(CAST(payload AS BLOB)) END)), "
    "CAST(group_concat(CASE WHEN size <= ?1 THEN payload END, '') AS BLOB) "
    "FROM (SELECT * FROM tasks WHERE id > ?2 AND state=0 ORDER BY id LIMIT ?3)"
)
_OUTBOX_PAGE = (
    "SELECT json_group_array(json_array(id, out_topic, length(CAST(out_payload AS BLOB)), out_seq)), "
    "CAST(group_concat(out_payload, '') AS BLOB) "
    "FROM (SELECT id, out_topic, out_payload, out_seq FROM tasks WHERE state=1 AND out_seq > ? ORDER BY out_seq "
    "LIMIT ?)"
)


class _Op(NamedTuple):
    kind: str
    args: tuple[Any, ...]


class Store:
    """Durable store with a single writer thread. Public methods are safe to call from any thread."""

    def __init__(self, state_dir: Path, *, max_tasks: int, max_bytes: int, synchronous: str = "full",
                 commit_interval_s: float = 0.0, dead_letter_max_count: int = 10_000,
                 dead_letter_max_bytes: int = 64 * 1024 * 1024) -> None:
        self.path = state_dir / "edge-agent.db"
        self.max_tasks = max_tasks
        self.max_bytes = max_bytes
        self.dead_letter_max_count = dead_letter_max_count
        self.dead_letter_max_bytes = dead_letter_max_bytes
        self._synchronous = synchronous.upper()
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        # Group commit with a floor on the spacing of commits (see _gather). _gathered is written by the
        # event loop (ingress) only while _gathering is set, and by the writer only while it is not.
        self._commit_interval = commit_interval_s
        self._last_start = 0.0
        self._gathering = False
        self._gathered = 0
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._reader: sqlite3.Connection | None = None
        self._hook: CommitHook = lambda committed: None
        # Single-writer counters (admitted: the event loop, in ingress; released: the writer thread): no lock
        # needed, and outstanding = admitted - released never races.
        self.admitted_rows = 0
        self.admitted_bytes = 0
        self.released_rows = 0
        self.released_bytes = 0
        self._next_seq = 0
        self._next_id = 0  # row ids are assigned here, so a group's rows go in with one INSERT
        # Whether commits hand their new tasks / outbox rows to the reader at all (writer thread only). Off
        # while the dispatcher or publisher has spilled and reads the store back anyway; on again at the read
        # that catches up, which in the writer's order comes before any commit it has not seen.
        self._hand_tasks = True
        self._hand_outbox = True
        # The commit count at each one's last catching-up read: a stop older than that read is stale.
        self._caught_up = {"tasks": -1, "outbox": -1}
        self._since_prune = 0
        self.commits = 0
        self.last_commit_s = 0.0
        self.busy_since: float | None = None  # monotonic start of the group being written, for health checks
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={self._synchronous}")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
            self._check_schema()
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError("EDGE_AGENT_STATE_DIR", f"cannot open the store at {self.path}: {exc}") from exc
        rows, size, seq, top = self._db.execute(
            "SELECT count(*), coalesce(sum(CASE state WHEN 0 THEN size ELSE length(out_payload) END), 0), "
            "(SELECT coalesce(max(out_seq), 0) FROM tasks), (SELECT coalesce(max(id), 0) FROM tasks) "
            "FROM tasks WHERE state < 2"
        ).fetchone()
        self.admitted_rows, self.admitted_bytes = int(rows), int(size)
        self._next_seq, self._next_id = int(seq) + 1, int(top) + 1
        # Replaced as a whole after each commit that changed it, so the metrics thread reads one consistent copy.
        self.dead_letters = self._count_dead_letters(DeadLetterTotals())
        given = int(self.get_meta(DEAD_LETTER_ID_KEY) or 0)
        self.dead_letters.top = max(self.dead_letters.top, given)
        # Ids are given out on the event loop (the dead-letter message carries one before its commit). One that
        # was committed is never given again, even after its copy was dropped, purged or replayed; one lost in
        # a crash before its commit was never published either.
        self._dead_ids = itertools.count(self.dead_letters.top + 1)
        self._data_version = self._db.execute("PRAGMA data_version").fetchone()[0]
        if self._over_dead_letter_bound(self.dead_letters):  # the bound may have been lowered since
            self._db.execute("BEGIN IMMEDIATE")
            totals = dataclasses.replace(self.dead_letters)
            self._bound_dead_letters(totals)
            self._db.execute("COMMIT")
            self.dead_letters = totals

    def _check_schema(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        # No row: a new store, which _SCHEMA has just made at version 1.
        version = 1 if row is None else int(row[0])
        if version > SCHEMA_VERSION:
            raise ConfigError("EDGE_AGENT_STATE_DIR", f"the store {self.path} has schema {version}, newer than this "
                              f"version of the agent knows ({SCHEMA_VERSION}): run the newer version, or move the "
                              "store aside")
        if row is not None and version == SCHEMA_VERSION:
            return
        db = self._db
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
            log.info("store_schema_upgraded", store=str(self.path), old=version, new=SCHEMA_VERSION)

    # ------------------------------------------------------------------ reads at start-up (before threads)

    def counts(self) -> dict[str, int]:
        return {
            name: int(self._db.execute("SELECT count(*) FROM tasks WHERE state=?", (state,)).fetchone()[0])
            for name, state in (("pending", PENDING), ("outbox", OUTBOX), ("published", PUBLISHED))
        }

    def recent_deliveries(self, limit: int) -> Iterator[tuple[int, str, int]]:
        """(mid, topic, crc) of the newest committed QoS 1 messages, newest first; to be consumed at start-up,
        before :meth:`start`. Row by row: the 65,535 rows as one list were 10 MB of peak memory for a moment,
        which the process then kept."""
        for mid, topic, crc in self._db.execute(
            "SELECT mid, topic, crc FROM tasks WHERE mid IS NOT NULL ORDER BY id DESC LIMIT ?", (limit,)
        ):
            yield int(mid), str(topic), int(crc)

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def load_task_state(self, kind: str, limit: int) -> list[tuple[str, bytes]]:
        """The newest ``limit`` entries :meth:`save_task_state` saved for ``kind``, oldest first."""
        rows = self._db.execute(
            "SELECT key, state FROM (SELECT key, state, saved_at FROM task_state WHERE kind=? "
            "ORDER BY saved_at DESC LIMIT ?) ORDER BY saved_at", (kind, limit)
        ).fetchall()
        return [(str(key), bytes(state)) for key, state in rows]

    def save_task_state(self, kind: str, entries: Sequence[tuple[str, bytes]], keep: int) -> None:
        """Save ``(key, state)`` entries of ``kind`` on the writer thread, in one transaction of their own, and
        drop all but the newest ``keep`` of that kind. Entries are saved in the order given (oldest first)."""
        if not entries:
            return
        saved_at = time.time()
        rows = [(kind, key, state, saved_at + i * 1e-6) for i, (key, state) in enumerate(entries)]

        def save() -> None:
            # Best effort, unlike the tasks: a failure (disk full) is logged and costs the history saved since
            # the last save, not a retry that would hold up the commits queued behind it.
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                db.executemany("INSERT OR REPLACE INTO task_state VALUES (?, ?, ?, ?)", rows)
                db.execute(
                    "DELETE FROM task_state WHERE kind=? AND key NOT IN "
                    "(SELECT key FROM task_state WHERE kind=? ORDER BY saved_at DESC LIMIT ?)", (kind, kind, keep)
                )
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                log.warning("task_state_save_failed", kind=kind, entries=len(rows), error=str(exc))

        self.call(save)

    def load_payload(self, row_id: int) -> bytes | None:
        """Read a spilled task's input from the event-loop thread (WAL readers do not block the writer)."""
        if self._reader is None:
            self._reader = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        row = self._reader.execute("SELECT payload FROM tasks WHERE id=?", (row_id,)).fetchone()
        return None if row is None else row[0]

    # ------------------------------------------------------------------ dead letters

    def new_dead_letter_id(self) -> int:
        """The id of a new dead letter (event loop): its message names it before the commit that keeps it."""
        return next(self._dead_ids)

    def _count_dead_letters(self, totals: DeadLetterTotals) -> DeadLetterTotals:
        kept, size, top = self._db.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0), coalesce(max(id), 0) FROM dead_letters").fetchone()
        totals.kept, totals.bytes, totals.top = int(kept), int(size), max(totals.top, int(top))
        return totals

    def _over_dead_letter_bound(self, totals: DeadLetterTotals) -> bool:
        return totals.kept > self.dead_letter_max_count or totals.bytes > self.dead_letter_max_bytes

    def _bound_dead_letters(self, totals: DeadLetterTotals) -> None:
        """Drop the oldest kept dead letters until the bound holds (writer, in its transaction). Those waiting
        for a replay are spared: they leave the table at the replay's commit anyway."""
        if not self._over_dead_letter_bound(totals):
            return
        cut = dropped = freed = 0
        for row_id, size in self._db.execute(
                "SELECT id, length(payload) FROM dead_letters WHERE replay=0 ORDER BY id"):
            cut, dropped, freed = row_id, dropped + 1, freed + size
            if (totals.kept - dropped <= self.dead_letter_max_count
                    and totals.bytes - freed <= self.dead_letter_max_bytes):
                break
        if dropped:
            self._db.execute("DELETE FROM dead_letters WHERE replay=0 AND id<=?", (cut,))
            totals.kept -= dropped
            totals.bytes -= freed
            totals.dropped += dropped

    def _refresh_dead_letters(self, totals: DeadLetterTotals) -> None:
        """Count again when another connection (``edge-agent dead-letters``) changed the table since."""
        version = self._db.execute("PRAGMA data_version").fetchone()[0]
        if version != self._data_version:
            self._data_version = version
            self._count_dead_letters(totals)

    def load_replays(self, limit: int, reply: Callable[[list[Replay]], None]) -> None:
        """The oldest dead letters waiting for a replay, in the order they were received: a read in the writer's
        order, so a replay the loop has handed back (:meth:`submit`'s ``replayed``) is never read again."""
        self._queue.put(_Op("load_replays", (limit, reply)))
        self._wake.set()

    # ------------------------------------------------------------------ state

    @property
    def outstanding_rows(self) -> int:
        return self.admitted_rows - self.released_rows

    @property
    def outstanding_bytes(self) -> int:
        return self.admitted_bytes - self.released_bytes

    def has_room(self, size: int) -> bool:
        # The properties above spelt out: this runs for every inbound message.
        return (self.admitted_rows - self.released_rows < self.max_tasks
                and self.admitted_bytes - self.released_bytes + size <= self.max_bytes)

    def below_resume_mark(self) -> bool:
        # Resume at half the bound: every resume costs a reconnect (for the broker to redeliver what we held
        # back), so the store drains a good part first instead of flapping between full and not full.
        return self.outstanding_rows < self.max_tasks * 0.5 and self.outstanding_bytes < self.max_bytes * 0.5

    # ------------------------------------------------------------------ writer thread

    def start(self, hook: CommitHook) -> None:
        self._hook = hook
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def healthy(self, stuck_after_s: float = 60.0) -> bool:
        """The writer runs and no commit has been hanging (a dying SD card blocks in fsync, not in an error)."""
        busy = self.busy_since
        return self.alive() and (busy is None or time.monotonic() - busy < stuck_after_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Commit what is queued, then close."""
        if self._thread is not None:
            self._queue.put(None)
            self._wake.set()
            self._thread.join(timeout_s)
            self._thread = None
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.warning("store_checkpoint_failed", error=str(exc))
        self._db.close()
        if self._reader is not None:
            self._reader.close()

    def admit(self, row: NewTask) -> None:
        """Count a row in as soon as ingress takes it, so the bound holds for rows not yet handed over."""
        self.admitted_rows += 1
        self.admitted_bytes += stored_size(row)

    def submit(self, rows: Sequence[NewTask], acks: Sequence[tuple[int, int]],
               replayed: Sequence[int] = ()) -> None:
        """Admitted rows to commit soon; the acknowledgements follow the commit. ``replayed``: the dead letters
        these rows replay, which leave the store in the same commit (so a replay runs once)."""
        self._queue.put(_Op("ingest", (rows, acks, replayed)))
        if self._gathering:
            self._gathered += len(rows)
            if self._gathered >= GATHER_ROWS:
                self._wake.set()

    def ingest(self, rows: Sequence[NewTask], acks: Sequence[tuple[int, int]]) -> None:
        """Admit and submit in one call (from one thread)."""
        for row in rows:
            self.admit(row)
        self.submit(rows, acks)

    def complete(self, results: Sequence[Finished], dead: Sequence[tuple[int, DeadLetter]] = ()) -> None:
        """Tasks done: (row id, input size, result topic, result payload) each, committed as one group.
        ``dead``: (row id, copy) of those that are dead letters; each keeps its row's input."""
        self._queue.put(_Op("complete", (results, dead)))

    def published(self, row_ids: Iterable[tuple[int, int]]) -> None:
        """Rows whose result the broker acknowledged: (row id, bytes the row held: its result payload, or its
        input when the result was published without the outbox)."""
        self._queue.put(_Op("published", (list(row_ids),)))

    def load_pending(self, after_id: int, limit: int, reply: Callable[[list[TaskRef]], None]) -> None:
        self._queue.put(_Op("load_pending", (after_id, limit, reply)))
        self._wake.set()  # a reader waits for it

    def load_outbox(self, after_seq: int, limit: int, reply: Callable[[list[OutboxEntry]], None]) -> None:
        self._queue.put(_Op("load_outbox", (after_seq, limit, reply)))
        self._wake.set()

    def stop_hand_off(self, what: str, commit: int) -> None:
        """``"tasks"`` or ``"outbox"``: the reader spilled at the hand-off of commit number ``commit`` and will
        read the store back; until that read catches up, commits need not build hand-offs it would only drop.

        Ignored when a read that caught up came after that commit: the reader has taken hand-offs again since
        (it sent this before the read's reply reached it), and stopping them now would strand new rows.
        """
        self._queue.put(_Op("stop_hand_off", (what, commit)))

    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the writer thread after everything queued before it has been committed."""
        self._queue.put(_Op("call", (fn,)))
        self._wake.set()

    def _run(self) -> None:
        running = True
        while running:
            op = self._queue.get()
            batch: list[_Op] = []
            if op is None:
                running = False
            else:
                batch.append(op)
            running = self._take(batch, running)
            if running and self._commit_interval > 0:
                running = self._gather(batch)
            self._last_start = time.perf_counter()
            # Reads and calls are barriers: the writes queued before them are committed and handed on first,
            # and their replies go out before anything queued after them. The dispatcher and publisher rely
            # on that order to switch from reading the store back to taking hand-offs without a gap.
            group: list[_Op] = []
            for item in batch:
                if item.kind in _BARRIERS:
                    if group:
                        self._commit_group(group)
                        group = []
                    self._barrier(item)
                else:
                    group.append(item)
            if group:
                self._commit_group(group)

    def _take(self, batch: list[_Op], running: bool) -> bool:
        """Add what is queued to ``batch``; False once the stop marker was taken."""
        while running and len(batch) < MAX_GROUP:
            try:
                more = self._queue.get_nowait()
            except queue.Empty:
                break
            if more is None:
                running = False
            else:
                batch.append(more)
        return running

    def _gather(self, batch: list[_Op]) -> bool:
        """Wait until the commit interval has passed since the last commit began, unless the group is already
        big, has a read or call someone waits for, or gets ``GATHER_ROWS`` new rows meanwhile.

        At a few thousand messages a second, commits would otherwise follow each other as soon as each fsync
        returns, a dozen rows each; every commit costs the same page writes, fsync, file locks and GIL hand-
        overs between this thread and the event loop whatever its size. Spacing them 4 ms apart took the
        agent's CPU time at 5,000 msgs/s from about 147 to 94 µs a message, its threads' wake-ups to a third
        and its p99 latency from 20 to 9 ms. A burst (a resumed session, a backlog) fills a group at once and
        never waits; neither does a message after a quiet spell.
        """
        wait = self._last_start + self._commit_interval - time.perf_counter()
        if wait <= 0:
            return True
        rows = 0
        for op in batch:
            if op.kind in _BARRIERS:
                return True
            if op.kind == "ingest":
                rows += len(op.args[0])
        if rows >= GATHER_ROWS:
            return True
        self._wake.clear()
        self._gathered = rows
        self._gathering = True  # from here on submit() counts the new rows and wakes us at GATHER_ROWS
        seen = len(batch)
        running = self._take(batch, True)  # what came meanwhile (a read's wake-up may have been cleared)
        if running and not any(op.kind in _BARRIERS for op in batch[seen:]):
            self._wake.wait(wait)
        self._gathering = False
        return self._take(batch, running)

    def _commit_group(self, batch: list[_Op]) -> None:
        started = time.perf_counter()
        self.busy_since = time.monotonic()
        next_id, next_seq, data_version = self._next_id, self._next_seq, self._data_version
        while True:
            committed = Committed()
            try:
                self._db.execute("BEGIN IMMEDIATE")
                released_rows, released_bytes, dead_letters = self._apply(batch, committed)
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
                self._next_id, self._next_seq, self._data_version = next_id, next_seq, data_version
                log.error("store_commit_failed", error=str(exc), retry_in_s=1.0)
                time.sleep(1.0)
        if dead_letters is not None:
            self.dead_letters = dead_letters
        self.released_rows += released_rows
        self.released_bytes += released_bytes
        self.busy_since = None
        self.commits += 1
        committed.number = self.commits
        self.last_commit_s = time.perf_counter() - started
        try:
            self._hook(committed)
        except Exception:
            log.exception("store_post_commit_failed")
        self._since_prune = 0 if prune else self._since_prune + committed.ingested

    def _apply(self, batch: list[_Op], committed: Committed) -> tuple[int, int, DeadLetterTotals | None]:
        """Write a group as a few multi-row statements; returns the rows and bytes it released, and the kept
        dead letters' new totals when they changed.

        One statement per kind rather than one per row: sqlite3 lets go of the GIL for every statement it
        steps, and each time this thread then waits for the event loop to hand the GIL back.
        """
        # Flat parameter lists (11, 15, 4 and 1 values a row), cut into statements by _chunks.
        inserts: list[Any] = []
        dead: list[Any] = []
        completes: list[Any] = []
        published: list[int] = []
        kept: list[Any] = []  # dead letters' copies: 9 values a row from ingress …
        copied: list[Any] = []  # … 4 from the dispatcher, whose input the writer copies from the task row
        replayed: list[int] = []
        released_rows = released_bytes = 0
        tasks, outbox = committed.tasks, committed.outbox
        for op in batch:
            if op.kind == "stop_hand_off":
                what, commit = op.args
                if commit > self._caught_up[what]:
                    if what == "tasks":
                        self._hand_tasks = False
                    else:
                        self._hand_outbox = False
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
                        if self._hand_outbox:
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
                        if self._hand_tasks:
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
                    if self._hand_outbox:
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
        for rows, chunk in _chunks(inserts, 11):
            db.execute(_insert_sql(rows), chunk)
        for rows, chunk in _chunks(dead, 15):
            db.execute(_insert_dead_sql(rows), chunk)
        # Before the completes below, which drop the inputs the dispatcher's dead letters keep.
        dead_letters = self._keep_dead_letters(kept, copied, replayed) if kept or copied or replayed else None
        for rows, chunk in _chunks(completes, 4):
            db.execute(_complete_sql(rows), chunk)
        for rows, chunk in _chunks(published, 1):
            db.execute(_published_sql(rows), chunk)
        return released_rows, released_bytes, dead_letters

    def _keep_dead_letters(self, kept: list[Any], copied: list[Any], replayed: list[int]) -> DeadLetterTotals:
        """Keep a group's dead letters, forget those replayed, and hold the bound (in the group's transaction:
        dead letters are rare, and a flood of them shares the group's fsync)."""
        db = self._db
        totals = dataclasses.replace(self.dead_letters)
        self._refresh_dead_letters(totals)
        if replayed:
            for rows, chunk in _chunks(replayed, 1):
                db.execute(_forget_dead_sql(rows), chunk)
            self._count_dead_letters(totals)
        top = max(max(kept[::9], default=0), max(copied[::4], default=0))
        if self.dead_letter_max_count > 0:
            now = time.time()
            for rows, chunk in _chunks(kept, 9):
                sizes = db.execute(_keep_dead_sql(rows), [now, *chunk]).fetchall()
                totals.kept += len(sizes)
                totals.bytes += sum(size for (size,) in sizes)
            for rows, chunk in _chunks(copied, 4):
                sizes = db.execute(_copy_dead_sql(rows), [now, *chunk]).fetchall()
                totals.kept += len(sizes)
                totals.bytes += sum(size for (size,) in sizes)
            self._bound_dead_letters(totals)
        if top > totals.top:
            totals.top = top
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (DEAD_LETTER_ID_KEY, str(top)))
        return totals

    def _barrier(self, op: _Op) -> None:
        try:
            if op.kind == "load_pending":
                after_id, limit, reply = op.args
                refs = [TaskRef(r[0], r[1], r[2], r[3], r[4], {**r[5], "topic": r[2]} if r[5] else {"topic": r[2]},
                                r[8], r[6], r[7])
                        for r in self._read_page(_PENDING_PAGE, (INLINE_READ_BYTES, after_id, limit), 8)]
                if len(refs) < limit:
                    self._hand_tasks = True
                    self._caught_up["tasks"] = self.commits
                reply(refs)
            elif op.kind == "load_outbox":
                after_seq, limit, reply = op.args
                entries = [OutboxEntry(r[0], r[1], r[2], r[3])
                           for r in self._read_page(_OUTBOX_PAGE, (after_seq, limit), 2, order=3)]
                if len(entries) < limit:
                    self._hand_outbox = True
                    self._caught_up["outbox"] = self.commits
                reply(entries)
            elif op.kind == "load_replays":
                limit, reply = op.args
                totals = dataclasses.replace(self.dead_letters)
                self._refresh_dead_letters(totals)  # so the gauges follow a purge or replay soon
                self.dead_letters = totals
                replays: list[Replay] = []
                held = 0
                for row_id, topic, payload in self._db.execute(
                        "SELECT id, topic, payload FROM dead_letters WHERE replay=1 AND truncated=0 "
                        "ORDER BY received_at, id LIMIT ?", (limit,)):
                    replays.append(Replay(int(row_id), str(topic), bytes(payload)))
                    held += len(payload)
                    if held >= REPLAY_READ_BYTES:
                        break
                reply(replays)
            else:
                op.args[0]()
        except sqlite3.Error as exc:
            # The reader waits for this reply; try again rather than leave it waiting forever.
            log.error("store_read_failed", operation=op.kind, error=str(exc), retry_in_s=1.0)
            time.sleep(1.0)
            self._queue.put(op)

    def _read_page(self, sql: str, params: tuple[Any, ...], blob: int, order: int = 0) -> list[list[Any]]:
        """A page of rows built by SQLite in one step of the statement, not one per row (each step lets go of
        the GIL, and while the event loop is busy each hand-back waits for its switch interval). Column
        ``blob`` holds a payload's length, and is replaced by the payload cut from the concatenation: both
        aggregates are fed the rows in one pass, so in the same order. Sorted afterwards, since SQL does not
        promise which order that is."""
        page, payloads = self._db.execute(sql, params).fetchone()
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


class ReadBack:
    """The bookkeeping of an in-memory queue whose overflow stays in the store and is read back in order.

    Items reach the queue as hand-offs after each commit, or, while ``spilled``, only by reading the store
    from ``cursor`` on. The switch back is safe because reads are barriers in the writer's order (see
    ``Store._run``): every commit handed off before a read's reply is in that read, every later one arrives
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


CHUNKS = (8, 64, 512)  # rows per statement: the three shapes of each statement


def _chunks(values: list[Any], width: int) -> Iterable[tuple[int, list[Any]]]:
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
def _rows_of(rows: int, columns: int) -> str:
    """The VALUES list of a multi-row statement: ``rows`` groups of ``columns`` placeholders."""
    return ",".join(["(" + ",".join("?" * columns) + ")"] * rows)


@functools.cache
def _insert_sql(rows: int) -> str:
    # Pending rows: the state and the empty result columns are written here, not bound (a bound value costs
    # the writer the GIL; this runs for every message).
    values = _rows_of(rows, 11)
    return ("INSERT INTO tasks (id, task_id, topic, kind, placement, options, payload, size, received_at, "  # noqa: S608
            f"mid, crc, state) SELECT *, {PENDING} FROM (VALUES {values}) WHERE column1 IS NOT NULL")


@functools.cache
def _insert_dead_sql(rows: int) -> str:
    values = _rows_of(rows, 15)
    return ("INSERT INTO tasks (id, task_id, topic, kind, placement, options, payload, size, received_at, "  # noqa: S608
            f"mid, crc, state, out_topic, out_payload, out_seq) SELECT * FROM (VALUES {values}) "
            "WHERE column1 IS NOT NULL")


@functools.cache
def _keep_dead_sql(rows: int) -> str:
    # OR IGNORE: an id already kept (only a hand-edited store has one) must not stop every commit after it.
    values = _rows_of(rows, 9)
    return ("INSERT OR IGNORE INTO dead_letters (id, task_id, topic, reason, detail, size, received_at, "  # noqa: S608
            f"payload, truncated, dead_at) SELECT *, ?1 FROM (VALUES {values}) WHERE column1 IS NOT NULL "
            "RETURNING length(payload)")


@functools.cache
def _copy_dead_sql(rows: int) -> str:
    # The task's input, still in its pending row (the complete in the same transaction drops it afterwards).
    values = _rows_of(rows, 4)
    return ("INSERT OR IGNORE INTO dead_letters (id, task_id, topic, reason, detail, size, received_at, "  # noqa: S608
            "dead_at, payload, truncated) SELECT v.column1, t.task_id, t.topic, v.column2, v.column3, t.size, "
            f"t.received_at, ?1, t.payload, 0 FROM (VALUES {values}) AS v JOIN tasks AS t ON t.id = v.column4 "
            "WHERE t.state = 0 AND t.payload IS NOT NULL RETURNING length(payload)")


@functools.cache
def _forget_dead_sql(rows: int) -> str:
    return f"DELETE FROM dead_letters WHERE id IN ({','.join('?' * rows)})"  # noqa: S608


@functools.cache
def _complete_sql(rows: int) -> str:
    values = _rows_of(rows, 4)
    return ("UPDATE tasks SET state=1, payload=NULL, out_topic=v.column2, out_payload=v.column3, "  # noqa: S608
            f"out_seq=v.column4 FROM (VALUES {values}) AS v WHERE tasks.id=v.column1 AND tasks.state=0")


@functools.cache
def _published_sql(rows: int) -> str:
    # state 0 too: a result published without the outbox (egress.Publisher.offer) turns its pending row into
    # the tombstone directly.
    return (f"UPDATE tasks SET state=2, payload=NULL, out_payload=NULL WHERE state<2 "  # noqa: S608
            f"AND id IN ({','.join('?' * rows)})")


def stored_size(row: NewTask) -> int:
    """Bytes a new row holds in the store: its input, or its dead letter (the input is not kept)."""
    return len(row.out_payload) if row.out_payload is not None else row.size


def ensure_writable(state_dir: Path) -> None:
    """Fail early, naming the variable, when the state directory cannot hold the store."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        probe = state_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError("EDGE_AGENT_STATE_DIR", f"{state_dir} is not writable: {exc.strerror}") from exc

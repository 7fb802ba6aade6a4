"""The store's public face: what ingress, the dispatcher, the publisher and the daemon call, from any thread."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from agent.deadletters import DeadLetter, Replay
from agent.store._dead_letters import DeadLetterTable, DeadLetterTotals
from agent.store._readback import read_outbox, read_pending
from agent.store._rows import CommitHook, Finished, NewTask, Op, OutboxEntry, TaskRef, stored_size
from agent.store._schema import OUTBOX, PENDING, PUBLISHED, open_store
from agent.store._transitions import RowTransitions
from agent.store._writer import GroupWriter
from agent.telemetry import get_logger

log = get_logger("agent.store")


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
        self._writer = GroupWriter(commit_interval_s)
        self._reader: sqlite3.Connection | None = None
        self._hook: CommitHook = lambda committed: None
        self.commits = 0
        self.busy_since: float | None = None  # monotonic start of the group being written, for health checks
        self._db = open_store(state_dir, self.path, synchronous.upper())
        rows, size, seq, top = self._db.execute(
            "SELECT count(*), coalesce(sum(CASE state WHEN 0 THEN size ELSE length(out_payload) END), 0), "
            "(SELECT coalesce(max(out_seq), 0) FROM tasks), (SELECT coalesce(max(id), 0) FROM tasks) "
            "FROM tasks WHERE state < 2"
        ).fetchone()
        # Single-writer counters (admitted: the event loop, in ingress; released: the writer thread): no lock
        # needed, and outstanding = admitted - released never races.
        self.admitted_rows, self.admitted_bytes = int(rows), int(size)
        self.released_rows = 0
        self.released_bytes = 0
        self._dead_letters = DeadLetterTable(self._db, dead_letter_max_count, dead_letter_max_bytes)
        self._rows = RowTransitions(self._db, self._dead_letters, next_id=int(top) + 1, next_seq=int(seq) + 1)

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

    @property
    def dead_letters(self) -> DeadLetterTotals:
        """The kept dead letters' totals as of the latest commit (one consistent copy for the metrics thread)."""
        return self._dead_letters.totals

    def new_dead_letter_id(self) -> int:
        """The id of a new dead letter (event loop): its message names it before the commit that keeps it."""
        return self._dead_letters.new_id()

    def load_replays(self, limit: int, reply: Callable[[list[Replay]], None]) -> None:
        """The oldest dead letters waiting for a replay, in the order they were received: a read in the writer's
        order, so a replay the loop has handed back (:meth:`submit`'s ``replayed``) is never read again."""
        self._writer.put_barrier(Op("load_replays", (limit, reply)))

    # ------------------------------------------------------------------ bounds

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

    # ------------------------------------------------------------------ the writer thread

    def start(self, hook: CommitHook) -> None:
        """Start the writer; ``hook`` runs on it after each commit, with what the commit made durable."""
        self._hook = hook
        self._writer.start(self._commit, self._barrier)

    def alive(self) -> bool:
        return self._writer.alive()

    def healthy(self, stuck_after_s: float = 60.0) -> bool:
        """The writer runs and no commit has been hanging (a dying SD card blocks in fsync, not in an error)."""
        busy = self.busy_since
        return self.alive() and (busy is None or time.monotonic() - busy < stuck_after_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Commit what is queued, then close."""
        self._writer.stop(timeout_s)
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
        self._writer.put(Op("ingest", (rows, acks, replayed)), rows=len(rows))

    def ingest(self, rows: Sequence[NewTask], acks: Sequence[tuple[int, int]]) -> None:
        """Admit and submit in one call (from one thread)."""
        for row in rows:
            self.admit(row)
        self.submit(rows, acks)

    def complete(self, outputs: Sequence[Finished], dead: Sequence[tuple[int, DeadLetter]] = ()) -> None:
        """Finished tasks' outputs, (row id, input size, topic, payload) each, to commit as outbox rows.
        ``dead``: (row id, copy) of those that are dead letters; each keeps its row's input."""
        self._writer.put(Op("complete", (outputs, dead)))

    def published(self, row_ids: Iterable[tuple[int, int]]) -> None:
        """Rows whose output the broker acknowledged: (row id, bytes the row held: its output's payload, or its
        input when a result was published without the outbox)."""
        self._writer.put(Op("published", (list(row_ids),)))

    def load_pending(self, after_id: int, limit: int, reply: Callable[[list[TaskRef]], None]) -> None:
        self._writer.put_barrier(Op("load_pending", (after_id, limit, reply)))

    def load_outbox(self, after_seq: int, limit: int, reply: Callable[[list[OutboxEntry]], None]) -> None:
        self._writer.put_barrier(Op("load_outbox", (after_seq, limit, reply)))

    def stop_hand_off(self, what: str, commit: int) -> None:
        """``"tasks"`` or ``"outbox"``: the reader spilled at the hand-off of commit number ``commit`` and will
        read the store back; until that read catches up, commits need not build hand-offs it would only drop.

        Ignored when a read that caught up came after that commit: the reader has taken hand-offs again since
        (it sent this before the read's reply reached it), and stopping them now would strand new rows.
        """
        self._writer.put(Op("stop_hand_off", (what, commit)))

    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the writer thread after everything queued before it has been committed."""
        self._writer.put_barrier(Op("call", (fn,)))

    def _commit(self, group: list[Op]) -> None:
        """Writer thread: commit a group of writes, then run the hook."""
        self.busy_since = time.monotonic()
        committed, released_bytes, dead_letters = self._rows.write(group)
        if dead_letters is not None:
            self._dead_letters.totals = dead_letters
        self.released_rows += committed.released
        self.released_bytes += released_bytes
        self.busy_since = None
        self.commits += 1
        committed.number = self.commits
        try:
            self._hook(committed)
        except Exception:
            log.exception("store_post_commit_failed")

    def _barrier(self, op: Op) -> None:
        """Writer thread, between groups: a read (its reply then goes out) or a call."""
        try:
            if op.kind == "load_pending":
                after_id, limit, reply = op.args
                refs = read_pending(self._db, after_id, limit)
                if len(refs) < limit:
                    self._rows.hand_offs.caught_up("tasks", self.commits)
                reply(refs)
            elif op.kind == "load_outbox":
                after_seq, limit, reply = op.args
                entries = read_outbox(self._db, after_seq, limit)
                if len(entries) < limit:
                    self._rows.hand_offs.caught_up("outbox", self.commits)
                reply(entries)
            elif op.kind == "load_replays":
                limit, reply = op.args
                reply(self._dead_letters.read_replays(limit))
            else:
                op.args[0]()
        except sqlite3.Error as exc:
            # The reader waits for this reply; try again rather than leave it waiting forever.
            log.error("store_read_failed", operation=op.kind, error=str(exc), retry_in_s=1.0)
            time.sleep(1.0)
            self._writer.put(op)


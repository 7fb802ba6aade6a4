"""``edge-agent dead-letters``: list, show, replay and purge the dead letters the store keeps.

A second connection to the agent's store, beside the running agent or without it (SQLite in WAL mode, a busy
timeout). It never writes the task table, whose row ids the agent's writer hands out from memory. A replay only
marks the dead letters as asked for; the agent reads them every second (or at its next start), routes each
through its current routes as a new task and commits the new rows together with the removal of the copies.
So a replay runs once whether the agent runs, is stopped, or stops half-way, and nothing goes through the
broker again, where other subscribers of the device topics would see it twice.

Only argparse and the settings are imported up front: the parser is built for every ``edge-agent`` call.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sqlite3
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.config import Settings
from agent.deadletters import REASONS
from agent.errors import ConfigError
from agent.mqtt.topics import topic_matches, validate_topic_filter

EX_FAILURE = 1
EX_USAGE = 2
WAIT_S = 10.0  # how long `replay` waits by default for the running agent to take what it asked for
_CHUNK = 500  # ids per statement


def add_parser(sub: Any, env_file_option: Callable[[argparse.ArgumentParser], None]) -> None:
    """The ``dead-letters`` subcommand and its own subcommands, on ``sub`` (the CLI's subparsers)."""
    dead = sub.add_parser(
        "dead-letters", help="list, show, replay or purge the dead letters the store keeps",
        description="Dead letters whose payload the store keeps (EDGE_AGENT_DEAD_LETTERS__MAX_COUNT, __MAX_BYTES), "
        "read from the store in EDGE_AGENT_STATE_DIR, while the agent runs or not. Run it as the user the agent "
        "runs as (sudo -u edge-agent).")
    commands = dead.add_subparsers(dest="dead_letters_command", required=True)

    def filters(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--reason", choices=REASONS, help="only dead letters with this reason")
        parser.add_argument("--topic", type=_topic_filter, metavar="FILTER",
                            help="only dead letters whose topic this MQTT filter matches (+ and # wildcards)")

    listing = commands.add_parser("list", help="one line per dead letter kept, oldest first")
    env_file_option(listing)
    filters(listing)
    listing.add_argument("--json", action="store_true", help="print a JSON array of objects")

    show = commands.add_parser("show", help="one dead letter with its payload")
    env_file_option(show)
    show.add_argument("id", type=_dead_letter_id, help="its id (the `id` of its dead-letter message)")
    show.add_argument("--raw", action="store_true", help="write the payload's bytes alone to standard output")

    replay = commands.add_parser(
        "replay", help="run dead letters again through the current routes, as new tasks",
        description="Asks the agent to re-admit the matching dead letters, oldest first, as new tasks with new "
        "task ids through its current routes; one that fails again becomes a new dead letter. A running agent "
        "takes them within a second, a stopped one at its next start. Truncated copies (too_large) cannot be "
        "replayed.")
    env_file_option(replay)
    filters(replay)
    replay.add_argument("--dry-run", action="store_true",
                        help="list what would be replayed and the route each would take under these settings")
    replay.add_argument("--wait", type=float, default=WAIT_S, metavar="SECONDS",
                        help=f"how long to wait for a running agent to take them (default {WAIT_S:g}; 0: do not)")

    purge = commands.add_parser("purge", help="delete the matching dead letters from the store")
    env_file_option(purge)
    filters(purge)


def _topic_filter(text: str) -> str:
    try:
        return validate_topic_filter(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _dead_letter_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an id: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"ids start at 1: {text!r}")
    return value


@dataclass(frozen=True, slots=True)
class Kept:
    """A kept dead letter, without its payload."""

    id: int
    task_id: str
    topic: str
    reason: str
    detail: str
    size: int
    received_at: float
    dead_at: float
    kept_bytes: int
    truncated: bool
    replay_requested: bool


_COLUMNS = ("id, task_id, topic, reason, detail, size, received_at, dead_at, length(payload), truncated, "
            "replay")


class DeadLetterBook:
    """The store's dead letters through a connection of the command's own."""

    def __init__(self, state_dir: Path) -> None:
        from agent.store import SCHEMA_VERSION

        self.path = state_dir / "edge-agent.db"
        if not self.path.is_file():
            raise ConfigError("EDGE_AGENT_STATE_DIR", f"no store at {self.path}: is this the agent's state directory "
                              "(and --env-file its settings)?")
        owner = self.path.stat().st_uid
        if os.geteuid() != owner:
            # SQLite may create the -wal and -shm files beside the store; owned by another user, they would keep
            # the agent from opening its own store.
            raise PermissionError(f"run this as the store's owner (uid {owner}), the user the agent runs as: "
                                  f"sudo -u edge-agent edge-agent dead-letters …")
        # mode=rw: never create a store where there is none.
        self.db = sqlite3.connect(f"file:{self.path}?mode=rw", uri=True, isolation_level=None, timeout=10.0)
        self.db.execute("PRAGMA busy_timeout=10000")  # the agent's group commits take milliseconds
        row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        schema = int(row[0]) if row is not None else 0
        if schema > SCHEMA_VERSION:
            raise ConfigError("EDGE_AGENT_STATE_DIR", f"the store {self.path} has schema {schema}, newer than this "
                              f"edge-agent knows ({SCHEMA_VERSION}): use the newer version's command")
        # A store an earlier version wrote has no dead letters yet; the agent adds the table at its next start.
        self.ready = self.db.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='dead_letters'").fetchone() is not None

    def close(self) -> None:
        self.db.close()

    def select(self, reason: str | None = None, topic: str | None = None) -> list[Kept]:
        """The matching dead letters in the order they were received."""
        if not self.ready:
            return []

        sql = f"SELECT {_COLUMNS} FROM dead_letters"  # noqa: S608 - no value is formatted in
        params: tuple[Any, ...] = ()
        if reason is not None:
            sql, params = sql + " WHERE reason=?", (reason,)
        rows = [Kept(int(r[0]), r[1], r[2], r[3], r[4], int(r[5]), float(r[6]), float(r[7]), int(r[8]), bool(r[9]),
                     bool(r[10])) for r in self.db.execute(sql + " ORDER BY received_at, id", params)]
        return [row for row in rows if topic is None or topic_matches(topic, row.topic)]

    def get(self, dead_letter_id: int) -> tuple[Kept, bytes] | None:
        if not self.ready:
            return None
        row = self.db.execute(f"SELECT {_COLUMNS}, payload FROM dead_letters WHERE id=?",  # noqa: S608
                              (dead_letter_id,)).fetchone()
        if row is None:
            return None
        return (Kept(int(row[0]), row[1], row[2], row[3], row[4], int(row[5]), float(row[6]), float(row[7]),
                     int(row[8]), bool(row[9]), bool(row[10])), bytes(row[11]))

    def request_replay(self, ids: Sequence[int]) -> int:
        """Mark them as asked for, in one transaction; returns how many were still there to mark."""
        return self._write("UPDATE dead_letters SET replay=1 WHERE replay=0 AND truncated=0 AND id IN ({})", ids)

    def purge(self, ids: Sequence[int]) -> int:
        return self._write("DELETE FROM dead_letters WHERE id IN ({})", ids)

    def waiting(self, ids: Sequence[int]) -> int:
        """How many of them are still asked for (not yet taken by the agent)."""
        return sum(int(self.db.execute(f"SELECT count(*) FROM dead_letters WHERE replay=1 AND id IN ({marks})",  # noqa: S608
                                       chunk).fetchone()[0]) for chunk, marks in _chunked(ids))

    def _write(self, sql: str, ids: Sequence[int]) -> int:
        changed = 0
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for chunk, marks in _chunked(ids):
                changed += self.db.execute(sql.format(marks), chunk).rowcount
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return changed


def _chunked(ids: Sequence[int]) -> Iterator[tuple[list[int], str]]:
    for start in range(0, len(ids), _CHUNK):
        chunk = list(ids[start:start + _CHUNK])
        yield chunk, ",".join("?" * len(chunk))


def run(args: argparse.Namespace, settings: Settings) -> int:
    """``edge-agent dead-letters …``: the exit status."""
    try:
        book = DeadLetterBook(settings.state_dir)
    except PermissionError as exc:
        print(f"edge-agent dead-letters: {exc}", file=sys.stderr)
        return EX_FAILURE
    except sqlite3.Error as exc:
        raise ConfigError("EDGE_AGENT_STATE_DIR", f"cannot read the store at {settings.state_dir}: {exc}") from exc
    try:
        if not book.ready:
            print("edge-agent dead-letters: this store keeps no dead letters yet: it was written by an earlier "
                  "version, and the agent adds them at its next start", file=sys.stderr)
        command = args.dead_letters_command
        if command == "list":
            return _list(book, args)
        if command == "show":
            return _show(book, args)
        if command == "replay":
            return _replay(book, args, settings)
        return _purge(book, args)
    except sqlite3.Error as exc:
        print(f"edge-agent dead-letters: the store could not be read or written: {exc}", file=sys.stderr)
        return EX_FAILURE
    finally:
        book.close()


def _list(book: DeadLetterBook, args: argparse.Namespace) -> int:
    rows = book.select(args.reason, args.topic)
    if args.json:
        json.dump([asdict(row) for row in rows], sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    if not rows:
        print("no dead letters kept" + (" match" if args.reason or args.topic else ""))
        return 0
    print(f"{'ID':>8}  {'DEAD-LETTERED (UTC)':19}  {'REASON':15}  {'SIZE':>9}  TOPIC")
    for row in rows:
        notes = []
        if row.truncated:
            notes.append(f"truncated: {row.kept_bytes} bytes kept")
        if row.replay_requested:
            notes.append("replay asked for")
        print(f"{row.id:>8}  {_when(row.dead_at)}  {row.reason:15}  {row.size:>9}  {_safe(row.topic)}"
              + (f"  ({'; '.join(notes)})" if notes else ""))
    kept = sum(row.kept_bytes for row in rows)
    print(f"{len(rows)} dead letter{'s' if len(rows) != 1 else ''}, {kept} bytes of payload kept")
    return 0


def _show(book: DeadLetterBook, args: argparse.Namespace) -> int:
    found = book.get(args.id)
    if found is None:
        print(f"edge-agent dead-letters: no dead letter {args.id} is kept (dropped by the bound, purged, replayed, "
              "or never kept: see `edge-agent dead-letters list`)", file=sys.stderr)
        return EX_FAILURE
    row, payload = found
    if args.raw:
        if sys.stdout.isatty():
            print("edge-agent dead-letters: --raw writes the payload's bytes: redirect them to a file or a pipe",
                  file=sys.stderr)
            return EX_USAGE
        sys.stdout.flush()
        sys.stdout.buffer.write(payload)
        sys.stdout.buffer.flush()
        return 0
    fields = [
        ("id", str(row.id)), ("task_id", row.task_id), ("topic", _safe(row.topic)), ("reason", row.reason),
        ("detail", _safe(row.detail)), ("size", f"{row.size} bytes"),
        ("received", f"{_when(row.received_at)} UTC ({row.received_at:.6f})"),
        ("dead-lettered", f"{_when(row.dead_at)} UTC"),
        ("kept", f"the first {row.kept_bytes} bytes (truncated: cannot be replayed)" if row.truncated
         else f"{row.kept_bytes} bytes, whole"),
    ]
    if row.replay_requested:
        fields.append(("replay", "asked for: the agent takes it within a second while it runs, else at its start"))
    for name, value in fields:
        print(f"{name + ':':15}{value}")
    text = _printable(payload)
    if text is not None:
        print("payload (UTF-8 text):")
        print(text)
    else:
        print("payload (binary, base64; --raw writes the bytes):")
        print("\n".join(textwrap.wrap(base64.b64encode(payload).decode(), 76)) or "(empty)")
    return 0


def _replay(book: DeadLetterBook, args: argparse.Namespace, settings: Settings) -> int:
    rows = book.select(args.reason, args.topic)
    truncated = [row for row in rows if row.truncated]
    asked = [row for row in rows if row.replay_requested and not row.truncated]
    todo = [row for row in rows if not row.truncated and not row.replay_requested]
    if truncated:
        print(f"{len(truncated)} truncated dead letter{'s' if len(truncated) != 1 else ''} (too_large) cannot be "
              "replayed: only their first bytes are kept")
    if asked:
        print(f"{len(asked)} already asked for, waiting for the agent")
    if args.dry_run:
        from agent.ingress import Router

        router = Router(settings.routes)
        for row in todo:
            route = router.match(row.topic)
            where = (f"task {route.task} (route {route.topic})" if route is not None
                     else "no route: it would be dead-lettered again (unknown_task)")
            print(f"{row.id:>8}  {_safe(row.topic)}  →  {where}")
        print(f"{len(todo)} would be replayed (dry run: nothing changed). The agent routes them with the routes it "
              "runs with, which a reload or restart may have made differ from this file's.")
        return 0
    if not todo:
        print("nothing to replay")
        return 0
    ids = [row.id for row in todo]
    marked = book.request_replay(ids)
    print(f"{marked} dead letter{'s' if marked != 1 else ''} asked to replay, oldest first")
    deadline = time.monotonic() + max(0.0, args.wait)
    waiting = marked
    while waiting and time.monotonic() < deadline:
        time.sleep(0.2)
        waiting = book.waiting(ids)
    if waiting == 0:
        print(f"the agent took {'it' if marked == 1 else 'them'}: each ran again as a new task "
              "(its log names each as dead_letter_replayed, with the new task_id)")
    else:
        print(f"{waiting} not taken yet: the agent is not running (it takes them at its next start), or its store "
              "is full (it takes them once there is room)")
    return 0


def _purge(book: DeadLetterBook, args: argparse.Namespace) -> int:
    rows = book.select(args.reason, args.topic)
    purged = book.purge([row.id for row in rows])
    print(f"{purged} dead letter{'s' if purged != 1 else ''} purged")
    return 0


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _safe(text: str) -> str:
    """Topics and details come from devices: control characters are shown escaped, never sent to a terminal."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _printable(payload: bytes) -> str | None:
    """The payload as text when it is UTF-8 with nothing but printable characters, tabs and line ends."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not payload or not all(c.isprintable() or c in "\t\r\n" for c in text):
        return None
    return text

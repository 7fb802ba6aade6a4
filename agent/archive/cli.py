"""`edge-agent archive query|replay`: the archive's command group (agent/cli.py dispatches here).

``query`` reads the archive where the agent keeps it (``EDGE_AGENT_STATE_DIR``/archive), from the gateway's disk
and from cloud storage, while the agent runs or not; it writes JSON lines (topic, received time, payload) and
records its reads in the catalog, from which the agent learns each route's retrieval rate.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from agent.archive.segment import Record

if TYPE_CHECKING:
    from agent.archive.objectstore import ObjectStore
    from agent.archive.service import CloudSide
    from agent.config import Settings

EX_USAGE = 2


def when(text: str) -> float:
    """A time on the command line: Unix seconds, or ISO 8601 (UTC unless it says otherwise)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not Unix seconds or an ISO 8601 time: {text!r}") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def add_parser(sub: Any, env_file_option: Callable[[argparse.ArgumentParser], None]) -> None:
    archive = sub.add_parser("archive", help="the archive of archive routes: query it, replay its cost model",
                             description="See docs/archive.md.")
    commands = archive.add_subparsers(dest="archive_command", required=True)
    query = commands.add_parser(
        "query", help="stream archived messages in receive order, from the gateway and cloud storage",
        description="Writes one JSON object a line: topic, received_at (Unix seconds), task_id, payload "
        "(UTF-8 text, or base64 with \"encoding\": \"base64\"). Exit status 1 when part of the range cannot be "
        "read (a segment in cloud storage while the cloud is unreachable).")
    env_file_option(query)
    query.add_argument("--route", required=True, metavar="FILTER",
                       help="MQTT topic filter the archived messages' topics must match (e.g. a route's filter)")
    query.add_argument("--from", dest="start", type=when, default=0.0, metavar="T1",
                       help="received at or after (Unix seconds or ISO 8601; default: the beginning)")
    query.add_argument("--to", dest="end", type=when, default=None, metavar="T2",
                       help="received at or before (default: now)")
    query.add_argument("--out", type=Path, metavar="FILE", help="write to FILE instead of stdout")
    replay = commands.add_parser(
        "replay", help="simulate a month of archive routes: the agent's placement against always_local, "
        "always_cloud and a clairvoyant oracle, priced")
    from agent.archive.replay import add_arguments

    add_arguments(replay)


def as_json(record: Record) -> dict[str, Any]:
    out: dict[str, Any] = {"topic": record.topic, "received_at": record.received_at, "task_id": record.task_id}
    try:
        out["payload"] = record.payload.decode()
    except UnicodeDecodeError:
        out["payload"] = base64.b64encode(record.payload).decode()
        out["encoding"] = "base64"
    return out


class CloudObjects:
    """The archive's object store as the agent uses it (its storage resource), built on first need."""

    def __init__(self, settings: Settings, root: Path) -> None:
        self._settings, self._root = settings, root
        self._side: CloudSide | None = None
        self._made = False

    def __call__(self) -> ObjectStore | None:
        if not self._made:
            from agent.archive.service import open_object_store

            self._side, self._made = open_object_store(self._settings, self._root), True
        return None if self._side is None else self._side.objects

    def close(self) -> None:
        if self._side is not None:
            self._side.close()


def run(args: argparse.Namespace, settings: Settings) -> int:
    """`edge-agent archive query` (agent/cli.py runs `archive replay` itself: it needs no settings)."""
    import time

    from agent.archive.catalog import Catalog
    from agent.archive.objectstore import ObjectStoreError
    from agent.archive.query import Query, QueryError, Reader
    from agent.archive.segment import SegmentError

    root = settings.state_dir / "archive"
    if not (root / "catalog.db").exists():
        print(f"edge-agent archive query: no archive in {root} (no archive route has kept anything yet)",
              file=sys.stderr)
        return 1
    end = time.time() if args.end is None else args.end
    objects = CloudObjects(settings, root)
    reader = Reader(root, Catalog(root / "catalog.db"), objects)
    out: IO[str] = sys.stdout if args.out is None else args.out.open("w")
    count = 0
    try:
        for record in reader.query(Query(args.route, args.start, end)):
            out.write(json.dumps(as_json(record)) + "\n")
            count += 1
    except (QueryError, ObjectStoreError, SegmentError) as exc:  # say what and stop, no traceback
        print(f"edge-agent archive query: {exc} (after {count} messages)", file=sys.stderr)
        return 1
    finally:
        objects.close()
        if out is not sys.stdout:
            out.close()
    if args.out is not None:
        print(f"edge-agent archive query: {count} messages written to {args.out}", file=sys.stderr)
    return 0


def explain(args: argparse.Namespace, settings: Settings) -> int:
    """`edge-agent explain --archive ROUTE`: the route's next segment priced in both places, from the settings
    and what the archive on this gateway holds now (its disk use, the route's segments and reads)."""
    import statistics
    import time

    from agent.archive.catalog import Catalog
    from agent.archive.cost import SECONDS_PER_MONTH, SegmentFacts
    from agent.archive.explain import as_json as explain_json
    from agent.archive.explain import render
    from agent.archive.manager import learned_rates
    from agent.archive.service import archive_root, archived_routes

    policies = archived_routes(settings.routes)
    policy = policies.get(args.archive)
    if policy is None:
        kept = ", ".join(sorted(policies)) or "none"
        print(f"edge-agent explain: {args.archive!r} is not an archive route (routes with an archive key: {kept})",
              file=sys.stderr)
        return EX_USAGE
    now = time.time()
    root = archive_root(settings)
    sizes: list[int] = []
    disk_used = 0
    rates = {}
    if (root / "catalog.db").exists():
        catalog = Catalog(root / "catalog.db")
        sizes = [e.size for e in catalog.entries(route=args.archive)][-20:]
        disk_used = catalog.disk_bytes() + sum(p.stat().st_size for p in root.glob("routes/*/*.jrn"))
        rates = learned_rates(catalog, policies)
    # The next segment: as large as this route's recent ones, or a full journal before any was sealed.
    size = args.bytes if args.bytes is not None else int(statistics.median(sizes)) if sizes \
        else settings.archive.seal_bytes
    rate = rates.get(args.archive)
    estimate = rate.snapshot(now) if rate is not None else None
    facts = SegmentFacts(size_bytes=size, months_left=policy.days * 86_400 / SECONDS_PER_MONTH,
                         retrievals_per_month=rate.per_month(now) if rate else policy.retrievals_per_month,
                         disk_used_bytes=disk_used + size)
    data = explain_json(args.archive, facts, settings.archive.prices(), estimate=estimate)
    if args.json:
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(render(data))
    return 0

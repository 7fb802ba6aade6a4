"""Read archived messages back: every one whose topic matches a filter and whose receive time is in a range, in
order and exactly once, from wherever each segment is (the gateway's disk, object storage, or a journal not
sealed yet). Used by `edge-agent archive query` (a process of its own) and by the MQTT query in the agent.

Exactly once across a seal or a move happening during the query: journals are read between two reads of the
catalog, and a segment sealed from a journal already read (same id) is skipped; a segment whose local file is
gone when read (moved meanwhile) is read from the cloud. Each segment read is recorded in the catalog, which is
how the agent learns each route's retrieval rate (agent/archive/cost.py: RetrievalRate).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.archive.catalog import Catalog, Entry
from agent.archive.intake import ROUTE_FILE, route_key
from agent.archive.segment import Record, file_chunks, read_segment, recover_journal
from agent.errors import AgentError
from agent.mqtt.topics import topic_matches

if TYPE_CHECKING:
    from agent.archive.objectstore import ObjectStore


class QueryError(AgentError):
    """A query that cannot be answered whole (a segment in the cloud with no way to reach it, a bad segment)."""


@dataclass(frozen=True)
class Query:
    topic_filter: str  # an MQTT topic filter the archived messages' topics must match
    start: float  # receive time, Unix seconds, inclusive
    end: float  # inclusive


def _could_match(route: str, topic_filter: str) -> bool:
    """Whether a route filter's topics can match the query filter (cheap and conservative: a literal prefix
    that disagrees rules it out)."""
    for a, b in zip(route.split("/"), topic_filter.split("/"), strict=False):
        if "#" in (a, b):
            return True
        if "+" not in (a, b) and a != b:
            return False
    return len(route.split("/")) == len(topic_filter.split("/")) or "#" in route or "#" in topic_filter


class Reader:
    """One archive's segments for queries. ``unsealed(route)``: the open journal's records when the caller owns
    the journals (the agent); otherwise journals are read from disk without touching them."""

    def __init__(self, root: Path, catalog: Catalog, objects: Callable[[], ObjectStore | None],
                 unsealed: Callable[[str], list[tuple[str, list[Record]]]] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.root = root
        self.catalog = catalog
        self._objects = objects
        self._unsealed = unsealed
        self._clock = clock

    def routes(self) -> list[str]:
        found = []
        routes_dir = self.root / "routes"
        if routes_dir.exists():
            for directory in sorted(routes_dir.iterdir()):
                if (directory / ROUTE_FILE).exists():
                    found.append((directory / ROUTE_FILE).read_text())
        return found

    def _journals(self, route: str) -> list[tuple[str, list[Record]]]:
        if self._unsealed is not None:
            return self._unsealed(route)
        directory = self.root / "routes" / route_key(route)
        out = []
        for path in sorted(directory.glob("*.jrn")):
            try:
                out.append((path.stem, recover_journal(path, repair=False)))
            except FileNotFoundError:
                continue  # sealed meanwhile: its segment is in the second read of the catalog
        return out

    def _segment(self, entry: Entry) -> Iterator[Record]:
        path = self.root / "routes" / route_key(entry.route) / f"{entry.segment_id}.seg"
        if entry.place != "cloud":
            try:
                chunks: Iterator[bytes] = file_chunks(path)
                first = next(chunks, b"")
            except FileNotFoundError:
                moved = self.catalog.get(entry.route, entry.segment_id)
                if moved is None:
                    return  # expired meanwhile
                entry = moved
            else:
                yield from read_segment(_prepend(first, chunks))
                return
        objects = self._objects()
        if objects is None:
            raise QueryError(f"segment {entry.segment_id} of route {entry.route!r} is in cloud storage and the "
                             "cloud is not configured (EDGE_AGENT_CLOUD__URL)")
        yield from read_segment(objects.open(entry.object_key or f"{route_key(entry.route)}/{entry.segment_id}.seg"))

    def query(self, q: Query) -> Iterator[Record]:
        """The matching records in receive-time order (routes merged), each once."""
        routes = [r for r in self.routes() if _could_match(r, q.topic_filter)]
        journals = {route: self._journals(route) for route in routes}
        # Read after the journals: a journal sealed meanwhile is here under its id, and is skipped.
        read_ids = {(route, jid) for route, items in journals.items() for jid, _ in items if jid}
        entries = [e for e in self.catalog.overlapping(q.start, q.end)
                   if e.route in journals and (e.route, e.segment_id) not in read_ids]
        streams = []
        for route in routes:
            mine = [e for e in entries if e.route == route]
            streams.append(self._route_stream(route, mine, journals[route], q))
        yield from heapq.merge(*streams, key=lambda r: r.received_at)

    def _route_stream(self, route: str, entries: list[Entry], journals: list[tuple[str, list[Record]]],
                      q: Query) -> Iterator[Record]:
        items: list[Record] = []
        for entry in entries:  # by first receive time
            matched = 0
            for record in self._segment(entry):
                if q.start <= record.received_at <= q.end and topic_matches(q.topic_filter, record.topic):
                    matched += 1
                    yield record
            self.catalog.record_read(route, self._clock(), entry.size, matched / max(entry.count, 1))
        for _, records in journals:
            items.extend(r for r in records
                         if q.start <= r.received_at <= q.end and topic_matches(q.topic_filter, r.topic))
        yield from sorted(items, key=lambda r: r.received_at)


def _prepend(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest

"""Committed inputs of archive routes → the route's journal → sealed segments in the catalog.

``append`` runs on the store's writer thread, in the post-commit hook, before the commit is handed to the event
loop: an input is durable in the archive before its task can run, so no task's result (and with it the input's
removal from the store) can get ahead of the archive. A crash between the store's commit and the journal's
fdatasync leaves the input pending in the store; :func:`agent.archive.recovery.reconcile` appends it at the next
start. Sealing runs on the archive manager's thread; a lock keeps it off a journal being appended to.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.archive.catalog import Catalog
from agent.archive.segment import Journal, Record, SegmentError, SegmentInfo, recover_journal, seal, segment_info
from agent.telemetry import get_logger

log = get_logger(__name__)

ROUTE_FILE = "route"


def route_key(route: str) -> str:
    """A route filter's directory name (filters hold '/', '+' and '#')."""
    return hashlib.sha256(route.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Sealing:
    age_s: float  # a journal whose first record is this old is sealed
    max_bytes: int  # a journal this large is sealed


class Intake:
    def __init__(self, root: Path, catalog: Catalog, sealing: Sealing, clock: Callable[[], float] = time.time) -> None:
        self.root = root
        self.catalog = catalog
        self.sealing = sealing
        self._clock = clock
        self._lock = threading.Lock()
        self._journals: dict[str, Journal] = {}
        self._closed: list[tuple[str, Journal]] = []  # closed after a failed append, not sealed yet
        self._last_id = 0
        self.appended = 0  # records since the start (a metric)
        self.sealed = 0
        # Set by the manager while the disk budget is full and no segment can leave: inputs are then not
        # archived (counted in ``refused``) rather than the budget broken or the agent's intake held.
        self.refusing = False
        self.refused = 0
        self.append_failures = 0
        # Task ids of what recovery found unsealed: what a reconciliation must not append again.
        self.recovered_ids: set[str] = set()

    def directory(self, route: str) -> Path:
        return self.root / "routes" / route_key(route)

    def _new_id(self) -> str:
        # Wall-clock microseconds, strictly increasing: segments sort by name in the order they were opened.
        self._last_id = max(self._last_id + 1, int(self._clock() * 1e6))
        return f"{self._last_id:017d}"

    # ------------------------------------------------------------------ start

    def open(self) -> list[SegmentInfo]:
        """Recover every route's directory: seal leftover journals (a whole segment already written for one
        means the crash came after sealing: the journal goes), and enter sealed segments the catalog lacks."""
        found: list[SegmentInfo] = []
        routes_dir = self.root / "routes"
        routes_dir.mkdir(parents=True, exist_ok=True)
        for directory in sorted(routes_dir.iterdir()):
            route_file = directory / ROUTE_FILE
            if not route_file.exists():
                continue
            route = route_file.read_text()
            for stale in directory.glob("*.seg.tmp"):
                stale.unlink()  # a seal the crash interrupted: its journal is still there
            known = self.catalog.known(route)
            for journal in sorted(directory.glob("*.jrn")):
                segment_id = journal.stem
                if (directory / f"{segment_id}.seg").exists():
                    journal.unlink()
                    continue
                records = recover_journal(journal)
                self.recovered_ids.update(r.task_id for r in records)
                if records:
                    info = seal(records, route, segment_id, directory)
                    self.catalog.add(info, self._clock())
                    known.add(segment_id)
                    found.append(info)
                journal.unlink()
            for path in sorted(directory.glob("*.seg")):
                if path.stem in known:
                    continue
                try:
                    info = segment_info(path, route)
                except (SegmentError, ValueError) as exc:
                    log.error("archive_segment_unreadable", path=str(path), error=str(exc))
                    continue
                self.catalog.add(info, self._clock())
                found.append(info)
            self._last_id = max([self._last_id, *(int(p.stem) for p in directory.glob("*.seg"))])
        if found:
            log.info("archive_recovered", segments=len(found), records=sum(i.count for i in found))
        return found

    def _journal(self, route: str) -> Journal:
        journal = self._journals.get(route)
        if journal is None:
            directory = self.directory(route)
            if not directory.exists():
                directory.mkdir(parents=True)
                (directory / ROUTE_FILE).write_text(route)
            journal = self._journals[route] = Journal(directory / f"{self._new_id()}.jrn")
        return journal

    # ------------------------------------------------------------------ writer thread

    def append(self, by_route: Mapping[str, list[Record]]) -> None:
        """Make committed inputs durable in their routes' journals (one fdatasync per route and batch)."""
        with self._lock:
            for route, records in by_route.items():
                if self.refusing:
                    self.refused += len(records)
                    continue
                if not records:
                    continue
                try:
                    self._journal(route).append(records, self._clock())
                except OSError as exc:
                    # A full or failing disk must not stop the agent's commits (this runs in the store's hook):
                    # the inputs are counted as not archived and the next batch starts a journal of its own.
                    self.refused += len(records)
                    self.append_failures += 1
                    log.error("archive_append_failed", route=route, inputs=len(records), error=str(exc))
                    journal = self._journals.pop(route, None)
                    if journal is not None:
                        with contextlib.suppress(OSError):
                            journal.close()
                        if journal.count:
                            self._closed.append((route, journal))  # sealed by the next pass that can
                    continue
                self.appended += len(records)

    # ------------------------------------------------------------------ manager thread

    def seal_due(self, force: bool = False) -> list[SegmentInfo]:
        """Seal the journals that are old or large enough (all non-empty ones with ``force``)."""
        now = self._clock()
        due: list[tuple[str, Journal]] = []
        with self._lock:
            due, self._closed = self._closed, []
            for route, journal in list(self._journals.items()):
                if journal.count and (force or journal.size >= self.sealing.max_bytes
                                      or now - (journal.started_at or now) >= self.sealing.age_s):
                    journal.close()
                    del self._journals[route]  # the next append opens a new one
                    due.append((route, journal))
        sealed = []
        for number, (route, journal) in enumerate(due):
            records = recover_journal(journal.path)
            try:
                info = seal(records, route, journal.path.stem, journal.path.parent)
            except OSError as exc:
                log.error("archive_seal_failed", route=route, segment=journal.path.stem, error=str(exc))
                with self._lock:
                    self._closed.extend(due[number:])  # kept as journals (queries read them) and tried again
                break
            self.catalog.add(info, now)
            journal.path.unlink()
            self.sealed += 1
            sealed.append(info)
            log.info("archive_segment_sealed", route=route, segment=info.segment_id, records=info.count,
                     raw_bytes=info.raw_bytes, size=info.size)
        return sealed

    def unsealed(self, route: str) -> list[tuple[str, list[Record]]]:
        """The id and records of each of a route's journals not sealed yet (a query reads them too)."""
        with self._lock:
            journals = [j for r, j in self._closed if r == route]
            journal = self._journals.get(route)
            if journal is not None and journal.count:
                journals.append(journal)
            return [(j.path.stem, recover_journal(j.path, repair=False)) for j in journals]

    def unsealed_bytes(self) -> int:
        with self._lock:
            return sum(j.size for j in self._journals.values()) + sum(j.size for _, j in self._closed)

    def close(self) -> None:
        with self._lock:
            for journal in self._journals.values():
                journal.close()
            self._journals.clear()

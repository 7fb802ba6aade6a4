"""The placement manager: seals segments, places each by the cost model, moves it, and deletes it on time.

Runs on a thread of its own (``archive-manager``): every call to the object store blocks. Each pass:

1. seal the journals due (agent/archive/intake.py) and tell each route's retrieval-rate estimator;
2. feed it the reads that queries recorded in the catalog (a query may run in another process);
3. retention: a segment past its route's ``days`` is deleted wherever it is;
4. after a (re)start, once the cloud answers: abort incomplete uploads a crash left, and finish moves the crash
   cut short (``uploading`` → the object is checked by its sha256 → ``cloud``, or uploaded again);
5. placement: each segment on the gateway is priced in both places (agent/archive/cost.py); the cheaper by the
   margin wins. Over the disk budget the oldest segments go to the cloud whatever the price.

A move is committed in steps: ``uploading`` (with its key) in the catalog, the upload (the store verifies the
sha256), ``cloud`` in the catalog, and only then the local file is deleted. A crash anywhere in between leaves
the segment whole in at least one place. When the cloud is unavailable the archive stays on the gateway: the
operator is warned once per outage, and at the budget new inputs are not archived (counted and warned) rather
than the budget being broken or the agent's intake blocked (docs/archive.md#when-the-cloud-is-unavailable).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.archive.catalog import Catalog, Entry
from agent.archive.cost import SECONDS_PER_MONTH, ArchivePrices, Placement, RetrievalRate, SegmentFacts, place_segment
from agent.archive.intake import Intake, route_key
from agent.archive.objectstore import ObjectStoreError  # light: the S3 client is imported on first use
from agent.telemetry import get_logger

if TYPE_CHECKING:
    from agent.archive.objectstore import ObjectStore

log = get_logger(__name__)

DAY_S = 86_400.0


@dataclass(frozen=True)
class RoutePolicy:
    """An archive route's settings: its retention and the prior of its retrieval rate."""

    days: float
    retrievals_per_month: float


@dataclass
class ManagerCounters:
    uploads: int = 0
    uploaded_bytes: int = 0
    upload_failures: int = 0
    forced_uploads: int = 0  # over the disk budget, whatever the price
    deleted_gateway: int = 0  # by retention
    deleted_cloud: int = 0
    decisions: int = 0
    cost_gateway: float = 0.0  # the chosen place's total, summed over placed segments
    cost_cloud: float = 0.0


def learned_rates(catalog: Catalog, routes: Mapping[str, RoutePolicy]) -> dict[str, RetrievalRate]:
    """Each archive route's retrieval rate rebuilt from what the catalog remembers: seals and reads, in time
    order (at a start, and for `edge-agent explain --archive`)."""
    rates = {route: RetrievalRate(p.retrievals_per_month, p.days) for route, p in routes.items()}
    events = [(e.sealed_at, 0, e.route, e.size) for e in catalog.entries()]
    events += [(at, 1, route, size) for _, route, at, size, _ in catalog.reads_since(0)]
    for at, kind, route, size in sorted(events):
        rate = rates.get(route)
        if rate is None:
            continue
        if kind == 0:
            rate.sealed(at, size)
        else:
            rate.read(at, size)
    return rates


def object_key(route: str, segment_id: str) -> str:
    return f"{route_key(route)}/{segment_id}.seg"


class Manager:
    def __init__(self, *, intake: Intake, catalog: Catalog, prices: ArchivePrices,
                 routes: Mapping[str, RoutePolicy], objects: ObjectStore | None,
                 clock: Callable[[], float] = time.time, tick_s: float = 1.0, redecide_s: float = 300.0,
                 cloud_retry_s: float = 30.0) -> None:
        self.intake = intake
        self.catalog = catalog
        self.prices = prices
        self.routes = dict(routes)
        self.objects = objects
        self._clock = clock
        self.tick_s = tick_s
        self.redecide_s = redecide_s
        self.cloud_retry_s = cloud_retry_s
        self.counters = ManagerCounters()
        self.rates: dict[str, RetrievalRate] = {}
        self._decided_at: dict[tuple[str, str], float] = {}
        self._reads_seen = 0
        self._resumed = False
        self.cloud_down_since: float | None = None
        self._cloud_retry_at = 0.0
        self._over_budget_warned = False
        self.last_pass_at: float | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one pass at a time (the thread, a test, the stop's last pass)
        self._learn_history()
        for entry in self.catalog.entries(place="cloud"):
            self._delete_local(entry)  # a crash came between the catalog's commit of a move and the unlink

    # ------------------------------------------------------------------ the thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="archive-manager", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("archive_pass_failed")
            self._wake.wait(self.tick_s)
            self._wake.clear()

    # ------------------------------------------------------------------ one pass

    def run_once(self) -> None:
        with self._lock:
            now = self._clock()
            for info in self.intake.seal_due():
                self.rate(info.route).sealed(now, info.size)
            self._learn_reads()
            self._retention(now)
            # The cloud is first reached when a move must be finished or made (never for a gateway-only archive).
            if self._cloud_usable(now) and not self._resumed and self.catalog.entries(place="uploading"):
                self._resume()
            self._place(now)
            self._hold_budget(now)
            self.last_pass_at = now

    # ------------------------------------------------------------------ learning

    def rate(self, route: str) -> RetrievalRate:
        rate = self.rates.get(route)
        if rate is None:
            policy = self.routes.get(route, RoutePolicy(days=30, retrievals_per_month=0.0))
            rate = self.rates[route] = RetrievalRate(policy.retrievals_per_month, policy.days)
        return rate

    def _learn_history(self) -> None:
        self.rates.update(learned_rates(self.catalog, self.routes))
        for rowid, *_ in self.catalog.reads_since(0):
            self._reads_seen = max(self._reads_seen, rowid)

    def _learn_reads(self) -> None:
        for rowid, route, at, size, _ in self.catalog.reads_since(self._reads_seen):
            self.rate(route).read(at, size)
            self._reads_seen = rowid

    # ------------------------------------------------------------------ retention

    def _retention(self, now: float) -> None:
        for entry in self.catalog.entries():
            policy = self.routes.get(entry.route)
            if policy is None or entry.last_at + policy.days * DAY_S > now:
                continue  # a route no longer archived keeps its segments until it is configured again
            if entry.place != "gateway":
                if not self._cloud_usable(now):
                    continue  # deleted once the cloud answers again
                assert self.objects is not None
                try:
                    self.objects.delete(entry.object_key or object_key(entry.route, entry.segment_id))
                except (ObjectStoreError, OSError) as exc:
                    self._cloud_failed(now, "delete", exc)
                    continue
                self.counters.deleted_cloud += 1
            self._delete_local(entry)
            self.catalog.forget(entry.route, entry.segment_id)
            if entry.place == "gateway":
                self.counters.deleted_gateway += 1
            log.info("archive_segment_expired", route=entry.route, segment=entry.segment_id, place=entry.place,
                     records=entry.count)

    def _delete_local(self, entry: Entry) -> None:
        path = self.local_path(entry)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def local_path(self, entry: Entry) -> Path:
        return self.intake.directory(entry.route) / f"{entry.segment_id}.seg"

    # ------------------------------------------------------------------ the cloud

    def _cloud_usable(self, now: float) -> bool:
        return self.objects is not None and now >= self._cloud_retry_at

    def _cloud_failed(self, now: float, what: str, exc: BaseException) -> None:
        self._cloud_retry_at = now + self.cloud_retry_s
        self.counters.upload_failures += what == "upload"
        if self.cloud_down_since is None:
            self.cloud_down_since = now
            log.warning("archive_cloud_unavailable", action=what, error=str(exc), retry_in_s=self.cloud_retry_s,
                        detail="the archive stays on the gateway, within its disk budget")

    def _cloud_answered(self, now: float) -> None:
        if self.cloud_down_since is not None:
            log.info("archive_cloud_available", down_s=round(now - self.cloud_down_since, 1))
            self.cloud_down_since = None

    def _resume(self) -> None:
        """After a start: what a crash left in the middle of a move."""
        assert self.objects is not None
        now = self._clock()
        try:
            for upload in self.objects.abort_incomplete_uploads():
                log.info("archive_incomplete_upload_aborted", key=upload.key)
            for entry in self.catalog.entries(place="uploading"):
                key = entry.object_key or object_key(entry.route, entry.segment_id)
                found = self.objects.head(key)
                if found is not None and found.sha256 == entry.sha256:
                    self._moved(entry, key)
                    log.info("archive_upload_confirmed", route=entry.route, segment=entry.segment_id)
                else:
                    self.catalog.set_place(entry.route, entry.segment_id, "gateway")  # placed again below
        except (ObjectStoreError, OSError) as exc:
            self._cloud_failed(now, "resume", exc)
            return
        self._cloud_answered(now)
        self._resumed = True

    def _upload(self, entry: Entry, now: float) -> bool:
        assert self.objects is not None
        if not self._resumed:
            self._resume()  # incomplete uploads a crash left go before this process starts its own
            if not self._resumed:
                return False
        key = object_key(entry.route, entry.segment_id)
        self.catalog.set_place(entry.route, entry.segment_id, "uploading", key)
        try:
            stored = self.objects.put_file(key, self.local_path(entry), entry.sha256)
        except (ObjectStoreError, OSError) as exc:
            self.catalog.set_place(entry.route, entry.segment_id, "gateway")
            self._cloud_failed(now, "upload", exc)
            return False
        self._cloud_answered(now)
        self._moved(entry, key)
        self.counters.uploads += 1
        self.counters.uploaded_bytes += stored.size
        return True

    def _moved(self, entry: Entry, key: str) -> None:
        self.catalog.set_place(entry.route, entry.segment_id, "cloud", key)  # committed before the unlink
        self._delete_local(entry)

    # ------------------------------------------------------------------ placement

    def disk_used(self) -> int:
        return self.catalog.disk_bytes() + self.intake.unsealed_bytes()

    def price(self, entry: Entry, now: float, disk_used: int | None = None) -> Placement:
        policy = self.routes.get(entry.route, RoutePolicy(days=30, retrievals_per_month=0.0))
        months_left = max(entry.last_at + policy.days * DAY_S - now, 0.0) / SECONDS_PER_MONTH
        facts = SegmentFacts(size_bytes=entry.size, months_left=months_left,
                             retrievals_per_month=self.rate(entry.route).per_month(now),
                             disk_used_bytes=self.disk_used() if disk_used is None else disk_used)
        return place_segment(facts, self.prices)

    def _place(self, now: float) -> None:
        for entry in self.catalog.entries(place="gateway"):
            if entry.route not in self.routes:
                continue
            decided = self._decided_at.get((entry.route, entry.segment_id))
            if decided is not None and now - decided < self.redecide_s:
                continue
            placement = self.price(entry, now)
            self._decided_at[(entry.route, entry.segment_id)] = now
            self._record(entry, placement, now, forced=False)
            if placement.choice == "cloud" and self._cloud_usable(now):
                self._upload(entry, now)

    def _record(self, entry: Entry, placement: Placement, now: float, *, forced: bool) -> None:
        choice = "cloud" if forced else placement.choice
        decision: dict[str, Any] = {
            "at": now, "choice": choice, "reason": "over_budget" if forced else placement.reason,
            "gateway": {"storage": placement.gateway.storage, "retrieval": placement.gateway.retrieval,
                        "total": placement.gateway.total},
            "cloud": {"storage": placement.cloud.storage, "retrieval": placement.cloud.retrieval,
                      "total": placement.cloud.total},
        }
        first = entry.decision is None
        changed = first or entry.decision is None or entry.decision.get("choice") != choice
        self.catalog.set_decision(entry.route, entry.segment_id, decision)
        if first:
            self.counters.decisions += 1
            chosen = placement.cloud.total if choice == "cloud" else placement.gateway.total
            if chosen != float("inf"):
                if choice == "cloud":
                    self.counters.cost_cloud += chosen
                else:
                    self.counters.cost_gateway += chosen
        (log.info if changed else log.debug)(
            "archive_segment_placed", route=entry.route, segment=entry.segment_id, choice=choice,
                 reason=decision["reason"], gateway_total=round(placement.gateway.total, 6),
                 cloud_total=round(placement.cloud.total, 6), size=entry.size)

    def _hold_budget(self, now: float) -> None:
        """The disk budget is a hard limit: over it the oldest segments leave whatever the price; if they
        cannot, new inputs are not archived until there is room (the agent's own intake is never held)."""
        budget = self.prices.disk_budget_bytes
        used = self.disk_used()
        if used > budget and self._cloud_usable(now):
            for entry in self.catalog.entries(place="gateway"):  # oldest first
                if used <= budget or not self._cloud_usable(now):
                    break
                placement = self.price(entry, now, disk_used=used)
                self._record(entry, placement, now, forced=True)
                if self._upload(entry, now):
                    self.counters.forced_uploads += 1
                    used -= entry.size
        full = used >= budget
        if full and not self._over_budget_warned:
            log.warning("archive_disk_budget_full", used_bytes=used, budget_bytes=budget,
                        cloud="unavailable" if self.cloud_down_since is not None or self.objects is None else "ok",
                        detail="new inputs are not archived until segments leave for the cloud or expire")
        elif not full and self._over_budget_warned:
            log.info("archive_disk_budget_room", used_bytes=used, budget_bytes=budget,
                     not_archived=self.intake.refused)
        self._over_budget_warned = full
        self.intake.refusing = full

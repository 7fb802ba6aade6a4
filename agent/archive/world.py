"""The archive replay's simulated world: the segments the routes seal, the queries' reads of them, and what a
schedule of moves to the cloud costs on them.

See :mod:`agent.archive.replay` for what is simulated and why; numpy, loaded only when a replay runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.archive.cost import GB, ArchivePrices
from agent.archive.replay import DAY, HOUR, MONTH, ArchiveWorkload

__all__ = ["Costs", "World", "evaluate", "generate", "peak_disk", "segment_costs"]


@dataclass(frozen=True, slots=True)
class World:
    """Everything random, drawn once and common to all policies: the segments and who reads them when."""

    route: np.ndarray[Any, Any]  # per segment, sorted by seal time
    start: np.ndarray[Any, Any]
    sealed: np.ndarray[Any, Any]
    size: np.ndarray[Any, Any]
    expires: np.ndarray[Any, Any]
    counted: np.ndarray[Any, Any]  # sealed during the replayed days (not the warm-up)
    read_t: np.ndarray[Any, Any]  # read events, sorted by time: a query read segment read_seg at read_t
    read_seg: np.ndarray[Any, Any]
    queries: int


def generate(workload: ArchiveWorkload) -> World:
    """The segments every route seals from the warm-up's start to the end of ``days``, and every read of them by
    the routes' queries until the last one expires (a query reads the sealed segments its span overlaps)."""
    rng = np.random.default_rng(workload.seed)
    t0, t1 = -workload.warmup_s, workload.days * DAY
    parts: list[tuple[np.ndarray[Any, Any], ...]] = []
    for i, route in enumerate(workload.routes):
        rate = route.gb_per_day * GB / DAY
        interval = min(workload.seal_age_s, workload.seal_bytes / rate)
        sealed = np.arange(t0 + interval, t1 + 1e-9, interval)
        size = np.maximum(rate * interval * rng.lognormal(0.0, workload.size_sigma, sealed.size), 1.0)
        parts.append((np.full(sealed.size, i), sealed - interval, sealed, size, sealed + route.days * DAY))
    route_a, start, sealed, size, expires = (np.concatenate([p[k] for p in parts]) for k in range(5))
    order = np.argsort(sealed, kind="stable")
    route_a, start, sealed, size, expires = route_a[order], start[order], sealed[order], size[order], expires[order]
    end = float(expires.max())

    read_t: list[np.ndarray[Any, Any]] = []
    read_seg: list[np.ndarray[Any, Any]] = []
    queries = 0
    for i, route in enumerate(workload.routes):
        mine = np.flatnonzero(route_a == i)  # by seal time, and so by start
        for query in route.queries:
            if query.every_hours > 0:
                at = np.arange(t0 + query.every_hours * HOUR, end, query.every_hours * HOUR)
                ends = at - query.lag_hours * HOUR
            else:
                n = int(rng.poisson(query.per_month * (end - t0) / MONTH))
                at = np.sort(rng.uniform(t0, end, n))
                ends = at - rng.uniform(0.0, query.within_days * DAY, n)
            for t, w1 in zip(at.tolist(), ends.tolist(), strict=True):
                w0 = w1 - query.span_hours * HOUR
                lo = int(np.searchsorted(sealed[mine], w0, side="right"))
                hi = int(np.searchsorted(start[mine], w1, side="left"))
                hit = mine[lo:hi]
                hit = hit[(sealed[hit] <= t) & (expires[hit] > t)]
                queries += 1
                read_t.append(np.full(hit.size, t))
                read_seg.append(hit)
    rt = np.concatenate(read_t) if read_t else np.zeros(0)
    rs = np.concatenate(read_seg).astype(np.int64) if read_seg else np.zeros(0, dtype=np.int64)
    order = np.argsort(rt, kind="stable")
    return World(route_a, start, sealed, size, expires, sealed > 0.0, rt[order], rs[order], queries)


@dataclass(frozen=True, slots=True)
class Costs:
    """What one policy's placements cost, for the counted segments over their whole lives, in the prices'
    currency."""

    upload: float  # the uplink's price of the bytes moved to the cloud
    cloud_storage: float  # their GB-months in the cloud
    gateway_reads: float  # reads from the gateway, over the uplink
    cloud_reads: float  # reads from the cloud, its egress
    cloud_share: float  # of the counted bytes, the share that ended up in the cloud
    forced_share: float  # of the counted bytes, the share the disk budget forced out
    peak_disk_bytes: float  # the most the archive held on the gateway from the first counted seal on

    @property
    def storage(self) -> float:
        return self.upload + self.cloud_storage

    @property
    def retrieval(self) -> float:
        return self.gateway_reads + self.cloud_reads

    @property
    def total(self) -> float:
        return self.storage + self.retrieval


def evaluate(world: World, prices: ArchivePrices, moved_at: np.ndarray[Any, Any],
             forced: np.ndarray[Any, Any] | None = None, *, weights: np.ndarray[Any, Any] | None = None) -> Costs:
    """Price a schedule: ``moved_at`` per segment is when it left for the cloud (its seal time: straight there;
    inf: never). ``weights``: which segments count (default: those sealed during the replayed days)."""
    w = world.counted.astype(float) if weights is None else weights
    moved = np.isfinite(moved_at)
    size_gb = world.size / GB
    upload = float(np.sum(w * moved * size_gb)) * prices.uplink_per_gb
    months = np.where(moved, (world.expires - np.where(moved, moved_at, 0.0)) / MONTH, 0.0)
    cloud_storage = float(np.sum(w * size_gb * np.maximum(months, 0.0))) * prices.cloud_storage_per_gb_month
    in_cloud = world.read_t >= moved_at[world.read_seg]
    read_gb = size_gb[world.read_seg] * w[world.read_seg]
    gateway_reads = float(np.sum(read_gb[~in_cloud])) * prices.uplink_per_gb
    cloud_reads = float(np.sum(read_gb[in_cloud])) * prices.cloud_egress_per_gb
    total_bytes = float(np.sum(w * world.size)) or 1.0
    forced_bytes = 0.0 if forced is None else float(np.sum(w * world.size * forced))
    return Costs(upload, cloud_storage, gateway_reads, cloud_reads, float(np.sum(w * world.size * moved)) / total_bytes,
                 forced_bytes / total_bytes, peak_disk(world, moved_at))


def segment_costs(world: World, prices: ArchivePrices, moved_at: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Each segment's cost under a schedule, on its real reads."""
    moved = np.isfinite(moved_at)
    size_gb = world.size / GB
    months = np.where(moved, np.maximum(world.expires - np.where(moved, moved_at, 0.0), 0.0) / MONTH, 0.0)
    storage = size_gb * (moved * prices.uplink_per_gb + months * prices.cloud_storage_per_gb_month)
    in_cloud = world.read_t >= moved_at[world.read_seg]
    per_read = size_gb[world.read_seg] * np.where(in_cloud, prices.cloud_egress_per_gb, prices.uplink_per_gb)
    return np.asarray(storage + np.bincount(world.read_seg, weights=per_read, minlength=world.size.size))


def peak_disk(world: World, moved_at: np.ndarray[Any, Any], since: float = 0.0) -> float:
    """The most the schedule keeps on the gateway's disk from ``since`` on (right after a seal, where it peaks)."""
    leaves = np.minimum(moved_at, world.expires)
    ins = world.sealed[leaves > world.sealed]
    sizes = world.size[leaves > world.sealed]
    outs = leaves[leaves > world.sealed]
    times = np.concatenate([ins, outs])
    deltas = np.concatenate([sizes, -sizes])
    order = np.lexsort((deltas, times))  # at the same instant, what leaves goes first
    use = np.cumsum(deltas[order])
    use = use[times[order] >= since]
    return float(use.max()) if use.size else 0.0

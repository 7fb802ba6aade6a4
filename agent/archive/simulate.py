"""The archive replay's engine: the policies, the replay of each on the simulated archive, and its report.

See :mod:`agent.archive.replay` for what is simulated and why; this module holds the arithmetic (numpy), loaded
only when a replay runs. The simulated world and its prices are in :mod:`agent.archive.world`, the oracles in
:mod:`agent.archive.oracle`.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from agent.archive.cost import GB, RetrievalRate, SegmentFacts, place_segment
from agent.archive.oracle import OracleSolution, oracle
from agent.archive.replay import DAY, MONTH, POLICIES, ArchiveWorkload
from agent.archive.world import Costs, World, evaluate, generate, peak_disk, segment_costs

__all__ = [
    "Agent",
    "Costs",
    "Fixed",
    "OracleSolution",
    "Policy",
    "Result",
    "World",
    "as_json",
    "evaluate",
    "format_table",
    "generate",
    "oracle",
    "peak_disk",
    "run_replay",
    "segment_costs",
    "simulate",
]



class Policy(Protocol):
    """What the replay asks of a policy. ``redecide_s``: how often the segments still on the gateway are asked
    again, oldest first, as the daemon's placement manager does (None: only at their seal)."""

    redecide_s: float | None

    def sealed(self, seg: int, now: float) -> None: ...

    def read(self, seg: int, now: float) -> None: ...

    def to_cloud(self, seg: int, now: float, disk_used: float) -> bool: ...


class Fixed:
    """``always_local`` or ``always_cloud``."""

    redecide_s: float | None = None

    def __init__(self, cloud: bool) -> None:
        self.cloud = cloud

    def sealed(self, seg: int, now: float) -> None:
        pass

    def read(self, seg: int, now: float) -> None:
        pass

    def to_cloud(self, seg: int, now: float, disk_used: float) -> bool:
        return self.cloud


class Agent:
    """The daemon's decisions: :func:`~agent.archive.cost.place_segment` for each segment at its seal and
    again every ``redecide_s`` while it is on the gateway, with a
    :class:`~agent.archive.cost.RetrievalRate` per route fed by the seals and the replay's reads."""

    def __init__(self, world: World, workload: ArchiveWorkload, *, redecide_s: float | None = DAY) -> None:
        self.redecide_s = redecide_s
        self._prices = workload.prices
        start = -workload.warmup_s
        self._rates = [RetrievalRate(r.retrievals_per_month, r.days, start=start) for r in workload.routes]
        self._route, self._size = world.route.tolist(), world.size.tolist()
        self._expires = world.expires.tolist()

    def sealed(self, seg: int, now: float) -> None:
        self._rates[self._route[seg]].sealed(now, int(self._size[seg]))

    def read(self, seg: int, now: float) -> None:
        self._rates[self._route[seg]].read(now, int(self._size[seg]))

    def to_cloud(self, seg: int, now: float, disk_used: float) -> bool:
        rate = self._rates[self._route[seg]].per_month(now)
        facts = SegmentFacts(int(self._size[seg]), (self._expires[seg] - now) / MONTH, rate, int(disk_used))
        return place_segment(facts, self._prices).choice == "cloud"


def simulate(world: World, workload: ArchiveWorkload, policy: Policy) -> tuple[np.ndarray[Any, Any],
                                                                               np.ndarray[Any, Any]]:
    """Run one policy through the seals, reads and expiries in time order, under the manager's hard rule.
    Returns each segment's move time (inf: never) and whether the budget forced it."""
    budget = workload.prices.disk_budget_bytes
    n = world.size.size
    moved_at = np.full(n, math.inf)
    forced = np.zeros(n, dtype=bool)
    sealed, size, expires = world.sealed.tolist(), world.size.tolist(), world.expires.tolist()
    local: list[tuple[float, int]] = []  # (seal time, segment): the oldest first
    expiring: list[tuple[float, int]] = []
    disk = 0.0
    reads = iter(zip(world.read_t.tolist(), world.read_seg.tolist(), strict=True))
    pending = next(reads, None)
    redecide_at = -math.inf

    def gone(seg: int, now: float) -> bool:
        return math.isfinite(moved_at[seg]) or expires[seg] <= now

    for seg in range(n):
        now = sealed[seg]
        while pending is not None and pending[0] < now:
            policy.read(pending[1], pending[0])
            pending = next(reads, None)
        while expiring and expiring[0][0] <= now:
            _, old = heapq.heappop(expiring)
            if not math.isfinite(moved_at[old]):
                disk -= size[old]
        policy.sealed(seg, now)
        if policy.to_cloud(seg, now, disk + size[seg]):
            moved_at[seg] = now
        else:
            disk += size[seg]
            heapq.heappush(local, (now, seg))
            heapq.heappush(expiring, (expires[seg], seg))
        if policy.redecide_s is not None and now >= redecide_at:
            redecide_at = now + policy.redecide_s
            local = [(t, old) for t, old in local if not gone(old, now)]
            heapq.heapify(local)
            for _, old in sorted(local):
                if policy.to_cloud(old, now, disk):
                    moved_at[old] = now
                    disk -= size[old]
        while disk > budget and local:
            _, old = heapq.heappop(local)
            if gone(old, now):
                continue
            moved_at[old] = now
            forced[old] = True
            disk -= size[old]
    while pending is not None:
        policy.read(pending[1], pending[0])
        pending = next(reads, None)
    return moved_at, forced


@dataclass(frozen=True, slots=True)
class Result:
    workload: ArchiveWorkload
    world: World
    costs: dict[str, Costs]
    # How far the oracle's schedule may be from the least possible cost (its Lagrangian lower bound), over the
    # whole replay; None without an oracle.
    oracle_gap: float | None

    def ratio(self, policy: str) -> float:
        return self.costs[policy].total / self.costs["oracle"].total if self.costs["oracle"].total > 0 else 1.0


def run_replay(workload: ArchiveWorkload, *, days: float | None = None,
               policies: tuple[str, ...] = POLICIES) -> Result:
    if days is not None:
        workload = replace(workload, days=days)
    workload.check()
    world = generate(workload)
    prices = workload.prices
    costs: dict[str, Costs] = {}
    schedules: dict[str, np.ndarray[Any, Any]] = {}
    for name in policies:
        if name in ("oracle", "route_oracle"):
            continue
        if name == "agent":
            moved_at, forced = simulate(world, workload, Agent(world, workload))
        elif name in ("always_local", "always_cloud"):
            moved_at, forced = simulate(world, workload, Fixed(cloud=name == "always_cloud"))
        else:
            raise ValueError(f"no policy {name!r}; there are {', '.join(POLICIES)}")
        schedules[name] = moved_at
        costs[name] = evaluate(world, prices, moved_at, forced)
    gap = None
    # The policies' schedules seed the oracles' search: an oracle is never worse than a schedule it was shown.
    seeds = tuple(schedules.values())
    for name, knows in (("oracle", "reads"), ("route_oracle", "rates")):
        if name in policies:
            solution = oracle(world, workload, knows=knows, candidates=seeds)
            costs[name] = evaluate(world, prices, solution.moved_at, solution.forced)
            if knows == "reads":
                # Over the whole replay (warm-up too): the segments do not split, the disk is shared.
                gap = max(solution.total / solution.bound - 1.0, 0.0) if solution.bound > 0 else 0.0
    return Result(workload, world, costs, gap)


def as_json(result: Result) -> dict[str, Any]:
    """``{"workload", "days", "segments", "queries", "policies": {name: {"total", "storage", "retrieval",
    "upload", "cloud_storage", "gateway_reads", "cloud_reads", "cloud_share", "forced_share",
    "peak_disk_bytes"}}, "oracle_gap"}``; money in the prices' currency."""
    return {
        "workload": result.workload.name,
        "days": result.workload.days,
        "segments": int(np.sum(result.world.counted)),
        "queries": result.world.queries,
        "policies": {
            name: {
                "total": round(c.total, 4), "storage": round(c.storage, 4), "retrieval": round(c.retrieval, 4),
                "upload": round(c.upload, 4), "cloud_storage": round(c.cloud_storage, 4),
                "gateway_reads": round(c.gateway_reads, 4), "cloud_reads": round(c.cloud_reads, 4),
                "cloud_share": round(c.cloud_share, 4), "forced_share": round(c.forced_share, 4),
                "peak_disk_bytes": round(c.peak_disk_bytes),
            }
            for name, c in result.costs.items()
        },
        "oracle_gap": None if result.oracle_gap is None else round(result.oracle_gap, 4),
    }


def format_table(result: Result) -> str:
    w = result.workload
    gb_day = sum(r.gb_per_day for r in w.routes)
    lines = [
        f"workload {w.name}: {len(w.routes)} route(s), {gb_day:.2f} GB/day, {w.days:g} days counted "
        f"(after {w.warmup_s / DAY:g} days of warm-up), disk budget {w.prices.disk_budget_bytes / GB:g} GB",
        f"prices: uplink {w.prices.uplink_per_gb:g}/GB, cloud storage {w.prices.cloud_storage_per_gb_month:g}"
        f"/GB-month, egress {w.prices.cloud_egress_per_gb:g}/GB, margin {w.prices.margin:.0%}",
        "",
        f"{'policy':<14} {'total':>10} {'storage':>10} {'retrieval':>10} {'× oracle':>9} {'in cloud':>9} "
        f"{'forced':>7} {'peak disk GB':>13}",
    ]
    oracle_total = result.costs["oracle"].total if "oracle" in result.costs else 0.0
    for name, c in result.costs.items():
        ratio = f"{c.total / oracle_total:9.3f}" if oracle_total > 0 else f"{'-':>9}"
        lines.append(f"{name:<14} {c.total:10.2f} {c.storage:10.2f} {c.retrieval:10.2f} {ratio} "
                     f"{c.cloud_share:9.1%} {c.forced_share:7.1%} {c.peak_disk_bytes / GB:13.1f}")
    if result.oracle_gap is not None:
        lines.append(f"oracle: each segment's future reads known; route_oracle: each route's read rate only. "
                     f"The oracle is within {result.oracle_gap:.1%} of the least possible cost.")
    return "\n".join(lines)

"""The archive replay's engine: the simulated archive, the policies, the oracles and the prices of it all.

See :mod:`agent.archive.replay` for what is simulated and why; this module holds the arithmetic (numpy), loaded
only when a replay runs.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from agent.archive.cost import GB, ArchivePrices, RetrievalRate, SegmentFacts, place_segment
from agent.archive.replay import DAY, HOUR, MONTH, POLICIES, ArchiveWorkload

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
class OracleSolution:
    moved_at: np.ndarray[Any, Any]
    forced: np.ndarray[Any, Any]
    bound: float  # a lower bound on the total cost of any schedule, all segments (warm-up too)
    total: float  # the schedule's total cost, all segments
    iterations: int


def oracle(world: World, workload: ArchiveWorkload, *, knows: str = "reads",
           candidates: tuple[np.ndarray[Any, Any], ...] = (), iterations: int = 200,
           blocks: int = 240) -> OracleSolution:
    """The least-cost clairvoyant schedule within the disk budget (see the module's docstring).

    ``knows="reads"``: each segment's own future reads. ``knows="rates"``: only each route's true reads by age,
    the same for all of its segments (what the best policy that learns per route could know, without knowing
    which segment a query will hit); its schedule is chosen on expected costs and then priced on the real reads.

    A segment either stays on the gateway for its whole life, goes to the cloud at its seal, or leaves after
    k grid steps. The disk constraint is kept at every seal (where the disk's use peaks). Relaxing it with a
    price per byte at each of those instants splits the problem per segment; the relaxed problem prices a move
    between two grid points at the least that any instant between them could cost, so its optimum is a lower
    bound on every schedule's cost, moves off the grid included."""
    prices = workload.prices
    u, s, e = prices.uplink_per_gb / GB, prices.cloud_storage_per_gb_month / GB / MONTH, prices.cloud_egress_per_gb / GB
    budget = float(prices.disk_budget_bytes)
    n = world.size.size
    life = world.expires - world.sealed
    grid = workload.oracle_grid_days * DAY
    steps = max(math.ceil(float(life.max()) / grid), 1)
    ages = np.arange(1, steps + 1) * grid  # move after k grid steps, k = 1..steps

    # Reads of each segment by age bucket: bucket k holds ages in [k·grid, (k+1)·grid).
    read_age = world.read_t - world.sealed[world.read_seg]
    buckets = np.minimum((read_age // grid).astype(np.int64), steps)
    counts = np.zeros((n, steps + 1))
    np.add.at(counts, (world.read_seg, buckets), 1.0)
    if knows == "rates":
        for r in range(len(workload.routes)):
            mine = world.route == r
            counts[mine] = counts[mine].mean(axis=0)
    elif knows != "reads":
        raise ValueError("knows is 'reads' or 'rates'")
    before = np.concatenate([np.zeros((n, 1)), np.cumsum(counts, axis=1)], axis=1)  # before[:, k]: age < k·grid
    total_reads = before[:, -1]
    b = world.size

    # Options: 0 stay, 1 at the seal, 1 + k: after k grid steps (true cost) / during step k (relaxed).
    move_age = np.concatenate([[math.inf, 0.0], ages])
    stay_true = b * u * total_reads
    seal_true = b * (u + s * life + e * total_reads)
    after = np.minimum(ages[None, :], life[:, None])
    n_before = before[:, 1:steps + 1]
    step_true = b[:, None] * (u + s * (life[:, None] - after) + u * n_before + e * (total_reads[:, None] - n_before))
    step_true = np.where(ages[None, :] < life[:, None], step_true, np.inf)  # moving after expiry is staying
    # Relaxed: a move during step k (after (k-1)·grid, at most k·grid): storage from k·grid at the least, the
    # reads of step k at the cheaper price, the disk held until (k-1)·grid at the least.
    in_step = counts[:, :steps]
    lo_before = before[:, :steps]
    step_relaxed = b[:, None] * (u + s * np.maximum(life[:, None] - ages[None, :], 0.0) + u * lo_before
                                 + min(u, e) * in_step + e * (total_reads[:, None] - lo_before - in_step))
    step_relaxed = np.where(ages[None, :] - grid < life[:, None], step_relaxed, np.inf)
    true_cost = np.column_stack([stay_true, seal_true, step_true])
    relaxed_cost = np.column_stack([stay_true, seal_true, step_relaxed])

    points = np.unique(world.sealed)
    first = np.searchsorted(points, world.sealed, side="left")
    held_true = np.concatenate([world.expires[:, None], world.sealed[:, None],
                                world.sealed[:, None] + np.minimum(ages[None, :], life[:, None])], axis=1)
    held_relaxed = held_true.copy()
    held_relaxed[:, 2:] = world.sealed[:, None] + np.minimum(ages[None, :] - grid, life[:, None])
    last_true = np.searchsorted(points, held_true, side="left")  # held at points[first:last]
    last_relaxed = np.searchsorted(points, held_relaxed, side="left")

    def usage(last: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        delta = np.zeros(points.size + 1)
        np.add.at(delta, first, b)
        np.add.at(delta, last, -b)
        return np.cumsum(delta)[:-1]

    def choose(cost: np.ndarray[Any, Any], last: np.ndarray[Any, Any], price: np.ndarray[Any, Any]
               ) -> tuple[np.ndarray[Any, Any], float]:
        cum = np.concatenate([[0.0], np.cumsum(price)])
        penalised = cost + b[:, None] * (cum[last] - cum[first][:, None])
        pick = np.argmin(penalised, axis=1)
        return pick, float(np.sum(penalised[np.arange(n), pick]))

    def schedule(pick: np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        moved_at = world.sealed + move_age[pick]
        return _repair(world, budget, moved_at)

    best: tuple[float, np.ndarray[Any, Any], np.ndarray[Any, Any]] | None = None

    def expected(moved_at: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        # Each segment's cost on the reads by age bucket (a move within a bucket splits its reads pro rata).
        moved = np.isfinite(moved_at)
        age = np.where(moved, moved_at - world.sealed, math.inf)
        x = np.minimum(age / grid, steps + 1.0)
        k = np.minimum(np.floor(x).astype(np.int64), steps)
        reads_before = before[np.arange(n), k] + (x - k) * counts[np.arange(n), np.minimum(k, steps)]
        reads_before = np.where(moved, np.minimum(reads_before, total_reads), total_reads)
        cloud_months = np.where(moved, np.maximum(world.expires - np.where(moved, moved_at, 0.0), 0.0), 0.0)
        return np.asarray(b * (moved * u + s * cloud_months + u * reads_before + e * (total_reads - reads_before)))

    def costs_of(moved_at: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        return segment_costs(world, prices, moved_at) if knows == "reads" else expected(moved_at)

    def consider(moved_at: np.ndarray[Any, Any], forced: np.ndarray[Any, Any]) -> None:
        nonlocal best
        total = float(np.sum(costs_of(moved_at)))
        if best is None or total < best[0]:
            best = (total, moved_at, forced)

    def improve(moved_at: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        # One segment at a time, the cheapest option on the grid that keeps the budget, given all the others;
        # until a sweep changes nothing. (The relaxation's schedules are good but not optimal: this finds, for
        # instance, that a segment read on its first day may stay that day and leave after it.)
        moved_at = moved_at.copy()
        current = costs_of(moved_at)
        held_until = np.searchsorted(points, np.minimum(moved_at, world.expires), side="left")
        use = usage(held_until)
        for _ in range(5):
            changed = False
            for i in range(n):
                lo, hi = int(first[i]), int(held_until[i])
                use[lo:hi] -= b[i]
                ends = last_true[i]
                span = int(ends.max()) - lo
                peak = np.maximum.accumulate(use[lo:lo + span]) if span > 0 else np.zeros(1)
                lengths = ends - lo
                fits = (lengths <= 0) | (peak[np.maximum(lengths - 1, 0)] + b[i] <= budget)
                cost = np.where(fits, true_cost[i], np.inf)
                j = int(np.argmin(cost))
                if cost[j] < current[i] - 1e-12 * max(current[i], 1.0):
                    moved_at[i] = world.sealed[i] + move_age[j]
                    current[i] = cost[j]
                    held_until[i] = hi = int(ends[j])
                    changed = True
                use[lo:hi] += b[i]
            if not changed:
                break
        return moved_at

    # One price per block of seals (``blocks`` of them, about a day long in the shipped replays): the disk's
    # value changes over days, not between two seals, and a few hundred prices converge where thousands would
    # not. Any prices >= 0 give a lower bound.
    block_s = max(float(points[-1] - points[0]) / blocks, 1.0)
    block = ((points - points[0]) // block_s).astype(np.int64)
    prices_per_block = np.zeros(int(block[-1]) + 1)
    bound = -math.inf
    done = 0
    for moved_at in candidates:
        consider(*_repair(world, budget, moved_at))
    step = 1.0
    stale = 0
    direction = np.zeros(prices_per_block.size)
    for done in range(1, iterations + 1):
        price = prices_per_block[block]
        pick, value = choose(relaxed_cost, last_relaxed, price)
        dual = value - budget * float(np.sum(price))
        improved = dual > bound
        if improved:
            bound, stale = dual, 0
        else:
            stale += 1
            if stale >= 10:
                step, stale = step / 2.0, 0
        true_pick, _ = choose(true_cost, last_true, price)
        if improved or done % 5 == 1:  # the repair is the slow part: only from promising prices
            consider(*schedule(true_pick))
        assert best is not None
        excess = usage(last_relaxed[np.arange(n), pick]) - budget
        if not np.any(excess > 0):
            # The relaxed schedule fits (its moves between grid points hold the disk a step less): the bound
            # is as good as it gets, but the real schedule may not fit. Its excess steers the prices instead.
            excess = usage(last_true[np.arange(n), true_pick]) - budget
            if done == 1 and not np.any(excess > 0):
                break  # the budget never binds
        gradient = np.bincount(block, weights=excess, minlength=prices_per_block.size)
        # Deflected: 70 % of the last direction carries over, which damps the zig-zag of whole routes
        # switching places together from one price to the next.
        direction = gradient + 0.7 * direction
        direction = np.where((prices_per_block <= 0) & (direction < 0), 0.0, direction)
        norm = float(np.dot(direction, direction))
        if norm == 0.0:  # what carried over cancelled the news: start afresh from the gradient
            direction = np.where((prices_per_block <= 0) & (gradient < 0), 0.0, gradient)
            norm = float(np.dot(direction, direction))
        if norm == 0.0 or best[0] - bound <= 1e-4 * best[0] or step < 1e-3:
            break
        prices_per_block = np.maximum(prices_per_block + step * (best[0] - dual) / norm * direction, 0.0)
    assert best is not None
    moved_at = improve(best[1])
    total = float(np.sum(costs_of(moved_at)))
    # The oracle plans every move: none is forced on it.
    return OracleSolution(moved_at, np.zeros(n, dtype=bool), min(bound, total), total, done)


def _repair(world: World, budget: float, moved_at: np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any],
                                                                                  np.ndarray[Any, Any]]:
    """Make a schedule fit the budget: wherever a seal takes the disk over, move out at once the segments on
    the gateway that would otherwise stay longest (each byte moved frees the most disk-time)."""
    moved_at = moved_at.copy()
    forced = np.zeros(moved_at.size, dtype=bool)
    leaves = np.minimum(moved_at, world.expires)
    sealed, size = world.sealed.tolist(), world.size.tolist()
    held: list[tuple[float, int]] = []  # (-leaves, segment): the one staying longest first
    departures: list[tuple[float, int]] = []
    gone = np.zeros(moved_at.size, dtype=bool)
    disk = 0.0
    for seg in range(moved_at.size):
        now = sealed[seg]
        while departures and departures[0][0] <= now:
            _, old = heapq.heappop(departures)
            if not gone[old]:
                gone[old] = True
                disk -= size[old]
        if leaves[seg] <= now:
            continue
        disk += size[seg]
        heapq.heappush(held, (-float(leaves[seg]), seg))
        heapq.heappush(departures, (float(leaves[seg]), seg))
        while disk > budget and held:
            _, old = heapq.heappop(held)
            if gone[old]:
                continue
            gone[old] = True
            moved_at[old] = now
            forced[old] = True
            disk -= size[old]
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

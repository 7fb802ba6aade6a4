"""The archive replay's oracles: the least-cost clairvoyant schedule within the disk budget, and the lower
bound that says how far from the least possible cost it may be.

See :mod:`agent.archive.replay` for what is simulated and why; numpy, loaded only when a replay runs.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.archive.cost import GB
from agent.archive.replay import DAY, MONTH, ArchiveWorkload
from agent.archive.world import World, segment_costs

__all__ = ["OracleSolution", "oracle"]


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
    """The least-cost clairvoyant schedule within the disk budget (see :mod:`agent.archive.replay`).

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

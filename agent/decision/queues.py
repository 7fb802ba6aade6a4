"""What the policy knows about each task kind, and the gateway's queues as it sees them: what is queued, priced
with the kinds' current service-time lines (docs/design.md#decision-model, W_local and cold start).
"""

from __future__ import annotations

import heapq
from collections import deque

from agent.decision.estimators import DecayingMean, ServiceTimeModel
from agent.decision.params import DecisionParams, KindParams

# Weight of a configured prior (output size, RTT, provisioning) as this many samples. Small, so the first real
# measurements dominate.
PRIOR_SAMPLES = 1.0


class KindState:
    """Everything the policy knows about one task kind, and how much of it is queued on each side."""

    __slots__ = ("cloud", "cloud_bytes", "cloud_n", "inline", "local", "local_bytes", "local_n", "local_runs", "out",
                 "out_prior")

    def __init__(self, prior: KindParams, params: DecisionParams, inline: bool) -> None:
        self.inline = inline
        memory, half_life = params.service_memory, params.service_half_life_s
        self.local = ServiceTimeModel(prior.local_fixed_s, prior.local_per_byte_s, memory=memory,
                                      half_life_s=half_life)
        self.cloud = ServiceTimeModel(prior.cloud_fixed_s, prior.cloud_per_byte_s, memory=memory,
                                      half_life_s=half_life)
        # Output size: a plain time-decayed mean. Results of the built-ins have a near-constant size per kind.
        self.out = DecayingMean(half_life, PRIOR_SAMPLES)
        self.out_prior = float(prior.out_bytes)
        self.local_n = self.cloud_n = 0
        self.local_bytes = self.cloud_bytes = 0
        self.local_runs = 0  # measured local executions (cold start: see COLD_RUNS)


def queue_wait(n_in_system: int, work_s: float, servers: int) -> float:
    """Expected wait of a new arrival at a FIFO pool of ``servers`` holding ``n_in_system`` tasks worth ``work_s``.

    With a free server it starts at once; otherwise it waits for ``n − servers + 1`` completions, each worth
    the average task, spread over the servers. Exact for equal tasks; the running tasks' elapsed time is not
    known to the policy and is ignored.
    """
    if n_in_system < servers:
        return 0.0
    return work_s * (n_in_system - servers + 1) / (n_in_system * servers)


# Cold start: until a kind has COLD_RUNS measured executions on the gateway, a task of it that has been running
# longer than its estimate proves the estimate short, and the kind's local line is scaled up to what that task
# has already taken (a lower bound of its service time). The first executions of a kind with a bad prior so
# re-price the backlog queued behind them while they still run, not only once they end. Later, one straggler
# among many measured runs says little, and the fit alone is used.
COLD_RUNS = 3


class FifoPool:
    """A FIFO queue in front of ``servers`` executors as the policy sees it: the gateway's worker pool, or the
    event loop for inline kinds.

    It keeps what is queued, not what it was predicted to cost: each running task's start, and the waiting
    tasks in order with their count and byte sum per kind. Every wait is priced with the kinds' *current*
    service-time lines, so a changed estimate re-prices the whole backlog at the next decision (a backlog
    queued on a prior that turned out 10× short is seen as 10× longer at once). A task runs from when it is
    queued (if a server is free) or from when the task ahead of it finishes; finishing is reported, so the
    picture is corrected at every completion. The wait of a new task is found by placing the waiting tasks on
    the earliest-free servers: unlike work / servers, this knows that a task started 0.4 s ago has less left.
    """

    __slots__ = ("queued", "running", "servers", "waiting")

    # Beyond this many waiting tasks the placement is approximated by spreading their work over the servers
    # (off by less than one task's service time), so a decision costs O(servers + kinds) however long the
    # backlog: the work is Σ over kinds of count × a + bytes × b with the current coefficients.
    EXACT_UP_TO = 64

    def __init__(self, servers: int) -> None:
        self.servers = servers
        self.running: list[tuple[float, KindState, int]] = []  # (start, kind, bytes)
        self.waiting: deque[tuple[KindState, int]] = deque()  # (kind, bytes), in order
        self.queued: dict[KindState, list[int]] = {}  # kind → [count, bytes] of its waiting tasks

    def __len__(self) -> int:
        return len(self.running) + len(self.waiting)

    def add(self, kind: KindState, size: int, now: float) -> None:
        if len(self.running) < self.servers:
            self.running.append((now, kind, size))
            return
        self.waiting.append((kind, size))
        sums = self.queued.get(kind)
        if sums is None:
            self.queued[kind] = [1, size]
        else:
            sums[0] += 1
            sums[1] += size

    def _unqueue(self, kind: KindState, size: int) -> None:
        sums = self.queued[kind]
        sums[0] -= 1
        sums[1] -= size
        if sums[0] <= 0:
            del self.queued[kind]

    def remove(self, kind: KindState, size: int, now: float) -> None:
        running = self.running
        for i, (_, k, n) in enumerate(running):
            if k is kind and n == size:
                del running[i]
                break
        else:
            if self.withdraw(kind, size, last=False):
                return  # left before it ran (a failure): nothing else changes
            if not running:
                return
            running.remove(min(running, key=_start))  # an unknown task finished: assume the oldest
        if self.waiting:
            k, n = self.waiting.popleft()
            self._unqueue(k, n)
            running.append((now, k, n))

    def withdraw(self, kind: KindState, size: int, *, last: bool = True) -> bool:
        """Take a waiting task of ``kind`` and ``size`` out of the queue (the last one queued, or the first):
        False when none waits."""
        waiting = self.waiting
        indices = range(len(waiting) - 1, -1, -1) if last else range(len(waiting))
        for i in indices:
            k, n = waiting[i]
            if k is kind and n == size:
                del waiting[i]
                self._unqueue(kind, size)
                return True
        return False

    def scale(self, kind: KindState, a: float, b: float, now: float) -> float:
        """How much longer than its line ``a + b·bytes`` a cold kind's running tasks have proved it to be (≥ 1)."""
        scale = 1.0
        if kind.local_runs >= COLD_RUNS:
            return scale
        for start, k, n in self.running:
            if k is kind:
                predicted = a + b * n
                elapsed = now - start
                if elapsed > predicted * scale:
                    scale = elapsed / predicted if predicted > 0.0 else 1e6
        return scale

    def coefficients(self, kind: KindState, now: float) -> tuple[float, float]:
        """``kind``'s current local line, scaled up by what its running tasks proved (cold kinds only)."""
        a, b = kind.local.coefficients(now)
        if kind.local_runs < COLD_RUNS:
            scale = self.scale(kind, a, b, now)
            if scale > 1.0:
                return a * scale, b * scale
        return a, b

    def wait(self, now: float) -> float:
        running = self.running
        servers = self.servers
        if len(running) < servers:
            return 0.0
        lines: dict[KindState, tuple[float, float]] = {}
        ends = []
        for start, kind, n in running:
            line = lines.get(kind)
            if line is None:
                line = lines[kind] = self.coefficients(kind, now)
            end = start + line[0] + line[1] * n
            # Overdue tasks are taken to finish now: the prediction was short, but they are still running.
            ends.append(end if end > now else now)
        waiting = self.waiting
        if not waiting:
            return min(ends) - now
        if servers == 1 or len(waiting) > self.EXACT_UP_TO:
            work = 0.0
            for kind, (count, size) in self.queued.items():
                line = lines.get(kind)
                if line is None:
                    line = lines[kind] = self.coefficients(kind, now)
                work += count * line[0] + size * line[1]
            if servers == 1:  # the event loop: one running task, the rest in line behind it
                return ends[0] + work - now
            return max(min(ends) - now, (sum(ends) - servers * now + work) / servers)
        heapq.heapify(ends)
        for kind, n in waiting:
            line = lines.get(kind)
            if line is None:
                line = lines[kind] = self.coefficients(kind, now)
            heapq.heapreplace(ends, ends[0] + line[0] + line[1] * n)
        return ends[0] - now


def _start(entry: tuple[float, KindState, int]) -> float:
    return entry[0]


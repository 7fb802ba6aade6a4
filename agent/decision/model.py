"""The total-time model: per task, does the gateway or the cloud finish it sooner (docs/design.md#decision-model).

``T_local = W_local + S_local(k, s_in)``
``T_cloud = P + RTT + (Q_up + s_in) / B_up + W_cloud + S_cloud(k, s_in) + s_out(k) / B_down``

Sans-I/O and deterministic: the caller passes every measurement and the time (``now``, seconds on any monotonic
clock); the same calls in the same order give the same decisions. The daemon and ``edge-agent replay`` run
this same class.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from agent.decision.estimators import DecayingMean, NetworkEstimate, ServiceTimeModel
from agent.decision.params import DecisionParams, KindParams, ParamsSource, decision_params

Target = Literal["local", "cloud"]
Reason = Literal["model", "placement", "no_cloud", "circuit_open"]
Placement = Literal["auto", "local", "cloud"]  # a route's placement (agent.config.Route), passed to decide()
Direction = Literal["up", "down"]

# Names of the terms, in the order of the formulas; each Decision.terms has all of them.
LOCAL_TERMS = ("local_wait_s", "local_service_s")
CLOUD_TERMS = (
    "provisioning_s",
    "rtt_s",
    "uplink_queue_s",
    "upload_s",
    "cloud_wait_s",
    "cloud_service_s",
    "download_s",
)

_BITS = 8.0
_MIN_RATE = 1.0  # bytes/s: keeps every term finite even after a total outage was measured
# Weight of the configured network priors: as much as this many seconds of measured transfer (bandwidth) or
# this many samples (RTT, provisioning, output size). Small, so the first real measurements dominate.
_PRIOR_SECONDS = 0.5
_PRIOR_SAMPLES = 1.0
# Bandwidth estimates also keep a memory this share of ``network_half_life_s`` long and use it while it predicts
# the link's transfers better (see NetworkEstimate): on links whose capacity decorrelates within a second or two,
# as LTE while driving, a 1 s memory notices a fade or a recovery after one transfer; on steadier links the
# configured memory keeps averaging. Which one predicted better is judged over about a minute of transfers.
_FAST_MEMORY = 0.2
_SELECTION_HALF_LIFE_S = 60.0
# Hedging (see Decision.hedge_after_s): a cloud task counts as overdue once it has taken HEDGE_SLACK_S longer
# than its predicted total, HEDGE_RATIO times that total, and HEDGE_LOCAL_RATIO times what the gateway was
# expected to need for it, whichever is latest. The slack and the ratio absorb ordinary prediction error (upload
# times on cellular links vary by about ×2 either way), so mostly uploads that met a fade or an outage are
# hedged; the local bound does not start a gateway copy before the task has waited as long as that copy is
# expected to take (the classic rent-or-buy rule). On the shared traces (links up to ~5 Mbit/s) slacks of 0.2-2 s
# and ratios of 1.5-3 did the same within seed noise. On faster links, where a cloud total is a few hundred
# milliseconds, a 1 s slack mostly delayed the rescue of tasks caught by an outage: 0.3 s took synthetic 5G-like
# traces from 1.110 to 1.093 × the oracle on average, and Mahimahi traces scaled ×50 by 0.01-0.02.
HEDGE_SLACK_S = 0.3
HEDGE_RATIO = 2.0
HEDGE_LOCAL_RATIO = 1.0
# A second, earlier hedge deadline for the upload alone (Decision.upload_by_s). An upload still unfinished
# after the lease wait, the cloud queue's wait (the daemon takes a lease slot before it sends), a round trip
# and UPLOAD_HEDGE_RATIO times its predicted uplink time (queue included) plus UPLOAD_HEDGE_SLACK_S has met a
# fade or an outage; waiting for the whole cloud total to run out as well only delays the rescue. This matters
# on fast links: a 100 kB clip takes 2 ms at 400 Mbit/s, and an outage showed only once the cloud total and
# its 0.3 s slack had passed. On synthetic 5G-like traces it took the agent from 1.093 to 1.061 × the oracle
# on average (worst 1.146 → 1.095), on Mahimahi traces scaled ×50 by up to 0.06; on the shared traces the
# mean stayed the same (1.0278 → 1.0277). Ratios 1.5-2 and slacks 0.02-0.1 s did about the same; 0.2 s gave
# back a third of the gain.
UPLOAD_HEDGE_RATIO = 2.0
UPLOAD_HEDGE_SLACK_S = 0.05
# What a cancelled upload proves (the link carried at most its size in the time it ran) is a bound, not a
# measured transfer: it counts as this share of a measured transfer of the same duration. In the replays, not
# counting it at all let the agent keep offloading into a dead link (each task then paying the hedge delay);
# counting it fully made the agent too timid after every fade on LTE.
_CANCELLED_WEIGHT = 0.3
# A probe questions estimates that may be stale, so it must keep to its budget even if the uplink turns out
# ten times slower than estimated (cellular links swing that much): a probe is a small task, never a big one
# whose upload merely looks cheap on old estimates.
_PROBE_LINK_DOUBT = 9.0
# Late binding (Policy.rebind): a task waiting on the gateway moves to the cloud only when the cloud now finishes
# it sooner by more than the largest of REBIND_MARGIN_S, REBIND_MARGIN_RATIO × its local total and the
# decision margin. The ratio keeps estimation noise from moving tasks whose gain is within it; a task moves at
# most once (a cloud task comes back to the gateway only as a hedge or a fallback), so nothing ping-pongs.
REBIND_MARGIN_S = 0.05
REBIND_MARGIN_RATIO = 0.1
# A move must also survive an uplink this much slower than estimated (upload and uplink queue counted
# 1 + REBIND_LINK_DOUBT times): upload times on cellular links vary by about ×2 either way, and a task moved
# into a fade comes back only through its hedge, after waiting longer than it would have in its place. In the
# replays with an outage, moving on the plain estimate sent queued clips into the dead link (mean completion
# +4 %); with the doubt, late binding is neutral there and the burst on a LAN (uploads of milliseconds) is
# unaffected.
REBIND_LINK_DOUBT = 1.0


# Not frozen: a frozen dataclass sets each field through object.__setattr__, three times the cost of a plain
# one, and the daemon builds a Task and a Decision for every message. Treat both as values all the same.
@dataclass(slots=True)
class Task:
    """What the model needs to know about a task: its kind and its input size in bytes."""

    kind: str
    in_bytes: int


@dataclass(slots=True)
class Decision:
    """Where a task runs, both predicted totals, why, and every term of both totals (seconds)."""

    target: Target
    t_local_s: float
    t_cloud_s: float
    reason: Reason
    terms: Mapping[str, float]
    # True when the model preferred the gateway but the task goes to the cloud to refresh stale estimates.
    probe: bool = False
    # True when the cloud would have won but for provisioning: the caller should request a lease now, so the
    # next tasks find it warm (provisioning is paid once for many tasks, not charged to this one).
    prewarm: bool = False
    # Hedging a cloud task: if its result has not come ``hedge_after_s`` seconds after this decision, the caller
    # starts the same task on the gateway too (reporting it with ``task_started("local", task)``), keeps the
    # result that comes first and cancels or ignores the other copy: ``task_finished`` for each copy once it
    # ended, or ``cloud_cancelled`` for a cloud copy cancelled because the gateway's finished first. Finite only
    # for a cloud task the model chose (probes included); ``math.inf`` for local tasks and for routes placed in
    # the cloud by the operator. The delay is the predicted cloud total plus a bound that ordinary prediction
    # error stays within (see ``HEDGE_*``), so that a task stuck in an upload that met a fade does not wait for
    # the fade to end.
    hedge_after_s: float = math.inf
    # The upload's own deadline (seconds after this decision, ``math.inf`` where ``hedge_after_s`` is): a caller
    # that sees when each upload ends starts the gateway copy at this time if the upload has not ended yet
    # (see ``UPLOAD_HEDGE_*``). One that cannot see uploads end ignores it.
    upload_by_s: float = math.inf
    # True for a decision of Policy.rebind that moved a task waiting on the gateway to the cloud (late binding).
    rebound: bool = False


class _Kind:
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
        self.out = DecayingMean(half_life, _PRIOR_SAMPLES)
        self.out_prior = float(prior.out_bytes)
        self.local_n = self.cloud_n = 0
        self.local_bytes = self.cloud_bytes = 0
        self.local_runs = 0  # measured local executions (cold start: see COLD_RUNS)


def _queue_wait(n_in_system: int, work_s: float, servers: int) -> float:
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


class _FifoPool:
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
        self.running: list[tuple[float, _Kind, int]] = []  # (start, kind, bytes)
        self.waiting: deque[tuple[_Kind, int]] = deque()  # (kind, bytes), in order
        self.queued: dict[_Kind, list[int]] = {}  # kind → [count, bytes] of its waiting tasks

    def __len__(self) -> int:
        return len(self.running) + len(self.waiting)

    def add(self, kind: _Kind, size: int, now: float) -> None:
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

    def _unqueue(self, kind: _Kind, size: int) -> None:
        sums = self.queued[kind]
        sums[0] -= 1
        sums[1] -= size
        if sums[0] <= 0:
            del self.queued[kind]

    def remove(self, kind: _Kind, size: int, now: float) -> None:
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

    def withdraw(self, kind: _Kind, size: int, *, last: bool = True) -> bool:
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

    def scale(self, kind: _Kind, a: float, b: float, now: float) -> float:
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

    def coefficients(self, kind: _Kind, now: float) -> tuple[float, float]:
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
        lines: dict[_Kind, tuple[float, float]] = {}
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


def _start(entry: tuple[float, _Kind, int]) -> float:
    return entry[0]


class Policy:
    """The decision policy with its online estimators. One instance per agent; not thread-safe (one loop)."""

    def __init__(
        self,
        settings: DecisionParams | ParamsSource | None = None,
        *,
        local_workers: int = 1,
        cloud_slots: int | None = None,
        inline_kinds: Collection[str] = (),
        lease_idle_s: float = 60.0,
    ) -> None:
        """``settings``: the model's :class:`DecisionParams`, or anything that gives them (``as_params()``, as
        ``agent.config.DecisionSettings`` does), or None for the defaults; ``local_workers``: the pool size
        (``EDGE_AGENT_LOCAL__WORKERS``); ``cloud_slots``: a lease's capacity (default: the parameters'
        ``cloud_slots``); ``inline_kinds``: light kinds the daemon runs on its event loop, one at a time, outside
        the pool (their local wait is the loop's queue, not the pool's); ``lease_idle_s``: how long the lease
        manager keeps an unused lease, so how long after the last cloud task no provisioning is expected (used
        until :meth:`observe_lease` reports the lease's state)."""
        if local_workers < 1:
            raise ValueError("local_workers must be at least 1")
        self._params = params = decision_params(settings)
        self._workers = local_workers
        self._lease_idle_s = lease_idle_s
        self._cloud_slots = cloud_slots if cloud_slots is not None else params.cloud_slots
        if self._cloud_slots < 1:
            raise ValueError("cloud_slots must be at least 1")
        def network(prior: float, weight: float, rate: bool) -> NetworkEstimate:
            half_life = params.network_half_life_s
            return NetworkEstimate(prior, half_life_s=half_life, rate=rate, prior_weight=weight,
                                   baseline_half_life_s=params.baseline_half_life_s,
                                   fast_half_life_s=half_life * _FAST_MEMORY if rate else None,
                                   selection_half_life_s=_SELECTION_HALF_LIFE_S)

        self._up = network(params.uplink_mbps * 1e6 / _BITS, _PRIOR_SECONDS, True)
        self._down = network(params.downlink_mbps * 1e6 / _BITS, _PRIOR_SECONDS, True)
        # RTT on a 0 prior would be rejected by the estimator; a configured 0 means "negligible".
        self._rtt = network(max(params.rtt_s, 1e-6), _PRIOR_SAMPLES, False)
        self._provisioning = DecayingMean(params.baseline_half_life_s, _PRIOR_SAMPLES)
        self._kinds: dict[str, _Kind] = {}
        self._inline_kinds = frozenset(inline_kinds)
        self._pool = _FifoPool(local_workers)
        self._loop = _FifoPool(1)  # inline kinds run one at a time on the daemon's event loop
        self._active_cloud: dict[str, _Kind] = {}
        self._cloud_n = 0
        self._up_pending: deque[int] = deque()  # input sizes of cloud tasks not yet uploaded, in FIFO order
        self._up_queued = 0  # their sum: Q_up
        self._up_head_since: float | None = None  # when the oldest pending upload could start
        # Sizes of cloud tasks whose upload was observed and that have not finished, so that finishing one does
        # not also take a same-size task's upload (fixed-size frames) off the uplink queue.
        self._up_done: dict[int, int] = {}
        self._last_cloud_done: float | None = None
        self._provision_started: float | None = None
        self._lease_ready: bool | None = None  # None: inferred from recent cloud activity
        self._clock = 0.0  # latest time passed in, for the bookkeeping calls that do not take one
        self._last_cloud_seen = -math.inf  # the latest cloud result or probe; never, at first
        self._probe_interval = params.probe_interval_s  # doubles while probes never lead to offloading

    def reconfigure(self, settings: DecisionParams | ParamsSource) -> None:
        """New parameters on a reload (SIGHUP) without forgetting what was learned; ``settings`` as for the
        constructor.

        Margins, probing and the provisioning prior apply at once, and every prior to kinds first seen from now
        on; the estimators already running keep their measurements and half-lives (a restart resets them).
        """
        self._params = params = decision_params(settings)
        self._probe_interval = params.probe_interval_s

    # ------------------------------------------------------------------ decisions

    def decide(
        self,
        task: Task,
        now: float,
        *,
        placement: Placement = "auto",
        cloud_available: bool = True,
        circuit_open: bool = False,
    ) -> Decision:
        """Both totals for ``task`` at time ``now`` and the target.

        ``placement`` is the route's override; ``cloud_available`` False means no cloud is configured;
        ``circuit_open`` means the cloud client is refusing calls. These change the target (with the matching
        reason) only when the task would otherwise go to the cloud, or for ``placement="local"``.
        """
        if now > self._clock:
            self._clock = now
        kind = self._kinds.get(task.kind) or self._new_kind(task.kind)
        size = task.in_bytes
        params = self._params

        pool = self._loop if kind.inline else self._pool
        if kind.local_runs < COLD_RUNS:
            la, lb = pool.coefficients(kind, now)
        else:
            la, lb = kind.local.coefficients(now)
        local_service = la + lb * size
        local_wait = pool.wait(now)

        up = max(self._up.estimate(now), _MIN_RATE)
        rtt = self._rtt.estimate(now)
        since = self._up_head_since
        if since is not None and self._provision_started is None and now - since > rtt:
            # An upload still pending after E seconds proves the link slower than its size / (E − RTT): a censored
            # sample, so an outage shows in the very next decision instead of when the upload ends. Not before
            # a round trip has passed (a small upload's time is all latency), nor while the lease is still being
            # provisioned (the upload has not started; the wait for the lease is counted in provisioning_s).
            up = max(min(up, self._up_pending[0] / (now - since - rtt)), _MIN_RATE)
        down = max(self._down.estimate(now), _MIN_RATE)
        ca, cb = kind.cloud.coefficients(now)
        cloud_service = ca + cb * size
        # Tasks still waiting for the uplink are counted there (uplink_queue_s), not yet in the cloud's queue.
        cloud_n, slots = self._cloud_n, self._cloud_slots
        n_uploaded = cloud_n - len(self._up_pending)
        provisioning = self._provisioning_wait(now)
        uplink_queue = self._up_queued / up
        upload = size / up
        cloud_wait = 0.0
        if cloud_n >= slots:
            work = self._cloud_work(self._active_cloud, now)
            if n_uploaded >= slots:
                cloud_wait = _queue_wait(n_uploaded, work * n_uploaded / cloud_n, slots)
            # The tasks still waiting for the uplink reach the cloud ahead of this one too: when inputs are
            # small (a burst), the slots, not the uplink, are what this task waits for, less the time its own
            # upload and those ahead of it take (the cloud works meanwhile).
            all_ahead = _queue_wait(cloud_n, work, slots) - uplink_queue - upload
            if all_ahead > cloud_wait:
                cloud_wait = all_ahead
        download = kind.out.estimate(kind.out_prior, now) / down
        terms = {
            "local_wait_s": local_wait,
            "local_service_s": local_service,
            "provisioning_s": provisioning,
            "rtt_s": rtt,
            "uplink_queue_s": uplink_queue,
            "upload_s": upload,
            "cloud_wait_s": cloud_wait,
            "cloud_service_s": cloud_service,
            "download_s": download,
        }
        t_local = local_wait + local_service
        t_cloud = provisioning + rtt + uplink_queue + upload + cloud_wait + cloud_service + download

        margin = max(params.margin_s, params.margin_ratio * t_local)
        target: Target = "cloud" if t_cloud < t_local - margin else "local"
        reason: Reason = "model"
        probe = False
        probe_lease = False
        if placement != "auto":
            target, reason = placement, "placement"
        if target == "cloud":
            if not cloud_available:
                target, reason = "local", "no_cloud"
            elif circuit_open:
                target, reason = "local", "circuit_open"
        elif (
            reason == "model"
            and cloud_available
            and not circuit_open
            and params.probe_interval_s > 0
            and now - self._last_cloud_seen >= self._probe_interval
            and t_cloud + _PROBE_LINK_DOUBT * upload - provisioning - t_local <= params.probe_budget_s
        ):
            if provisioning > 0.0:
                # Estimates of a side that is never used cannot correct themselves, but a task sent while no
                # lease is warm would wait out the provisioning (seconds) to refresh them. Request the lease
                # instead; the probe goes with the first task of the budget once it is ready.
                probe_lease = self._provision_started is None
            else:
                # One bounded-cost task refreshes them. The timer restarts now, and it doubles (up to 16×) until
                # the model offloads on its own: on a link that stays bad, probes become rare.
                target, probe = "cloud", True
                if self._last_cloud_seen > -math.inf:
                    self._probe_interval = min(self._probe_interval * 2.0, params.probe_interval_s * 16.0)
                self._last_cloud_seen = now
        if target == "cloud" and not probe:
            self._probe_interval = params.probe_interval_s
        prewarm = probe_lease or (
            target == "local"
            and reason == "model"
            and cloud_available
            and not circuit_open
            and self._provision_started is None
            and provisioning > 0.0
            and t_cloud - provisioning < t_local - margin
        )
        if prewarm:
            self._provision_started = now  # the caller requests a lease; count its provisioning down from now
        hedge_after = upload_by = math.inf
        if target == "cloud" and reason == "model":
            hedge_after = max(t_cloud + HEDGE_SLACK_S, HEDGE_RATIO * t_cloud, HEDGE_LOCAL_RATIO * t_local)
            # The cloud's queue counts too: the daemon takes a slot of the lease before it sends.
            upload_by = min(hedge_after, provisioning + cloud_wait + rtt + UPLOAD_HEDGE_SLACK_S
                            + UPLOAD_HEDGE_RATIO * (uplink_queue + upload))
        return Decision(target, t_local, t_cloud, reason, terms, probe, prewarm, hedge_after, upload_by)

    def rebind(
        self,
        task: Task,
        now: float,
        *,
        cloud_available: bool = True,
        circuit_open: bool = False,
    ) -> Decision | None:
        """Late binding: ``task`` waits on the gateway, queued and not started (the last of its kind and size
        queued there): does the cloud now finish it sooner?

        Decided as by :meth:`decide` with the current estimates and queues, the task's own place in the queue
        taken as the wait. When the cloud wins by more than the rebind margin (``REBIND_MARGIN_*``) the task is
        moved in the bookkeeping (as ``task_finished("local")`` then ``task_started("cloud")``) and the decision,
        with ``rebound`` True, is returned: the caller sends the task to the cloud. Otherwise nothing changes
        and the result is None, or, when the cloud would win but for provisioning, a decision with
        ``prewarm`` True and ``rebound`` False (the caller requests a lease; the task stays). Probes are not
        started here.
        """
        kind = self._kinds.get(task.kind)
        if not cloud_available or circuit_open or kind is None:
            return None
        pool = self._loop if kind.inline else self._pool
        size = task.in_bytes
        if not pool.withdraw(kind, size):
            return None
        probe_state = self._probe_interval, self._last_cloud_seen, self._provision_started
        decision = self.decide(task, now)
        params = self._params
        t_local = decision.t_local_s
        margin = max(REBIND_MARGIN_S, REBIND_MARGIN_RATIO * t_local, params.margin_s, params.margin_ratio * t_local)
        terms = decision.terms
        doubted = decision.t_cloud_s + REBIND_LINK_DOUBT * (terms["uplink_queue_s"] + terms["upload_s"])
        if decision.target == "cloud" and not decision.probe and doubted < t_local - margin:
            kind.local_n -= 1
            kind.local_bytes = max(0, kind.local_bytes - size)
            decision.rebound = True
            self.task_started("cloud", task, now)
            return decision
        self._probe_interval, self._last_cloud_seen = probe_state[0], probe_state[1]
        pool.add(kind, size, now)  # back to its place: it was the last of its kind queued
        if decision.prewarm:
            decision.target, decision.probe = "local", False
            decision.hedge_after_s = decision.upload_by_s = math.inf
            return decision
        self._provision_started = probe_state[2]
        return None

    # ------------------------------------------------------------------ observations

    def observe_local(self, kind: str, in_bytes: int, service_s: float, now: float) -> None:
        """A local execution of ``in_bytes`` took ``service_s`` (measured in the worker, without queueing)."""
        self._clock = max(self._clock, now)
        entry = self._kind(kind)
        entry.local.observe(in_bytes, service_s, now)
        entry.local_runs += 1

    def observe_cloud(self, kind: str, in_bytes: int, service_s: float, now: float) -> None:
        """The cloud reported executing the task in ``service_s`` (the resource API's ``exec_ms`` / 1000)."""
        self._clock = max(self._clock, now)
        self._kind(kind).cloud.observe(in_bytes, service_s, now)
        self._last_cloud_seen = max(self._last_cloud_seen, now)

    def observe_output(self, kind: str, n_bytes: int, now: float) -> None:
        """A result of ``kind`` was ``n_bytes`` long (local or cloud: the result is the same)."""
        self._clock = max(self._clock, now)
        if n_bytes >= 0:
            self._kind(kind).out.observe(float(n_bytes), 1.0, now)

    def observe_transfer(self, direction: Direction, n_bytes: int, seconds: float, now: float) -> None:
        """``n_bytes`` crossed the link in ``seconds``, net of server time and RTT.

        An upload also counts against the uplink queue (``Q_up``) of the tasks in flight.
        """
        self._clock = max(self._clock, now)
        if direction == "up":
            self._up.observe(n_bytes / seconds if seconds > 0 else 0.0, seconds, now)
            self._upload_ended(n_bytes)
            self._up_head_since = now if self._up_pending else None
        elif direction == "down":
            self._down.observe(n_bytes / seconds if seconds > 0 else 0.0, seconds, now)
        else:
            raise ValueError(f"direction must be 'up' or 'down', not {direction!r}")

    def _upload_ended(self, n_bytes: int) -> None:
        """A pending upload left the uplink: the oldest of that size (uploads may end out of order when they
        share the link), else the oldest."""
        pending = self._up_pending
        if not pending:
            return
        if pending[0] == n_bytes or n_bytes not in pending:
            size = pending.popleft()
        else:
            pending.remove(n_bytes)
            size = n_bytes
        self._up_queued -= size
        self._up_done[size] = self._up_done.get(size, 0) + 1

    def observe_rtt(self, seconds: float, now: float) -> None:
        self._clock = max(self._clock, now)
        self._rtt.observe(seconds, 1.0, now)

    def observe_provisioning(self, seconds: float, now: float) -> None:
        """A lease became ready ``seconds`` after it was requested."""
        self._clock = max(self._clock, now)
        if seconds >= 0 and math.isfinite(seconds):
            self._provisioning.observe(seconds, 1.0, now)
        self._provision_started = None
        self._lease_ready = None if self._lease_ready is None else True
        # A lease that just became ready stays for lease_idle_s even before its first task.
        self._last_cloud_done = now if self._last_cloud_done is None else max(self._last_cloud_done, now)
        if self._up_pending:
            self._up_head_since = now  # uploads wait for the lease; they can start now

    def observe_lease(self, ready: bool, *, slots: int | None = None) -> None:
        """The lease manager's view: whether a ready lease exists, and its capacity. Once called, the policy
        stops inferring warmth from its own traffic."""
        self._lease_ready = ready
        if slots is not None and slots >= 1:
            self._cloud_slots = slots

    # ------------------------------------------------------------------ queue bookkeeping

    def task_started(self, target: Target, task: Task, now: float | None = None) -> None:
        """``task`` was queued for ``target`` (call once per task, right after deciding).

        ``now`` (default: the time of the latest call) dates a cloud request sent while no lease was warm, from
        which the remaining provisioning time is counted down.
        """
        now = self._clock if now is None else now
        if target == "cloud" and self._provision_started is None and not self._lease_warm(now):
            self._provision_started = now
        kind = self._kind(task.kind)
        if target == "local":
            kind.local_n += 1
            kind.local_bytes += task.in_bytes
            pool = self._loop if kind.inline else self._pool
            pool.add(kind, task.in_bytes, now)
        else:
            kind.cloud_n += 1
            kind.cloud_bytes += task.in_bytes
            self._cloud_n += 1
            self._active_cloud[task.kind] = kind
            self._up_pending.append(task.in_bytes)
            self._up_queued += task.in_bytes
            if len(self._up_pending) == 1:
                self._up_head_since = now + self._provisioning_wait(now)

    def task_finished(self, target: Target, task: Task, now: float | None = None) -> None:
        """``task`` left ``target`` (done or failed). ``now`` (default: the time of the latest call) dates the
        last use of the cloud, which keeps a lease counted as warm for ``lease_idle_s``."""
        now = self._clock if now is None else now
        kind = self._kind(task.kind)
        if target == "local":
            if kind.local_n > 0:
                kind.local_n -= 1
                kind.local_bytes = max(0, kind.local_bytes - task.in_bytes)
            (self._loop if kind.inline else self._pool).remove(kind, task.in_bytes, now)
            return
        if kind.cloud_n > 0:
            kind.cloud_n -= 1
            kind.cloud_bytes = max(0, kind.cloud_bytes - task.in_bytes)
            self._cloud_n -= 1
            done = self._up_done.get(task.in_bytes, 0)
            if done:
                self._up_done[task.in_bytes] = done - 1  # its upload was already taken off the uplink
            elif task.in_bytes in self._up_pending:
                # Finished (failed) without an observed upload: it no longer occupies the uplink.
                self._up_pending.remove(task.in_bytes)
                self._up_queued -= task.in_bytes
                if not self._up_pending:
                    self._up_head_since = None
            if self._cloud_n == 0 and (self._up_pending or self._up_done):
                # Nothing is in the cloud: whatever the bookkeeping still holds is drift, not uploads.
                self._up_pending.clear()
                self._up_done.clear()
                self._up_queued = 0
                self._up_head_since = None
        if kind.cloud_n == 0:
            self._active_cloud.pop(task.kind, None)
        self._last_cloud_done = now if self._last_cloud_done is None else max(self._last_cloud_done, now)
        if self._cloud_n == 0:
            self._provision_started = None  # nothing waits for a lease any more

    def cloud_cancelled(self, task: Task, now: float) -> None:
        """The cloud copy of a hedged ``task`` was cancelled: its local copy finished first.

        Bookkeeping as ``task_finished("cloud", task, now)``. If its upload was the one in progress on the uplink
        and never completed, the time it has been uploading is kept as a sample of the uplink: the link carried
        at most ``in_bytes`` in that time (a bound, so weighted by ``_CANCELLED_WEIGHT``). Without it, the
        estimate would forget the fade that the upload met the moment the upload stops counting as pending.
        """
        now = max(self._clock, now)
        since = self._up_head_since
        pending = self._up_pending
        if pending and pending[0] == task.in_bytes and since is not None and now > since:
            elapsed = now - since
            self._up.observe(task.in_bytes / elapsed, _CANCELLED_WEIGHT * elapsed, now)
            self._upload_ended(task.in_bytes)  # what task_finished below then settles
            self._up_head_since = now if pending else None
        self.task_finished("cloud", task, now)

    # ------------------------------------------------------------------ introspection

    def snapshot(self, now: float) -> dict[str, Any]:
        """Current estimates and queue state as plain data (logs, metrics, ``edge-agent explain``)."""
        kinds = {}
        for name, kind in sorted(self._kinds.items()):
            la, lb = kind.local.coefficients(now)
            ca, cb = kind.cloud.coefficients(now)
            kinds[name] = {
                "local_fixed_s": la, "local_per_byte_s": lb, "local_samples": kind.local.samples(now),
                "cloud_fixed_s": ca, "cloud_per_byte_s": cb, "cloud_samples": kind.cloud.samples(now),
                "out_bytes": kind.out.estimate(kind.out_prior, now),
                "queued_local": kind.local_n, "queued_cloud": kind.cloud_n,
            }
        return {
            "uplink_mbps": self._up.estimate(now) * _BITS / 1e6,
            "uplink_baseline_mbps": self._up.baseline(now) * _BITS / 1e6,
            "uplink_memory_s": self._up.memory_s(),
            "downlink_mbps": self._down.estimate(now) * _BITS / 1e6,
            "rtt_s": self._rtt.estimate(now),
            "provisioning_s": self._provisioning.estimate(self._params.provisioning_s, now),
            "lease_warm": self._lease_warm(now),
            "local_workers": self._workers,
            "cloud_slots": self._cloud_slots,
            "local_tasks": len(self._pool),
            "inline_tasks": len(self._loop),
            "cloud_tasks": self._cloud_n,
            "uplink_queued_bytes": self._up_queued,
            "kinds": kinds,
        }

    # ------------------------------------------------------------------ internals

    def _kind(self, name: str) -> _Kind:
        return self._kinds.get(name) or self._new_kind(name)

    def _new_kind(self, name: str) -> _Kind:
        priors = self._params.kinds
        kind = _Kind(priors.get(name) or priors["*"], self._params, name in self._inline_kinds)
        self._kinds[name] = kind
        return kind

    @staticmethod
    def _cloud_work(active: dict[str, _Kind], now: float) -> float:
        # Linear service models make queued work linear in the counts and bytes per kind, so the total is
        # recomputed from the current fits instead of being accumulated (no drift when estimates change).
        work = 0.0
        for kind in active.values():
            a, b = kind.cloud.coefficients(now)
            work += a * kind.cloud_n + b * kind.cloud_bytes
        return work

    def _lease_warm(self, now: float) -> bool:
        if self._lease_ready is not None:
            return self._lease_ready
        if self._cloud_n > 0 and self._provision_started is None:
            return True
        last = self._last_cloud_done
        return last is not None and now - last <= self._lease_idle_s

    def _provisioning_wait(self, now: float) -> float:
        if self._lease_warm(now) and self._provision_started is None:
            return 0.0
        expected = self._provisioning.estimate(self._params.provisioning_s, now)
        if self._provision_started is not None:
            return max(0.0, expected - (now - self._provision_started))
        return expected

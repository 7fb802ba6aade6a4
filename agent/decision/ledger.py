"""What the policy has learned and what it has queued: its estimators, fed by the observations, and the
bookkeeping of the tasks on each side (docs/design.md#policy-interface). agent.decision.model decides from it.

Sans-I/O: every call passes the time (or takes the latest time passed in).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Collection
from typing import Any

from agent.decision.estimators import DecayingMean, NetworkEstimate
from agent.decision.params import DecisionParams, ParamsSource, decision_params
from agent.decision.queues import PRIOR_SAMPLES, FifoPool, KindState
from agent.decision.values import Direction, Target, Task

BITS = 8.0
# Weight of the configured bandwidth priors: as much as this many seconds of measured transfer. Small, so the
# first real measurements dominate.
_PRIOR_SECONDS = 0.5
# Bandwidth estimates also keep a memory this share of ``network_half_life_s`` long and use it while it predicts
# the link's transfers better (see NetworkEstimate): on links whose capacity decorrelates within a second or two,
# as LTE while driving, a 1 s memory notices a fade or a recovery after one transfer; on steadier links the
# configured memory keeps averaging. Which one predicted better is judged over about a minute of transfers.
_FAST_MEMORY = 0.2
_SELECTION_HALF_LIFE_S = 60.0
# What a cancelled upload proves (the link carried at most its size in the time it ran) is a bound, not a
# measured transfer: it counts as this share of a measured transfer of the same duration. In the replays, not
# counting it at all let the agent keep offloading into a dead link (each task then paying the hedge delay);
# counting it fully made the agent too timid after every fade on LTE.
_CANCELLED_WEIGHT = 0.3


class Ledger:
    """The policy's estimates and queues, and the calls that keep them current. One instance per agent, as the
    base of :class:`agent.decision.Policy`; not thread-safe (one loop)."""

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

        self._up = network(params.uplink_mbps * 1e6 / BITS, _PRIOR_SECONDS, True)
        self._down = network(params.downlink_mbps * 1e6 / BITS, _PRIOR_SECONDS, True)
        # RTT on a 0 prior would be rejected by the estimator; a configured 0 means "negligible".
        self._rtt = network(max(params.rtt_s, 1e-6), PRIOR_SAMPLES, False)
        self._provisioning = DecayingMean(params.baseline_half_life_s, PRIOR_SAMPLES)
        self._kinds: dict[str, KindState] = {}
        self._inline_kinds = frozenset(inline_kinds)
        self._pool = FifoPool(local_workers)
        self._loop = FifoPool(1)  # inline kinds run one at a time on the daemon's event loop
        self._active_cloud: dict[str, KindState] = {}
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

    def _withdraw_upload(self, task: Task, now: float) -> int:
        """Take a cloud task whose upload has not started out of the cloud's bookkeeping (late binding back to
        the gateway): the last pending upload of its size, not the one in progress. Returns its place in the
        uplink's queue for :meth:`_restore_upload`, or -1 when there is none."""
        kind = self._kinds.get(task.kind)
        pending, size = self._up_pending, task.in_bytes
        if kind is None or kind.cloud_n <= 0 or not pending:
            return -1
        since = self._up_head_since
        # The oldest pending upload is on the link unless a lease is still on its way (then none has started).
        first = 1 if since is not None and since <= now and self._provision_started is None else 0
        for i in range(len(pending) - 1, first - 1, -1):
            if pending[i] == size:
                del pending[i]
                break
        else:
            return -1
        self._up_queued -= size
        if not pending:
            self._up_head_since = None
        kind.cloud_n -= 1
        kind.cloud_bytes = max(0, kind.cloud_bytes - size)
        self._cloud_n -= 1
        if kind.cloud_n == 0:
            self._active_cloud.pop(task.kind, None)
        return i

    def _restore_upload(self, task: Task, index: int, since: float | None) -> None:
        """Undo :meth:`_withdraw_upload` (the task stays in the cloud); ``since``: the head's start before."""
        kind = self._kind(task.kind)
        self._up_pending.insert(index, task.in_bytes)
        self._up_queued += task.in_bytes
        self._up_head_since = since
        kind.cloud_n += 1
        kind.cloud_bytes += task.in_bytes
        self._cloud_n += 1
        self._active_cloud[task.kind] = kind

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
            "uplink_mbps": self._up.estimate(now) * BITS / 1e6,
            "uplink_baseline_mbps": self._up.baseline(now) * BITS / 1e6,
            "uplink_memory_s": self._up.memory_s(),
            "downlink_mbps": self._down.estimate(now) * BITS / 1e6,
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

    def _kind(self, name: str) -> KindState:
        return self._kinds.get(name) or self._new_kind(name)

    def _new_kind(self, name: str) -> KindState:
        priors = self._params.kinds
        kind = KindState(priors.get(name) or priors["*"], self._params, name in self._inline_kinds)
        self._kinds[name] = kind
        return kind

    @staticmethod
    def _cloud_work(active: dict[str, KindState], now: float) -> float:
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

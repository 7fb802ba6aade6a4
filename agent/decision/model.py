"""The total-time model: per task, does the gateway or the cloud finish it sooner (docs/design.md#decision-model).

``T_local = W_local + S_local(k, s_in)``
``T_cloud = P + RTT + (Q_up + s_in) / B_up + W_cloud + S_cloud(k, s_in) + s_out(k) / B_down``

Sans-I/O and deterministic: the caller passes every measurement and the time (``now``, seconds on any monotonic
clock); the same calls in the same order give the same decisions. The daemon and ``edge-agent replay`` run
this same class.
"""

from __future__ import annotations

import math

from agent.decision.ledger import Ledger
from agent.decision.queues import COLD_RUNS, KindState, queue_wait
from agent.decision.values import (
    CLOUD_TERMS,
    LOCAL_TERMS,
    Decision,
    Direction,
    Placement,
    Reason,
    Target,
    Task,
)

__all__ = [
    "CLOUD_TERMS",
    "COLD_RUNS",
    "HEDGE_LOCAL_RATIO",
    "HEDGE_RATIO",
    "HEDGE_SLACK_S",
    "LOCAL_TERMS",
    "REBIND_LINK_DOUBT",
    "REBIND_MARGIN_RATIO",
    "REBIND_MARGIN_S",
    "UPLOAD_HEDGE_RATIO",
    "UPLOAD_HEDGE_SLACK_S",
    "Decision",
    "Direction",
    "Placement",
    "Policy",
    "Reason",
    "Target",
    "Task",
]

_MIN_RATE = 1.0  # bytes/s: keeps every term finite even after a total outage was measured
# Hedging (see Decision.hedge_after_s): a cloud task counts as overdue once it has taken HEDGE_SLACK_S longer
# than its predicted total, HEDGE_RATIO times that total, and HEDGE_LOCAL_RATIO times what the gateway was
# expected to need for it, whichever is latest. The slack and the ratio absorb ordinary prediction error (upload
# times on cellular links vary by about ×2 either way), so mostly uploads that met a fade or an outage are
# hedged; the local bound does not start a gateway copy before the task has waited as long as that copy is
# expected to take (the classic rent-or-buy rule). On the shared traces (links up to ~5 Mbit/s) slacks of 0.2-2 s
# and ratios of 1.5-3 did the same within seed noise. On faster links, where a cloud total is a few hundred
# milliseconds, a 1 s slack mostly delayed the rescue of tasks caught by an outage: 0.3 s took synthetic 5G-like
# traces from 1.110 to 1.093 × the oracle on average, and Mahimahi traces scaled ×50 by 0.01-0.02.
# The local bound is priced again when a deadline comes (Policy.hedge_delay): on a gateway that slowed down ×3
# under a backlog (the LTE replay of gateway-slows.json), 27 of 29 copies lost to the cloud, most of them
# queued behind the backlog at the upload's deadline; counting the gateway's current queue there took that
# replay from 1.107 to 1.097 × the oracle, the default workload unchanged.
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
# A probe questions estimates that may be stale, so it must keep to its budget even if the uplink turns out
# ten times slower than estimated (cellular links swing that much): a probe is a small task, never a big one
# whose upload merely looks cheap on old estimates.
_PROBE_LINK_DOUBT = 9.0
# Late binding (Policy.rebind): a task waiting on the gateway moves to the cloud only when the cloud now finishes
# it sooner by more than the largest of REBIND_MARGIN_S, REBIND_MARGIN_RATIO × its local total and the
# decision margin; back (Policy.move_back), a cloud task whose upload has not started comes to the gateway only
# when the gateway wins by as much of the cloud's total. The ratio keeps estimation noise from moving tasks
# whose gain is within it; the callers move a task at most once, either way, so nothing ping-pongs.
REBIND_MARGIN_S = 0.05
REBIND_MARGIN_RATIO = 0.1
# A move must also survive an uplink this much slower than estimated (upload and uplink queue counted
# 1 + REBIND_LINK_DOUBT times): upload times on cellular links vary by about ×2 either way, and a task moved
# into a fade comes back only through its hedge, after waiting longer than it would have in its place. In the
# replays with an outage, moving on the plain estimate sent queued clips into the dead link (mean completion
# +4 %); with the doubt, late binding is neutral there and the burst on a LAN (uploads of milliseconds) is
# unaffected.
REBIND_LINK_DOUBT = 1.0


class Policy(Ledger):
    """The decision policy with its online estimators. One instance per agent; not thread-safe (one loop).

    Constructed as :class:`~agent.decision.ledger.Ledger` (the estimators and queues it decides from)."""

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

        local_wait, local_service = self._local_terms(kind, size, now)

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
                cloud_wait = queue_wait(n_uploaded, work * n_uploaded / cloud_n, slots)
            # The tasks still waiting for the uplink reach the cloud ahead of this one too: when inputs are
            # small (a burst), the slots, not the uplink, are what this task waits for, less the time its own
            # upload and those ahead of it take (the cloud works meanwhile).
            all_ahead = queue_wait(cloud_n, work, slots) - uplink_queue - upload
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

    def hedge_delay(self, task: Task, decided_at: float, now: float, *, upload: bool = False) -> float:
        """A cloud task decided at ``decided_at`` reached a hedge deadline, ``Decision.hedge_after_s`` or (with
        ``upload``) ``upload_by_s``: 0.0 when its gateway copy should start now, else how many seconds to wait
        before asking again.

        The rent-or-buy bound of :meth:`decide` re-priced: the copy starts once the task has waited
        ``HEDGE_LOCAL_RATIO`` times what the gateway would *now* need for it (its current queue and service-time
        estimates), not what it would have needed at the decision. A gateway that has slowed down or fallen
        behind since then would run the copy after the cloud's answer, and hold up the tasks queued behind it
        for one whose result is already coming. The upload's deadline comes earlier on purpose (a stalled
        upload is rescued without waiting for the gateway's service time), so there only the gateway's queue
        is counted: a copy starts at once on a free worker, never ahead of a backlog that has not yet been
        waited out.
        """
        if now > self._clock:
            self._clock = now
        kind = self._kind(task.kind)
        wait, service = self._local_terms(kind, task.in_bytes, now)
        price = wait if upload else wait + service
        return max(0.0, decided_at + HEDGE_LOCAL_RATIO * price - now)

    def _local_terms(self, kind: KindState, size: int, now: float) -> tuple[float, float]:
        """``local_wait_s`` and ``local_service_s`` of a task of ``kind`` and ``size`` queued now."""
        pool = self._loop if kind.inline else self._pool
        if kind.local_runs < COLD_RUNS:
            la, lb = pool.coefficients(kind, now)
        else:
            la, lb = kind.local.coefficients(now)
        return pool.wait(now), la + lb * size

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

    def move_back(self, task: Task, now: float) -> Decision | None:
        """Late binding back: ``task`` was sent to the cloud and its upload has not started (the last pending
        upload of its kind's size, behind the one on the link): does the gateway now finish it sooner?

        Decided as by :meth:`decide` with the current estimates and queues, the task's own place at the end of
        the uplink's queue taken as its upload wait. When the gateway wins by more than the rebind margin of the
        cloud's total (``REBIND_MARGIN_*``) the task is moved in the bookkeeping (as ``task_finished("cloud")``
        then ``task_started("local")``, the lease it may have asked for still counted as on its way) and the
        decision, target ``"local"`` with ``rebound`` True, is returned: the caller runs the task on the gateway
        instead of uploading it. Otherwise nothing changes and the result is None. The caller moves a task at
        most once, either way, so the margin and that rule keep tasks from ping-ponging.
        """
        since = self._up_head_since
        index = self._withdraw_upload(task, now)
        if index < 0:
            return None
        state = self._probe_interval, self._last_cloud_seen, self._provision_started
        decision = self.decide(task, now)
        self._probe_interval, self._last_cloud_seen, self._provision_started = state  # asking starts nothing
        params = self._params
        terms = decision.terms
        # The uplink is priced at its measured rate, without what the upload in progress proves (a stall that
        # may end within the second: on LTE, moving a burst back on that evidence cost 10 % of mean completion
        # time), and as much faster than estimated as a move the other way must survive it slower: the upload
        # and the uplink queue count 1 / (1 + REBIND_LINK_DOUBT) times.
        measured = (self._up_queued + task.in_bytes) / max(self._up.estimate(now), _MIN_RATE)
        t_cloud = (decision.t_cloud_s - terms["uplink_queue_s"] - terms["upload_s"]
                   + measured / (1.0 + REBIND_LINK_DOUBT))
        margin = max(REBIND_MARGIN_S, REBIND_MARGIN_RATIO * t_cloud, params.margin_s, params.margin_ratio * t_cloud)
        if decision.t_local_s < t_cloud - margin:
            decision.target, decision.reason, decision.rebound = "local", "model", True
            decision.probe = decision.prewarm = False
            decision.hedge_after_s = decision.upload_by_s = math.inf
            self.task_started("local", task, now)
            return decision
        self._restore_upload(task, index, since)
        return None

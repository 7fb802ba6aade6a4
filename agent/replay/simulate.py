"""Discrete-event replay of one workload over one uplink/downlink trace, for each policy.

The world each policy's tasks run in:

- **Gateway**: heavy kinds queue FIFO for ``workers`` pool processes; light kinds run inline on the event
  loop, one after another (as the dispatcher does).
- **Uplink**: one FIFO pipe whose capacity is the trace; uploads queue behind each other (that is how
  concurrent uploads share it, to first order) and start only once the lease is ready.
- **Cloud**: a lease of ``cloud_slots`` servers, FIFO; requested at the first offload when none is warm, ready
  after the task's drawn provisioning time, released ``lease_idle_s`` after its last task.
- **Per request**: one RTT; the result comes back over the downlink trace (results are small, so downloads
  are not queued behind each other).

Completion time = result available − arrival. All randomness is drawn once per task (``workload.generate``)
and shared by every policy, so differences come from decisions alone.

Policies: ``agent`` is :class:`agent.decision.Policy`, fed only what a gateway measures, at the moment it
would measure it: local service times when a task finishes, each upload's bytes and duration when it ends,
the RTT, the cloud's reported execution time, the result's size and download time when the result arrives,
and provisioning time when a lease becomes ready. It never sees the trace. Late binding is replayed as the
dispatcher does it: at every arrival and completion, heavy tasks still queued for the gateway move to the
cloud, from the end of the queue, while ``Policy.rebind`` says so, and cloud tasks whose upload has not
started come back to the gateway, from the end of the uplink's queue, while ``Policy.move_back`` says so; a
task moves once at most (``agent_no_late_binding``, not in the default table, decides each task once, at its
arrival, for comparisons). ``oracle`` knows the true
completion time of both options for each task (the trace, the queues, the drawn service times) and picks the
sooner: a clairvoyant greedy choice per task. Knowing the future, it also requests leases ahead of need, so
provisioning never delays its tasks.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, replace

from agent.decision import DecisionParams, KindParams, ParamsSource, Policy, Target, Task
from agent.decision.params import decision_params
from agent.replay.traces import Trace
from agent.replay.workload import Arrivals, Workload

POLICIES = ("agent", "always_local", "always_cloud", "size_threshold", "network_threshold", "oracle")


@dataclass(frozen=True, slots=True)
class CloudPlan:
    lease_ready: float
    new_lease: bool
    up_start: float
    up_end: float
    exec_start: float
    exec_end: float
    down_end: float
    done: float


@dataclass(frozen=True, slots=True)
class Outcome:
    """Per task, in arrival order: completion time (s) and where it ran (for a hedged task: the copy that counted)."""

    policy: str
    completion_s: list[float]
    cloud: list[bool]


class World:
    """The queues and the lease of one policy's run. ``plan_*`` look ahead without changing anything."""

    def __init__(self, workload: Workload, arrivals: Arrivals, uplink: Trace, downlink: Trace,
                 *, foresee_leases: bool = False) -> None:
        self.w = workload
        # The oracle knows when it will need the cloud, so it requests each lease early enough that
        # provisioning never delays a task.
        self.foresee_leases = foresee_leases
        self.a = arrivals
        self.uplink = uplink
        self.downlink = downlink
        self.local_free = [0.0] * workload.workers  # heap of times each worker is free
        self.inline_free = 0.0  # the event loop, where light tasks run one after another
        self.heavy = [arrivals.kinds[k].heavy for k in arrivals.kind]
        self.cloud_free = [0.0] * workload.cloud_slots
        self.uplink_free = 0.0
        self.lease_ready: float | None = None
        self.lease_busy_until = 0.0  # completion of the latest cloud task so far

    def plan_local(self, i: int, now: float) -> tuple[float, float]:
        start = max(now, self.local_free[0] if self.heavy[i] else self.inline_free)
        return start, start + self.a.local_s[i]

    def commit_local(self, i: int, end: float) -> float:
        """Queue task ``i`` to end at ``end``; returns what it replaced (for :meth:`uncommit_local`)."""
        if self.heavy[i]:
            return heapq.heapreplace(self.local_free, end)
        before, self.inline_free = self.inline_free, end
        return before

    def uncommit_local(self, end: float, before: float) -> None:
        """Take back the latest heavy task queued (ending at ``end``, having replaced ``before``): late binding."""
        free = self.local_free
        free[free.index(end)] = before
        heapq.heapify(free)

    def lease_warm(self, now: float) -> bool:
        if self.lease_ready is None:
            return False
        return now <= max(self.lease_busy_until, self.lease_ready) + self.w.lease_idle_s

    def plan_cloud(self, i: int, now: float) -> CloudPlan:
        a = self.a
        new_lease = not self.lease_warm(now)
        if new_lease:
            ready = now if self.foresee_leases else now + a.provisioning_s[i]
        else:
            ready = max(now, self.lease_ready or now)
        up_start = max(now, ready, self.uplink_free)
        up_end = self.uplink.finish(up_start, a.in_bytes[i])
        half_rtt = a.rtt_s[i] / 2.0
        exec_start = max(up_end + half_rtt, self.cloud_free[0])
        exec_end = exec_start + a.cloud_s[i]
        down_end = self.downlink.finish(exec_end + half_rtt, a.out_bytes[i])
        return CloudPlan(ready, new_lease, up_start, up_end, exec_start, exec_end, down_end, down_end)

    def request_lease(self, i: int, now: float) -> float | None:
        """Start a lease ahead of need (the policy's ``prewarm``); returns when it will be ready, if it is new."""
        if self.lease_warm(now):
            return None
        self.lease_ready = now + self.a.provisioning_s[i]
        self.lease_busy_until = now
        return self.lease_ready

    def cloud_state(self) -> tuple[float, list[float], float]:
        """What :meth:`commit_cloud` changes, for :meth:`uncommit_cloud` (the lease it may start is kept)."""
        return self.uplink_free, list(self.cloud_free), self.lease_busy_until

    def uncommit_cloud(self, state: tuple[float, list[float], float]) -> None:
        """Take back the latest cloud task committed, whose upload has not started: late binding back."""
        self.uplink_free, self.cloud_free, self.lease_busy_until = state[0], list(state[1]), state[2]

    def commit_cloud(self, plan: CloudPlan) -> None:
        if plan.new_lease:
            self.lease_ready = plan.lease_ready
        self.uplink_free = plan.up_end
        heapq.heapreplace(self.cloud_free, plan.exec_end)
        self.lease_busy_until = max(self.lease_busy_until, plan.done)


Chooser = Callable[[World, int, float], Target]


def _static(choose: Chooser, name: str, workload: Workload, arrivals: Arrivals, uplink: Trace,
            downlink: Trace) -> Outcome:
    world = World(workload, arrivals, uplink, downlink, foresee_leases=name == "oracle")
    completion: list[float] = []
    cloud: list[bool] = []
    for i, now in enumerate(arrivals.arrival_s):
        if choose(world, i, now) == "cloud":
            plan = world.plan_cloud(i, now)
            world.commit_cloud(plan)
            completion.append(plan.done - now)
            cloud.append(True)
        else:
            _, end = world.plan_local(i, now)
            world.commit_local(i, end)
            completion.append(end - now)
            cloud.append(False)
    return Outcome(name, completion, cloud)


def _oracle(world: World, i: int, now: float) -> Target:
    return "cloud" if world.plan_cloud(i, now).done < world.plan_local(i, now)[1] else "local"


# Observation events for the agent, in time order: (time, sequence, what, task index, CloudPlan or None).
_LOCAL_DONE, _LEASE_READY, _UPLOADED, _CLOUD_DONE, _HEDGE, _CANCEL_CLOUD, _DROP_LOCAL, _HEDGE_UPLOAD = range(8)


def agent_params(settings: DecisionParams | ParamsSource | None, arrivals: Arrivals) -> DecisionParams:
    """The agent's parameters for a replay: ``settings``, with the priors of the streams that set
    ``prior_factor`` (their true mean lines times that factor: a prior that is off)."""
    params = decision_params(settings)
    off = {
        s.kind: KindParams(local_fixed_s=s.local_fixed_s * s.prior_factor,
                           local_per_byte_s=s.local_per_byte_s * s.prior_factor,
                           cloud_fixed_s=s.local_fixed_s / s.cloud_speedup * s.prior_factor,
                           cloud_per_byte_s=s.local_per_byte_s / s.cloud_speedup * s.prior_factor,
                           out_bytes=s.out_bytes)
        for s in arrivals.kinds.values() if s.prior_factor is not None
    }
    return replace(params, kinds={**params.kinds, **off}) if off else params


def _agent(settings: DecisionParams | ParamsSource | None, workload: Workload, arrivals: Arrivals, uplink: Trace,
           downlink: Trace, *, late_binding: bool = True) -> Outcome:
    """The agent's run, hedging included (``Decision.hedge_after_s``), as the dispatcher does it.

    A cloud task whose result has not come by its hedge time, or whose upload has not ended by the upload's
    deadline (``Decision.upload_by_s``; the daemon sees an upload end when its last byte is acknowledged, a
    round trip after it left), gets a local copy, queued like any local task (it occupies a worker, or the event
    loop for a light kind) at that moment, or later if the gateway would now need longer for it than the task
    has waited (``Policy.hedge_delay``, asked again when that time comes). The first result counts:

    - the local copy finishes first: the cloud request is cancelled then. Its upload keeps the uplink until
      it would have ended all the same: the bytes already handed to the socket's send buffer and the modem's
      queue still drain after the request is abandoned (a closed TCP socket sends what it has buffered), so
      freeing the link at once would flatter hedging. Its cloud slot is kept likewise. The agent observes
      nothing of the cancelled request (no upload time, no RTT), as in the daemon.
    - the cloud result comes first: a copy still waiting for a worker is dropped; one already running goes on
      (a pool process cannot be interrupted), and its service time is observed as usual.
    """
    world = World(workload, arrivals, uplink, downlink)
    inline = frozenset(k for k, stream in arrivals.kinds.items() if not stream.heavy)
    policy = Policy(agent_params(settings, arrivals), local_workers=workload.workers,
                    cloud_slots=workload.cloud_slots, inline_kinds=inline, lease_idle_s=workload.lease_idle_s)
    a = arrivals
    tasks = [Task(k, b) for k, b in zip(a.kind, a.in_bytes, strict=True)]
    events: list[tuple[float, int, int, int, CloudPlan | None]] = []
    seq = 0
    completion: list[float] = []
    cloud: list[bool] = []
    cancelled: dict[int, float] = {}  # hedged cloud copies the local copy beat: task index → cancellation time
    hedged: set[int] = set()  # tasks given a gateway copy
    decided_at: dict[int, float] = {}  # cloud tasks → when they were sent there
    # Heavy tasks queued for the gateway by a decision, latest last: (index, start, end, what its end replaced).
    # Late binding takes them back from the end while they have not started.
    queued: list[tuple[int, float, float, float]] = []
    moved: dict[int, float] = {}  # rebound tasks → the end of the gateway run they no longer have
    # Cloud tasks in the order they were committed to the uplink: (index, plan, the world's cloud side before,
    # whether it may come back). Late binding back takes them from the end while their upload has not started.
    sent: list[tuple[int, CloudPlan, tuple[float, list[float], float], bool]] = []
    back: set[int] = set()  # tasks moved back to the gateway: their cloud plan's events are void

    def push(t: float, what: int, j: int, plan: CloudPlan | None) -> None:
        nonlocal seq
        heapq.heappush(events, (t, seq, what, j, plan))
        seq += 1

    def hedge(j: int, t: float, plan: CloudPlan) -> None:
        start, end = world.plan_local(j, t)
        policy.task_started("local", tasks[j], t)
        if start >= plan.done:
            push(plan.done, _DROP_LOCAL, j, None)  # still queued when the cloud answered: dropped unrun
            return
        world.commit_local(j, end)
        push(end, _LOCAL_DONE, j, None)
        if end < plan.done:
            cancelled[j] = end
            push(end, _CANCEL_CLOUD, j, None)
            completion[j] = end - a.arrival_s[j]
            cloud[j] = False

    def offload(j: int, now: float, decision_hedge_s: float, upload_by_s: float, movable: bool) -> None:
        decided_at[j] = now
        plan = world.plan_cloud(j, now)
        sent.append((j, plan, world.cloud_state(), movable))
        world.commit_cloud(plan)
        if plan.new_lease:
            push(plan.lease_ready, _LEASE_READY, j, plan)
        push(plan.up_end, _UPLOADED, j, plan)
        push(plan.done, _CLOUD_DONE, j, plan)
        if now + decision_hedge_s < plan.done:
            push(now + decision_hedge_s, _HEDGE, j, plan)
        if now + upload_by_s < plan.up_end + a.rtt_s[j]:
            push(now + upload_by_s, _HEDGE_UPLOAD, j, plan)
        completion[j] = plan.done - a.arrival_s[j]
        cloud[j] = True

    def rebind(now: float) -> None:
        while queued:
            j, start, end, before = queued[-1]
            if start <= now or world.local_free.count(end) == 0:
                return  # started (or no longer the latest on its worker): it stays
            decision = policy.rebind(tasks[j], now)
            if decision is None:
                return
            if decision.prewarm:
                ready = world.request_lease(j, now)
                if ready is not None:
                    push(ready, _LEASE_READY, j, None)
            if not decision.rebound:
                return
            queued.pop()
            world.uncommit_local(end, before)
            moved[j] = end
            offload(j, now, decision.hedge_after_s, decision.upload_by_s, False)  # moves once at most

    def move_back(now: float) -> None:
        while sent:
            j, plan, state, movable = sent[-1]
            if not movable or plan.up_start <= now or j in hedged:
                return  # uploading already, or not the model's to move
            decision = policy.move_back(tasks[j], now)
            if decision is None:
                return
            sent.pop()
            world.uncommit_cloud(state)
            back.add(j)
            _, end = world.plan_local(j, now)
            world.commit_local(j, end)
            push(end, _LOCAL_DONE, j, None)
            completion[j] = end - a.arrival_s[j]
            cloud[j] = False

    def deliver(until: float) -> None:
        while events and events[0][0] <= until:
            t, _, what, j, plan = heapq.heappop(events)
            if what in (_UPLOADED, _CLOUD_DONE) and j in cancelled and t > cancelled[j]:
                continue  # the request was cancelled before this happened
            if what == _LOCAL_DONE and moved.get(j) == t:
                del moved[j]  # the gateway run a rebound task gave up
                continue
            if j in back and what in (_UPLOADED, _CLOUD_DONE, _HEDGE, _HEDGE_UPLOAD):
                continue  # the cloud run a task moved back gave up (its lease request stands)
            rebind_after = late_binding and bool(queued) and what in (_LOCAL_DONE, _CLOUD_DONE)
            if what == _LOCAL_DONE:
                policy.observe_local(a.kind[j], a.in_bytes[j], a.local_s[j], t)
                policy.observe_output(a.kind[j], a.out_bytes[j], t)
                policy.task_finished("local", tasks[j], t)
            elif what == _LEASE_READY:
                policy.observe_provisioning(a.provisioning_s[j], t)
            elif what == _UPLOADED:
                assert plan is not None
                policy.observe_transfer("up", a.in_bytes[j], plan.up_end - plan.up_start, t)
            elif what == _CLOUD_DONE:
                assert plan is not None
                policy.observe_rtt(a.rtt_s[j], t)
                policy.observe_cloud(a.kind[j], a.in_bytes[j], a.cloud_s[j], t)
                policy.observe_transfer("down", a.out_bytes[j], plan.down_end - plan.exec_end - a.rtt_s[j] / 2, t)
                policy.observe_output(a.kind[j], a.out_bytes[j], t)
                policy.task_finished("cloud", tasks[j], t)
            elif what in (_HEDGE, _HEDGE_UPLOAD):
                assert plan is not None
                # At the task's deadline, or at its upload's if the upload is still running: whichever comes first,
                # once the gateway would now finish a copy soon enough (Policy.hedge_delay); else asked again then.
                if j not in hedged and (what == _HEDGE or t < plan.up_end + a.rtt_s[j]):
                    delay = policy.hedge_delay(tasks[j], decided_at[j], t, upload=what == _HEDGE_UPLOAD)
                    if delay > 0.0:
                        if t + delay < plan.done:
                            push(t + delay, what, j, plan)
                    else:
                        hedged.add(j)
                        hedge(j, t, plan)
            elif what == _CANCEL_CLOUD:
                policy.cloud_cancelled(tasks[j], t)
            else:  # _DROP_LOCAL
                policy.task_finished("local", tasks[j], t)
            if rebind_after:
                rebind(t)
            if late_binding and sent and what in (_LOCAL_DONE, _CLOUD_DONE):
                move_back(t)

    for i, now in enumerate(a.arrival_s):
        deliver(now)
        if late_binding and queued:
            rebind(now)
        if late_binding and sent:
            move_back(now)
        decision = policy.decide(tasks[i], now)
        policy.task_started(decision.target, tasks[i], now)
        if decision.prewarm:
            ready = world.request_lease(i, now)
            if ready is not None:
                push(ready, _LEASE_READY, i, None)
        completion.append(0.0)
        cloud.append(False)
        if decision.target == "cloud":
            offload(i, now, decision.hedge_after_s, decision.upload_by_s,
                    decision.reason == "model" and not decision.probe)
        else:
            start, end = world.plan_local(i, now)
            before = world.commit_local(i, end)
            push(end, _LOCAL_DONE, i, None)
            completion[i] = end - now
            if world.heavy[i] and decision.reason == "model":
                queued.append((i, start, end, before))
    deliver(float("inf"))  # hedges due after the last arrival still change completion times
    return Outcome("agent", completion, cloud)


def run_policy(name: str, workload: Workload, arrivals: Arrivals, uplink: Trace, downlink: Trace,
               settings: DecisionParams | ParamsSource | None = None) -> Outcome:
    """Replay ``arrivals`` under one policy (a name from :data:`POLICIES`)."""
    if name == "agent":
        return _agent(settings, workload, arrivals, uplink, downlink)
    if name == "agent_no_late_binding":  # for comparisons: decided once, at admission
        return _agent(settings, workload, arrivals, uplink, downlink, late_binding=False)
    window = workload.network_window_s

    def network(world: World, i: int, now: float) -> Target:
        # A passive link monitor: what the uplink carried over the last window (EdgeCloudSim reads the
        # simulator's current WAN bandwidth; this is the closest a gateway gets).
        measured = uplink.mbps(max(0.0, now - window), now) if now > 0 else 0.0
        return "cloud" if measured > workload.network_threshold_mbps else "local"

    choosers: dict[str, Chooser] = {
        "always_local": lambda world, i, now: "local",
        "always_cloud": lambda world, i, now: "cloud",
        "size_threshold": lambda world, i, now: (
            "cloud" if arrivals.in_bytes[i] >= workload.size_threshold_bytes else "local"),
        "network_threshold": network,
        "oracle": _oracle,
    }
    if name not in choosers:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
    return _static(choosers[name], name, workload, arrivals, uplink, downlink)

"""Committed task → decision → execution (gateway or cloud) → result or dead letter committed to the outbox.

Runs on the event loop. Each task is decided when it is admitted, so the policy sees every task queued on
each side (its waits) and not only the running ones. A task sent to the cloud that does not come back for any
reason (the cloud client raised) runs on the gateway instead: the cloud can delay a task, never lose it.

Hedging: a cloud task still unanswered ``Decision.hedge_after_s`` after its decision (an upload that met a fade)
also runs on the gateway, as the same row with the same task id. The first copy to finish commits the result;
a cloud request still running then is cancelled (which aborts its HTTP request), a gateway copy still queued is
dropped, and one already running in the pool is left to finish and its result ignored. Either way one result
is published, whose ``placement`` says where it ran and whose decision says ``"hedged": true``.

Late binding: a heavy task decided for the gateway that has not started yet is asked again
(``Policy.rebind``), from the end of the queue, at every turn and every ``REBIND_CHECK_S`` while tasks wait;
one the cloud would now finish sooner moves to the cloud queue, with ``"rebound": true`` in its decision. It is
the same pending row either way (the store does not record where a task runs), so a crash at any point of a
move leaves a pending row that the next start decides afresh.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from agent.cloud import CircuitOpen, CloudError, TransientCloudError
from agent.deadletters import DeadLetter, DeadLetterLog
from agent.decision import Decision, Placement, Policy, Task
from agent.egress import dead_letter, result_message
from agent.errors import PayloadError, UnknownTask
from agent.executor import LocalExecutor, WorkerDied
from agent.metrics import Histogram
from agent.store import Finished, ReadBack, Store, TaskRef
from agent.tasks import TaskRegistry
from agent.telemetry import get_logger

if TYPE_CHECKING:
    from agent.cloud import Cloud  # what the dispatcher uses of the client (CloudClient: httpx, only with a URL)

log = get_logger(__name__)

INLINE_BUDGET = 256  # light tasks per loop turn, so acks and PUBACK hand-offs are not starved
WORKER_RETRIES = 1  # a task whose worker died is tried once more before it is dead-lettered
FALLBACK_LOG_EVERY_S = 30.0
CLOUD_IN_FLIGHT = 64  # cloud submissions awaiting answers; beyond, decided tasks wait (bounded memory)
_NO_TERMS: Mapping[str, float] = {}
REBIND_CHECK_S = 0.1  # how often waiting heavy tasks are asked again while nothing else happens
REBIND_SCAN = 64  # queued tasks looked at from the end of the queue per turn


class Admitted(NamedTuple):
    """A task with its decision, waiting for its turn."""

    ref: TaskRef
    task: Task
    decision: Decision | None  # None: the kind is not installed (it fails without running)
    fallback: str | None = None  # why a task decided for the cloud runs on the gateway after all
    decided_at: float = 0.0  # the dispatcher's clock when it was decided (hedging counts from then)
    hedge: bool = False  # the gateway copy of a cloud task that was overdue


def _micro(seconds: float) -> float:
    """``seconds`` to the microsecond: what ``round(seconds, 6)`` gives, at a third of its cost (five a result)."""
    try:
        return round(seconds * 1e6) / 1e6
    except (OverflowError, ValueError):  # inf, nan: as they are (a result writes them as null)
        return seconds


def decision_fields(item: Admitted, hedged: bool = False) -> dict[str, Any]:
    """The ``decision`` object of a result message, with its optional flags ``probe``, ``fallback`` (why a task
    decided for the cloud ran here) and ``hedged``: see docs/design.md#mqtt-contract."""
    decision = item.decision
    if decision is None:
        return {"t_local_s": None, "t_cloud_s": None, "reason": "unknown_task"}
    fields: dict[str, Any] = {"t_local_s": _micro(decision.t_local_s), "t_cloud_s": _micro(decision.t_cloud_s),
                              "reason": decision.reason}
    if decision.probe:
        fields["probe"] = True
    if item.fallback is not None:
        fields["fallback"] = item.fallback
    if hedged or item.hedge:
        fields["hedged"] = True
    if decision.rebound:
        fields["rebound"] = True
    return fields


class Dispatcher:
    def __init__(
        self,
        *,
        agent_id: str,
        registry: TaskRegistry,
        executor: LocalExecutor,
        store: Store,
        policy: Policy,
        cloud: Cloud | None = None,
        clock: Callable[[], float] = time.monotonic,
        memory_cap_bytes: int = 16 * 1024 * 1024,
        memory_cap_tasks: int = 3_000,
        dead_log: DeadLetterLog | None = None,
    ) -> None:
        self._agent_id = agent_id
        self._dead_log = dead_log or DeadLetterLog()
        self._registry = registry
        self._executor = executor
        self._store = store
        self.policy = policy
        self.cloud = cloud
        self._clock = clock
        self._cap_bytes = memory_cap_bytes
        self._cap_tasks = memory_cap_tasks
        # Two queues so a burst of heavy tasks waiting for a worker never holds up the light ones; each stays in
        # commit order (sensor.stats windows see a topic's readings in the order they arrived).
        self._light: deque[Admitted] = deque()
        self._heavy: deque[Admitted] = deque()
        self._cloud: deque[Admitted] = deque()
        self._cloud_running: dict[int, asyncio.Task[None]] = {}
        self._queued_bytes = 0
        self._readback = ReadBack()
        self._running: dict[int, asyncio.Task[None]] = {}
        self._attempts: dict[int, int] = {}
        self._heavy_limit = executor.workers * 2  # keep the pool's queue fed without hoarding tasks
        self._scheduled = False
        self._done: list[Finished] = []  # results of this loop turn, for the store
        self._dead: list[tuple[int, DeadLetter]] = []  # … the copies to keep of those that are dead letters
        self._direct: list[Finished] = []  # … of light tasks, offered to the publisher first
        # Set by connect_publisher: publishes results without the outbox where it can and returns the rest; and
        # how many it takes now.
        self._publish_direct: Callable[[list[Finished]], list[Finished]] | None = None
        self._publish_room: Callable[[], int] | None = None
        self._held = False  # light tasks wait: the publisher has as many results as it takes
        self.closing = False
        self.completed = 0
        self.dead_lettered = 0
        self.decisions: dict[tuple[str, str], int] = {}  # (target, reason) → count
        self.dead_by_reason: dict[str, int] = {}
        self.durations: dict[tuple[str, str], Histogram] = {}  # (placement, kind) → service time
        self.cloud_outcomes: dict[str, int] = {}  # ok, transient, permanent, circuit_open, cancelled → count
        self.fallbacks = 0
        self.hedges = 0  # cloud tasks that also ran on the gateway because they were overdue
        self.hedges_won = 0  # … of which the gateway copy finished first
        self.rebinds = 0  # tasks queued for the gateway moved to the cloud before they started (late binding)
        self._rebind_timer: asyncio.TimerHandle | None = None
        self._hedged: dict[int, Admitted] = {}  # row id → gateway copy of a cloud task still in flight
        self._hedge_timers: dict[int, asyncio.TimerHandle] = {}
        self._upload_timers: dict[int, asyncio.TimerHandle] = {}  # … at the upload's deadline, until it ends
        self._settled: set[int] = set()  # rows whose result is committed while a losing gateway copy still runs
        self._fallbacks_unlogged = 0
        self._fallback_logged_at = -FALLBACK_LOG_EVERY_S
        self.last_terms: dict[str, Mapping[str, float]] = {}  # kind → the terms of its latest decision
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._load_more()

    @property
    def backlog(self) -> int:
        return len(self._light) + len(self._heavy) + len(self._cloud)

    @property
    def running(self) -> int:
        return len(self._running) + len(self._cloud_running)

    def idle(self) -> bool:
        return not self.backlog and not self._running and self._readback.settled

    # ------------------------------------------------------------------ intake

    def accept(self, tasks: list[TaskRef], commit: int) -> None:
        """The tasks a commit (number ``commit``) handed over."""
        if not tasks:
            return
        # Take what fits under the caps; the rest stays in the store and is read back in order later.
        room = self._cap_tasks - self.backlog if self._queued_bytes < self._cap_bytes else 0
        take = tasks if room >= len(tasks) else tasks[:max(room, 0)]
        if take and self._readback.hand_off(True, take[-1].id):
            now = self._clock()
            for ref in take:
                self._admit(ref, now)
        else:
            take = []
        if len(take) < len(tasks):
            self._readback.hand_off(False, tasks[-1].id)
            self._store.stop_hand_off("tasks", commit)  # read back from the store from now on
        self._schedule()

    def connect_publisher(
        self,
        offer: Callable[[list[Finished]], list[Finished]],
        room: Callable[[], int],
    ) -> Callable[[], None]:
        """Send light tasks' results to ``offer`` instead of the outbox, and run light tasks only while ``room()``
        says it takes them: a broker slower than the gateway then holds inputs in the store (written once)
        rather than results on disk (written and read back). Returns the callback for when it has room again."""
        self._publish_direct, self._publish_room = offer, room
        return self._publisher_ready

    def _publisher_ready(self) -> None:
        if self._held:
            self._held = False
            self._schedule()

    def _admit(self, ref: TaskRef, now: float) -> None:
        """Decide where the task runs and queue it there."""
        task = Task(ref.kind, ref.size)
        spec = self._registry.get(ref.kind) if ref.kind in self._registry else None
        decision: Decision | None = None
        if spec is not None:
            cloud = self.cloud
            decision = self._decide(self.policy, task, cast(Placement, ref.placement), now)
            if decision.prewarm and cloud is not None:
                cloud.prewarm()  # the model wants a warm lease for the tasks to come
            key = (decision.target, decision.reason)
            self.decisions[key] = self.decisions.get(key, 0) + 1
            self.last_terms[ref.kind] = decision.terms  # each decision has its own; no copy per task
            self.policy.task_started(decision.target, task, now)
            # The queued task keeps what its result reports, not the terms (most of a decision's memory); each
            # decision is a new object, so dropping them here takes nothing from last_terms.
            decision.terms = _NO_TERMS
        item = Admitted(ref, task, decision, decided_at=now)
        if decision is not None and decision.target == "cloud":
            self._cloud.append(item)
        else:
            (self._heavy if spec is not None and spec.heavy else self._light).append(item)
        self._queued_bytes += ref.size

    def _decide(self, policy: Policy, task: Task, placement: Placement, now: float) -> Decision:
        cloud = self.cloud
        return policy.decide(task, now, placement=placement, cloud_available=cloud is not None,
                             circuit_open=cloud is not None and cloud.circuit_open(now))

    def preview(self, task: Task, placement: Placement) -> tuple[Decision, dict[str, Any]]:
        """The decision ``task`` would get if it were admitted now, and the estimates and queues it was made on
        (``edge-agent explain --live``). The same call as for a real task, on a copy of the policy: asking
        must not start a probe's timer or a lease, nor add a kind to the estimates."""
        now = self._clock()
        policy = copy.deepcopy(self.policy)
        return self._decide(policy, task, placement, now), policy.snapshot(now)

    def _load_more(self) -> None:
        if self.closing or not self._readback.start_read():
            return
        assert self._loop is not None
        loop, limit = self._loop, max(1, self._cap_tasks // 2)

        def reply(refs: list[TaskRef]) -> None:
            loop.call_soon_threadsafe(self._loaded, refs, limit)

        self._store.load_pending(self._readback.cursor, limit, reply)

    def _loaded(self, refs: list[TaskRef], limit: int) -> None:
        now = self._clock()
        for ref in refs:
            if ref.id not in self._running:
                self._admit(ref, now)
        self._readback.read(len(refs), limit, refs[-1].id if refs else None)
        self._schedule()

    # ------------------------------------------------------------------ execution

    def _schedule(self) -> None:
        if not self._scheduled and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        self._scheduled = False
        if self.closing:
            return
        if self._heavy and self.cloud is not None:
            self._rebind()
        cloud = self._cloud
        while cloud and len(self._cloud_running) < CLOUD_IN_FLIGHT:
            item = cloud.popleft()
            self._queued_bytes -= item.ref.size
            payload = self._payload(item, "cloud")
            if payload is not None:
                self._cloud_running[item.ref.id] = asyncio.ensure_future(self._run_cloud(item, payload))
        heavy = self._heavy
        while heavy and len(self._running) < self._heavy_limit:
            item = heavy.popleft()
            self._queued_bytes -= item.ref.size
            if item.hedge and self._hedge_lost(item):
                continue
            payload = self._payload(item)
            if payload is not None:
                self._running[item.ref.id] = asyncio.ensure_future(self._run_heavy(item, payload))
        light = self._light
        budget = min(len(light), INLINE_BUDGET)
        if self._publish_room is not None and light:
            budget = min(budget, self._publish_room() - len(self._direct))
            if budget <= 0:
                self._held = True  # until the publisher calls _publisher_ready
                budget = 0
        for _ in range(budget):
            item = light.popleft()
            self._queued_bytes -= item.ref.size
            if item.hedge and self._hedge_lost(item):
                continue
            payload = self._payload(item)
            if payload is not None:
                self._run_light(item, payload)
        if light and not self._held:
            self._schedule()
        # The next page is asked for while half of the cap is still queued, so the loop has work while the
        # writer reads it (a read waits behind the commits queued before it).
        if self._readback.spilled and self.backlog <= self._cap_tasks // 2:
            self._load_more()

    def _rebind(self) -> None:
        """Late binding: move the heavy tasks still queued for the gateway that the cloud would now finish
        sooner, from the end of the queue (the longest waits) until one stays."""
        cloud, heavy, loop = self.cloud, self._heavy, self._loop
        assert cloud is not None and loop is not None
        if self._rebind_timer is None:
            self._rebind_timer = loop.call_later(REBIND_CHECK_S, self._rebind_due)
        now = self._clock()
        if cloud.circuit_open(now):
            return
        i = len(heavy) - 1
        stop = max(-1, i - REBIND_SCAN)
        while i > stop:
            item = heavy[i]
            i -= 1
            decision = item.decision
            if decision is None or item.hedge or item.fallback is not None or decision.reason != "model" \
                    or decision.target != "local":
                continue
            new = self.policy.rebind(item.task, now)
            if new is None:
                break
            if new.prewarm:
                cloud.prewarm()
            if not new.rebound:
                break
            del heavy[i + 1]
            self.rebinds += 1
            self.last_terms[item.ref.kind] = new.terms
            new.terms = _NO_TERMS
            self._cloud.append(item._replace(decision=new, decided_at=now))

    def _rebind_due(self) -> None:
        self._rebind_timer = None
        if self._heavy and not self.closing:
            self._schedule()

    def _payload(self, item: Admitted, target: str = "local") -> bytes | None:
        ref = item.ref
        payload = ref.payload if ref.payload is not None else self._store.load_payload(ref.id)
        if payload is None:  # no longer pending: finished by an earlier run
            self._finished(item, target)
        return payload

    def _run_light(self, item: Admitted, payload: bytes) -> None:
        ref = item.ref
        if item.decision is None:
            self._fail(item, UnknownTask(f"task {ref.kind!r} is not installed on this gateway"))
            return
        started = time.time()
        try:
            result, service_s = self._executor.run_inline(self._registry.get(ref.kind), payload, ref.options,
                                                          ref.id)
        except Exception as exc:  # noqa: BLE001 - any task error becomes a dead letter
            self._fail(item, exc)
        else:
            self._complete(item, result, service_s, started, light=True)

    async def _run_heavy(self, item: Admitted, payload: bytes) -> None:
        ref = item.ref
        started = time.time()
        try:
            result, service_s = await self._executor.run_in_pool(ref.kind, payload, ref.options)
        except WorkerDied as exc:
            if self.closing:
                return  # stopping: the row stays pending and runs at the next start
            attempts = self._attempts.get(ref.id, 0)
            if attempts < WORKER_RETRIES:
                # Others' tasks die with the pool too; give each one more chance in the fresh pool.
                self._attempts[ref.id] = attempts + 1
                self._heavy.appendleft(item._replace(ref=ref._replace(payload=payload)))
                self._queued_bytes += ref.size
            else:
                self._attempts.pop(ref.id, None)
                self._fail(item, exc)
        except Exception as exc:  # noqa: BLE001 - any task error becomes a dead letter
            self._fail(item, exc)
        else:
            self._attempts.pop(ref.id, None)
            self._complete(item, result, service_s, started)
        finally:
            self._running.pop(ref.id, None)
            self._schedule()

    async def _run_cloud(self, item: Admitted, payload: bytes) -> None:
        ref = item.ref
        assert self.cloud is not None and self._loop is not None
        started = time.time()
        decision, loop, now = item.decision, self._loop, self._clock()
        hedge_after = decision.hedge_after_s if decision is not None else math.inf
        if math.isfinite(hedge_after):
            self._hedge_timers[ref.id] = loop.call_later(max(0.0, item.decided_at + hedge_after - now),
                                                         self._hedge, item, payload)
        upload_by = decision.upload_by_s if decision is not None else math.inf
        on_uploaded: Callable[[], None] | None = None
        # Only where each upload's end is seen: inferred from the answer, every upload would look overdue.
        if math.isfinite(upload_by) and self.cloud.sees_uploads:
            self._upload_timers[ref.id] = loop.call_later(max(0.0, item.decided_at + upload_by - now),
                                                          self._hedge, item, payload)
            on_uploaded = functools.partial(_cancel_timer, self._upload_timers, ref.id)
        try:
            answer = await self.cloud.submit(ref.task_id, ref.kind, payload, ref.options, on_uploaded)
        except CloudError as exc:
            self._count_cloud(_outcome(exc))
            if ref.id in self._hedged:
                self._finished(item, "cloud")  # the gateway copy is running already: it provides the result
            else:
                self._cloud_failed(item, payload, exc)
        else:
            self._count_cloud("ok")
            self._complete(item, answer.result, answer.exec_s, started, placement="cloud")
        finally:
            self._cancel_hedge_timers(ref.id)
            self._cloud_running.pop(ref.id, None)
            lease = self.cloud.lease_status()
            if lease.ready or not lease.provisioning:
                self.policy.observe_lease(lease.ready, slots=lease.slots or None)
            self._schedule()

    def _cancel_hedge_timers(self, row_id: int) -> None:
        _cancel_timer(self._hedge_timers, row_id)
        _cancel_timer(self._upload_timers, row_id)

    def _hedge(self, item: Admitted, payload: bytes) -> None:
        """The cloud task, or its upload, is overdue: queue a gateway copy too, behind the tasks queued there
        already (as the policy counts it, and as the replay simulates it)."""
        ref = item.ref
        self._cancel_hedge_timers(ref.id)  # one copy at most, whichever deadline came first
        if self.closing or ref.id not in self._cloud_running or ref.id in self._hedged:
            return
        self.policy.task_started("local", item.task, self._clock())
        self.hedges += 1
        copy = item._replace(ref=ref._replace(payload=payload), hedge=True)
        self._hedged[ref.id] = copy
        spec = self._registry.get(ref.kind)
        (self._heavy if spec.heavy else self._light).append(copy)
        self._queued_bytes += ref.size
        self._schedule()

    def _hedge_lost(self, copy: Admitted) -> bool:
        """A gateway copy about to start: True (and forgotten) when the cloud already answered for its row."""
        if copy.ref.id in self._hedged:
            return False
        self._settled.discard(copy.ref.id)
        self.policy.task_finished("local", copy.task, self._clock())
        return True

    def _cloud_failed(self, item: Admitted, payload: bytes, exc: CloudError) -> None:
        """Run it on the gateway instead, ahead of tasks admitted later (it has waited already)."""
        now = self._clock()
        self.policy.task_finished("cloud", item.task, now)
        self.policy.task_started("local", item.task, now)
        self.fallbacks += 1
        reason = "circuit_open" if isinstance(exc, CircuitOpen) else str(exc)[:200]
        self._fallbacks_unlogged += 1
        if now - self._fallback_logged_at >= FALLBACK_LOG_EVERY_S:
            # One line per interval, not per task: an outage would otherwise flood the journal.
            log.warning("cloud_offload_failed", reason=reason, ran_on_gateway=self._fallbacks_unlogged)
            self._fallback_logged_at, self._fallbacks_unlogged = now, 0
        spec = self._registry.get(item.ref.kind)
        local = item._replace(ref=item.ref._replace(payload=payload), fallback=reason)
        (self._heavy if spec.heavy else self._light).appendleft(local)
        self._queued_bytes += item.ref.size

    def _count_cloud(self, outcome: str) -> None:
        self.cloud_outcomes[outcome] = self.cloud_outcomes.get(outcome, 0) + 1

    def _finished(self, item: Admitted, target: str = "local") -> None:
        if item.decision is not None:
            self.policy.task_finished("cloud" if target == "cloud" else "local", item.task, self._clock())

    def _complete(self, item: Admitted, result: dict[str, Any], service_s: float, started: float,
                  placement: str = "local", light: bool = False) -> None:
        ref = item.ref
        if item.hedge and ref.id in self._settled:
            # The losing gateway copy of a row the cloud answered: its time is still a measurement.
            self._settled.discard(ref.id)
            self._finished(item, "local")
            self.policy.observe_local(ref.kind, ref.size, service_s, self._clock())
            return
        hedged = item.hedge or ref.id in self._hedged
        finished = time.time()
        try:
            topic, body = result_message(
                self._agent_id, task_id=ref.task_id, kind=ref.kind, topic=ref.topic, placement=placement,
                decision=decision_fields(item, hedged),
                timings={"queued_s": _micro(max(0.0, started - ref.received_at)), "exec_s": _micro(service_s),
                         "total_s": _micro(max(0.0, finished - ref.received_at))},
                result=result,
            )
        except TypeError as exc:  # orjson.JSONEncodeError: a value JSON cannot hold (bytes, sets, objects…)
            self._fail(item, ValueError(f"the task returned a result that is not JSON: {exc}"))
            return
        now = self._clock()
        if hedged:
            self._settle_hedge(item, placement, now)
        self._finished(item, placement)
        if placement == "local":
            # What the model learns from: the measured service time (the cloud client reports the cloud's).
            self.policy.observe_local(ref.kind, ref.size, service_s, now)
        self.policy.observe_output(ref.kind, len(body), now)
        key = (placement, ref.kind)
        histogram = self.durations.get(key)
        if histogram is None:
            histogram = self.durations[key] = Histogram()
        histogram.observe(service_s)
        self.completed += 1
        # A light task is cheap to run again after a crash, so its result may skip the outbox; the result of
        # a heavy or cloud task is committed before it is published, so a crash does not repeat the work.
        self._finish_row(ref, topic, body, direct=light)

    def _settle_hedge(self, item: Admitted, placement: str, now: float) -> None:
        """The first copy of a hedged row finished (its result is being committed): stop the other copy."""
        ref = item.ref
        copy = self._hedged.pop(ref.id, None)
        if placement == "local":
            self.hedges_won += 1
            cloud_task = self._cloud_running.pop(ref.id, None)
            if cloud_task is not None:
                self.policy.cloud_cancelled(item.task, now)
                self._count_cloud("cancelled")  # so every cloud decision ends in one outcome
                cloud_task.cancel()  # aborts the HTTP request; its late answer can no longer be committed
        elif copy is not None and ref.id in self._running:
            self._settled.add(ref.id)  # the gateway copy runs in the pool: let it finish, ignore its result
        # A copy still queued is dropped when it would start (_hedge_lost); a light one never waits that long.

    def _fail(self, item: Admitted, exc: BaseException) -> None:
        ref = item.ref
        if item.hedge:
            if ref.id in self._settled:
                self._settled.discard(ref.id)
                self._finished(item)
                return
            if ref.id in self._cloud_running and ref.id in self._hedged:
                # The gateway copy failed while the cloud copy still runs: the cloud may still deliver; if it
                # fails too, its fallback runs the task here again and reports that failure.
                del self._hedged[ref.id]
                self._finished(item)
                return
            self._hedged.pop(ref.id, None)
        self._finished(item)
        number = self._store.new_dead_letter_id()
        if isinstance(exc, (PayloadError, UnknownTask)):
            reason, detail = exc.reason, str(exc)
            self._dead_log.record(reason, id=number, topic=ref.topic, task_id=ref.task_id, size=ref.size,
                                  detail=detail)
        else:
            reason, detail = "task_failed", f"{type(exc).__name__}: {exc}"[:500]
            self._dead_log.record(reason, "task_failed", id=number, kind=ref.kind, topic=ref.topic,
                                  task_id=ref.task_id, error=detail)
        self.dead_lettered += 1
        self.dead_by_reason[reason] = self.dead_by_reason.get(reason, 0) + 1
        topic, body = dead_letter(self._agent_id, ref.topic, reason, detail, ref.size, ref.received_at, number)
        self._dead.append((ref.id, DeadLetter(number, reason, detail)))  # keeps the row's input
        self._finish_row(ref, topic, body)

    def _finish_row(self, ref: TaskRef, topic: str, body: bytes, direct: bool = False) -> None:
        """Hand a result or dead letter on: all of one loop turn's in one write (or one publish)."""
        if not self._done and not self._direct:
            assert self._loop is not None
            self._loop.call_soon(self._flush_done)
        (self._direct if direct and self._publish_direct is not None else self._done).append(
            (ref.id, ref.size, topic, body))

    def _flush_done(self) -> None:
        done, self._done = self._done, []
        dead, self._dead = self._dead, []
        if self._direct:
            assert self._publish_direct is not None
            direct, self._direct = self._direct, []
            done += self._publish_direct(direct)
        if done:
            self._store.complete(done, dead)

    async def drain(self, timeout_s: float) -> bool:
        """Stop starting tasks and wait for the running ones; True when all finished in time.

        Cloud submissions still unanswered at the deadline are cancelled: their rows stay pending, and the
        next start sends them again under the same Idempotency-Key, so the cloud does not run them twice.
        """
        self.closing = True
        if self._rebind_timer is not None:
            self._rebind_timer.cancel()
            self._rebind_timer = None
        running = [*self._running.values(), *self._cloud_running.values()]
        pending: set[asyncio.Task[None]] = set()
        if running:
            _, pending = await asyncio.wait(running, timeout=timeout_s)
            for task in pending:
                if task in self._cloud_running.values():
                    task.cancel()
        if self._done or self._direct:
            self._flush_done()  # the results of the last turn reach the store before its final barrier
        return not pending


def _cancel_timer(timers: dict[int, asyncio.TimerHandle], row_id: int) -> None:
    timer = timers.pop(row_id, None)
    if timer is not None:
        timer.cancel()


def _outcome(exc: CloudError) -> str:
    if isinstance(exc, CircuitOpen):
        return "circuit_open"
    return "transient" if isinstance(exc, TransientCloudError) else "permanent"

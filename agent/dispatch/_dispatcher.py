"""The dispatcher: committed tasks in, each decided when admitted, run inline, in the pool or in the cloud, and
its output (a result or a dead letter) handed on. See :mod:`agent.dispatch` for the words used here."""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from agent.cloud import CircuitOpen, CloudError, TransientCloudError
from agent.deadletters import DeadLetter, DeadLetterLog
from agent.decision import Decision, Placement, Policy, Task
from agent.dispatch._admitted import NO_TERMS, Admitted, decision_fields, micro
from agent.dispatch._binding import LateBinding
from agent.dispatch._hedging import Hedging
from agent.egress import dead_letter, result_message
from agent.errors import PayloadError, UnknownTask
from agent.executor import LocalExecutor, WorkerDied
from agent.store import Finished, ReadBack, Store, TaskRef
from agent.tasks import TaskRegistry
from agent.telemetry import get_logger

if TYPE_CHECKING:
    from agent.cloud import Cloud

log = get_logger("agent.dispatch")  # the name its events have always carried

INLINE_BUDGET = 256  # light tasks per loop turn, so acks and PUBACK hand-offs are not starved
WORKER_RETRIES = 1  # a task whose worker died is tried once more before it is dead-lettered
FALLBACK_LOG_EVERY_S = 30.0
CLOUD_IN_FLIGHT = 64  # cloud submissions awaiting answers; beyond, decided tasks wait (bounded memory)


class Dispatcher(Hedging, LateBinding):
    """Takes the tasks each commit hands over (or reads them back from the store), decides and runs them on the
    event loop, and hands their outputs to the publisher or the store. Its counters are read by /metrics."""

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
        memory_cap_tasks: int = 1_000,  # 3,000 held 2 MB more at a backlog's peak and drained no faster
        dead_log: DeadLetterLog | None = None,
    ) -> None:
        super().__init__(registry=registry, policy=policy, cloud=cloud, clock=clock)
        self._agent_id = agent_id
        self._dead_log = dead_log or DeadLetterLog()
        self._executor = executor
        self._store = store
        self._cap_bytes = memory_cap_bytes
        self._cap_tasks = memory_cap_tasks
        self._readback = ReadBack()
        self._attempts: dict[int, int] = {}
        self._heavy_limit = executor.workers * 2  # keep the pool's queue fed without hoarding tasks
        # This loop turn's outputs, handed on together at its end (_hand_on): for the store, …
        self._outputs: list[Finished] = []
        self._dead_copies: list[tuple[int, DeadLetter]] = []  # … the copies to keep of its dead letters, …
        self._direct_outputs: list[Finished] = []  # … and light tasks' results, offered to the publisher first
        # Set by connect_publisher: publishes results without the outbox where it can and returns the rest; and
        # how many it takes now.
        self._publish_direct: Callable[[list[Finished]], list[Finished]] | None = None
        self._publish_room: Callable[[], int] | None = None
        self._held = False  # light tasks wait: the publisher has as many results as it takes
        self._fallbacks_unlogged = 0
        self._fallback_logged_at = -FALLBACK_LOG_EVERY_S

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._load_more()

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
            self._count_decision(ref.kind, decision.target, decision.reason, decision.terms)
            self.policy.task_started(decision.target, task, now)
            # The queued task keeps what its result reports, not the terms (most of a decision's memory); each
            # decision is a new object, so dropping them here takes nothing from last_terms.
            decision.terms = NO_TERMS
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

    def _pump(self) -> None:
        self._scheduled = False
        if self.closing:
            return
        if self._heavy and self.cloud is not None:
            self._rebind()
        if (self._cloud or self._cloud_items) and self.cloud is not None:
            self._move_back()
        cloud = self._cloud
        while cloud and len(self._cloud_running) < CLOUD_IN_FLIGHT:
            item = cloud.popleft()
            self._queued_bytes -= item.ref.size
            payload = self._payload(item, "cloud")
            if payload is not None:
                self._cloud_running[item.ref.id] = asyncio.ensure_future(self._run_cloud(item, payload))
                self._cloud_items[item.ref.id] = item._replace(ref=item.ref._replace(payload=payload))
        heavy = self._heavy
        while heavy and len(self._running) < self._heavy_limit:
            item = heavy.popleft()
            self._queued_bytes -= item.ref.size
            if item.hedge and self._stopped_before_start(item):
                continue
            payload = self._payload(item)
            if payload is not None:
                self._running[item.ref.id] = asyncio.ensure_future(self._run_heavy(item, payload))
        light = self._light
        budget = min(len(light), INLINE_BUDGET)
        if self._publish_room is not None and light:
            budget = min(budget, self._publish_room() - len(self._direct_outputs))
            if budget <= 0:
                self._held = True  # until the publisher calls _publisher_ready
                budget = 0
        for _ in range(budget):
            item = light.popleft()
            self._queued_bytes -= item.ref.size
            if item.hedge and self._stopped_before_start(item):
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

    def _payload(self, item: Admitted, side: str = "local") -> bytes | None:
        ref = item.ref
        payload = ref.payload if ref.payload is not None else self._store.load_payload(ref.id)
        if payload is None:  # no longer pending: its output was committed by an earlier run
            self._finished_on(item, side)
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
            self._succeed(item, result, service_s, started, light=True)

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
            self._succeed(item, result, service_s, started)
        finally:
            self._running.pop(ref.id, None)
            self._schedule()

    async def _run_cloud(self, item: Admitted, payload: bytes) -> None:
        ref = item.ref
        assert self.cloud is not None
        started = time.time()
        on_uploaded = self._arm_hedge(item, payload)
        try:
            answer = await self.cloud.submit(ref.task_id, ref.kind, payload, ref.options, on_uploaded)
        except CloudError as exc:
            self._count_cloud(_outcome(exc))
            if ref.id in self._hedge_copies:
                self._finished_on(item, "cloud")  # the gateway copy is running already: it provides the result
            else:
                self._fall_back(item, payload, exc)
        else:
            self._count_cloud("ok")
            self._succeed(item, answer.result, answer.exec_s, started, placement="cloud")
        finally:
            self._disarm_hedge(ref.id)
            self._cloud_running.pop(ref.id, None)
            self._cloud_items.pop(ref.id, None)
            lease = self.cloud.lease_status()
            if lease.ready or not lease.provisioning:
                self.policy.observe_lease(lease.ready, slots=lease.slots or None)
            self._schedule()

    def _fall_back(self, item: Admitted, payload: bytes, exc: CloudError) -> None:
        """The cloud failed the task: run it on the gateway instead, ahead of tasks admitted later (it has
        waited already)."""
        now = self._clock()
        self.policy.task_finished("cloud", item.task, now)
        self.policy.task_started("local", item.task, now)
        reason = "circuit_open" if isinstance(exc, CircuitOpen) else str(exc)[:200]
        self._fallbacks_unlogged += 1
        if now - self._fallback_logged_at >= FALLBACK_LOG_EVERY_S:
            # One line per interval, not per task: an outage would otherwise flood the journal.
            log.warning("cloud_offload_failed", reason=reason, ran_on_gateway=self._fallbacks_unlogged)
            self._fallback_logged_at, self._fallbacks_unlogged = now, 0
        self._queue_on_gateway(item._replace(ref=item.ref._replace(payload=payload), fallback=reason), first=True)

    # ------------------------------------------------------------------ outcomes

    def _succeed(self, item: Admitted, result: dict[str, Any], service_s: float, started: float,
                 placement: str = "local", light: bool = False) -> None:
        ref = item.ref
        if item.hedge and self._loser_ended(item):
            self.policy.observe_local(ref.kind, ref.size, service_s, self._clock())  # still a measurement
            return
        hedged = item.hedge or ref.id in self._hedge_copies
        finished = time.time()
        try:
            topic, body = result_message(
                self._agent_id, task_id=ref.task_id, kind=ref.kind, topic=ref.topic, placement=placement,
                decision=decision_fields(item, hedged),
                timings={"queued_s": micro(max(0.0, started - ref.received_at)), "exec_s": micro(service_s),
                         "total_s": micro(max(0.0, finished - ref.received_at))},
                result=result,
            )
        except TypeError as exc:  # orjson.JSONEncodeError: a value JSON cannot hold (bytes, sets, objects…)
            self._fail(item, ValueError(f"the task returned a result that is not JSON: {exc}"))
            return
        now = self._clock()
        if hedged:
            self._won(item, placement, now)
        self._finished_on(item, placement)
        if placement == "local":
            # What the model learns from: the measured service time (the cloud client reports the cloud's).
            self.policy.observe_local(ref.kind, ref.size, service_s, now)
        self.policy.observe_output(ref.kind, len(body), now)
        self._count_success(placement, ref.kind, service_s)
        # A light task is cheap to run again after a crash, so its result may skip the outbox; the result of
        # a heavy or cloud task is committed before it is published, so a crash does not repeat the work.
        self._hand_on(ref, topic, body, direct=light)

    def _fail(self, item: Admitted, exc: BaseException) -> None:
        ref = item.ref
        if item.hedge and self._copy_failed(item):
            return
        self._finished_on(item, "local")
        number = self._store.new_dead_letter_id()
        if isinstance(exc, (PayloadError, UnknownTask)):
            reason, detail = exc.reason, str(exc)
            self._dead_log.record(reason, id=number, topic=ref.topic, task_id=ref.task_id, size=ref.size,
                                  detail=detail)
        else:
            reason, detail = "task_failed", f"{type(exc).__name__}: {exc}"[:500]
            self._dead_log.record(reason, "task_failed", id=number, kind=ref.kind, topic=ref.topic,
                                  task_id=ref.task_id, error=detail)
        self._count_dead_letter(reason)
        topic, body = dead_letter(self._agent_id, ref.topic, reason, detail, ref.size, ref.received_at, number)
        self._dead_copies.append((ref.id, DeadLetter(number, reason, detail)))  # keeps the row's input
        self._hand_on(ref, topic, body)

    def _hand_on(self, ref: TaskRef, topic: str, body: bytes, direct: bool = False) -> None:
        """Hand an output on: all of one loop turn's in one write (or one publish)."""
        if not self._outputs and not self._direct_outputs:
            assert self._loop is not None
            self._loop.call_soon(self._flush_outputs)
        (self._direct_outputs if direct and self._publish_direct is not None else self._outputs).append(
            (ref.id, ref.size, topic, body))

    def _flush_outputs(self) -> None:
        outputs, self._outputs = self._outputs, []
        dead, self._dead_copies = self._dead_copies, []
        if self._direct_outputs:
            assert self._publish_direct is not None
            direct, self._direct_outputs = self._direct_outputs, []
            outputs += self._publish_direct(direct)
        if outputs:
            self._store.complete(outputs, dead)

    async def drain(self, timeout_s: float) -> bool:
        """Stop starting tasks and wait for the running ones; True when all finished in time.

        Cloud submissions still unanswered at the deadline are cancelled: their rows stay pending, and the
        next start sends them again under the same Idempotency-Key, so the cloud does not run them twice.
        """
        self.closing = True
        self._stop_rebinding()
        running = [*self._running.values(), *self._cloud_running.values()]
        pending: set[asyncio.Task[None]] = set()
        if running:
            _, pending = await asyncio.wait(running, timeout=timeout_s)
            for task in pending:
                if task in self._cloud_running.values():
                    task.cancel()
        if self._outputs or self._direct_outputs:
            self._flush_outputs()  # the outputs of the last turn reach the store before its final barrier
        return not pending


def _outcome(exc: CloudError) -> str:
    if isinstance(exc, CircuitOpen):
        return "circuit_open"
    return "transient" if isinstance(exc, TransientCloudError) else "permanent"

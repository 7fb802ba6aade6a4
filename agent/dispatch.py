"""Committed task → decision → execution → result or dead letter committed to the outbox.

Runs on the event loop. The decision is made per task in :meth:`Dispatcher._decide`; until the offload path
exists every task runs on the gateway and the decision says why (``placement`` or ``no_cloud``).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from agent.egress import dead_letter, result_message
from agent.errors import PayloadError, UnknownTask
from agent.executor import LocalExecutor, WorkerDied
from agent.metrics import Histogram
from agent.store import Store, TaskRef
from agent.tasks import TaskRegistry
from agent.telemetry import get_logger

log = get_logger(__name__)

INLINE_BUDGET = 256  # light tasks per loop turn, so acks and PUBACK hand-offs are not starved
WORKER_RETRIES = 1  # a task whose worker died is tried once more before it is dead-lettered


@dataclass(slots=True)
class ServiceSample:
    """One measured execution, for the decision model to learn from."""

    kind: str
    placement: str
    in_bytes: int
    service_s: float


class Dispatcher:
    def __init__(
        self,
        *,
        agent_id: str,
        registry: TaskRegistry,
        executor: LocalExecutor,
        store: Store,
        memory_cap_bytes: int = 64 * 1024 * 1024,
        memory_cap_tasks: int = 20_000,
    ) -> None:
        self._agent_id = agent_id
        self._registry = registry
        self._executor = executor
        self._store = store
        self._cap_bytes = memory_cap_bytes
        self._cap_tasks = memory_cap_tasks
        # Two queues so a burst of heavy tasks waiting for a worker never holds up the light ones; each stays in
        # commit order (sensor.stats windows see a topic's readings in the order they arrived).
        self._light: deque[TaskRef] = deque()
        self._heavy: deque[TaskRef] = deque()
        self._queued_bytes = 0
        self._spilled = True  # at start the pending rows in the store are the truth
        self._loading = False
        self._last_id = 0
        self._running: dict[int, asyncio.Task[None]] = {}
        self._attempts: dict[int, int] = {}
        self._heavy_limit = executor.workers * 2  # keep the pool's queue fed without hoarding tasks
        self._scheduled = False
        self.closing = False
        self.completed = 0
        self.dead_lettered = 0
        self.decisions: dict[tuple[str, str], int] = {}  # (target, reason) → count
        self.dead_by_reason: dict[str, int] = {}
        self.durations: dict[tuple[str, str], Histogram] = {}  # (placement, kind) → service time
        self.samples: deque[ServiceSample] = deque(maxlen=1000)
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._load_more()

    @property
    def backlog(self) -> int:
        return len(self._light) + len(self._heavy)

    @property
    def running(self) -> int:
        return len(self._running)

    def idle(self) -> bool:
        return not self.backlog and not self._running and not self._spilled and not self._loading

    # ------------------------------------------------------------------ intake

    def accept(self, tasks: list[TaskRef]) -> None:
        if not tasks:
            return
        if self._spilled or self.backlog >= self._cap_tasks or self._queued_bytes >= self._cap_bytes:
            self._spilled = True  # the store has them; _load_more reads them back in id order
        else:
            for ref in tasks:
                self._enqueue(ref)
            self._last_id = tasks[-1].id
        self._schedule()

    def _enqueue(self, ref: TaskRef) -> None:
        spec = self._registry.get(ref.kind) if ref.kind in self._registry else None
        if spec is not None and spec.heavy:
            self._heavy.append(ref)
        else:
            self._light.append(ref)
        self._queued_bytes += ref.size

    def _load_more(self) -> None:
        if self._loading or self.closing:
            return
        self._loading = True
        assert self._loop is not None
        loop, limit = self._loop, 1000
        def reply(refs: list[TaskRef]) -> None:
            loop.call_soon_threadsafe(self._loaded, refs, limit)

        self._store.load_pending(self._last_id, limit, reply)

    def _loaded(self, refs: list[TaskRef], limit: int) -> None:
        self._loading = False
        for ref in refs:
            if ref.id not in self._running:
                self._enqueue(ref)
        if refs:
            self._last_id = refs[-1].id
        if len(refs) < limit:
            self._spilled = False
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
        heavy = self._heavy
        while heavy and len(self._running) < self._heavy_limit:
            ref = heavy.popleft()
            self._queued_bytes -= ref.size
            payload = ref.payload if ref.payload is not None else self._store.load_payload(ref.id)
            if payload is not None:  # None: no longer pending (finished by an earlier run)
                decision = self._decide(ref)
                self._running[ref.id] = asyncio.ensure_future(self._run_heavy(ref, payload, decision))
        light = self._light
        for _ in range(min(len(light), INLINE_BUDGET)):
            ref = light.popleft()
            self._queued_bytes -= ref.size
            payload = ref.payload if ref.payload is not None else self._store.load_payload(ref.id)
            if payload is not None:
                self._run_light(ref, payload)
        if light:
            self._schedule()
        elif self._spilled and self.backlog < self._cap_tasks // 2:
            self._load_more()

    def _run_light(self, ref: TaskRef, payload: bytes) -> None:
        decision = self._decide(ref)
        if ref.kind not in self._registry:
            self._fail(ref, UnknownTask(f"task {ref.kind!r} is not installed on this gateway"))
            return
        started = time.time()
        try:
            result, service_s = self._executor.run_inline(self._registry.get(ref.kind), payload, ref.options)
        except Exception as exc:  # noqa: BLE001 - any task error becomes a dead letter
            self._fail(ref, exc)
        else:
            self._complete(ref, decision, result, service_s, started)

    def _decide(self, ref: TaskRef) -> dict[str, Any]:
        """Where the task runs and why. Only the gateway executes tasks so far."""
        reason = "placement" if ref.placement == "local" else "no_cloud"
        key = ("local", reason)
        self.decisions[key] = self.decisions.get(key, 0) + 1
        return {"target": "local", "t_local_s": None, "t_cloud_s": None, "reason": reason}

    async def _run_heavy(self, ref: TaskRef, payload: bytes, decision: dict[str, Any]) -> None:
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
                self._heavy.appendleft(ref._replace(payload=payload))
                self._queued_bytes += ref.size
            else:
                self._attempts.pop(ref.id, None)
                self._fail(ref, exc)
        except Exception as exc:  # noqa: BLE001 - any task error becomes a dead letter
            self._fail(ref, exc)
        else:
            self._attempts.pop(ref.id, None)
            self._complete(ref, decision, result, service_s, started)
        finally:
            self._running.pop(ref.id, None)
            self._schedule()

    def _complete(self, ref: TaskRef, decision: dict[str, Any], result: dict[str, Any], service_s: float,
                  started: float) -> None:
        finished = time.time()
        self.samples.append(ServiceSample(ref.kind, "local", ref.size, service_s))
        key = ("local", ref.kind)
        histogram = self.durations.get(key)
        if histogram is None:
            histogram = self.durations[key] = Histogram()
        histogram.observe(service_s)
        try:
            topic, body = result_message(
                self._agent_id, task_id=ref.task_id, kind=ref.kind, topic=ref.topic, placement="local",
                decision={"t_local_s": decision["t_local_s"], "t_cloud_s": decision["t_cloud_s"],
                          "reason": decision["reason"]},
                timings={"queued_s": round(max(0.0, started - ref.received_at), 6),
                         "exec_s": round(service_s, 6),
                         "total_s": round(max(0.0, finished - ref.received_at), 6)},
                result=result,
            )
        except TypeError as exc:  # orjson.JSONEncodeError: a value JSON cannot hold (bytes, sets, objects…)
            self._fail(ref, ValueError(f"the task returned a result that is not JSON: {exc}"))
            return
        self.completed += 1
        self._store.complete(ref.id, ref.size, topic, body)

    def _fail(self, ref: TaskRef, exc: BaseException) -> None:
        if isinstance(exc, (PayloadError, UnknownTask)):
            reason, detail = exc.reason, str(exc)
        else:
            reason, detail = "task_failed", f"{type(exc).__name__}: {exc}"[:500]
            log.warning("task_failed", kind=ref.kind, topic=ref.topic, task_id=ref.task_id, error=detail)
        self.dead_lettered += 1
        self.dead_by_reason[reason] = self.dead_by_reason.get(reason, 0) + 1
        topic, body = dead_letter(self._agent_id, ref.topic, reason, detail, ref.size, ref.received_at)
        self._store.complete(ref.id, ref.size, topic, body)

    async def drain(self, timeout_s: float) -> bool:
        """Stop starting tasks and wait for the running ones; True when all finished in time."""
        self.closing = True
        running = list(self._running.values())
        if not running:
            return True
        _, pending = await asyncio.wait(running, timeout=timeout_s)
        return not pending

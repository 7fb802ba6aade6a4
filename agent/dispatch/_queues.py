"""What the parts of the dispatcher share: the queues of decided tasks, the tasks running, and the policy's view
of which side each task occupies."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.decision import Policy
from agent.dispatch._admitted import Admitted
from agent.dispatch._counters import DispatchCounters
from agent.tasks import TaskRegistry

if TYPE_CHECKING:
    from agent.cloud import Cloud  # what the dispatcher uses of the client (CloudClient: httpx, only with a URL)


class DispatchQueues(DispatchCounters):
    """The dispatcher's queues and running tasks; :class:`agent.dispatch.Dispatcher` moves tasks through them."""

    def __init__(self, *, registry: TaskRegistry, policy: Policy, cloud: Cloud | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._registry = registry
        self.policy = policy
        self.cloud = cloud
        self._clock = clock
        self._loop: asyncio.AbstractEventLoop | None = None
        # Two queues so a burst of heavy tasks waiting for a worker never holds up the light ones; each stays in
        # commit order (sensor.stats windows see a topic's readings in the order they arrived).
        self._light: deque[Admitted] = deque()
        self._heavy: deque[Admitted] = deque()
        self._cloud: deque[Admitted] = deque()
        self._queued_bytes = 0
        self._running: dict[int, asyncio.Task[None]] = {}  # row id → heavy task in the worker pool
        self._cloud_running: dict[int, asyncio.Task[None]] = {}  # row id → cloud submission awaiting its answer
        self._cloud_items: dict[int, Admitted] = {}  # … and its task (with its payload), in the order sent
        self._scheduled = False
        self.closing = False

    @property
    def backlog(self) -> int:
        return len(self._light) + len(self._heavy) + len(self._cloud)

    @property
    def running(self) -> int:
        return len(self._running) + len(self._cloud_running)

    def _schedule(self) -> None:
        if not self._scheduled and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        raise NotImplementedError  # Dispatcher._pump: start what the queues and limits allow

    def _queue_on_gateway(self, item: Admitted, *, first: bool = False) -> None:
        """Queue ``item`` (an installed kind) to run here: ``first`` for one that has waited already."""
        queue = self._heavy if self._registry.get(item.ref.kind).heavy else self._light
        if first:
            queue.appendleft(item)
        else:
            queue.append(item)
        self._queued_bytes += item.ref.size

    def _finished_on(self, item: Admitted, side: str) -> None:
        """The task no longer occupies ``side`` ("local" or "cloud") in the policy's view, whatever its outcome."""
        if item.decision is not None:
            self.policy.task_finished("cloud" if side == "cloud" else "local", item.task, self._clock())

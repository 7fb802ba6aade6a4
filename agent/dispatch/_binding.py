"""Late binding: a heavy task decided for the gateway that has not started yet is asked again
(``Policy.rebind``), from the end of the queue, at every turn and every ``REBIND_CHECK_S`` while tasks wait; one
the cloud would now finish sooner moves to the cloud queue, with ``"rebound": true`` in its decision. It is the
same pending row either way (the store does not record where a task runs), so a crash at any point of a move
leaves a pending row that the next start decides afresh.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.decision import Policy
from agent.dispatch._admitted import NO_TERMS
from agent.dispatch._queues import DispatchQueues
from agent.tasks import TaskRegistry

if TYPE_CHECKING:
    from agent.cloud import Cloud

REBIND_CHECK_S = 0.1  # how often waiting heavy tasks are asked again while nothing else happens
REBIND_SCAN = 64  # queued tasks looked at from the end of the queue per turn


class LateBinding(DispatchQueues):
    """Moves queued heavy tasks from the gateway to the cloud while they wait."""

    def __init__(self, *, registry: TaskRegistry, policy: Policy, cloud: Cloud | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(registry=registry, policy=policy, cloud=cloud, clock=clock)
        self._rebind_timer: asyncio.TimerHandle | None = None

    def _rebind(self) -> None:
        """Move the heavy tasks still queued for the gateway that the cloud would now finish sooner, from the
        end of the queue (the longest waits) until one stays."""
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
            new.terms = NO_TERMS
            self._cloud.append(item._replace(decision=new, decided_at=now))

    def _rebind_due(self) -> None:
        self._rebind_timer = None
        if self._heavy and not self.closing:
            self._schedule()

    def _stop_rebinding(self) -> None:
        if self._rebind_timer is not None:
            self._rebind_timer.cancel()
            self._rebind_timer = None

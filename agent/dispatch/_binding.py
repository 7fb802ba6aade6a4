"""Late binding: a heavy task decided for the gateway that has not started yet is asked again
(``Policy.rebind``), from the end of the queue, at every turn and every ``REBIND_CHECK_S`` while tasks wait; one
the cloud would now finish sooner moves to the cloud queue, with ``"rebound": true`` in its decision. Back the
other way (``Policy.move_back``), a cloud task whose upload has not started (not yet handed to the cloud client,
or its submission still waiting for a lease or for a slot of one) comes to the gateway's queue when the gateway
would now finish it sooner; its submission, if any, is cancelled before it sends. A task moves once at most.

It is the same pending row either way (the store does not record where a task runs), so a crash at any point
of a move leaves a pending row that the next start decides afresh. Which submissions wait for a slot is
inferred (the oldest in flight hold the lease's slots, which the client grants in order); one that had in fact
begun to send is cancelled as a hedge's losing copy is: the cloud may still run it, under the row's task id as
Idempotency-Key, and its answer is never read, so the row's one result is the gateway's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.decision import Policy
from agent.dispatch._admitted import NO_TERMS, Admitted
from agent.dispatch._queues import DispatchQueues
from agent.tasks import TaskRegistry

if TYPE_CHECKING:
    from agent.cloud import Cloud

REBIND_CHECK_S = 0.1  # how often waiting heavy tasks are asked again while nothing else happens
REBIND_SCAN = 64  # queued tasks looked at from the end of the queue per turn


class LateBinding(DispatchQueues):
    """Moves queued heavy tasks from the gateway to the cloud while they wait, and cloud tasks not yet uploaded
    back."""

    _hedge_copies: dict[int, Admitted]  # Hedging's: a task with a gateway copy already stays where it is

    def _disarm_hedge(self, row_id: int) -> None:
        raise NotImplementedError  # Hedging._disarm_hedge

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
                    or decision.target != "local" or decision.rebound:
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

    def _move_back(self) -> None:
        """Bring to the gateway the cloud tasks whose upload has not started that the gateway would now finish
        sooner, from the end of the uplink's queue (the latest sent) until one stays."""
        cloud, loop = self.cloud, self._loop
        assert cloud is not None and loop is not None
        lease = cloud.lease_status()
        holding = lease.slots if lease.ready else 0  # the oldest submissions in flight hold the slots
        if not self._cloud and len(self._cloud_items) <= holding:
            return  # every submission may be sending: nothing to ask (the common case, checked every turn)
        candidates: list[tuple[Admitted, asyncio.Task[None] | None]] = [(item, None) for item in reversed(self._cloud)]
        waiting = list(self._cloud_items.values())[holding:]
        candidates += [(item, self._cloud_running.get(item.ref.id)) for item in reversed(waiting)]
        if self._rebind_timer is None:
            self._rebind_timer = loop.call_later(REBIND_CHECK_S, self._rebind_due)
        now = self._clock()
        for item, submission in candidates:
            decision = item.decision
            if decision is None or decision.rebound or decision.probe or decision.reason != "model" \
                    or item.fallback is not None or item.ref.id in self._hedge_copies:
                break
            new = self.policy.move_back(item.task, now)
            if new is None:
                break
            if submission is None:
                self._cloud.pop()  # the last one not handed to the client yet: this one
                self._queued_bytes -= item.ref.size
            else:
                del self._cloud_items[item.ref.id]
                self._disarm_hedge(item.ref.id)
                submission.cancel()  # waiting for a lease or a slot: nothing of it has been sent
            self.moves_back += 1
            self._count_cloud("moved_back")  # how this cloud decision ended
            self.last_terms[item.ref.kind] = new.terms
            new.terms = NO_TERMS
            self._queue_on_gateway(item._replace(decision=new, decided_at=now))

    def _rebind_due(self) -> None:
        self._rebind_timer = None
        if (self._heavy or self._cloud_items) and not self.closing:
            self._schedule()

    def _stop_rebinding(self) -> None:
        if self._rebind_timer is not None:
            self._rebind_timer.cancel()
            self._rebind_timer = None

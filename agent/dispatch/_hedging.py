"""Hedging: a cloud task still unanswered ``Decision.hedge_after_s`` after its decision (or whose upload is past
``Decision.upload_by_s``) also runs on the gateway, as the same row with the same task id.

The row then has two copies. The first to succeed **wins**: its result is the row's one result. The other is
**stopped**: a cloud request still running is cancelled (which aborts its HTTP request), a gateway copy still
queued is dropped when its turn comes, and one already running in the pool is left to finish as a **loser**, its
result ignored but its service time still a measurement.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.decision import Policy
from agent.dispatch._admitted import Admitted
from agent.dispatch._queues import DispatchQueues
from agent.tasks import TaskRegistry

if TYPE_CHECKING:
    from agent.cloud import Cloud


class Hedging(DispatchQueues):
    """The hedge copies of cloud tasks, their deadlines, and which copy of a row won."""

    def __init__(self, *, registry: TaskRegistry, policy: Policy, cloud: Cloud | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(registry=registry, policy=policy, cloud=cloud, clock=clock)
        self._hedge_copies: dict[int, Admitted] = {}  # row id → gateway copy of a cloud task still in flight
        self._hedge_timers: dict[int, asyncio.TimerHandle] = {}
        self._upload_timers: dict[int, asyncio.TimerHandle] = {}  # … at the upload's deadline, until it ends
        self._losers: set[int] = set()  # rows whose result is committed while their gateway copy still runs

    def _arm_hedge(self, item: Admitted, payload: bytes) -> Callable[[], None] | None:
        """A cloud submission starts: set its deadlines. Returns what to call when its upload has ended."""
        ref, decision, loop, now = item.ref, item.decision, self._loop, self._clock()
        assert self.cloud is not None and loop is not None
        hedge_after = decision.hedge_after_s if decision is not None else math.inf
        if math.isfinite(hedge_after):
            self._hedge_timers[ref.id] = loop.call_later(max(0.0, item.decided_at + hedge_after - now),
                                                         self._hedge, item, payload, False)
        upload_by = decision.upload_by_s if decision is not None else math.inf
        # Only where each upload's end is seen: inferred from the answer, every upload would look overdue.
        if math.isfinite(upload_by) and self.cloud.sees_uploads:
            self._upload_timers[ref.id] = loop.call_later(max(0.0, item.decided_at + upload_by - now),
                                                          self._hedge, item, payload, True)
            return functools.partial(_cancel_timer, self._upload_timers, ref.id)
        return None

    def _disarm_hedge(self, row_id: int) -> None:
        _cancel_timer(self._hedge_timers, row_id)
        _cancel_timer(self._upload_timers, row_id)

    def _hedge(self, item: Admitted, payload: bytes, upload: bool) -> None:
        """The cloud task, or (``upload``) its upload, is overdue: queue a gateway copy too, behind the tasks
        queued there already (as the policy counts it, and as the replay simulates it), once the gateway would
        now need no longer for it than the task has waited (``Policy.hedge_delay``; asked again then)."""
        ref = item.ref
        if self.closing or ref.id not in self._cloud_running or ref.id in self._hedge_copies:
            self._disarm_hedge(ref.id)
            return
        now = self._clock()
        delay = self.policy.hedge_delay(item.task, item.decided_at, now, upload=upload)
        if delay > 0.0:
            assert self._loop is not None
            timers = self._upload_timers if upload else self._hedge_timers
            timers[ref.id] = self._loop.call_later(delay, self._hedge, item, payload, upload)
            return
        self._disarm_hedge(ref.id)  # one copy at most, whichever deadline came first
        self.policy.task_started("local", item.task, now)
        self.hedges += 1
        copy = item._replace(ref=ref._replace(payload=payload), hedge=True)
        self._hedge_copies[ref.id] = copy
        self._queue_on_gateway(copy)
        self._schedule()

    def _stopped_before_start(self, copy: Admitted) -> bool:
        """A gateway copy about to start: True (and forgotten) when the cloud copy already won its row."""
        if copy.ref.id in self._hedge_copies:
            return False
        self._losers.discard(copy.ref.id)
        self.policy.task_finished("local", copy.task, self._clock())
        return True

    def _loser_ended(self, copy: Admitted) -> bool:
        """A gateway copy ended: True (and forgotten) when it lost, its row's result committed already."""
        if copy.ref.id not in self._losers:
            return False
        self._losers.discard(copy.ref.id)
        self._finished_on(copy, "local")
        return True

    def _won(self, item: Admitted, placement: str, now: float) -> None:
        """A copy of a hedged row succeeded first (its result is being committed): stop the other copy."""
        ref = item.ref
        copy = self._hedge_copies.pop(ref.id, None)
        if placement == "local":
            self.hedges_won += 1
            cloud_task = self._cloud_running.pop(ref.id, None)
            if cloud_task is not None:
                self.policy.cloud_cancelled(item.task, now)
                self._count_cloud("cancelled")  # so every cloud decision ends in one outcome
                cloud_task.cancel()  # aborts the HTTP request; its late answer can no longer be committed
        elif copy is not None and ref.id in self._running:
            self._losers.add(ref.id)  # the gateway copy runs in the pool: let it finish, ignore its result
        # A copy still queued is dropped when it would start (_stopped_before_start); a light one never waits
        # that long.

    def _copy_failed(self, copy: Admitted) -> bool:
        """A gateway copy failed: True when its row needs no dead letter (it lost, or the cloud may still
        deliver; if the cloud fails too, its fallback runs the task here again and reports that failure)."""
        ref = copy.ref
        if self._loser_ended(copy):
            return True
        if ref.id in self._cloud_running and ref.id in self._hedge_copies:
            del self._hedge_copies[ref.id]
            self._finished_on(copy, "local")
            return True
        self._hedge_copies.pop(ref.id, None)
        return False


def _cancel_timer(timers: dict[int, asyncio.TimerHandle], row_id: int) -> None:
    timer = timers.pop(row_id, None)
    if timer is not None:
        timer.cancel()

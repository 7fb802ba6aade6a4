"""Leaving the shared group (SIGUSR1): retire this member losslessly (docs/fleets.md#retiring-a-member).

Unsubscribe, take in what the broker session still holds, finish every task, have every result and dead letter
acknowledged, then stop and end the session, so that nothing is left with this member. The leave is marked in
the store's meta table while under way, so a crash or a power cut does not undo it: the next start resumes it.
A SIGTERM cancels it: an ordinary stop, and the session keeps what it holds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.telemetry import get_logger

if TYPE_CHECKING:
    from agent.dispatch import Dispatcher
    from agent.egress import Publisher
    from agent.ingress import Ingress
    from agent.mqtt import Link
    from agent.store import Store

log = get_logger(__name__)

LEAVING_KEY = "leaving"  # set while a leave (SIGUSR1) is under way, so a crash or power cut does not undo it
# Leaving the group ends once nothing has arrived for this long after the broker confirmed the UNSUBSCRIBE:
# Mosquitto pushes a session's queue as fast as we acknowledge (in milliseconds), so silence means it is empty.
LEAVE_QUIET_S = 2.0


def leave_pending(store: Store) -> bool:
    """A leave was under way when the agent last stopped (read before the writer thread owns the store)."""
    return bool(store.get_meta(LEAVING_KEY))


class Leave:
    """The leave's state and its drain loop; the daemon asks ``leaving`` and ``session_ended``."""

    def __init__(self, *, store: Store, link: Link, ingress: Ingress, dispatcher: Dispatcher,
                 publisher: Publisher, stopping: asyncio.Event, request_stop: Callable[[str], None],
                 announce: Callable[[], object], group: str | None, client_id: str) -> None:
        self._store, self._link, self._ingress = store, link, ingress
        self._dispatcher, self._publisher = dispatcher, publisher
        self._stopping, self._request_stop, self._announce = stopping, request_stop, announce
        self._group, self._client_id = group, client_id
        self.leaving = False
        self.session_ended = False  # set once the leave is complete: the stop then discards the session
        self._task: asyncio.Future[None] | None = None

    def request(self) -> None:
        """SIGUSR1: start leaving, unless already leaving or stopping."""
        if self.leaving or self._stopping.is_set():
            return
        self.leaving = True
        self._mark(True)
        log.info("leaving_group", group=self._group, client_id=self._client_id)
        self._announce()
        self._link.leave()
        self._task = asyncio.ensure_future(self._drain())

    def stopping(self) -> None:
        """The agent stops: a leave not complete is cancelled, not resumed at the next start."""
        if self.leaving and not self.session_ended:
            self._mark(False)

    async def _drain(self) -> None:
        received, quiet_since = -1, 0.0
        ingress, dispatcher, link = self._ingress, self._dispatcher, self._link
        while not self._stopping.is_set():
            now = time.monotonic()
            if (ingress.counters.received != received or not link.left.is_set()
                    or not link.connected.is_set() or ingress.paused):
                received, quiet_since = ingress.counters.received, now  # the session may still hold more
            elif (now - quiet_since >= LEAVE_QUIET_S and dispatcher.backlog == 0
                    and dispatcher.running == 0 and self._publisher.idle() and self._store.outstanding_rows == 0):
                log.info("left_group_drained", received=received, completed=dispatcher.completed)
                self.session_ended = True
                self._mark(False)
                self._request_stop("left the group")
                return
            await asyncio.sleep(0.1)

    def _mark(self, on: bool) -> None:
        store = self._store
        store.call(lambda: store.set_meta(LEAVING_KEY, "1" if on else ""))

"""Results, dead letters and their delivery (docs/design.md#mqtt-contract).

The encoders are pure. :class:`Publisher` runs on the event loop: it publishes committed outbox rows within a
window of unacknowledged messages (paho's packet ids run out past 65,535 and a big backlog would otherwise
lose results: docs/contributing.md#paho-mqtt-traps), and tells the store when the broker has acknowledged
each one.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from agent import codec
from agent.mqtt.topics import dead_letter_topic, results_topic
from agent.store import Finished, OutboxEntry, ReadBack, Store
from agent.telemetry import get_logger

log = get_logger(__name__)

RETRY_REFUSED_S = 0.5
# Results offered without the outbox that may wait for the window. The dispatcher stops running light tasks
# while this is full (their inputs wait in the store, already durable) rather than write results to disk.
FRESH_CAP = 1_000


def dead_letter(agent_id: str, topic: str, reason: str, detail: str, size: int,
                received_at: float, dead_letter_id: int) -> tuple[str, bytes]:
    """``dead_letter_id``: the store's id of the kept copy (``edge-agent dead-letters show ID``)."""
    body = {"topic": topic, "reason": reason, "detail": detail, "size": size, "received_at": received_at,
            "id": dead_letter_id}
    return dead_letter_topic(agent_id, topic), codec.dumps(body)


def result_message(agent_id: str, *, task_id: str, kind: str, topic: str, placement: str,
                   decision: dict[str, Any], timings: dict[str, float],
                   result: dict[str, Any]) -> tuple[str, bytes]:
    body = {
        "task_id": task_id,
        "kind": kind,
        "topic": topic,
        "placement": placement,
        "decision": decision,
        "timings": timings,
        "result": result,
    }
    return results_topic(agent_id, topic), codec.dumps(body)


class Sent(NamedTuple):
    """A result published and not yet acknowledged by the broker."""

    id: int  # its row in the store
    topic: str
    payload: bytes
    release: int  # bytes of the row the store frees once the broker has it
    direct: bool  # published straight from the dispatcher: not in the outbox, its row still holds the input


class Publisher:
    """Publishes results, at most ``window`` unacknowledged at once.

    Outbox rows arrive from the store after each commit, in commit order. Beyond ``memory_cap`` queued rows it
    stops holding them in memory ("spilled") and reads them back from the store once the queue drains, so an
    outage with a long backlog costs disk, not memory.

    Results of light tasks may skip the outbox (:meth:`offer`): up to ``fresh_cap`` of them wait in memory and go
    out once the outbox is empty and the window has room; only their acknowledgement is written (the row becomes
    a tombstone). Their input row stays pending until then, so a crash before the PUBACK is recorded runs the
    task again under the same task_id (at least once, as with an outbox row); the result itself never reaches
    the disk, which saves the store a write of every result and the SD card its wear.
    """

    def __init__(
        self,
        store: Store,
        send: Callable[[Sequence[Sent], Sequence[int] | None], list[int]],
        *,
        window: int,
        memory_cap: int = 2_000,
    ) -> None:
        self._store = store
        self._send = send
        self.window = window
        self._memory_cap = memory_cap
        self._queue: deque[Sent] = deque()  # outbox rows, in commit order
        self._fresh: deque[Sent] = deque()  # offered results waiting for the window
        self.fresh_cap = FRESH_CAP
        self.on_room: Callable[[], None] = lambda: None  # called when offered results fell below half the cap
        self._inflight: dict[int, Sent] = {}  # mid → the result it carries
        self._readback = ReadBack()
        self._retry: asyncio.TimerHandle | None = None
        self._settled: list[tuple[int, int]] = []  # acknowledged since the last hand-over to the store
        self.published = 0
        self.acknowledged = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._load_more()

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    @property
    def backlog(self) -> int:
        return len(self._queue) + len(self._fresh)

    def idle(self) -> bool:
        return (not self._queue and not self._fresh and not self._inflight and not self._settled
                and self._readback.settled)

    # ------------------------------------------------------------------ event loop

    def accept(self, entries: list[OutboxEntry], commit: int) -> None:
        """The results and dead letters a commit (number ``commit``) handed over."""
        room = self._memory_cap - len(self._queue)
        take = entries if room >= len(entries) else entries[:max(room, 0)]
        if take and self._readback.hand_off(True, take[-1].seq):
            self._queue.extend(Sent(e.id, e.topic, e.payload, len(e.payload), False) for e in take)
        else:
            take = []
        if len(take) < len(entries):
            self._readback.hand_off(False, entries[-1].seq)  # the rest is read back from the store later
            self._store.stop_hand_off("outbox", commit)
        self.pump()

    def acked(self, mids: Iterable[int]) -> None:
        for mid in mids:
            self.acked_one(mid)

    def acked_one(self, mid: int) -> None:
        """A PUBACK, as the client reads it; the store hears of them once per loop turn."""
        entry = self._inflight.pop(mid, None)
        if entry is None:  # not a result of ours
            return
        settled = self._settled
        if not settled:
            assert self._loop is not None
            self._loop.call_soon(self._settle)
        settled.append((entry.id, entry.release))

    def _settle(self) -> None:
        done, self._settled = self._settled, []
        self.acknowledged += len(done)
        self._store.published(done)
        self.pump()

    def pump(self) -> None:
        if self._retry is not None:
            return
        if not self._send_from(self._queue) or self._queue:
            return
        if self._readback.spilled:
            self._load_more()
            return
        # The outbox is empty: results not written to it go next.
        fresh = self._fresh
        if fresh and self._send_from(fresh) and len(fresh) <= self.fresh_cap // 2:
            self.on_room()

    def _send_from(self, queue: deque[Sent]) -> bool:
        """Send what the window allows from ``queue``; False when the link refused them (disconnected: again
        after the next CONNACK, or shortly)."""
        room = min(len(queue), self.window - len(self._inflight))
        if room <= 0:
            return True
        batch = [queue.popleft() for _ in range(room)]
        mids = self._send(batch, None)
        if not mids:
            queue.extendleft(reversed(batch))
            assert self._loop is not None
            self._retry = self._loop.call_later(RETRY_REFUSED_S, self._retry_now)
            return False
        self._inflight.update(zip(mids, batch, strict=True))
        self.published += len(mids)
        return True

    def room(self) -> int:
        """How many more results :meth:`offer` takes now."""
        return self.fresh_cap - len(self._fresh)

    def offer(self, results: list[Finished]) -> list[Finished]:
        """Results to publish without the outbox: (row id, input size, topic, payload) each. Up to ``fresh_cap``
        wait in memory for the window; returns those not taken, for the caller to commit to the outbox."""
        room = self.room()
        take = results if room >= len(results) else results[:max(room, 0)]
        if take:
            self._fresh.extend(Sent(row, topic, payload, size, True) for row, size, topic, payload in take)
            self.pump()
        return results[len(take):]

    def take_unconfirmed(self) -> list[Finished]:
        """At shutdown: the results not in the outbox and not acknowledged, for the outbox (the next start
        publishes the same result again rather than computing a new one)."""
        direct = [e for e in self._inflight.values() if e.direct] + list(self._fresh)
        self._inflight = {mid: e for mid, e in self._inflight.items() if not e.direct}
        self._fresh.clear()
        return [(e.id, e.release, e.topic, e.payload) for e in direct]

    def reconnected(self, window: int) -> None:
        """After each CONNACK, with the window the broker allows: what the last connection left unacknowledged
        goes again, then the queue."""
        self.window = max(1, window)
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._inflight:
            self._send(list(self._inflight.values()), list(self._inflight))
        self.pump()

    def _retry_now(self) -> None:
        self._retry = None
        self.pump()

    def _load_more(self) -> None:
        if not self._readback.start_read():
            return
        assert self._loop is not None
        loop = self._loop
        limit = self._memory_cap
        def reply(rows: list[OutboxEntry]) -> None:
            loop.call_soon_threadsafe(self._loaded, rows, limit)

        self._store.load_outbox(self._readback.cursor, limit, reply)

    def _loaded(self, rows: list[OutboxEntry], limit: int) -> None:
        inflight_ids = {entry.id for entry in self._inflight.values()}
        for row in rows:
            if row.id not in inflight_ids:
                self._queue.append(Sent(row.id, row.topic, row.payload, len(row.payload), False))
        self._readback.read(len(rows), limit, rows[-1].seq if rows else None)
        self.pump()

"""Results, dead letters and their delivery (DESIGN §4).

The encoders are pure. :class:`Publisher` runs on the event loop: it publishes committed outbox rows within a
window of unacknowledged messages (paho's packet ids run out past 65,535 and a big backlog would otherwise
lose results, STYLE.md), and tells the store when the broker has acknowledged each one.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from agent import codec
from agent.store import OutboxEntry, ReadBack, Store
from agent.telemetry import get_logger

log = get_logger(__name__)

RETRY_REFUSED_S = 0.5


def results_topic(agent_id: str, topic: str) -> str:
    return f"edge/{agent_id}/results/{topic}"


def dead_letter_topic(agent_id: str, topic: str) -> str:
    return f"edge/{agent_id}/dead-letter/{topic}"


def dead_letter(agent_id: str, topic: str, reason: str, detail: str, size: int,
                received_at: float) -> tuple[str, bytes]:
    body = {"topic": topic, "reason": reason, "detail": detail, "size": size, "received_at": received_at}
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


class Publisher:
    """Publishes outbox rows in commit order, at most ``window`` unacknowledged at once.

    Rows arrive from the store after each commit. Beyond ``memory_cap`` queued rows it stops holding them in
    memory ("spilled") and reads them back from the store once the queue drains, so an outage with a long
    backlog costs disk, not memory.
    """

    def __init__(
        self,
        store: Store,
        send: Callable[[list[tuple[str, bytes, int | None]]], list[int]],
        *,
        window: int,
        memory_cap: int = 2_000,
    ) -> None:
        self._store = store
        self._send = send
        self.window = window
        self._memory_cap = memory_cap
        self._queue: deque[OutboxEntry] = deque()
        self._inflight: dict[int, OutboxEntry] = {}  # mid → the row it carries
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
        return len(self._queue)

    def idle(self) -> bool:
        return not self._queue and not self._inflight and not self._settled and self._readback.settled

    # ------------------------------------------------------------------ event loop

    def accept(self, entries: list[OutboxEntry], commit: int) -> None:
        """The results and dead letters a commit (number ``commit``) handed over."""
        room = self._memory_cap - len(self._queue)
        take = entries if room >= len(entries) else entries[:max(room, 0)]
        if take and self._readback.hand_off(True, take[-1].seq):
            self._queue.extend(take)
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
        settled.append((entry.id, len(entry.payload)))

    def _settle(self) -> None:
        done, self._settled = self._settled, []
        self.acknowledged += len(done)
        self._store.published(done)
        self.pump()

    def pump(self) -> None:
        if self._retry is not None:
            return
        queue, inflight = self._queue, self._inflight
        room = min(len(queue), self.window - len(inflight))
        if room > 0:
            batch = [queue.popleft() for _ in range(room)]
            mids = self._send([(entry.topic, entry.payload, None) for entry in batch])
            if not mids:  # disconnected: again after the next CONNACK, or shortly
                queue.extendleft(reversed(batch))
                assert self._loop is not None
                self._retry = self._loop.call_later(RETRY_REFUSED_S, self._retry_now)
                return
            inflight.update(zip(mids, batch, strict=True))
            self.published += len(mids)
        if not queue and self._readback.spilled:
            self._load_more()

    def reconnected(self, window: int) -> None:
        """After each CONNACK, with the window the broker allows: what the last connection left unacknowledged
        goes again, then the queue."""
        self.window = max(1, window)
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._inflight:
            self._send([(entry.topic, entry.payload, mid) for mid, entry in self._inflight.items()])
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
                self._queue.append(row)
        self._readback.read(len(rows), limit, rows[-1].seq if rows else None)
        self.pump()

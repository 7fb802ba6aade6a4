"""The devcloud's state: leases, the idempotency store, the simulated link, counters."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from agent.devcloud.knobs import Knobs
from agent.devcloud.schemas import Resource, ResourceStatus

# Answers a client should retry are not remembered: the retry must run the request again.
TRANSIENT_STATUS = frozenset({429, 502, 503, 504})
# Released and expired leases still answer GET with "released" this long, then are forgotten (404).
RELEASED_KEPT_S = 600.0


@dataclass(frozen=True, slots=True)
class StoredAnswer:
    status: int
    body: dict[str, Any]
    headers: tuple[tuple[str, str], ...] = ()


def error_answer(status: int, code: str, detail: str, retry_after: int | None = None) -> StoredAnswer:
    headers = (("Retry-After", str(retry_after)),) if retry_after is not None else ()
    return StoredAnswer(status, {"error": code, "detail": detail}, headers)


@dataclass(slots=True, eq=False)
class ServerLease:
    id: str
    quantity: int
    location: str
    ready_at: float  # monotonic
    expires_mono: float
    expires_at: datetime
    slots: asyncio.Semaphore
    released_at: float | None = None
    # Tasks holding or waiting for a slot; beyond quantity × (1 + queue_per_slot) new ones get 429.
    waiting: int = 0

    def status(self, now: float) -> ResourceStatus:
        if self.released_at is not None or now >= self.expires_mono:
            return "released"
        return "provisioning" if now < self.ready_at else "ready"

    def view(self, now: float) -> Resource:
        return Resource(id=self.id, type="compute", quantity=self.quantity, location=self.location,
                        status=self.status(now), expires_at=self.expires_at)


class IdempotencyStore:
    """The first answer per key, returned for every repeat; a repeat of a request still running waits for it.

    Keys are global (not per lease), so a task re-sent to a replacement lease is still answered once. The
    request's fingerprint must match: the same key for a different request is refused. Bounded: the oldest
    answers are forgotten first.
    """

    def __init__(self, capacity: int = 100_000) -> None:
        self._capacity = capacity
        self._done: OrderedDict[str, tuple[bytes, StoredAnswer]] = OrderedDict()
        self._running: dict[str, tuple[bytes, asyncio.Future[StoredAnswer]]] = {}
        self._tasks: set[asyncio.Task[StoredAnswer]] = set()

    async def run(self, key: str, fingerprint: bytes, produce: Callable[[], Awaitable[StoredAnswer]],
                  admit: Callable[[], StoredAnswer | None]) -> tuple[StoredAnswer, bool]:
        """The answer for ``key`` and whether it is a replay. ``admit`` may refuse a new request (429)."""
        if key in self._done:
            seen, answer = self._done[key]
            self._done.move_to_end(key)
            return (answer, True) if seen == fingerprint else (_reused(), False)
        if key in self._running:
            seen, future = self._running[key]
            if seen != fingerprint:
                return _reused(), False
            return await asyncio.shield(future), True
        refusal = admit()
        if refusal is not None:
            return refusal, False
        future = asyncio.get_running_loop().create_future()
        self._running[key] = (fingerprint, future)
        # A task of its own: the work finishes (and is remembered) even if this client gives up waiting.
        task = asyncio.ensure_future(produce())
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._finish(key, fingerprint, future, done))
        return await asyncio.shield(future), False

    def _finish(self, key: str, fingerprint: bytes, future: asyncio.Future[StoredAnswer],
                task: asyncio.Task[StoredAnswer]) -> None:
        self._tasks.discard(task)
        self._running.pop(key, None)
        if task.cancelled():
            future.cancel()
            return
        error = task.exception()
        if error is not None:
            future.set_exception(error)
            return
        answer = task.result()
        if answer.status not in TRANSIENT_STATUS:
            self._done[key] = (fingerprint, answer)
            while len(self._done) > self._capacity:
                self._done.popitem(last=False)
        future.set_result(answer)

    async def cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def clear(self) -> None:
        self._done.clear()


def _reused() -> StoredAnswer:
    return error_answer(400, "idempotency_key_reused",
                        "this Idempotency-Key was already used for a different request")


class Link:
    """A shared link of ``rate`` bytes/s: transfers queue behind each other, as on one uplink."""

    def __init__(self) -> None:
        self._free_at = 0.0

    async def carry(self, n_bytes: int, rate: float) -> None:
        if rate <= 0 or n_bytes <= 0:
            return
        now = time.monotonic()
        self._free_at = max(now, self._free_at) + n_bytes / rate
        await asyncio.sleep(self._free_at - now)


@dataclass(slots=True)
class Counters:
    requests: int = 0
    replays: int = 0
    executions: Counter[str] = field(default_factory=Counter)
    rejections: Counter[str] = field(default_factory=Counter)


class Leases:
    def __init__(self) -> None:
        self._by_id: dict[str, ServerLease] = {}

    def create(self, quantity: int, location: str, knobs: Knobs) -> ServerLease:
        now = time.monotonic()
        self._purge(now)
        lease = ServerLease(
            id=f"r-{uuid.uuid4().hex}",
            quantity=quantity,
            location=location,
            ready_at=now + knobs.provisioning_delay_s,
            expires_mono=now + knobs.lease_ttl_s,
            expires_at=datetime.now(UTC) + timedelta(seconds=knobs.lease_ttl_s),
            slots=asyncio.Semaphore(quantity),
        )
        self._by_id[lease.id] = lease
        return lease

    def get(self, lease_id: str) -> ServerLease | None:
        return self._by_id.get(lease_id)

    def release(self, lease: ServerLease) -> None:
        if lease.released_at is None:
            lease.released_at = time.monotonic()

    def summary(self) -> dict[str, int]:
        now = time.monotonic()
        counts = Counter(lease.status(now) for lease in self._by_id.values())
        return {status: counts.get(status, 0) for status in ("provisioning", "ready", "released")}

    def clear(self) -> None:
        self._by_id.clear()

    def _purge(self, now: float) -> None:
        for lease_id, lease in list(self._by_id.items()):
            ended = lease.released_at if lease.released_at is not None else lease.expires_mono
            if now - ended > RELEASED_KEPT_S:
                del self._by_id[lease_id]


def retry_after_for(lease: ServerLease, now: float) -> int:
    """Whole seconds (Retry-After's unit) until a provisioning lease is ready, at least 1."""
    return max(1, math.ceil(lease.ready_at - now))

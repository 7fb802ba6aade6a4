"""The devcloud's shared state and lifecycle: its settings, the leases, the storage, the workers, the counters.

Everything the routes of :mod:`agent.devcloud.app` share.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from agent.devcloud.knobs import Knobs
from agent.devcloud.pool import WorkerPool
from agent.devcloud.state import Counters, IdempotencyStore, Leases, Link, StoredAnswer
from agent.devcloud.storage import BUCKET, S3Process, StorageResources, expire_keys
from agent.telemetry import get_logger

__all__ = ["ApiError", "DevCloud", "DevCloudConfig"]

log = get_logger("agent.devcloud")


@dataclass(frozen=True, slots=True)
class DevCloudConfig:
    """Start-up settings of the server (the knobs may change later; these do not)."""

    token: str
    workers: int = 2
    max_body_bytes: int = 32 * 1024 * 1024
    queue_per_slot: int = 4
    knobs: Knobs = field(default_factory=Knobs)
    # Storage resources need the S3 server process (a few seconds to start): only when asked for.
    storage: bool = False


class ApiError(Exception):
    """A refusal: the answer the exception handler sends."""

    def __init__(self, answer: StoredAnswer) -> None:
        super().__init__(answer.body.get("detail", ""))
        self.answer = answer


class DevCloud:
    """Everything the routes share."""

    def __init__(self, config: DevCloudConfig) -> None:
        self.config = config
        self.knobs = config.knobs
        self.leases = Leases()
        self.idempotency = IdempotencyStore()
        self.counters = Counters()
        self.uplink = Link()
        self.downlink = Link()
        self.pool: WorkerPool | None = None
        self.s3 = S3Process()
        self.storage: StorageResources | None = None
        self._expiry: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # The S3 server (seconds to import moto) starts while the workers warm up.
        storage = asyncio.create_task(self._start_storage()) if self.config.storage else None
        started = time.perf_counter()
        self.pool = WorkerPool(self.config.workers)
        await self.pool.warm_up()
        log.info("devcloud_workers_ready", workers=self.config.workers,
                 seconds=round(time.perf_counter() - started, 3))
        if storage is not None:
            await storage

    async def _start_storage(self) -> None:
        started = time.perf_counter()
        admin = await self.s3.start()
        self.storage = await asyncio.to_thread(StorageResources, self.s3, admin)
        self._expiry = asyncio.create_task(expire_keys(self.storage))
        log.info("devcloud_storage_ready", endpoint=admin.endpoint, bucket=BUCKET,
                 seconds=round(time.perf_counter() - started, 3))

    async def stop(self) -> None:
        await self.idempotency.cancel_all()
        if self._expiry is not None:
            self._expiry.cancel()
        self.s3.stop()
        if self.pool is not None:
            self.pool.shutdown()

    def reset(self) -> None:
        self.knobs = self.config.knobs
        self.leases.clear()
        self.idempotency.clear()
        self.counters = Counters()

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.counters.requests,
            "replays": self.counters.replays,
            "executions": dict(self.counters.executions),
            "executions_total": sum(self.counters.executions.values()),
            "rejections": dict(self.counters.rejections),
            "leases": self.leases.summary(),
            "storage": self.storage.summary() if self.storage is not None else None,
        }

    def refuse(self, answer: StoredAnswer) -> ApiError:
        self.counters.rejections[str(answer.body["error"])] += 1
        return ApiError(answer)

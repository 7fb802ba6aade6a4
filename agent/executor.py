"""Local execution: light tasks inline, heavy tasks in a process pool; every run's service time measured."""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import time
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from agent.tasks import TaskSpec, run_task
from agent.telemetry import get_logger

log = get_logger(__name__)


class WorkerDied(Exception):
    """A worker process ended while running a task (killed, out of memory, crashed in native code)."""


def _worker_init() -> None:
    # Ctrl-C reaches the whole process group; only the daemon decides how to stop, so workers ignore it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _warm() -> int:
    return 0


class LocalExecutor:
    def __init__(self, workers: int) -> None:
        self.workers = workers
        # forkserver: forking a process that runs paho's and the store's threads could copy a held lock.
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(["agent.tasks"])
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=self._context, initializer=_worker_init)

    async def warm_up(self) -> None:
        """Start the worker processes now rather than on the first heavy task."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self._pool, _warm) for _ in range(self.workers)))

    @staticmethod
    def run_inline(spec: TaskSpec, payload: bytes, options: Mapping[str, Any]) -> tuple[dict[str, Any], float]:
        started = time.perf_counter()
        result = spec.fn(payload, options)
        return result, time.perf_counter() - started

    async def run_in_pool(self, kind: str, payload: bytes,
                          options: Mapping[str, Any]) -> tuple[dict[str, Any], float]:
        loop = asyncio.get_running_loop()
        pool = self._pool
        try:
            return await loop.run_in_executor(pool, run_task, kind, payload, dict(options))
        except BrokenProcessPool as exc:
            if pool is self._pool:
                log.error("worker_pool_broken_restarting")
                pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()
            raise WorkerDied("a worker process died while running the task") from exc

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

"""The worker processes that run tasks with the gateway's own registry."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import multiprocessing
import os
import signal
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from agent.tasks import default_registry, run_task

PR_SET_PDEATHSIG = 1


class WorkerDied(Exception):
    """A worker process ended while running a task."""


def _worker_init(parent_pid: int) -> None:
    # Ctrl-C reaches the whole process group; the server decides how to stop, so workers ignore it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A SIGKILLed devcloud (the tests do that) must not leave its workers behind.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(0)


def _warm() -> int:
    default_registry()  # imports numpy and the task plugins now, not in the first task's exec_ms
    return os.getpid()


class WorkerPool:
    """One process pool for the whole server; each lease's quantity is enforced by its own semaphore.

    One pool per lease would pay the spawn start-up (about a second per process with numpy) on every lease
    request and, with several leases on a small machine, run more processes than cores; the lease's bound on
    concurrent tasks is what its quantity promises, and a semaphore keeps it.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        # spawn, as the gateway's executor: no fork of a process that runs uvicorn's event loop and threads.
        self._context = multiprocessing.get_context("spawn")
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=self._context, initializer=_worker_init,
                                   initargs=(os.getpid(),))

    async def warm_up(self) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self._pool, _warm) for _ in range(self.workers)))

    async def run(self, kind: str, payload: bytes, options: Mapping[str, Any]) -> tuple[dict[str, Any], float]:
        loop = asyncio.get_running_loop()
        pool = self._pool
        try:
            return await loop.run_in_executor(pool, run_task, kind, payload, dict(options))
        except BrokenProcessPool as exc:
            if pool is self._pool:
                pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()
            raise WorkerDied("a worker process died while running the task") from exc

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

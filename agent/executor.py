"""Local execution: light tasks inline, heavy tasks in a process pool; every run's service time measured."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import resource_tracker
from typing import Any, TypeVar

from agent.config import Settings
from agent.tasks import TaskSpec, default_registry, run_task
from agent.telemetry import configure_logging, get_logger

log = get_logger(__name__)
_T = TypeVar("_T")


class WorkerDied(Exception):
    """A worker process ended while running a task (killed, out of memory, crashed in native code)."""


PR_SET_PDEATHSIG = 1


def _worker_init(parent_pid: int, settings: Settings | None) -> None:
    # Ctrl-C reaches the whole process group; only the daemon decides how to stop, so workers ignore it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGUSR1 asks the daemon to leave its group; `systemctl kill -s USR1` sends it to every process of the unit,
    # and its default action would end a worker.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})  # blocked from the spawn on (_submit)
    # If the agent is SIGKILLed outside systemd (no cgroup to clean up), its workers must not live on.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(0)  # the agent died before the line above took effect
    if settings is not None:
        configure_logging(settings)


def _start_resource_tracker() -> None:
    # multiprocessing's resource tracker (a process the pool's locks register with) would die of a SIGUSR1 sent
    # to the whole unit, and its successor warns of leaks. It inherits our signal mask when it starts, and it
    # unblocks only SIGINT and SIGTERM (which it ignores): started while SIGUSR1 is blocked, it never gets one.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        resource_tracker.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _warm() -> int:
    default_registry()  # imports the task plugins now, not in the first task's service time
    import numpy  # noqa: F401 - noise.spectrum's, likewise
    return os.getpid()


class LocalExecutor:
    """``settings`` (optional) configure the workers' logging like the parent's."""

    def __init__(self, workers: int, settings: Settings | None = None) -> None:
        self.workers = workers
        self._settings = settings
        # spawn, not fork: forking a process that runs paho's and the store's threads could copy a held lock;
        # not forkserver: its server would outlive a SIGKILLed agent, and workers must be our direct children
        # for the parent-death signal.
        self._context = multiprocessing.get_context("spawn")
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        _start_resource_tracker()
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=self._context, initializer=_worker_init,
                                   initargs=(os.getpid(), self._settings))

    async def warm_up(self) -> None:
        """Start the worker processes now rather than on the first heavy task."""
        await asyncio.gather(*(self._submit(self._pool, _warm) for _ in range(self.workers)))

    @staticmethod
    def _submit(pool: ProcessPoolExecutor, fn: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        # The pool starts a worker inside submit(). Until its initializer ignores SIGUSR1, a SIGUSR1 sent to the
        # whole unit would end it (the default action) and break the pool; a worker started while SIGUSR1 is
        # blocked inherits the mask, so the signal waits, ignored, until the initializer unblocks it.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        try:
            return asyncio.wrap_future(pool.submit(fn, *args))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    @staticmethod
    def run_inline(spec: TaskSpec, payload: bytes, options: Mapping[str, Any],
                   seq: int = 0) -> tuple[dict[str, Any], float]:
        """Run a light task; ``seq``: the task's store row id, for a task that wants it (TaskSpec.sequenced)."""
        sequenced = spec.sequenced
        started = time.perf_counter()
        result = spec.fn(payload, options) if sequenced is None else sequenced(payload, options, seq)
        return result, time.perf_counter() - started

    async def run_in_pool(self, kind: str, payload: bytes,
                          options: Mapping[str, Any]) -> tuple[dict[str, Any], float]:
        pool = self._pool
        try:
            return await self._submit(pool, run_task, kind, payload, dict(options))
        except BrokenProcessPool as exc:
            if pool is self._pool:
                log.error("worker_pool_broken_restarting")
                pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()
            raise WorkerDied("a worker process died while running the task") from exc

    def shutdown(self, wait: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=True)

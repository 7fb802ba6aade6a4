"""The worker pool under `systemctl kill --signal=SIGUSR1`, which reaches every process of the unit."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import psutil

from agent.executor import LocalExecutor


def test_a_sigusr1_while_workers_start_does_not_break_the_pool() -> None:
    # Workers are spawned inside submit(); until their initializer ignores SIGUSR1 its default action would end
    # them. Signal every child again and again while the pool starts: no worker may die of it.
    executor = LocalExecutor(workers=2)
    me = psutil.Process()

    async def pelt() -> None:
        loop = asyncio.get_running_loop()
        warm = asyncio.ensure_future(executor.warm_up())
        end = loop.time() + 3.0
        while loop.time() < end and not warm.done():
            for child in me.children():
                if "resource_tracker" in " ".join(child.cmdline()):
                    continue
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGUSR1)
            await asyncio.sleep(0.002)
        await warm  # a worker killed while starting raises BrokenProcessPool here
        # And once they run, a heavy task still completes.
        result, _ = await executor.run_in_pool("noise.spectrum", b"\x00\x01" * 1600, {})
        assert "leq_db" in result

    try:
        asyncio.run(pelt())
    finally:
        executor.shutdown(wait=True)

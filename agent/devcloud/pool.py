"""The worker processes that run tasks: the gateway's own executor, so the cloud runs tasks exactly as it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.executor import LocalExecutor, WorkerDied

__all__ = ["WorkerDied", "WorkerPool"]


class WorkerPool(LocalExecutor):
    """One process pool for the whole server; each lease's quantity is enforced by its own semaphore.

    One pool per lease would pay the spawn start-up (about a second per process with numpy) on every lease
    request and, with several leases on a small machine, run more processes than cores; the lease's bound on
    concurrent tasks is what its quantity promises, and a semaphore keeps it.
    """

    async def run(self, kind: str, payload: bytes, options: Mapping[str, Any]) -> tuple[dict[str, Any], float]:
        return await self.run_in_pool(kind, payload, options)

    def shutdown(self, wait: bool = True) -> None:
        super().shutdown(wait=wait)

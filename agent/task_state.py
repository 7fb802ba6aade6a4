"""Stateful tasks' state (sensor.stats windows) in the store: restored at a start, saved periodically and at a stop."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from agent.tasks import StatefulTask
from agent.telemetry import get_logger

if TYPE_CHECKING:
    from agent.store import Store
    from agent.tasks import TaskRegistry

log = get_logger(__name__)

STATE_BATCH = 500  # windows a save hands to the store at once: at most ~1.7 MB of readings at the defaults


def stateful_tasks(registry: TaskRegistry) -> list[tuple[str, StatefulTask]]:
    tasks: list[tuple[str, StatefulTask]] = []
    for spec in registry:
        fn: object = spec.fn
        if isinstance(fn, StatefulTask):
            tasks.append((spec.name, fn))
    return tasks


def restore_task_state(registry: TaskRegistry, store: Store) -> None:
    """Before the writer thread starts: each stateful task takes back what the store kept of it."""
    for kind, task in stateful_tasks(registry):
        entries = store.load_task_state(kind, task.state_limit)
        if entries:
            restored, skipped = task.load_state(entries)
            log.info("task_state_restored", kind=kind, entries=restored, skipped=skipped)


async def store_barrier(store: Store) -> None:
    """Wait until the writer has committed everything queued so far and run its hand-offs."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def release() -> None:
        loop.call_soon_threadsafe(done.set_result, None)

    store.call(release)
    await done


async def save_task_state(registry: TaskRegistry, store: Store) -> None:
    """Hand what stateful tasks changed since the last save to the writer, a batch at a time, each one
    committed before the next is built: saving 10,000 windows never holds them all twice in memory."""
    for kind, task in stateful_tasks(registry):
        try:
            while entries := task.dump_state(limit=STATE_BATCH):
                store.save_task_state(kind, entries, keep=task.state_limit)
                await store_barrier(store)
        except Exception:  # a plugin's dump_state: its state is worth less than the stop or the loop
            log.exception("task_state_save_failed", kind=kind)

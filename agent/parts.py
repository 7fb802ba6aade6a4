"""The daemon's boundaries: what talks to the broker, the cloud, the disk, the worker processes and the clock,
and what the stages hold in memory. :func:`default_parts` builds the real ones; tests inject their own through
``Daemon(settings, link=..., cloud=..., store=..., executor=..., clock=..., limits=...)`` (tests/fakes.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.config import Settings
from agent.executor import LocalExecutor
from agent.mqtt import LinkFactory
from agent.store import Store, ensure_writable

if TYPE_CHECKING:
    from agent.cloud import CloudFactory

__all__ = ["DEFAULT_LIMITS", "Limits", "Parts", "default_parts"]


@dataclass(frozen=True)
class Limits:
    """What the stages hold in memory before they leave the rest in the store; None: the stage's own default.
    Tests make them small to have work spill to disk and come back."""

    dispatch_tasks: int | None = None  # committed tasks the dispatcher holds (Dispatcher's memory_cap_tasks)
    publish_rows: int | None = None  # outbox rows the publisher holds (Publisher's memory_cap)
    fresh_results: int | None = None  # light results waiting for the window, not in the outbox (fresh_cap)


DEFAULT_LIMITS = Limits()  # every stage its own default


@dataclass(frozen=True)
class Parts:
    """The daemon's boundaries: what talks to the broker, the cloud, the disk, the worker processes and the clock."""

    store: Store
    executor: LocalExecutor
    link: LinkFactory
    cloud: CloudFactory | None  # None: no cloud URL, no offloading
    clock: Callable[[], float]


def default_parts(settings: Settings, *, link: LinkFactory | None = None, cloud: CloudFactory | None = None,
                  store: Store | None = None, executor: LocalExecutor | None = None,
                  clock: Callable[[], float] | None = None) -> Parts:
    """The real parts for these settings, except those given."""
    if store is None:
        ensure_writable(settings.state_dir)
        store = Store(settings.state_dir, max_tasks=settings.store.max_tasks, max_bytes=settings.store.max_bytes,
                      synchronous=settings.store.synchronous,
                      commit_interval_s=settings.store.commit_interval_ms / 1000,
                      dead_letter_max_count=settings.dead_letters.max_count,
                      dead_letter_max_bytes=settings.dead_letters.max_bytes)
    if link is None:
        from agent.mqtt.link import MqttLink  # and paho

        link = MqttLink
    if cloud is None and settings.cloud.url:
        from agent.cloud import CloudClient  # and httpx: only an agent with a cloud loads them

        cloud = CloudClient
    if executor is None:
        executor = LocalExecutor(settings.local.workers, settings)  # no worker process starts before warm_up
    return Parts(store=store, executor=executor, link=link, cloud=cloud if settings.cloud.url else None,
                 clock=clock or time.monotonic)

"""Wiring and lifecycle: build the stages, connect them, start, report, stop. No business logic here."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from agent.config import Settings
from agent.dispatch import Dispatcher
from agent.egress import Publisher
from agent.executor import LocalExecutor
from agent.ingress import Ingress
from agent.mqtt import MqttLink
from agent.store import Committed, Store, ensure_writable
from agent.tasks import default_registry
from agent.telemetry import get_logger

log = get_logger(__name__)

T = TypeVar("T")
STATS_EVERY_S = 60.0
SUBSCRIPTIONS_KEY = "subscriptions"


class ThreadHandoff(Generic[T]):
    """Items from any thread, delivered to ``fn`` on the loop in batches with at most one wake-up pending."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fn: Callable[[list[T]], None]) -> None:
        self._loop = loop
        self._fn = fn
        self._items: deque[T] = deque()
        self._scheduled = False

    def put(self, item: T) -> None:
        self._items.append(item)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        # Clear the flag before taking items: an item appended after the last pop then schedules a new drain.
        self._scheduled = False
        items = self._items
        batch = [items.popleft() for _ in range(len(items))]
        if batch:
            self._fn(batch)


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        ensure_writable(settings.state_dir)
        self.registry = default_registry()
        self.store = Store(settings.state_dir, max_tasks=settings.store.max_tasks,
                           max_bytes=settings.store.max_bytes, synchronous=settings.store.synchronous)
        self.stopping = asyncio.Event()
        self.started_at = time.monotonic()

    def request_stop(self, reason: str) -> None:
        if not self.stopping.is_set():
            log.info("stop_requested", reason=reason)
            self.stopping.set()

    async def run(self) -> int:
        s = self.settings
        loop = asyncio.get_running_loop()
        store = self.store
        counts = store.counts()
        log.info("agent_starting", agent_id=s.agent_id, broker=f"{s.mqtt.host}:{s.mqtt.port}",
                 protocol=s.mqtt.protocol, store=str(store.path), workers=s.local.workers,
                 routes=[r.topic for r in s.routes], resume_pending=counts["pending"],
                 resume_outbox=counts["outbox"])

        executor = LocalExecutor(s)
        dispatcher = Dispatcher(agent_id=s.agent_id, registry=self.registry, executor=executor, store=store)
        link_box: list[MqttLink] = []
        ingress = Ingress(agent_id=s.agent_id, routes=s.routes, max_payload_bytes=s.max_payload_bytes,
                          store=store, ack=lambda mid, qos: link_box[0].ack(mid, qos),
                          request_redelivery=lambda: link_box[0].request_reconnect())
        ingress.remember(store.recent_deliveries(s.mqtt.receive_maximum))

        filters = [r.topic for r in s.routes]
        previous = json.loads(store.get_meta(SUBSCRIPTIONS_KEY) or "[]")
        stale = [f for f in previous if f not in filters]

        def subscribed(session_present: bool) -> None:  # network thread, after every CONNACK
            # Remember what we subscribe to, so filters dropped from the routes are unsubscribed next time.
            store.call(lambda: store.set_meta(SUBSCRIPTIONS_KEY, json.dumps(filters)))
            stale.clear()
            # MQTT 5: never have more results unacknowledged than the broker says it accepts.
            window = min(s.mqtt.publish_window, link_box[0].server_receive_maximum)
            loop.call_soon_threadsafe(publisher_box[0].set_window, window)

        publisher_box: list[Publisher] = []
        pubacks: ThreadHandoff[int] = ThreadHandoff(loop, lambda mids: publisher_box[0].acked(mids))
        link = MqttLink(
            s.mqtt, client_id=s.client_id, agent_id=s.agent_id,
            topic_filters=[(r.topic, r.qos) for r in s.routes],
            on_message=ingress.handle, on_puback=pubacks.put, on_connected=subscribed,
            stale_filters=lambda: list(stale),
        )
        link_box.append(link)
        publisher = Publisher(store, link.publish, window=s.mqtt.publish_window)
        publisher_box.append(publisher)

        def deliver(committed: Committed) -> None:
            if committed.tasks:
                dispatcher.accept(committed.tasks)
            if committed.outbox:
                publisher.accept(committed.outbox)

        def on_commit(committed: Committed) -> None:  # writer thread, after each group commit
            if committed.acks:
                ingress.mark_acked(committed.acks)
                for mid, qos in committed.acks:
                    link.ack(mid, qos)
            if committed.tasks or committed.outbox:
                loop.call_soon_threadsafe(deliver, committed)
            if committed.released:
                ingress.maybe_resume()

        for sig, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
            loop.add_signal_handler(sig, self.request_stop, name)
        loop.add_signal_handler(signal.SIGHUP, lambda: log.info("sighup_ignored",
                                                                 detail="restart the agent to apply changes"))

        store.start(on_commit)
        dispatcher.start(loop)
        publisher.start(loop)
        if any(self.registry.get(r.task).heavy for r in s.routes):
            await executor.warm_up()  # a light-only gateway never starts worker processes
        link.start()
        stats = asyncio.ensure_future(self._report(ingress, dispatcher, publisher, link))
        log.info("agent_started", agent_id=s.agent_id)

        await self.stopping.wait()
        stats.cancel()
        return await self._shutdown(ingress, dispatcher, publisher, link, executor)

    async def _shutdown(self, ingress: Ingress, dispatcher: Dispatcher, publisher: Publisher, link: MqttLink,
                        executor: LocalExecutor) -> int:
        deadline = time.monotonic() + self.settings.shutdown_timeout_s
        ingress.closing = True  # new messages stay unacknowledged: the broker keeps them for our next start
        finished = await dispatcher.drain(max(0.1, deadline - time.monotonic() - 1.0))
        await self._store_barrier()  # results just computed are committed and handed to the publisher
        # Give them a chance to reach the broker; whatever is left stays in the outbox for the next start.
        while not publisher.idle() and link.connected.is_set() and time.monotonic() < deadline - 0.5:
            await asyncio.sleep(0.02)
        link.stop(timeout_s=max(0.5, deadline - time.monotonic()))
        await asyncio.sleep(0)  # run PUBACK hand-offs queued by the network thread
        executor.shutdown()
        self.store.stop()
        log.info("agent_stopped", all_running_finished=finished, results_unconfirmed=publisher.inflight,
                 results_waiting=publisher.backlog, pending_tasks=dispatcher.backlog)
        return 0

    async def _store_barrier(self) -> None:
        """Wait until the writer has committed everything queued so far and run its hand-offs."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        def release() -> None:
            loop.call_soon_threadsafe(done.set_result, None)

        self.store.call(release)
        await done

    async def _report(self, ingress: Ingress, dispatcher: Dispatcher, publisher: Publisher,
                      link: MqttLink) -> None:
        """One status line a minute: what an operator looks at first in the journal."""
        while True:
            await asyncio.sleep(STATS_EVERY_S)
            c = ingress.counters
            log.info("agent_stats", connected=link.connected.is_set(), received=c.received,
                     accepted=c.accepted, dead_lettered=c.dead_lettered + dispatcher.dead_lettered,
                     completed=dispatcher.completed, duplicates=c.duplicates, held_back=c.held_back,
                     store_rows=self.store.outstanding_rows, queued=dispatcher.backlog,
                     running=dispatcher.running, results_unconfirmed=publisher.inflight,
                     intake_paused=ingress.paused, threads=threading.active_count())


def run(settings: Settings) -> int:
    daemon = Daemon(settings)
    return asyncio.run(daemon.run())

"""Wiring and lifecycle: build the stages, connect them, start, report, reload, stop. No business logic here.

Its boundaries can be injected (``Daemon(settings, link=..., cloud=..., store=..., clock=...)``): the MQTT link
and the cloud client as factories of the Protocols ``agent.mqtt.Link`` and ``agent.cloud.Cloud``, the store as
an instance; :func:`default_parts` (:mod:`agent.parts`) fills in the real ones. Tests build the daemon
in-process that way (tests/fakes.py). What it reports is worded in :mod:`agent.health`; a SIGHUP is applied by
:mod:`agent.sighup`.
"""

from __future__ import annotations

import asyncio
import gc
import json
import signal
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.agent_metrics import build_collector
from agent.config import Reread, Settings
from agent.deadletters import REPLAY_BATCH, DeadLetterLog, DropLog, Replay
from agent.dispatch import Dispatcher
from agent.egress import Publisher
from agent.executor import LocalExecutor
from agent.health import STUCK_AFTER_S, health, log_stats, readiness, status_line
from agent.ingress import Ingress
from agent.introspect import Introspection, build_policy
from agent.leave import Leave, leave_pending
from agent.mqtt import Link, LinkFactory
from agent.parts import DEFAULT_LIMITS, Limits, Parts, default_parts
from agent.sighup import RELOAD_SUBACK_WAIT_S, SUBSCRIPTIONS_KEY, Sighup
from agent.store import Committed, Store
from agent.systemd import Notifier
from agent.task_state import restore_task_state, save_task_state, store_barrier
from agent.tasks import default_registry
from agent.telemetry import get_logger

if TYPE_CHECKING:
    from agent.archive.service import ArchiveService
    from agent.cloud import Cloud, CloudFactory
    from agent.metrics_server import MetricsServer

log = get_logger(__name__)

__all__ = ["RELOAD_SUBACK_WAIT_S", "STATS_EVERY_S", "STATUS_EVERY_S", "STUCK_AFTER_S", "SUBSCRIPTIONS_KEY",
           "Daemon", "Limits", "Parts", "Reloader", "default_parts", "health", "run", "tune_process"]

STATS_EVERY_S = 60.0
STATUS_EVERY_S = 5.0
Reloader = Callable[[], Reread]


def tune_process() -> None:
    """The agent's own process, once its long-lived objects are built."""
    # Everything built so far lives as long as the process: keep it out of the collector's full passes,
    # which otherwise walk it all and stall the loop for tens of milliseconds under load.
    gc.freeze()
    # Each message leaves a few dozen tracked objects in queues for a moment; at the default threshold of
    # 700 the young generation was collected every ~80 messages and the middle one every ~800, together
    # about 3 µs a message. 10,000 cuts that by nine tenths; a pass over 10,000 objects takes ~2 ms.
    gc.set_threshold(10_000, 10, 10)
    # The store writer takes the GIL back after each SQLite call; at the default 5 ms switch interval every
    # one of those waits up to 5 ms behind a busy loop, and a group commit makes several. 1 ms cut the tail
    # of commit times under load (p99 9 → 6 ms, max 22 → 15 ms in benchmarks/throughput.py's latency phase).
    sys.setswitchinterval(0.001)


class Daemon:
    def __init__(self, settings: Settings, reload: Reloader | None = None, *, link: LinkFactory | None = None,
                 cloud: CloudFactory | None = None, store: Store | None = None,
                 executor: LocalExecutor | None = None, clock: Callable[[], float] | None = None,
                 limits: Limits = DEFAULT_LIMITS,
                 tune_process: bool = True) -> None:
        """``tune_process``: freeze the start-up objects out of the collector and shorten the GIL switch
        interval (``run``), as the agent's own process wants; an in-process test leaves its interpreter as is."""
        self.settings = settings
        self._reload_settings = reload
        self.parts = default_parts(settings, link=link, cloud=cloud, store=store, executor=executor, clock=clock)
        self._clock = self.parts.clock
        self._limits = limits
        self._tune_process = tune_process
        self.registry = default_registry()
        self.store = self.parts.store
        self.notifier = Notifier()
        self.stopping = asyncio.Event()
        self.loop_tick = self._clock()

    def request_stop(self, reason: str) -> None:
        if not self.stopping.is_set():
            log.info("stop_requested", reason=reason)
            self.notifier.stopping()
            self.stopping.set()

    def request_leave(self) -> None:
        """SIGUSR1: retire this member losslessly (agent/leave.py, docs/fleets.md#retiring-a-member)."""
        self.leave.request()

    @property
    def leaving(self) -> bool:
        return self.leave.leaving

    # ------------------------------------------------------------------ wiring

    def _build(self, loop: asyncio.AbstractEventLoop) -> None:
        s, store = self.settings, self.store
        self.executor = self.parts.executor
        self.dead_log, self.dead_drops, self._reading_replays = DeadLetterLog(), DropLog(), False
        self.policy = build_policy(s, self.registry)  # as `edge-agent explain` builds its own
        # No URL, no offloading: the policy then keeps every task local with reason no_cloud.
        self.cloud: Cloud | None = None
        if self.parts.cloud is not None:
            self.cloud = self.parts.cloud(s.cloud, observer=self.policy)
        limits = self._limits
        self.dispatcher = Dispatcher(agent_id=s.agent_id, registry=self.registry, executor=self.executor,
                                     store=store, policy=self.policy, cloud=self.cloud, dead_log=self.dead_log,
                                     clock=self._clock,
                                     **({} if limits.dispatch_tasks is None
                                        else {"memory_cap_tasks": limits.dispatch_tasks}))
        self.ingress = Ingress(agent_id=s.agent_id, routes=s.routes, max_payload_bytes=s.max_payload_bytes,
                               store=store, ack=self._ack, request_redelivery=self._request_redelivery,
                               throttle=self._throttle, dead_log=self.dead_log,
                               renumbered_redeliveries=s.mqtt.renumbered_redeliveries)
        # Every packet id, not only a Receive Maximum's worth: a broker resuming a session may have more of our
        # messages unacknowledged than that (Mosquitto 2.0 does), and any of them can come back as a duplicate.
        self.ingress.remember(store.recent_deliveries(65_535))
        self.ingress.start(loop)
        # The archive (docs/archive.md) only when a route keeps its inputs: otherwise none of it is imported.
        self.archive: ArchiveService | None = None
        if any(r.archive is not None for r in s.routes):
            from agent.archive.service import ArchiveService

            self.archive = ArchiveService(s, match=lambda topic: self.ingress.router.match(topic))
            self.ingress.on_submit = self.archive.tap.submitted
        previous = json.loads(store.get_meta(SUBSCRIPTIONS_KEY) or "[]")
        self.link: Link = self.parts.link(
            s.mqtt, client_id=s.client_id, agent_id=s.agent_id,
            topic_filters=[(r.topic, r.qos) for r in s.routes],
            on_message=self.ingress.handle, on_puback=self._acked, on_connected=self._connected,
            unsubscribe=[f for f in previous if f not in {r.topic for r in s.routes}],
        )
        self.publisher = Publisher(store, self.link.send, window=s.mqtt.publish_window,
                                   **({} if limits.publish_rows is None else {"memory_cap": limits.publish_rows}))
        if limits.fresh_results is not None:
            self.publisher.fresh_cap = limits.fresh_results
        self.publisher.on_room = self.dispatcher.connect_publisher(self.publisher.offer, self.publisher.room)
        self.introspection = Introspection(
            settings=lambda: self.settings, registry=self.registry, ingress=self.ingress, dispatcher=self.dispatcher,
            store=store, link=self.link, publisher=self.publisher, cloud=self.cloud, healthy=self._healthy,
            ready=self._ready, clock=self._clock, archive=self.archive)
        self.leave = Leave(store=store, link=self.link, ingress=self.ingress, dispatcher=self.dispatcher,
                           publisher=self.publisher, stopping=self.stopping, request_stop=self.request_stop,
                           announce=lambda: self.notifier.status(self._status_line()),
                           group=s.mqtt.shared_group, client_id=s.client_id)
        self.sighup = Sighup(settings=lambda: self.settings, adopt=self._adopt, reread=self._reload_settings,
                             registry=self.registry, policy=self.policy, ingress=self.ingress, archive=self.archive,
                             link=self.link, store=store, notifier=self.notifier, leaving=lambda: self.leaving,
                             status_line=self._status_line)
        self.metrics: MetricsServer | None = None
        if s.metrics.port:
            collector = build_collector(ingress=self.ingress, dispatcher=self.dispatcher, store=store,
                                        link=self.link, publisher=self.publisher, policy=self.policy,
                                        cloud=self.cloud)
            if self.archive is not None:
                from agent.archive.metrics import add_metrics

                add_metrics(collector, self.archive)
            from agent.metrics_server import MetricsServer

            self.metrics = MetricsServer(s.metrics.port, collector, healthy=self._healthy,
                                         ready=self._ready, host=s.metrics.host,
                                         endpoints=self.introspection.endpoints())

    def _ack(self, mid: int, qos: int) -> None:
        self.link.ack(mid, qos)

    def _throttle(self, on: bool) -> None:
        self.link.pause_reading(on)

    def _request_redelivery(self) -> None:
        self.link.request_reconnect()

    def _acked(self, mid: int) -> None:
        self.publisher.acked_one(mid)

    def _connected(self, session_present: bool) -> None:  # after every CONNACK
        routes = self.settings.routes
        # Remember what we subscribe to, so filters dropped from the routes are unsubscribed next time.
        self.store.call(lambda: self.store.set_meta(SUBSCRIPTIONS_KEY, json.dumps([r.topic for r in routes])))
        # MQTT 5: never have more results unacknowledged than the broker says it accepts.
        window = min(self.settings.mqtt.publish_window, self.link.server_receive_maximum)
        self.publisher.reconnected(window)
        self.ingress.reconnected()

    def _deliver(self, committed: Committed) -> None:  # event loop, after each group commit
        if committed.ingested:
            self.ingress.committed(committed.ingested)
        if committed.acks:
            self.ingress.mark_acked(committed.acks)
            self.link.ack_many(self.ingress.to_send(committed.acks))
        if committed.tasks:
            self.dispatcher.accept(committed.tasks, committed.number)
        if committed.outbox:
            self.publisher.accept(committed.outbox, committed.number)
        if committed.released:
            self.ingress.maybe_resume()

    def _on_commit(self, committed: Committed) -> None:  # writer thread: one hand-off to the loop per commit
        if self.archive is not None and committed.ingested:
            # Durable in the archive before any of these tasks can run (agent/archive/tap.py says why).
            self.archive.committed(committed.ingested)
        if committed.ingested or committed.acks or committed.tasks or committed.outbox or committed.released:
            self._loop.call_soon_threadsafe(self._deliver, committed)

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        s = self.settings
        loop = self._loop = asyncio.get_running_loop()
        counts = self.store.counts()
        log.info("agent_starting", agent_id=s.agent_id, broker=", ".join(map(str, s.mqtt.nodes)),
                 protocol=s.mqtt.protocol, store=str(self.store.path), workers=s.local.workers,
                 routes=[r.topic for r in s.routes], resume_pending=counts["pending"],
                 resume_outbox=counts["outbox"], systemd=self.notifier.enabled, cloud=s.cloud.url or "off")
        self._build(loop)
        restore_task_state(self.registry, self.store)
        resume_leave = leave_pending(self.store)  # read before the writer thread owns the store
        self._state_saved: asyncio.Future[None] = loop.create_future()  # the periodic save under way, if any
        self._state_saved.set_result(None)
        for sig, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
            loop.add_signal_handler(sig, self.request_stop, name)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.sighup.reload()))
        loop.add_signal_handler(signal.SIGUSR1, self.request_leave)

        if self.metrics is not None:
            self.metrics.start()
        if self.archive is not None:
            self.archive.open(self.store.path)  # before the writer: what a crash kept from the archive goes in
            self.archive.start()
        self.store.start(self._on_commit)
        self.dispatcher.start(loop)
        self.publisher.start(loop)
        self.introspection.start(loop)
        if any(self.registry.get(r.task).heavy for r in s.routes):
            await self.executor.warm_up()  # a light-only gateway never starts worker processes
        if self._tune_process:
            tune_process()
        self.link.start()
        housekeeping = asyncio.ensure_future(self._housekeeping())
        log.info("agent_started", agent_id=s.agent_id)
        if resume_leave:
            log.info("leave_resumed", detail="the agent stopped during a leave that SIGTERM had not cancelled")
            self.request_leave()

        await self.stopping.wait()
        housekeeping.cancel()
        return await self._shutdown()

    async def _housekeeping(self) -> None:
        """Readiness, watchdog pings, the systemd status line and the minutely stats line."""
        ready = False
        interval = min(1.0, self.notifier.watchdog_s or 1.0)
        self.notifier.status(f"connecting to the broker at {', '.join(map(str, self.settings.mqtt.nodes))}")
        last_status = last_stats = last_state = self._clock()
        state_every = self.settings.store.state_interval_s
        while True:
            now = self._clock()
            self.loop_tick = now  # this coroutine running is the proof that the event loop is not stuck
            if not ready and self.link.connected.is_set() and self.link.subscribed.is_set():
                ready = True  # store open (it opened before anything else), broker connected, routes subscribed
                self.notifier.ready(self._status_line())
                log.info("agent_ready")
            if self.notifier.watchdog_s is not None and self._healthy()[0]:
                self.notifier.watchdog()
            if ready and now - last_status >= STATUS_EVERY_S:
                self.notifier.status(self._status_line())
                last_status = now
            if now - last_stats >= STATS_EVERY_S:
                self._log_stats()
                last_stats = now
            if state_every > 0 and now - last_state >= state_every and self._state_saved.done():
                self._state_saved = asyncio.ensure_future(save_task_state(self.registry, self.store))
                last_state = now
            self._dead_letter_chores()
            await asyncio.sleep(interval)

    def _dead_letter_chores(self) -> None:
        """Summaries of the dead-letter log and of the bound's drops; the replays `edge-agent dead-letters
        replay` asked for, read one batch at a time (the next read waits until this one is handed back)."""
        self._summarise_dead_letters()
        if not self._reading_replays and not self.stopping.is_set():
            self._reading_replays = True
            loop = self._loop

            def reply(items: list[Replay]) -> None:
                loop.call_soon_threadsafe(self._readmit, items)

            self.store.load_replays(REPLAY_BATCH, reply)

    def _readmit(self, items: list[Replay]) -> None:
        self._reading_replays = False
        self.ingress.readmit(items)

    def _summarise_dead_letters(self, force: bool = False) -> None:
        self.dead_log.flush(force)
        totals = self.store.dead_letters
        self.dead_drops.check(totals.dropped, force=force, kept=totals.kept, kept_bytes=totals.bytes,
                              max_count=self.store.dead_letter_max_count, max_bytes=self.store.dead_letter_max_bytes)

    def _healthy(self) -> tuple[bool, str]:
        return health(self._clock() - self.loop_tick, self.link.alive(within_s=STUCK_AFTER_S),
                      self.store.healthy())

    def _ready(self) -> tuple[bool, str]:
        return readiness(stopping=self.stopping.is_set(), leaving=self.leaving, link=self.link, ingress=self.ingress)

    def _status_line(self) -> str:
        return status_line(leaving=self.leaving, link=self.link, ingress=self.ingress, dispatcher=self.dispatcher,
                           store=self.store)

    def _log_stats(self) -> None:
        log_stats(link=self.link, ingress=self.ingress, dispatcher=self.dispatcher, store=self.store,
                  publisher=self.publisher)

    def _adopt(self, settings: Settings) -> None:  # a reload's settings, the routes applied
        self.settings = settings

    async def _shutdown(self) -> int:
        deadline = time.monotonic() + self.settings.shutdown_timeout_s
        self.leave.stopping()  # stopped by SIGTERM: a leave under way is cancelled, not resumed at the next start
        self.ingress.closing = True  # new messages stay unacknowledged: the broker keeps them for our next start
        finished = await self.dispatcher.drain(max(0.1, deadline - time.monotonic() - 1.0))
        await self._state_saved  # a periodic save under way finishes first: it holds windows it took
        await save_task_state(self.registry, self.store)  # no task runs any more: the windows are final
        if self.cloud is not None:
            await self.cloud.aclose()  # releases the leases
        await store_barrier(self.store)  # results just computed are committed and handed to the publisher
        # Give them a chance to reach the broker; whatever is left stays in the outbox for the next start.
        while not self.publisher.idle() and self.link.connected.is_set() and time.monotonic() < deadline - 0.5:
            await asyncio.sleep(0.02)
        unconfirmed = self.publisher.take_unconfirmed()
        if unconfirmed:  # to the outbox: the next start publishes these results again rather than new ones
            self.store.complete(unconfirmed)
        await self.link.stop(timeout_s=max(0.5, deadline - time.monotonic()))
        if self.leave.session_ended:
            ended = await self.link.end_session(timeout_s=max(2.0, deadline - time.monotonic()))
            if ended:
                log.info("left_group", session="ended")
            else:  # nothing is lost: the session holds nothing and no subscription; it expires on its own
                log.warning("left_group", session="not ended: the broker could not be reached",
                            detail="it holds no subscription and expires after EDGE_AGENT_MQTT__SESSION_EXPIRY_S")
        self.executor.shutdown()
        self._summarise_dead_letters(force=True)
        self.store.stop()
        if self.archive is not None:
            self.archive.stop()  # after the writer: its last commits are archived
        if self.metrics is not None:
            self.metrics.stop()
        log.info("agent_stopped", all_running_finished=finished, results_unconfirmed=self.publisher.inflight,
                 results_waiting=self.publisher.backlog, pending_tasks=self.dispatcher.backlog)
        self.notifier.close()
        return 0


def run(settings: Settings, reload: Reloader | None = None) -> int:
    return asyncio.run(Daemon(settings, reload).run())

"""Device message → routed task row handed to the store; the acknowledgement follows the commit.

Runs on the MQTT network thread, so it only does cheap work: size check, route lookup, an id and a checksum.
Parsing belongs to the task (its errors become dead letters with the task's reason code).
"""

from __future__ import annotations

import os
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from agent.config import Route
from agent.egress import dead_letter
from agent.mqtt import InboundMessage
from agent.store import NewTask, Store
from agent.telemetry import get_logger

log = get_logger(__name__)

ROUTE_CACHE_MAX = 10_000


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching (``+`` one level, ``#`` the rest); ``$``-topics never match a leading wildcard."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for i, level in enumerate(f_levels):
        if level == "#":
            return True
        if i >= len(t_levels):
            return False
        if level != "+" and level != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


class Router:
    """First matching route wins; lookups are cached per concrete topic (devices repeat their topics)."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = list(routes)
        self._cache: dict[str, Route | None] = {}

    def match(self, topic: str) -> Route | None:
        try:
            return self._cache[topic]
        except KeyError:
            pass
        found = next((r for r in self.routes if topic_matches(r.topic, topic)), None)
        if len(self._cache) >= ROUTE_CACHE_MAX:
            self._cache.clear()
        self._cache[topic] = found
        return found


@dataclass(slots=True)
class Delivery:
    """What we know of the last message the broker sent under one packet id."""

    topic: str
    crc: int
    task_id: str
    acked: bool


@dataclass(slots=True)
class IngressCounters:
    received: int = 0
    accepted: int = 0
    dead_lettered: int = 0
    duplicates: int = 0
    held_back: int = 0  # not acknowledged because the store was full (the broker redelivers them)
    by_route: dict[str, int] = field(default_factory=dict)  # accepted messages per route filter
    dead_by_reason: dict[str, int] = field(default_factory=dict)


class Ingress:
    def __init__(
        self,
        *,
        agent_id: str,
        routes: Sequence[Route],
        max_payload_bytes: int,
        store: Store,
        ack: Callable[[int, int], None],
        request_redelivery: Callable[[], None],
    ) -> None:
        self._agent_id = agent_id
        self.router = Router(routes)
        self._max_payload = max_payload_bytes
        self._store = store
        self._ack = ack
        self._request_redelivery = request_redelivery
        self.counters = IngressCounters()
        # Packet id → last delivery. Packet ids are at most 65,535, so this is bounded by construction.
        self._deliveries: dict[int, Delivery | None] = {}
        self._lock = threading.Lock()  # guards paused/held_back between the network and writer threads
        self.paused = False
        self.closing = False  # set at shutdown: nothing new is acknowledged, the broker keeps it for us
        self._held_back_since_resume = False

    def remember(self, recent: Sequence[tuple[int, str, int, str]]) -> None:
        """Load (mid, topic, crc, task_id) of committed deliveries, newest first (at start-up)."""
        for mid, topic, crc, task_id in reversed(recent):
            self._deliveries[mid] = Delivery(topic, crc, task_id, acked=True)

    def set_routes(self, routes: Sequence[Route]) -> None:
        self.router = Router(routes)

    # ------------------------------------------------------------------ network thread

    def handle(self, msg: InboundMessage) -> None:
        self.counters.received += 1
        payload = msg.payload
        size = len(payload)
        crc = zlib.crc32(payload) if msg.qos else 0

        if msg.qos and msg.dup:
            known = self._deliveries.get(msg.mid)
            if known is not None and known.topic == msg.topic and known.crc == crc:
                # A redelivery of a message we already committed: same task, nothing new to store.
                self.counters.duplicates += 1
                if known.acked:
                    self._ack(msg.mid, msg.qos)  # our first PUBACK was lost with the connection
                log.debug("duplicate_delivery", topic=msg.topic, mid=msg.mid, task_id=known.task_id)
                return

        if self.closing:
            if msg.qos:
                self._deliveries[msg.mid] = None
            return
        if self.paused or not self._store.has_room(size if size <= self._max_payload else 0):
            self._hold_back(msg)
            return

        task_id = os.urandom(16).hex()  # 128 random bits like uuid4, a quarter of its cost on this hot path
        route = self.router.match(msg.topic)
        if size > self._max_payload:
            row = self._dead(msg, task_id, crc, "too_large",
                             f"payload of {size} bytes exceeds EDGE_AGENT_MAX_PAYLOAD_BYTES={self._max_payload}")
        elif route is None:
            row = self._dead(msg, task_id, crc, "unknown_task",
                             f"no route matches topic {msg.topic!r} (a subscription left from earlier routes?)")
        else:
            options = route.options
            options["topic"] = msg.topic
            row = NewTask(task_id, msg.topic, route.task, route.placement, options, payload, size,
                          msg.received_at, msg.mid if msg.qos else None, crc if msg.qos else None)
            counters = self.counters
            counters.accepted += 1
            counters.by_route[route.topic] = counters.by_route.get(route.topic, 0) + 1
        if msg.qos:
            self._deliveries[msg.mid] = Delivery(msg.topic, crc, task_id, acked=False)
        self._store.ingest((row,), ((msg.mid, msg.qos),) if msg.qos else ())

    def _dead(self, msg: InboundMessage, task_id: str, crc: int, reason: str, detail: str) -> NewTask:
        self.counters.dead_lettered += 1
        self.counters.dead_by_reason[reason] = self.counters.dead_by_reason.get(reason, 0) + 1
        out_topic, out_payload = dead_letter(self._agent_id, msg.topic, reason, detail, len(msg.payload),
                                             msg.received_at)
        log.warning("dead_letter", reason=reason, topic=msg.topic, detail=detail)
        return NewTask(task_id, msg.topic, None, None, None, None, len(msg.payload), msg.received_at,
                       msg.mid if msg.qos else None, crc if msg.qos else None, out_topic, out_payload)

    def _hold_back(self, msg: InboundMessage) -> None:
        with self._lock:
            if not self.paused:
                self.paused = True
                log.warning("store_full_intake_paused", rows=self._store.outstanding_rows,
                            bytes=self._store.outstanding_bytes, max_tasks=self._store.max_tasks,
                            max_bytes=self._store.max_bytes)
            self.counters.held_back += 1
            self._held_back_since_resume = True
        if msg.qos:
            # Forget any older delivery under this id: this one was not committed.
            self._deliveries[msg.mid] = None
        else:
            log.warning("qos0_message_dropped_store_full", topic=msg.topic)

    # ------------------------------------------------------------------ writer thread

    def mark_acked(self, acks: Sequence[tuple[int, int]]) -> None:
        deliveries = self._deliveries
        for mid, _ in acks:
            known = deliveries.get(mid)
            if known is not None:
                known.acked = True

    def maybe_resume(self) -> None:
        """After the store released rows: resume intake and have the broker redeliver what we held back."""
        if not self.paused or not self._store.below_resume_mark():
            return
        with self._lock:
            self.paused = False
            redeliver = self._held_back_since_resume
            self._held_back_since_resume = False
        log.info("store_intake_resumed", rows=self._store.outstanding_rows)
        if redeliver:
            self._request_redelivery()

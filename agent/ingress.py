"""Device message → routed task row handed to the store; the acknowledgement follows the commit.

Runs on the event loop for every message, so it only does cheap work: size check, route lookup, an id and a
checksum. Parsing belongs to the task (its errors become dead letters with the task's reason code).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import zlib
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from agent import codec
from agent.config import Route
from agent.deadletters import TRUNCATED_KEEP, DeadLetter, DeadLetterLog, Replay
from agent.egress import dead_letter
from agent.mqtt.link import InboundMessage
from agent.mqtt.topics import topic_matches
from agent.store import NewTask, Store
from agent.telemetry import get_logger

log = get_logger(__name__)

ROUTE_CACHE_MAX = 10_000
# Rows handed to the store and not yet committed. The broker should keep this below our Receive Maximum, but
# a broker resuming a session may push its whole queue at once; above the high mark we stop reading the
# socket (TCP pushes back) until the writer has caught up to the low mark, so memory stays bounded. Two group
# commits' worth keeps the writer busy: 4,000 / 1,000 held about 2 MB more at a backlog's peak, no faster.
INTAKE_HIGH = 2_000
INTAKE_LOW = 500


class Router:
    """First matching route wins; lookups are cached per concrete topic (devices repeat their topics)."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = list(routes)
        self._cache: dict[str, Route | None] = {}
        # Each route's task options, built once (pydantic builds a new dict on every access).
        self.options: dict[str, dict[str, object]] = {}
        self.stored_options: dict[str, str | None] = {}  # as the store keeps them: JSON, None when empty
        for route in reversed(self.routes):
            self.options[route.topic] = options = route.options
            self.stored_options[route.topic] = codec.dumps(options).decode() if options else None

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


class TaskIds:
    """Task ids: 64 random bits drawn at start-up and a 64-bit counter, as 32 hex digits.

    As unique as a uuid4 for our purposes, without a system call for randomness on every message.
    """

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._count = itertools.count(int.from_bytes(os.urandom(4), "big"))

    def next(self) -> str:
        return self._prefix + (next(self._count) & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "big").hex()


def fingerprint(topic: str, crc: int) -> int:
    """What identifies a delivery besides its packet id: the topic's hash and the payload's crc32."""
    return ((hash(topic) & 0xFFFFFFFF) << 32) | crc


NOT_STORED, STORED, ACKED = 0, 1, 2


@dataclass(slots=True)
class IngressCounters:
    received: int = 0
    accepted: int = 0
    dead_lettered: int = 0
    duplicates: int = 0
    held_back: int = 0  # not acknowledged because the store was full (the broker redelivers them)
    replayed: int = 0  # dead letters re-admitted as new tasks (`edge-agent dead-letters replay`)
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
        throttle: Callable[[bool], None] = lambda on: None,
        dead_log: DeadLetterLog | None = None,
        renumbered_redeliveries: bool = False,
    ) -> None:
        self._agent_id = agent_id
        # Only for a broker that re-sends under new packet ids (EDGE_AGENT_MQTT__RENUMBERED_REDELIVERIES): matching
        # by content alone would take a new message with the payload of a committed one for its redelivery.
        self._renumbered = renumbered_redeliveries
        # Acknowledgements handed to the store, come back from its commits, and (renumbering broker) the count
        # handed over before the last CONNACK: their ids meant those messages on the connection they came on.
        self._acks_submitted = self._acks_returned = self._stale_until = 0
        self._dead_log = dead_log or DeadLetterLog()
        self.router = Router(routes)
        self._max_payload = max_payload_bytes
        self._store = store
        self._ack = ack
        self._request_redelivery = request_redelivery
        self._throttle = throttle
        self.uncommitted = 0
        self.throttled = False
        self.counters = IngressCounters()
        # Per packet id, the last delivery under it: its fingerprint and whether it is stored and acknowledged.
        # Packet ids are at most 65,535, so two flat arrays (about 600 kB) hold them all.
        self._marks = array("Q", bytes(8 * 65536))
        self._state = bytearray(65536)
        self._ids = TaskIds()
        self._rows: list[NewTask] = []  # taken this loop turn, handed to the store in one go
        self._acks: list[tuple[int, int]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.paused = False
        self.closing = False  # set at shutdown: nothing new is acknowledged, the broker keeps it for us
        self._held_back_since_resume = False
        # Sees each hand-over to the store before the store does (the archive's tap, agent/archive/tap.py).
        self.on_submit: Callable[[Sequence[NewTask]], None] | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def remember(self, recent: Iterable[tuple[int, str, int]]) -> None:
        """Load (mid, topic, crc) of committed deliveries, newest first (at start-up): each packet id keeps its
        newest delivery."""
        marks, state = self._marks, self._state
        for mid, topic, crc in recent:
            if not state[mid]:
                marks[mid] = fingerprint(topic, crc)
                state[mid] = ACKED

    def _acked_under_another_id(self, mid: int, mark: int) -> bool:
        """Whether a redelivery is of a message committed and acknowledged under another packet id.

        RabbitMQ numbers a session's deliveries afresh on every connection, so what it redelivers after a lost
        connection (our PUBACK lost with it) or a restart comes under a new id (docs/fleets.md#rabbitmq-310).
        Only DUP deliveries that the id did not match come here, so this scan (C speed, 65,536 slots) stays off
        the hot path. Each committed delivery stands for one redelivery: the slot found is spent, and the new
        id takes its place. A delivery still waiting for its commit (STORED) is not taken: its PUBACK goes out
        under its old id, so this copy runs again (at-least-once, a second task_id) rather than be lost.
        """
        marks, state = self._marks, self._state
        if marks[mid] == mark and state[mid] == NOT_STORED:
            return False  # this very delivery was held back under this id (store full): never committed
        start = 0
        while True:
            try:
                slot = marks.index(mark, start)
            except ValueError:
                return False
            if slot != mid and state[slot] == ACKED:
                state[slot] = NOT_STORED
                marks[mid], state[mid] = mark, ACKED
                return True
            start = slot + 1

    def set_routes(self, routes: Sequence[Route]) -> None:
        self.router = Router(routes)

    def handle(self, msg: InboundMessage) -> None:
        counters = self.counters
        counters.received += 1
        payload = msg.payload
        size = len(payload)
        qos, mid = msg.qos, msg.mid
        crc = mark = 0
        if qos:
            crc = zlib.crc32(payload)
            mark = fingerprint(msg.topic, crc)
            if msg.dup and self._state[mid] and self._marks[mid] == mark:
                # A redelivery of a message we already committed: same task, nothing new to store.
                counters.duplicates += 1
                if self._state[mid] == ACKED:
                    self._ack(mid, qos)  # our first PUBACK was lost with the connection
                log.debug("duplicate_delivery", topic=msg.topic, mid=mid)
                return
            if msg.dup and self._renumbered and self._acked_under_another_id(mid, mark):
                counters.duplicates += 1
                self._ack(mid, qos)
                log.debug("duplicate_delivery", topic=msg.topic, mid=mid, renumbered=True)
                return

        if self.closing:
            if qos:
                self._state[mid] = NOT_STORED
            return
        store = self._store
        if self.paused or not store.has_room(size if size <= self._max_payload else 0):
            self._hold_back(msg, mark)
            return

        task_id = self._ids.next()
        route = self.router.match(msg.topic)
        if size > self._max_payload:
            row = self._dead(msg, task_id, crc, "too_large",
                             f"payload of {size} bytes exceeds EDGE_AGENT_MAX_PAYLOAD_BYTES={self._max_payload}")
        elif route is None:
            row = self._dead(msg, task_id, crc, "unknown_task",
                             f"no route matches topic {msg.topic!r} (a subscription left from earlier routes?)")
        else:
            options = {**self.router.options[route.topic], "topic": msg.topic}
            row = NewTask(task_id, msg.topic, route.task, route.placement, options, payload, size,
                          msg.received_at, mid if qos else None, crc if qos else None,
                          route_options=self.router.stored_options[route.topic])
            counters.accepted += 1
            counters.by_route[route.topic] = counters.by_route.get(route.topic, 0) + 1
        store.admit(row)
        rows = self._rows
        if not rows:
            assert self._loop is not None
            self._loop.call_soon(self._flush)
        rows.append(row)
        if qos:
            self._marks[mid] = mark
            self._state[mid] = STORED
            self._acks.append((mid, qos))

    def _flush(self) -> None:
        """One hand-over to the store per loop turn (a burst read from the socket), not one per message."""
        rows, acks = self._rows, self._acks
        self._rows, self._acks = [], []
        if self.on_submit is not None:
            self.on_submit(rows)
        self._acks_submitted += len(acks)
        self._store.submit(rows, acks)
        self.uncommitted += len(rows)
        if self.uncommitted >= INTAKE_HIGH and not self.throttled:
            self.throttled = True
            log.debug("intake_throttled", uncommitted=self.uncommitted)
            self._throttle(True)

    def committed(self, rows: int) -> None:
        """The writer committed ``rows`` of ours: reading resumes once it has caught up."""
        self.uncommitted -= rows
        if self.throttled and self.uncommitted <= INTAKE_LOW:
            self.throttled = False
            self._throttle(False)

    def _dead(self, msg: InboundMessage, task_id: str, crc: int, reason: str, detail: str) -> NewTask:
        self.counters.dead_lettered += 1
        self.counters.dead_by_reason[reason] = self.counters.dead_by_reason.get(reason, 0) + 1
        size = len(msg.payload)
        number = self._store.new_dead_letter_id()
        out_topic, out_payload = dead_letter(self._agent_id, msg.topic, reason, detail, size, msg.received_at,
                                             number)
        self._dead_log.record(reason, id=number, topic=msg.topic, task_id=task_id, size=size, detail=detail)
        # A message over the size limit is kept only in part (agent/deadletters.py says why).
        kept = msg.payload if size <= self._max_payload else msg.payload[:TRUNCATED_KEEP]
        return NewTask(task_id, msg.topic, None, None, None, None, size, msg.received_at,
                       msg.mid if msg.qos else None, crc if msg.qos else None, out_topic, out_payload,
                       dead_letter=DeadLetter(number, reason, detail, kept, truncated=len(kept) < size))

    def readmit(self, replays: Sequence[Replay]) -> None:
        """Dead letters that ``edge-agent dead-letters replay`` asked for, oldest first: each becomes a new task
        through the current routes (or a new dead letter), committed together with the removal of its kept
        copy, so it runs once. What does not fit in the store now, or comes while stopping, stays asked for
        and is read again later."""
        if self.closing or not replays:
            return
        store, rows, replayed = self._store, [], []
        for item in replays:
            size = len(item.payload)
            if self.paused or not store.has_room(size if size <= self._max_payload else 0):
                break
            msg = InboundMessage(item.topic, item.payload, 0, 0, False, time.time())
            task_id = self._ids.next()
            route = self.router.match(item.topic)
            if size > self._max_payload:
                row = self._dead(msg, task_id, 0, "too_large",
                                 f"payload of {size} bytes exceeds EDGE_AGENT_MAX_PAYLOAD_BYTES={self._max_payload}")
            elif route is None:
                row = self._dead(msg, task_id, 0, "unknown_task",
                                 f"no route matches topic {item.topic!r} (replayed dead letter {item.id})")
            else:
                row = NewTask(task_id, item.topic, route.task, route.placement,
                              {**self.router.options[route.topic], "topic": item.topic}, item.payload, size,
                              msg.received_at, None, None, route_options=self.router.stored_options[route.topic])
            store.admit(row)
            rows.append(row)
            replayed.append(item.id)
            self.counters.replayed += 1
            # task None: dead-lettered again (logged as such).
            log.info("dead_letter_replayed", id=item.id, task_id=task_id, topic=item.topic, task=row.kind)
        if rows:
            # Straight to the store, not through this turn's batch: the next read of requested replays is then
            # queued behind this commit, which forgets these.
            if self.on_submit is not None:
                self.on_submit(rows)
            store.submit(rows, [], replayed)
            self.uncommitted += len(rows)

    def _hold_back(self, msg: InboundMessage, mark: int) -> None:
        if not self.paused:
            self.paused = True
            log.warning("store_full_intake_paused", rows=self._store.outstanding_rows,
                        bytes=self._store.outstanding_bytes, max_tasks=self._store.max_tasks,
                        max_bytes=self._store.max_bytes)
        self.counters.held_back += 1
        self._held_back_since_resume = True
        if msg.qos:
            # Forget any older delivery under this id: this one was not committed (and its redelivery under this
            # id is known for what it is).
            self._marks[msg.mid], self._state[msg.mid] = mark, NOT_STORED
        else:
            log.warning("qos0_message_dropped_store_full", topic=msg.topic)

    def reconnected(self) -> None:
        """After a CONNACK. A broker that renumbers (EDGE_AGENT_MQTT__RENUMBERED_REDELIVERIES) has given the ids
        of the last connection to other messages on this one: a PUBACK of a commit that outlived the connection
        would acknowledge one of those, perhaps before it is committed. The broker redelivers what those
        PUBACKs were for, and the redelivery is acknowledged as the duplicate it is."""
        if self._renumbered:
            self._stale_until = self._acks_submitted

    def to_send(self, acks: Sequence[tuple[int, int]]) -> Sequence[tuple[int, int]]:
        """The acknowledgements of a commit (they come back in the order they were handed over) that still
        stand for the messages their ids name: all of them but on a renumbering broker after a reconnect."""
        first = self._acks_returned
        self._acks_returned += len(acks)
        stale = self._stale_until - first
        return acks if stale <= 0 else acks[stale:]

    def mark_acked(self, acks: Sequence[tuple[int, int]]) -> None:
        state = self._state
        for mid, _ in acks:
            if state[mid] == STORED:
                state[mid] = ACKED

    def maybe_resume(self) -> None:
        """After the store released rows: resume intake and have the broker redeliver what we held back."""
        if not self.paused or not self._store.below_resume_mark():
            return
        self.paused = False
        redeliver, self._held_back_since_resume = self._held_back_since_resume, False
        log.info("store_intake_resumed", rows=self._store.outstanding_rows)
        if redeliver:
            self._request_redelivery()

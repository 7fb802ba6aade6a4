"""The one paho-mqtt client: connect, reconnect with backoff and jitter, subscribe, manual ack, publish.

paho runs on the agent's asyncio event loop through its external-loop interface (``loop_read``,
``loop_write``, ``loop_misc`` and the socket callbacks) rather than ``loop_start()``: ingress, dispatch and
publishing then share one thread, so no message crosses a thread (each crossing costs a wake-up and a fight
for the GIL), and the reconnect loop is ours, with jitter (paho's has none, so a fleet of gateways would
reconnect in lock-step after a broker restart). Only the blocking connect (TCP and TLS handshake) runs in a
worker thread. Every paho callback catches everything: an exception escaping one would unwind paho's
read loop mid-packet (thingsboard-gateway #2086).

The link keeps the connection's state; the lean wire path is ``wire.WireClient``, the socket's registration
on the event loop ``pump.Pump``, the subscriptions ``session.Subscriptions``, and which of several brokers
(``EDGE_AGENT_MQTT__HOSTS``) to try next ``failover.Failover``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.backoff import compute_backoff
from agent.metrics import LabelledCounter
from agent.mqtt.failover import Failover
from agent.mqtt.inbound import Inbound
from agent.mqtt.inbound import InboundMessage as InboundMessage  # public here too: agent.mqtt.link.InboundMessage
from agent.mqtt.pump import Pump
from agent.mqtt.session import Subscriptions, end_session, new_client, resume_session
from agent.mqtt.tls import explain_connect_error
from agent.mqtt.topics import status_topic
from agent.mqtt.wire import Outgoing
from agent.telemetry import get_logger

if TYPE_CHECKING:
    from agent.config import BrokerNode, MqttSettings
    from agent.metrics import AgentCollector

log = get_logger(__name__)


TICK_S = 0.5  # supervisor period: keepalive checks, reconnect decisions, watchdog heartbeat
CONNACK_TIMEOUT_S = 30.0


class MqttLink:
    """Owns the paho client, driven by the event loop.

    ``on_message``, ``on_puback`` and ``on_connected`` run on the event loop and must be quick. ``ack`` and
    ``send`` are called on the loop too; paho writes the queued packets on the loop's next turn.
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        client_id: str,
        agent_id: str,
        topic_filters: Sequence[tuple[str, int]],
        on_message: Callable[[InboundMessage], None],
        on_puback: Callable[[int], None],
        on_connected: Callable[[bool], None] = lambda session_present: None,
        unsubscribe: Sequence[str] = (),
    ) -> None:
        self._settings = settings
        self._agent_id = agent_id
        self._client_id = client_id
        self._on_puback_cb = on_puback
        self._on_connected_cb = on_connected
        self._rng = random.Random()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self._reconnect_requested = False
        self._dropping = False  # we closed the connection on purpose: reconnect at once, no backoff
        self._lost = False  # the connection dropped or was refused: back off before the next attempt
        self._connack_deadline = 0.0
        self.connected = threading.Event()
        self.heartbeat = time.monotonic()  # refreshed by every pass of the supervisor (watchdog)
        self.server_receive_maximum = 65535
        self._v5 = settings.protocol == "5"
        self._awaiting_connack = False
        self._failover = Failover(settings.nodes)
        self.session_present: bool | None = None  # the last CONNACK's, None before the first
        self.connections = {"true": 0, "false": 0}  # accepted connections by session_present

        client = new_client(settings, client_id, agent_id)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        inbound = Inbound(on_message, self.ack)
        client.on_message = inbound.from_paho
        client.on_publish = self._on_publish
        client.inbound = inbound.from_wire
        client.settled = self._on_puback_cb
        self._client = client
        self._pump = Pump(client, self._lose_socket)
        self._subs = Subscriptions(client, settings.shared_group, v5=self._v5, topic_filters=topic_filters,
                                   unsubscribe=unsubscribe)
        # Set once the broker confirmed a leave (``leave``).
        self.left = self._subs.left
        # The broker answered this connection's SUBSCRIBE (or there was nothing to subscribe): from then on it
        # keeps what devices publish for this session, also on a client id's very first start.
        self.subscribed = self._subs.subscribed

    # ----------------------------------------------------------------- lifecycle (event loop)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._pump.start(self._loop)
        self._wake = asyncio.Event()
        self._supervisor = self._loop.create_task(self._supervise(), name="mqtt-supervisor")

    def request_reconnect(self) -> None:
        """Reconnect so the broker redelivers the QoS 1 messages we left unacknowledged (store was full)."""
        self._reconnect_requested = True
        self._poke()

    def alive(self, within_s: float) -> bool:
        return self._supervisor is not None and not self._supervisor.done() and (
            time.monotonic() - self.heartbeat < within_s
        )

    async def stop(self, timeout_s: float) -> None:
        """Publish the retained ``offline`` status (waiting for its PUBACK), disconnect, stop reconnecting."""
        if self._supervisor is None:
            return
        self._stopping = True
        deadline = time.monotonic() + timeout_s
        if self.connected.is_set():
            info = self._client.publish(status_topic(self._agent_id), b"offline", qos=1, retain=True)
            soft = min(deadline, time.monotonic() + 5.0)
            while not info.is_published() and time.monotonic() < soft and self.connected.is_set():
                await asyncio.sleep(0.01)
        self._supervisor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._supervisor
        self._supervisor = None
        if self._client.socket() is not None:
            self._client.disconnect()
            while self._client.socket() is not None and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        self.connected.clear()

    # ----------------------------------------------------------------- event loop

    def ack(self, mid: int, qos: int) -> None:
        # Only on a live session: a PUBACK queued while paho reconnects could go out before the CONNECT. The
        # broker redelivers what we did not acknowledge, and ingress recognises it as already stored.
        if qos > 0 and self.connected.is_set():
            self._client.ack(mid, qos)

    def ack_many(self, acks: Sequence[tuple[int, int]]) -> None:
        """The acknowledgements of one commit: the QoS 1 PUBACKs as one queued write, built here."""
        if not self.connected.is_set():
            return  # see ack()
        self._client.send_pubacks([mid for mid, qos in acks if qos == 1])
        for mid, qos in acks:
            if qos == 2:
                self._client.ack(mid, qos)

    def send(self, messages: Sequence[Outgoing], mids: Sequence[int] | None = None) -> list[int]:
        """Queue results at QoS 1, under new packet ids, or with ``mids`` as resends under the ids they had
        before a reconnect (DUP), as MQTT asks. Returns their packet ids; none while disconnected (the caller
        keeps them for later).

        paho does not track these: their PUBACKs reach ``on_puback``, and the caller resends what a lost
        connection left unacknowledged.
        """
        if not self.connected.is_set():
            return []
        return self._client.send_qos1(messages, mids)

    async def _supervise(self) -> None:
        """Connect, keep alive, reconnect with backoff; one pass per tick or when something changes."""
        assert self._loop is not None and self._wake is not None
        attempt = 0
        while True:
            self.heartbeat = time.monotonic()
            client = self._client
            if client.socket() is None:
                if self._lost:
                    self._lost = False
                    if self._failover.round_over:  # a round without an answer, or a lost connection: back off
                        attempt += 1
                        delay = compute_backoff(attempt, self._settings.reconnect_min_s,
                                                self._settings.reconnect_max_s, self._rng.random())
                        log.info("mqtt_reconnect_wait", seconds=round(delay, 2), attempt=attempt)
                        await self._wait_out(delay)
                        self._failover.next_round()
                        continue
                self._failover.advance()
                if not await self._loop.run_in_executor(None, self._try_connect):
                    self._lost = True
                    continue
                self._connack_deadline = time.monotonic() + CONNACK_TIMEOUT_S
            elif self.connected.is_set():
                attempt = 0
                if self._reconnect_requested:
                    self._reconnect_requested = False
                    log.info("mqtt_reconnect_for_redelivery")
                    # A normal DISCONNECT: the session, with the messages we left unacknowledged, stays.
                    self._dropping = True
                    client.disconnect()
            elif self._awaiting_connack and time.monotonic() > self._connack_deadline:
                node = self.node
                log.warning("mqtt_connect_failed", host=node.host, port=node.port, node=str(node),
                            error=f"no CONNACK within {CONNACK_TIMEOUT_S:.0f} s")
                self._lose_socket()
            if client.socket() is not None:
                client.loop_misc()  # keepalive: a PINGREQ when due; a silent broker is dropped
            await self._pause(TICK_S)

    async def _pause(self, seconds: float) -> None:
        assert self._wake is not None
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _wait_out(self, seconds: float) -> None:
        """A reconnect backoff (up to RECONNECT_MAX_S) that keeps the heartbeat fresh: waiting is not being
        stuck, and a stale heartbeat would stop the watchdog pings and get the agent killed mid-outage."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.heartbeat = time.monotonic()
            await asyncio.sleep(min(TICK_S, left))

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _try_connect(self) -> bool:
        """The blocking part (TCP connect, TLS handshake, CONNECT queued); runs in a worker thread."""
        # Set before connecting: the event loop may read the CONNACK (and clear this) before connect() returns.
        self._awaiting_connack = True
        node = self.node
        try:
            resume_session(self._client, self._settings, node)
        except (OSError, ssl.SSLError, ValueError) as exc:
            self._awaiting_connack = False
            message = explain_connect_error(exc, self._settings, node)
            if self._failover.refused(message):
                log.warning("mqtt_connect_failed", host=node.host, port=node.port, node=str(node), error=message)
            return False
        return True

    def _refused_before_connack(self) -> None:
        # With TLS 1.3 the broker checks our certificate after the handshake looks complete to us, so a
        # refused certificate shows up only as a connection closed before any CONNACK.
        detail = "the broker closed the connection before accepting it"
        if self._settings.tls.cert_file:
            detail += "; check that it accepts this agent's certificate (EDGE_AGENT_MQTT__TLS__CERT_FILE)"
        if self._failover.refused(detail):
            node = self.node
            log.error("mqtt_connect_failed", host=node.host, port=node.port, node=str(node), error=detail)

    def _lose_socket(self) -> None:
        """Give up on the current socket without a DISCONNECT (it is broken or the broker never answered)."""
        self._client.drop_socket()
        self._connection_ended()

    @property
    def last_connect_error(self) -> str | None:
        """Why the latest attempt to connect failed; None once the broker has accepted a connection."""
        return self._failover.last_refusal

    @property
    def node(self) -> BrokerNode:
        """The broker in use, or being tried."""
        return self._failover.node

    @property
    def nodes(self) -> tuple[BrokerNode, ...]:
        return self._failover.nodes

    @property
    def connected_node(self) -> BrokerNode | None:
        """The broker of the live connection; None while there is none."""
        return self._failover.node if self.connected.is_set() else None

    @property
    def failovers(self) -> int:
        """Connections accepted by another node than the one before (edge_agent_mqtt_failovers)."""
        return self._failover.failovers

    def describe(self) -> str:
        """The connection in the status line (STATUS=): connected or reconnecting, and with several brokers the
        node in use (or being tried) and the failovers so far."""
        connected = self.connected.is_set()
        return ("connected" if connected else "reconnecting") + self._failover.describe(connected)

    def add_metrics(self, collector: AgentCollector) -> None:
        """The link's series: accepted connections by session_present, failovers, and the node in use."""
        collector.counters += [
            LabelledCounter("edge_agent_mqtt_connections", "Connections the broker accepted, by whether it "
                            "resumed the session (session_present).", ("session_present",),
                            lambda: self.connections),
            LabelledCounter("edge_agent_mqtt_failovers", "Connections accepted by another broker of "
                            "EDGE_AGENT_MQTT__HOSTS than the one before.", (), lambda: {(): self.failovers}),
        ]
        collector.gauge_maps.append((
            "edge_agent_mqtt_node", "1 for the broker in use, 0 for the other nodes of EDGE_AGENT_MQTT__HOSTS "
            "(all 0 while disconnected).", ("node",),
            lambda: {str(node): float(node == self.connected_node) for node in self.nodes}))

    def _connection_ended(self) -> None:
        if self._awaiting_connack and not self._dropping:
            self._refused_before_connack()
        if self._dropping:
            self._failover.dropped()
        elif self.connected.is_set() and not self._stopping:
            self._failover.lost()
        self._awaiting_connack = False
        if not self._dropping and not self._stopping:
            self._lost = True
        self._dropping = False
        self._subs.connection_ended()
        self.connected.clear()
        self._poke()

    def pause_reading(self, paused: bool) -> None:
        """Stop (or resume) reading from the broker; TCP then holds back its messages."""
        self._pump.pause_reading(paused)

    # ----------------------------------------------------------------- paho callbacks (event loop)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Properties | None) -> None:
        try:
            self._awaiting_connack = False
            if reason.is_failure:
                text = str(reason)
                if self._failover.refused(text):
                    log.error("mqtt_connect_refused", reason=text, host=self.node.host, node=str(self.node))
                return
            previous = self._failover.accepted()
            session_present = bool(getattr(flags, "session_present", False))
            if properties is not None and hasattr(properties, "ReceiveMaximum"):
                self.server_receive_maximum = int(properties.ReceiveMaximum)
            self._subs.send()
            client.publish(status_topic(self._agent_id), b"online", qos=1, retain=True)
            node = self.node
            self.session_present = session_present
            self.connections["true" if session_present else "false"] += 1
            self.connected.set()
            log.info("mqtt_connected", host=node.host, port=node.port, node=str(node),
                     session_present=session_present, protocol=self._settings.protocol)
            if previous is not None:
                # With independent brokers the session starts afresh here (session_present false) and what
                # devices published to the other node stays there; a cluster resumes it (docs/fleets.md).
                log.warning("mqtt_failover", from_node=str(previous), to_node=str(node),
                            session_present=session_present, failovers=self.failovers)
            self._on_connected_cb(session_present)
        except Exception:
            log.exception("callback_failed", callback="on_connect")

    @property
    def subscribe_pending(self) -> bool:
        """A SUBSCRIBE of this connection still waits for the broker's SUBACK."""
        return self._subs.pending

    @property
    def subscriptions(self) -> dict[str, str]:
        """This connection's subscriptions as the broker answered them (``edge-agent status``)."""
        return self._subs.state

    def set_subscriptions(self, topic_filters: Sequence[tuple[str, int]], unsubscribe: Sequence[str]) -> None:
        """New routes (SIGHUP): subscribe now when connected, and after every later CONNACK."""
        self._subs.replace(topic_filters, unsubscribe, connected=self.connected.is_set())

    def leave(self) -> None:
        """Unsubscribe every filter now (or at the next CONNACK) and never subscribe again; ``left`` is set once
        the broker confirms. Messages the session already holds keep coming: Mosquitto delivers a session's
        queue after an UNSUBSCRIBE, and the other members of a shared group get everything published after it."""
        self._subs.leave(connected=self.connected.is_set())

    async def end_session(self, timeout_s: float) -> bool:
        """After ``stop``: discard this client id's session at the broker, by connecting once with a clean
        start (3.1.1: clean session) and no session expiry, then disconnecting. True once the broker accepted."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, end_session, self._settings, self._client_id, timeout_s,
                                          self.node)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Properties | None) -> None:
        try:
            if self.connected.is_set() and not self._stopping and not self._dropping:
                log.warning("mqtt_connection_lost", reason=str(reason))
            self._connection_ended()
        except Exception:
            log.exception("callback_failed", callback="on_disconnect")

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode,
                    properties: Properties | None) -> None:
        try:
            if reason.is_failure:
                # The broker took the message and answered no (MQTT 5, e.g. not authorised): retrying cannot
                # help, so it counts as settled, loudly.
                log.error("result_refused_by_broker", mid=mid, reason=str(reason))
            self._on_puback_cb(mid)
        except Exception:
            log.exception("callback_failed", callback="on_publish")

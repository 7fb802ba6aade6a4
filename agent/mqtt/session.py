"""The broker's session: the link's client and its connect, which resume it; the routes' filters after every
CONNACK, the broker's answers, leaving; its end.

docs/design.md#mqtt-contract (Subscriptions): each route's filter at its QoS, in the shared form when a group
is set, with retain handling 1 on MQTT 5; filters earlier routes left in the session are unsubscribed.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.mqtt.tls import authenticate, explain_connect_error
from agent.mqtt.topics import status_topic, subscription_filter
from agent.mqtt.wire import WireClient
from agent.telemetry import get_logger

if TYPE_CHECKING:
    from agent.config import BrokerNode, MqttSettings

log = get_logger(__name__)


def new_client(s: MqttSettings, client_id: str, agent_id: str) -> WireClient:
    """The link's client: a persistent session, acknowledgements and reconnects left to the link, the retained
    ``offline`` status as its will."""
    v5 = s.protocol == "5"
    client = WireClient(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
        # 3.1.1: a persistent session; MQTT 5 uses clean_start=False plus a session expiry on connect.
        clean_session=None if v5 else False,
        manual_ack=True,
        reconnect_on_failure=False,
    )
    # We bound the results awaiting PUBACK ourselves; paho's limit costs O(in-flight) per PUBACK
    # (docs/contributing.md#paho-mqtt-traps).
    client.max_inflight_messages_set(0)
    client.max_queued_messages_set(0)
    authenticate(client, s)
    client.will_set(status_topic(agent_id), b"offline", qos=1, retain=True)
    return client


def resume_session(client: paho.Client, s: MqttSettings, node: BrokerNode) -> None:
    """Connect ``client`` to ``node``, resuming its session there (or starting one that outlives the connection).
    Blocking: the TCP connect, the TLS handshake, the CONNECT queued; raises what paho's ``connect`` raises."""
    v5 = s.protocol == "5"
    properties: Properties | None = None
    if v5:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = s.session_expiry_s
        properties.ReceiveMaximum = s.receive_maximum
    client.connect(
        node.host,  # with TLS also the SNI and the name the broker's certificate is verified against
        node.port,
        keepalive=s.keepalive_s,
        clean_start=False if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
        properties=properties,
    )


class Subscriptions:
    """What to subscribe to, what the broker answered for this connection, and the leave.

    Runs on the event loop; takes paho's SUBACK and UNSUBACK callbacks.
    """

    def __init__(self, client: paho.Client, shared_group: str | None, *, v5: bool,
                 topic_filters: Sequence[tuple[str, int]], unsubscribe: Sequence[str]) -> None:
        self._client = client
        self._group = shared_group
        self._v5 = v5
        self._filters = list(topic_filters)
        # Filters our persistent session may still hold from earlier routes; dropped at the next CONNACK.
        self._unsubscribe = list(unsubscribe)
        # Leaving (``leave``): the filters to unsubscribe at every CONNACK until the broker confirms, and then
        # ``left`` is set. None while a member.
        self._leaving: list[str] | None = None
        self._leave_mid: int | None = None
        self._subscribing: dict[int, list[str]] = {}  # SUBSCRIBE packet id → its filters, until the SUBACK
        # This connection's subscriptions as the broker answered them (``edge-agent status``): filter as
        # subscribed ($share/… included) → "pending", "subscribed" or "refused: <reason code>".
        self.state: dict[str, str] = {}
        self.left = threading.Event()
        self.subscribed = threading.Event()  # this connection's SUBSCRIBE was answered (or there was none)
        client.on_subscribe = self.on_suback
        client.on_unsubscribe = self.on_unsuback

    @property
    def pending(self) -> bool:
        """A SUBSCRIBE of this connection still waits for the broker's SUBACK."""
        return bool(self._subscribing)

    def replace(self, topic_filters: Sequence[tuple[str, int]], unsubscribe: Sequence[str], *,
                connected: bool) -> None:
        """New routes: subscribe now when connected, and after every later CONNACK."""
        if self._leaving is not None:
            return  # a member that is leaving never subscribes again
        self._filters = list(topic_filters)
        self._unsubscribe = list(unsubscribe)
        if connected:
            self.send()

    def leave(self, *, connected: bool) -> None:
        """Unsubscribe every filter now (or at the next CONNACK) and never subscribe again."""
        if self._leaving is not None:
            return
        self._leaving = [f for f, _ in self._filters] + self._unsubscribe
        self._filters, self._unsubscribe = [], []
        if not self._leaving:
            self.left.set()  # subscribed to nothing
        elif connected:
            self.send()

    def connection_ended(self) -> None:
        self._subscribing.clear()
        self.state = {}
        self.subscribed.clear()

    def send(self) -> None:
        """After every CONNACK (and on a change while connected): the leave, stale filters, the routes."""
        group = self._group
        if self._leaving and not self.left.is_set():
            # Again after every reconnect until confirmed: an UNSUBSCRIBE lost with a connection never happened.
            leaving = [subscription_filter(f, group) for f in self._leaving]
            _, self._leave_mid = self._client.unsubscribe(leaving)
            log.info("mqtt_unsubscribing", filters=leaving)
        stale = [subscription_filter(f, group) for f in self._unsubscribe]
        if stale:
            self._client.unsubscribe(stale)
            log.info("mqtt_unsubscribed_stale", filters=stale)
            self._unsubscribe = []
        subscriptions: list[tuple[str, Any]] = []
        for topic_filter, qos in self._filters:
            full = subscription_filter(topic_filter, group)
            if self._v5:
                # retainHandling=1: a resubscribe after reconnect must not replay retained messages as new tasks.
                subscriptions.append((full, SubscribeOptions(qos=qos, retainHandling=1)))
            else:
                subscriptions.append((full, qos))
        # Always resubscribe: the broker may have lost the session (restart without persistence).
        self.state = {full: "pending" for full, _ in subscriptions}
        if subscriptions:
            _, mid = self._client.subscribe(subscriptions)
            if mid is not None:  # None: paho refused it (not connected); the next CONNACK subscribes again
                self._subscribing[mid] = [full for full, _ in subscriptions]
        else:
            self.subscribed.set()  # a leaving member: nothing to wait for

    def on_suback(self, client: paho.Client, userdata: Any, mid: int, reason_codes: list[ReasonCode],
                      properties: Properties | None) -> None:
        try:
            self.subscribed.set()  # answered, refusals included: those are logged, and waiting would not help
            filters = self._subscribing.pop(mid, None) or ["?"] * len(reason_codes)
            pairs = list(zip(filters, reason_codes, strict=False))
            for topic_filter, code in pairs:
                if topic_filter in self.state:
                    self.state[topic_filter] = f"refused: {code}" if code.is_failure else "subscribed"
            failed = [str(code) for _, code in pairs if code.is_failure]
            if failed:
                log.error("mqtt_subscribe_refused", reasons=failed,
                          filters=[f for f, code in pairs if code.is_failure])
            granted = [f for f, code in pairs if not code.is_failure]
            if granted:
                # Messages published from here on reach this session: until then the broker had nowhere to
                # keep them (the first start of a client id, or a broker that lost its sessions).
                log.info("mqtt_subscribed", filters=granted)
        except Exception:
            log.exception("callback_failed", callback="on_subscribe")

    def on_unsuback(self, client: paho.Client, userdata: Any, mid: int, reason_codes: list[ReasonCode],
                        properties: Properties | None) -> None:
        try:
            if self._leave_mid is not None and mid == self._leave_mid:
                # "No subscription existed" (MQTT 5) is as good: the broker holds no subscription of ours.
                self.left.set()
                log.info("mqtt_unsubscribed", reasons=sorted({str(code) for code in reason_codes}))
        except Exception:
            log.exception("callback_failed", callback="on_unsubscribe")


def end_session(s: MqttSettings, client_id: str, timeout_s: float, first: BrokerNode | None = None) -> bool:
    """Discard ``client_id``'s session at every broker of ``s.nodes`` that answers, ``first`` (the node in use)
    first: independent brokers each keep a session of their own; on a cluster the later ones find nothing to
    discard. Blocking (a worker thread); True once at least one broker accepted."""
    deadline = time.monotonic() + timeout_s
    nodes = [first] if first is not None else []
    nodes += [node for node in s.nodes if node != first]
    ended = False
    for node in nodes:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        if _end_session_on(s, client_id, left, node):
            ended = True
            log.info("mqtt_session_ended", node=str(node))
    return ended


def _end_session_on(s: MqttSettings, client_id: str, timeout_s: float, node: BrokerNode) -> bool:
    v5 = s.protocol == "5"
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
                         clean_session=None if v5 else True)
    authenticate(client, s)
    accepted = threading.Event()
    answered = threading.Event()

    def on_connect(c: paho.Client, u: Any, f: Any, reason: ReasonCode, p: Properties | None) -> None:
        if not reason.is_failure:
            accepted.set()
        answered.set()

    client.on_connect = on_connect
    try:
        # 3.1.1 has clean_session (above) and refuses clean_start.
        client.connect(node.host, node.port, keepalive=s.keepalive_s,
                       clean_start=True if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY)
    except (OSError, ssl.SSLError, ValueError) as exc:
        log.error("mqtt_end_session_failed", node=str(node), error=explain_connect_error(exc, s, node))
        return False
    client.loop_start()
    try:
        answered.wait(timeout_s)
        if accepted.is_set():
            client.disconnect()
    finally:
        client.loop_stop()
    return accepted.is_set()

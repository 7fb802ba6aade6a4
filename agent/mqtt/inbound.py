"""Device messages as paho hands them over, converted at once into the agent's own :class:`InboundMessage`.

Two paths deliver them: the lean wire path (QoS 0 and 1, ``wire.WireClient.inbound``) and paho's own (QoS 2,
``on_message``). Both catch everything: an exception escaping a paho callback would unwind paho's read loop
mid-packet (thingsboard-gateway #2086).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from agent.mqtt.wire import raw_topic
from agent.telemetry import get_logger

if TYPE_CHECKING:
    import paho.mqtt.client as paho

log = get_logger("agent.mqtt.link")  # the link's events, under the name they have always had


class InboundMessage(NamedTuple):
    """A device message as paho handed it over (NamedTuple: cheapest immutable value on the hot path)."""

    topic: str
    payload: bytes
    qos: int
    mid: int
    dup: bool
    received_at: float  # wall clock, for dead letters and the latency figures


class Inbound:
    """Hands each device message to ``deliver``. One whose topic is not UTF-8 is logged and acknowledged with
    ``ack``: MQTT forbids it and brokers reject it; if one slips through, it cannot be routed or replied to."""

    __slots__ = ("_ack", "_deliver")

    def __init__(self, deliver: Callable[[InboundMessage], None], ack: Callable[[int, int], None]) -> None:
        self._deliver = deliver
        self._ack = ack

    def from_wire(self, topic: bytes, payload: bytes, qos: int, mid: int, dup: bool) -> None:
        """``WireClient.inbound``: QoS 0 and 1 messages, from the lean path."""
        try:
            try:
                text = topic.decode()
            except UnicodeDecodeError:
                log.error("mqtt_topic_not_utf8", raw=repr(topic[:200]))
                self._ack(mid, qos)
                return
            self._deliver(InboundMessage(text, payload, qos, mid, dup, time.time()))
        except Exception:
            log.exception("callback_failed", callback="on_message")

    def from_paho(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        """paho's ``on_message``: QoS 2 messages, which take paho's own path."""
        try:
            try:
                topic = message.topic
            except UnicodeDecodeError:
                log.error("mqtt_topic_not_utf8", raw=repr(raw_topic(message)[:200]))
                self._ack(message.mid, message.qos)
                return
            self._deliver(
                InboundMessage(topic, bytes(message.payload), message.qos, message.mid, bool(message.dup), time.time())
            )
        except Exception:
            log.exception("callback_failed", callback="on_message")

"""The lean wire path: the one module that touches paho's private names (docs/contributing.md#paho-mqtt-traps).

Per message paho costs more than the rest of the agent: three ``recv`` calls for each packet, and a message,
a message-info with its condition variable and lock, and MQTT 5 property and reason-code objects for every
PUBLISH and PUBACK. :class:`WireClient` is paho's client with a lean path for what the agent does per message;
paho stays in charge of the session (CONNECT, subscriptions, keepalive, QoS 2, the status messages).

What the link may use, and all it may use of paho's internals:

- ``inbound(topic, payload, qos, mid, dup)``: every QoS 0/1 PUBLISH, as plain values;
- ``settled(mid)``: the PUBACK of a result sent with :meth:`WireClient.send_qos1`;
- ``hold_reads``, :meth:`~WireClient.read_burst`, :meth:`~WireClient.buffered`: reading on the event loop;
- :meth:`~WireClient.send_qos1`, :meth:`~WireClient.send_pubacks`: results and acknowledgements as one write;
- :meth:`~WireClient.drop_socket`: give up a socket without a DISCONNECT;
- :func:`raw_topic`: the undecoded topic of a message paho delivered (QoS 2).

The private names this relies on are listed in :data:`PAHO_PRIVATE_NAMES`; paho is pinned to the minor
release this was tested against (pyproject.toml), and tests/test_mqtt_wire.py feeds the path packets built
by paho's own encoder, so a paho release that changes them fails there first.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from agent.telemetry import get_logger

if TYPE_CHECKING:
    from paho.mqtt.client import _OutPacket

log = get_logger(__name__)

READ_CHUNK = 64 * 1024
WRITE_CHUNK = 256 * 1024  # bytes coalesced into one send

# paho's private names used here (and nowhere else in the agent): tests/test_mqtt_wire.py checks that paho
# still has each of them and that no other module of the agent uses them.
PAHO_PRIVATE_NAMES = frozenset({
    "_sock", "_sock_recv", "_sock_close", "_packet_read", "_packet_handle", "_packet_write", "_packet_queue",
    "_loop_rc_handle", "_in_packet", "_out_packet", "_out_messages", "_out_message_mutex", "_mid_generate",
    "_last_bytes_received", "_protocol", "_handle_publish", "_handle_pubackcomp", "_topic", "_OutPacket",
})


class Outgoing(Protocol):
    """A result to publish: the publisher's own records are passed as they are, with no tuple per message."""

    @property
    def topic(self) -> str: ...

    @property
    def payload(self) -> bytes: ...


def raw_topic(message: paho.MQTTMessage) -> bytes:
    """The topic of a message paho delivered, as bytes: ``message.topic`` raises when they are not UTF-8."""
    return bytes(message._topic)


def varint(n: int) -> bytes:
    """MQTT's Variable Byte Integer (a packet's remaining length)."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


class WireClient(paho.Client):
    """paho's client with a lean path for what the agent does per message (see the module's docstring).

    Reads come from one 64 KiB ``recv``; a QoS 0/1 PUBLISH goes to ``inbound`` as plain values; results go out
    as QoS 1 packets built here, tracked by the caller (``MqttLink.send``), whose PUBACKs go to ``settled``.
    Anything else takes paho's own path.
    """

    _rbuf = b""
    _rpos = 0
    _rsock: object = None
    inbound: Callable[[bytes, bytes, int, int, bool], None] | None = None  # topic, payload, qos, mid, dup
    settled: Callable[[int], None] | None = None  # mid of a result the broker acknowledged
    hold_reads = False  # the link paused reading: stop between packets

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rpos >= len(self._rbuf) or self._rsock is not self._sock:
            data = super()._sock_recv(READ_CHUNK)
            self._rsock, self._rbuf, self._rpos = self._sock, data, 0
            if not data:
                return data
        pos = self._rpos
        chunk = self._rbuf[pos:pos + bufsize]
        self._rpos = pos + len(chunk)
        return chunk

    def buffered(self) -> bool:
        """Bytes read from the socket but not parsed yet, which the event loop's select() cannot see."""
        sock = self._sock
        if sock is None:
            return False
        if self._rsock is sock and self._rpos < len(self._rbuf):
            return True
        return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0

    def read_burst(self, budget: int) -> bool:
        """Up to ``budget`` packets: ``loop_read``'s work without a call of it per packet. True when bytes
        are still buffered here (select() cannot see them), so reading should go on after other work."""
        for _ in range(budget):
            if self.hold_reads or self._sock is None:
                return False
            rc = self._packet_read()
            if rc > 0:
                self._loop_rc_handle(rc)
                return False
            if rc == MQTTErrorCode.MQTT_ERR_AGAIN or not self.buffered():
                return False
        return True

    def _packet_read(self) -> MQTTErrorCode:
        """A packet already whole in the buffer is cut out of it directly: PUBLISH and a plain PUBACK go to
        their callbacks, anything else to paho's handler. Partial packets take paho's byte-by-byte path."""
        if self._in_packet["command"] or self._rsock is not self._sock:
            return super()._packet_read()
        buf, pos = self._rbuf, self._rpos
        end = len(buf)
        length = shift = 0
        i = pos + 1
        while True:
            if i >= end or shift > 21:
                return super()._packet_read()
            byte = buf[i]
            i += 1
            length |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
        stop = i + length
        if stop > end:
            return super()._packet_read()
        command = buf[pos]
        self._rpos = stop
        self._last_bytes_received = time.monotonic()  # paho's keepalive clock
        kind = command & 0xF0
        if kind == paho.PUBLISH and self.inbound is not None and command & 0x06 != 0x04:
            return self._publish_from(command, buf, i, stop)
        if kind == paho.PUBACK and length == 2 and self.settled is not None:
            mid = (buf[i] << 8) | buf[i + 1]
            if mid not in self._out_messages:
                self.settled(mid)
                return MQTTErrorCode.MQTT_ERR_SUCCESS
        self._in_packet["command"] = command
        self._in_packet["packet"] = bytearray(buf[i:stop])
        try:
            rc = self._packet_handle()
        except MalformedPacket:
            rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
        self._in_packet["command"] = 0
        self._in_packet["packet"] = bytearray()
        return rc

    def _handle_publish(self) -> MQTTErrorCode:
        command, packet = self._in_packet["command"], self._in_packet["packet"]
        if command & 0x06 == 0x04 or self.inbound is None:  # QoS 2: paho's own flow
            return super()._handle_publish()
        return self._publish_from(command, packet, 0, len(packet))

    def _publish_from(self, command: int, data: bytes | bytearray, start: int, stop: int) -> MQTTErrorCode:
        """A QoS 0/1 PUBLISH whose variable header and payload are ``data[start:stop]``, to ``inbound``."""
        assert self.inbound is not None
        qos = (command & 0x06) >> 1
        try:
            end = start + 2 + ((data[start] << 8) | data[start + 1])
            topic = bytes(data[start + 2:end])
            mid = 0
            if qos:
                mid = (data[end] << 8) | data[end + 1]
                end += 2
            if self._protocol == paho.MQTTv5:  # skip the properties: none of them changes what we do
                length = shift = 0
                while True:
                    byte = data[end]
                    end += 1
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    if byte < 0x80:
                        break
                end += length
        except IndexError:
            return MQTTErrorCode.MQTT_ERR_PROTOCOL
        if not topic or end > stop:  # an empty topic needs an alias, which we never allow
            return MQTTErrorCode.MQTT_ERR_PROTOCOL
        self.inbound(topic, bytes(data[end:stop]), qos, mid, bool(command & 0x08))
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _handle_pubackcomp(self, cmd: Literal["PUBACK", "PUBCOMP"]) -> MQTTErrorCode:
        packet = self._in_packet["packet"]
        if cmd != "PUBACK" or self.settled is None or len(packet) < 2:
            return super()._handle_pubackcomp(cmd)
        mid = (packet[0] << 8) | packet[1]
        with self._out_message_mutex:
            own = mid in self._out_messages
        if own:  # one of paho's (status messages)
            return super()._handle_pubackcomp(cmd)
        if len(packet) > 2 and packet[2] >= 0x80:
            # The broker took the result and answered no (MQTT 5, e.g. not authorised): retrying cannot help,
            # so it counts as settled, loudly.
            reason = ReasonCode(PacketTypes.PUBACK, identifier=packet[2])
            log.error("result_refused_by_broker", mid=mid, reason=str(reason))
        self.settled(mid)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _packet_write(self) -> MQTTErrorCode:
        """Whole queued packets (a loop turn's PUBACKs and results) go out in one send, not one each."""
        out = self._out_packet
        if len(out) > 1:
            taken: list[_OutPacket] = []
            size = 0
            while out and size < WRITE_CHUNK:
                head = out[0]
                kind = head["command"] & 0xF0
                if head["pos"] or kind == paho.DISCONNECT or (kind == paho.PUBLISH and head["qos"] == 0):
                    break  # partly sent, or paho acts once it is written
                taken.append(out.popleft())
                size += len(head["packet"])
            if len(taken) > 1:
                blob = b"".join(packet["packet"] for packet in taken)
                out.appendleft({"command": paho.PUBACK, "mid": 0, "qos": 1, "pos": 0, "to_process": len(blob),
                                "packet": blob, "info": None})
            elif taken:
                out.appendleft(taken[0])
        return super()._packet_write()

    def send_qos1(self, messages: Sequence[Outgoing], mids: Sequence[int] | None = None) -> list[int]:
        """Queue QoS 1 PUBLISHes as one write. Without ``mids`` they get new packet ids; with them they are
        resends (DUP) under those ids after a reconnect. Returns the packet ids in order."""
        extra, properties = (5, b"\x00") if self._protocol == paho.MQTTv5 else (4, b"")
        if mids is None:
            mids, command = [self._mid_generate() for _ in messages], b"\x32"
        else:
            mids, command = list(mids), b"\x3a"
        parts: list[bytes] = []
        for message, mid in zip(messages, mids, strict=True):
            topic, payload = message.topic.encode(), message.payload
            parts += (command, varint(len(topic) + len(payload) + extra), len(topic).to_bytes(2, "big"), topic,
                      mid.to_bytes(2, "big"), properties, payload)
        if parts:
            self._packet_queue(paho.PUBLISH, b"".join(parts), mids[0], 1)
        return mids

    def send_pubacks(self, mids: Sequence[int]) -> None:
        """Queue plain PUBACKs (QoS 1, reason success) for ``mids`` as one write."""
        if mids:
            blob = b"".join([b"\x40\x02" + mid.to_bytes(2, "big") for mid in mids])
            self._packet_queue(paho.PUBACK, blob, 0, 0)

    def drop_socket(self) -> None:
        """Give up the current socket without a DISCONNECT: paho's own teardown (socket callbacks, then close)."""
        self._sock_close()

"""The one paho-mqtt client: connect, reconnect with backoff and jitter, subscribe, manual ack, publish.

paho runs on the agent's asyncio event loop through its external-loop interface (``loop_read``,
``loop_write``, ``loop_misc`` and the socket callbacks) rather than ``loop_start()``: ingress, dispatch and
publishing then share one thread, so no message crosses a thread (each crossing costs a wake-up and a fight
for the GIL), and the reconnect loop is ours, with jitter (paho's has none, so a fleet of gateways would
reconnect in lock-step after a broker restart). Only the blocking connect (TCP and TLS handshake) runs in a
worker thread. Every paho callback catches everything: an exception escaping one would unwind paho's
read loop mid-packet (thingsboard-gateway #2086).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.config import MqttSettings
from agent.errors import ConfigError
from agent.telemetry import get_logger

if TYPE_CHECKING:
    from paho.mqtt.client import _OutPacket

log = get_logger(__name__)


class InboundMessage(NamedTuple):
    """A device message as paho handed it over (NamedTuple: cheapest immutable value on the hot path)."""

    topic: str
    payload: bytes
    qos: int
    mid: int
    dup: bool
    received_at: float  # wall clock, for dead letters and the latency figures


class Outgoing(Protocol):
    """A result to publish: the publisher's own records are passed as they are, with no tuple per message."""

    @property
    def topic(self) -> str: ...

    @property
    def payload(self) -> bytes: ...


def backoff_delay(attempt: int, minimum: float, maximum: float, rng: random.Random) -> float:
    """Exponential backoff with "equal jitter": half the step is fixed, half random, capped at ``maximum``."""
    step = min(maximum, minimum * (2 ** min(attempt, 30)))
    return float(step / 2 + rng.uniform(0, step / 2))


def status_topic(agent_id: str) -> str:
    return f"edge/{agent_id}/status"


def subscription_filter(topic_filter: str, shared_group: str | None) -> str:
    return f"$share/{shared_group}/{topic_filter}" if shared_group else topic_filter


def tls_context(settings: MqttSettings) -> ssl.SSLContext:
    """Build the TLS context now, so a bad CA, key or certificate stops start-up with a clear message."""
    tls = settings.tls
    try:
        context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError("EDGE_AGENT_MQTT__TLS__CA_FILE", f"not a usable CA bundle: {exc}") from exc
    if tls.cert_file and tls.key_file:
        expiry = certificate_expiry(tls.cert_file)
        if expiry is not None and expiry < time.time():
            raise ConfigError("EDGE_AGENT_MQTT__TLS__CERT_FILE",
                              f"the certificate expired on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(expiry))}")
        try:
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                "EDGE_AGENT_MQTT__TLS__CERT_FILE", f"certificate and key do not load as a pair: {exc}"
            ) from exc
    return context


def certificate_expiry(path: Path) -> float | None:
    """notAfter of a PEM certificate as a Unix time; None when it cannot be read this way."""
    # The ssl module's own certificate decoder (private but present in every CPython 3); a failure here only
    # skips this early check: the handshake still validates the certificate.
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:
        return None
    try:
        return float(ssl.cert_time_to_seconds(decode(str(path))["notAfter"]))
    except (ssl.SSLError, OSError, KeyError, ValueError):
        return None


def explain_connect_error(exc: BaseException, settings: MqttSettings) -> str:
    """A failed connection attempt in words an operator can act on."""
    where = f"{settings.host}:{settings.port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        if code == 10:
            return f"the broker's certificate at {where} has expired"
        if code in (2, 18, 19, 20, 21):
            return (f"the broker's certificate at {where} is not signed by the CA in "
                    f"EDGE_AGENT_MQTT__TLS__CA_FILE ({exc.verify_message})")
        if code == 62:
            return f"the broker's certificate does not name {settings.host!r} ({exc.verify_message})"
        return f"the broker's certificate at {where} was refused: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or exc)
        if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER" in reason:
            return f"{where} does not speak TLS (a plain MQTT port?)"
        if "ALERT" in reason:
            return f"the broker refused this agent's certificate (EDGE_AGENT_MQTT__TLS__CERT_FILE): {reason}"
        return f"TLS with {where} failed: {reason}"
    if isinstance(exc, ConnectionRefusedError):
        return f"nothing accepts connections on {where} (is the broker running?)"
    if isinstance(exc, socket.gaierror):
        return f"the broker host {settings.host!r} cannot be resolved ({exc.strerror})"
    if isinstance(exc, TimeoutError | socket.timeout):
        return f"no answer from {where} (timed out)"
    return f"{type(exc).__name__}: {exc}"


READ_CHUNK = 64 * 1024
READ_BUDGET = 256  # packets per turn of the event loop
WRITE_CHUNK = 256 * 1024  # bytes coalesced into one send
TICK_S = 0.5  # supervisor period: keepalive checks, reconnect decisions, watchdog heartbeat
CONNACK_TIMEOUT_S = 30.0


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


class _Client(paho.Client):
    """paho's client with a lean path for what the agent does per message.

    paho stays in charge of the session (CONNECT, subscriptions, keepalive, QoS 2, our status messages). Per
    message it costs more than the rest of the agent: three ``recv`` calls for each packet, and a message, a
    message-info with its condition variable and lock, and MQTT 5 property and reason-code objects for every
    PUBLISH and PUBACK. Here reads come from one 64 KiB ``recv``; a QoS 0/1 PUBLISH goes to ``inbound`` as plain
    values; results go out as QoS 1 packets built here, tracked by the caller (``MqttLink.publish``), whose
    PUBACKs go to ``settled``. Anything else takes paho's own path.
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
            parts += (command, _varint(len(topic) + len(payload) + extra), len(topic).to_bytes(2, "big"), topic,
                      mid.to_bytes(2, "big"), properties, payload)
        if parts:
            self._packet_queue(paho.PUBLISH, b"".join(parts), mids[0], 1)
        return mids


def _authenticate(client: paho.Client, settings: MqttSettings) -> None:
    if settings.username:
        password = settings.password.get_secret_value() if settings.password else None
        client.username_pw_set(settings.username, password)
    if settings.tls.enabled:
        client.tls_set_context(tls_context(settings))


class MqttLink:
    """Owns the paho client, driven by the event loop.

    ``on_message``, ``on_puback`` and ``on_connected`` run on the event loop and must be quick. ``ack`` and
    ``publish`` are called on the loop too; paho writes the queued packets on the loop's next turn.
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
        self._filters = list(topic_filters)
        self._on_message_cb = on_message
        self._on_puback_cb = on_puback
        self._on_connected_cb = on_connected
        # Filters our persistent session may still hold from earlier routes; dropped at the next CONNACK.
        self._unsubscribe = list(unsubscribe)
        # Leaving (``leave``): the filters to unsubscribe at every CONNACK until the broker confirms, and then
        # ``left`` is set. None while a member.
        self._leaving: list[str] | None = None
        self._leave_mid: int | None = None
        self._subscribing: dict[int, list[str]] = {}  # SUBSCRIBE packet id → its filters, until the SUBACK
        # This connection's subscriptions as the broker answered them (``edge-agent status``): filter as
        # subscribed ($share/… included) → "pending", "subscribed" or "refused: <reason code>".
        self.subscriptions: dict[str, str] = {}
        self.left = threading.Event()
        self._rng = random.Random()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._supervisor: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self._reconnect_requested = False
        self._dropping = False  # we closed the connection on purpose: reconnect at once, no backoff
        self._lost = False  # the connection dropped or was refused: back off before the next attempt
        self._connack_deadline = 0.0
        self._reader_fd = -1
        self._writer_fd = -1
        self._flush_scheduled = False
        self._reading_paused = False
        self.connected = threading.Event()
        # The broker answered this connection's SUBSCRIBE (or there was nothing to subscribe): from then on it
        # keeps what devices publish for this session, also on a client id's very first start.
        self.subscribed = threading.Event()
        self.heartbeat = time.monotonic()  # refreshed by every pass of the supervisor (watchdog)
        self.server_receive_maximum = 65535
        self._v5 = settings.protocol == "5"
        self._last_refusal: str | None = None
        self._awaiting_connack = False

        protocol = paho.MQTTv5 if self._v5 else paho.MQTTv311
        client = _Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            # 3.1.1: a persistent session; MQTT 5 uses clean_start=False plus a session expiry on connect.
            clean_session=None if self._v5 else False,
            manual_ack=True,
            reconnect_on_failure=False,
        )
        # We bound the results awaiting PUBACK ourselves; paho's limit costs O(in-flight) per PUBACK
        # (docs/contributing.md#paho-mqtt-traps).
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        _authenticate(client, settings)
        client.will_set(status_topic(agent_id), b"offline", qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        client.inbound = self._inbound
        client.settled = self._on_puback_cb
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        self._client = client

    # ----------------------------------------------------------------- lifecycle (event loop)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wake = asyncio.Event()
        self._supervisor = self._loop.create_task(self._supervise(), name="mqtt-supervisor")

    def request_reconnect(self) -> None:
        """Reconnect so the broker redelivers the QoS 1 messages we left unacknowledged (store was full)."""
        self._reconnect_requested = True
        if self._wake is not None:
            self._wake.set()

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
        pubacks = [mid for mid, qos in acks if qos == 1]
        if pubacks:
            blob = b"".join([b"\x40\x02" + mid.to_bytes(2, "big") for mid in pubacks])
            self._client._packet_queue(paho.PUBACK, blob, 0, 0)
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
                    delay = backoff_delay(attempt, self._settings.reconnect_min_s,
                                          self._settings.reconnect_max_s, self._rng)
                    attempt += 1
                    log.info("mqtt_reconnect_wait", seconds=round(delay, 2), attempt=attempt)
                    await self._wait_out(delay)
                    continue
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
                log.warning("mqtt_connect_failed", host=self._settings.host, port=self._settings.port,
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
        properties: Properties | None = None
        if self._v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = self._settings.session_expiry_s
            properties.ReceiveMaximum = self._settings.receive_maximum
        # Set before connecting: the event loop may read the CONNACK (and clear this) before connect() returns.
        self._awaiting_connack = True
        try:
            self._client.connect(
                self._settings.host,
                self._settings.port,
                keepalive=self._settings.keepalive_s,
                clean_start=False if self._v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
                properties=properties,
            )
        except (OSError, ssl.SSLError, ValueError) as exc:
            self._awaiting_connack = False
            message = explain_connect_error(exc, self._settings)
            if message != self._last_refusal:
                log.warning("mqtt_connect_failed", host=self._settings.host, port=self._settings.port,
                            error=message)
                self._last_refusal = message
            return False
        return True

    def _refused_before_connack(self) -> None:
        # With TLS 1.3 the broker checks our certificate after the handshake looks complete to us, so a
        # refused certificate shows up only as a connection closed before any CONNACK.
        detail = "the broker closed the connection before accepting it"
        if self._settings.tls.cert_file:
            detail += "; check that it accepts this agent's certificate (EDGE_AGENT_MQTT__TLS__CERT_FILE)"
        if detail != self._last_refusal:
            log.error("mqtt_connect_failed", host=self._settings.host, port=self._settings.port, error=detail)
            self._last_refusal = detail

    def _lose_socket(self) -> None:
        """Give up on the current socket without a DISCONNECT (it is broken or the broker never answered)."""
        self._client._sock_close()  # paho's own teardown: socket callbacks, then close
        self._connection_ended()

    @property
    def last_connect_error(self) -> str | None:
        """Why the latest attempt to connect failed; None once the broker has accepted a connection."""
        return self._last_refusal

    def _connection_ended(self) -> None:
        if self._awaiting_connack and not self._dropping:
            self._refused_before_connack()
        self._awaiting_connack = False
        if not self._dropping and not self._stopping:
            self._lost = True
        self._dropping = False
        self._subscribing.clear()
        self.subscriptions = {}
        self.subscribed.clear()
        self.connected.clear()
        self._poke()

    def pause_reading(self, paused: bool) -> None:
        """Stop (or resume) reading from the broker; TCP then holds back its messages."""
        self._reading_paused = self._client.hold_reads = paused
        assert self._loop is not None
        if not paused and self._reader_fd < 0:
            sock = self._client.socket()
            if sock is not None:
                self._watch(sock)
                self._loop.call_soon(self._readable)  # bytes already buffered raise no event
        elif paused and self._reader_fd >= 0:
            self._loop.remove_reader(self._reader_fd)
            self._reader_fd = -1

    # ----------------------------------------------------------------- socket plumbing (event loop)

    def _on_loop(self, fn: Callable[[], None]) -> None:
        assert self._loop is not None
        if threading.get_ident() == self._loop_thread:
            fn()
        else:  # the connect in its worker thread
            self._loop.call_soon_threadsafe(fn)

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(lambda: self._watch(sock))

    def _watch(self, sock: Any) -> None:
        assert self._loop is not None
        current = self._client.socket()
        if current is None or current is not sock or self._reader_fd >= 0 or self._reading_paused:
            return  # closed again meanwhile, already watched, or paused
        self._reader_fd = current.fileno()
        self._loop.add_reader(self._reader_fd, self._readable)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # By descriptor, since paho closes the socket as soon as this returns.
        self._on_loop(self._unwatch)

    def _unwatch(self) -> None:
        assert self._loop is not None
        if self._reader_fd >= 0:
            self._loop.remove_reader(self._reader_fd)
            self._reader_fd = -1
        if self._writer_fd >= 0:
            self._loop.remove_writer(self._writer_fd)
            self._writer_fd = -1

    def _on_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # Write on the loop's next turn: every packet queued until then goes out in the same pass.
        if not self._flush_scheduled:
            self._flush_scheduled = True
            assert self._loop is not None
            if threading.get_ident() == self._loop_thread:
                self._loop.call_soon(self._flush)
            else:
                self._loop.call_soon_threadsafe(self._flush)

    def _on_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self._writer_fd >= 0:
            self._on_loop(self._stop_writing)

    def _stop_writing(self) -> None:
        if self._writer_fd >= 0:
            assert self._loop is not None
            self._loop.remove_writer(self._writer_fd)
            self._writer_fd = -1

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._write()

    def _write(self) -> None:
        client = self._client
        if client.socket() is None:
            return
        try:
            client.loop_write()
        except Exception as exc:  # noqa: BLE001 - paho raises on some socket errors; the loop must go on
            log.warning("mqtt_write_error", error=repr(exc))
            self._lose_socket()
            return
        sock = client.socket()
        if sock is not None and client.want_write() and self._writer_fd < 0:
            # The socket's buffer is full: wait until it drains.
            assert self._loop is not None
            self._writer_fd = sock.fileno()
            self._loop.add_writer(self._writer_fd, self._write)

    def _readable(self) -> None:
        client = self._client
        try:
            if not client.read_burst(READ_BUDGET):
                return
        except Exception as exc:  # noqa: BLE001 - paho raises on some socket errors; the loop must go on
            log.warning("mqtt_loop_error", error=repr(exc))
            if client.socket() is not None:
                self._lose_socket()
            return
        # More is buffered (select() cannot see it): continue after the loop's other work, so commits, acks
        # and results keep pace with a broker that pushes a whole queued session at once.
        assert self._loop is not None
        self._loop.call_soon(self._readable)

    # ----------------------------------------------------------------- paho callbacks (event loop)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Properties | None) -> None:
        try:
            self._awaiting_connack = False
            if reason.is_failure:
                text = str(reason)
                if text != self._last_refusal:
                    log.error("mqtt_connect_refused", reason=text, host=self._settings.host)
                    self._last_refusal = text
                return
            self._last_refusal = None
            session_present = bool(getattr(flags, "session_present", False))
            if properties is not None and hasattr(properties, "ReceiveMaximum"):
                self.server_receive_maximum = int(properties.ReceiveMaximum)
            self._subscribe_all(session_present)
            client.publish(status_topic(self._agent_id), b"online", qos=1, retain=True)
            self.connected.set()
            log.info("mqtt_connected", host=self._settings.host, port=self._settings.port,
                     session_present=session_present, protocol=self._settings.protocol)
            self._on_connected_cb(session_present)
        except Exception:
            log.exception("callback_failed", callback="on_connect")

    @property
    def subscribe_pending(self) -> bool:
        """A SUBSCRIBE of this connection still waits for the broker's SUBACK."""
        return bool(self._subscribing)

    def set_subscriptions(self, topic_filters: Sequence[tuple[str, int]], unsubscribe: Sequence[str]) -> None:
        """New routes (SIGHUP): subscribe now when connected, and after every later CONNACK."""
        if self._leaving is not None:
            return  # a member that is leaving never subscribes again
        self._filters = list(topic_filters)
        self._unsubscribe = list(unsubscribe)
        if self.connected.is_set():
            self._subscribe_all(session_present=True)

    def leave(self) -> None:
        """Unsubscribe every filter now (or at the next CONNACK) and never subscribe again; ``left`` is set once
        the broker confirms. Messages the session already holds keep coming: Mosquitto delivers a session's
        queue after an UNSUBSCRIBE, and the other members of a shared group get everything published after it."""
        if self._leaving is not None:
            return
        self._leaving = [f for f, _ in self._filters] + self._unsubscribe
        self._filters, self._unsubscribe = [], []
        if not self._leaving:
            self.left.set()  # subscribed to nothing
        elif self.connected.is_set():
            self._subscribe_all(session_present=True)

    async def end_session(self, timeout_s: float) -> bool:
        """After ``stop``: discard this client id's session at the broker, by connecting once with a clean
        start (3.1.1: clean session) and no session expiry, then disconnecting. True once the broker accepted."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self._clean_connect, timeout_s)

    def _clean_connect(self, timeout_s: float) -> bool:
        s = self._settings
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self._client_id,
                             protocol=paho.MQTTv5 if self._v5 else paho.MQTTv311,
                             clean_session=None if self._v5 else True)
        _authenticate(client, s)
        accepted = threading.Event()
        answered = threading.Event()

        def on_connect(c: paho.Client, u: Any, f: Any, reason: ReasonCode, p: Properties | None) -> None:
            if not reason.is_failure:
                accepted.set()
            answered.set()

        client.on_connect = on_connect
        try:
            # 3.1.1 has clean_session (above) and refuses clean_start.
            client.connect(s.host, s.port, keepalive=s.keepalive_s,
                           clean_start=True if self._v5 else paho.MQTT_CLEAN_START_FIRST_ONLY)
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.error("mqtt_end_session_failed", error=explain_connect_error(exc, s))
            return False
        client.loop_start()
        try:
            answered.wait(timeout_s)
            if accepted.is_set():
                client.disconnect()
        finally:
            client.loop_stop()
        return accepted.is_set()

    def _subscribe_all(self, session_present: bool) -> None:
        group = self._settings.shared_group
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
        self.subscriptions = {full: "pending" for full, _ in subscriptions}
        if subscriptions:
            _, mid = self._client.subscribe(subscriptions)
            if mid is not None:  # None: paho refused it (not connected); the next CONNACK subscribes again
                self._subscribing[mid] = [full for full, _ in subscriptions]
        else:
            self.subscribed.set()  # a leaving member: nothing to wait for

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reason_codes: list[ReasonCode],
                      properties: Properties | None) -> None:
        try:
            self.subscribed.set()  # answered, refusals included: those are logged, and waiting would not help
            filters = self._subscribing.pop(mid, None) or ["?"] * len(reason_codes)
            pairs = list(zip(filters, reason_codes, strict=False))
            for topic_filter, code in pairs:
                if topic_filter in self.subscriptions:
                    self.subscriptions[topic_filter] = f"refused: {code}" if code.is_failure else "subscribed"
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

    def _on_unsubscribe(self, client: paho.Client, userdata: Any, mid: int, reason_codes: list[ReasonCode],
                        properties: Properties | None) -> None:
        try:
            if self._leave_mid is not None and mid == self._leave_mid:
                # "No subscription existed" (MQTT 5) is as good: the broker holds no subscription of ours.
                self.left.set()
                log.info("mqtt_unsubscribed", reasons=sorted({str(code) for code in reason_codes}))
        except Exception:
            log.exception("callback_failed", callback="on_unsubscribe")

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Properties | None) -> None:
        try:
            if self.connected.is_set() and not self._stopping and not self._dropping:
                log.warning("mqtt_connection_lost", reason=str(reason))
            self._connection_ended()
        except Exception:
            log.exception("callback_failed", callback="on_disconnect")

    def _inbound(self, topic: bytes, payload: bytes, qos: int, mid: int, dup: bool) -> None:
        try:
            try:
                text = topic.decode()
            except UnicodeDecodeError:
                # MQTT forbids it and brokers reject it; if one slips through, it cannot be routed or replied to.
                log.error("mqtt_topic_not_utf8", raw=repr(topic[:200]))
                self.ack(mid, qos)
                return
            self._on_message_cb(InboundMessage(text, payload, qos, mid, dup, time.time()))
        except Exception:
            log.exception("callback_failed", callback="on_message")

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        """QoS 2 messages, which take paho's own path."""
        try:
            try:
                topic = message.topic
            except UnicodeDecodeError:
                # MQTT forbids it and brokers reject it; if one slips through, it cannot be routed or replied to.
                log.error("mqtt_topic_not_utf8", raw=repr(message._topic[:200]))
                self.ack(message.mid, message.qos)
                return
            self._on_message_cb(
                InboundMessage(topic, bytes(message.payload), message.qos, message.mid, bool(message.dup), time.time())
            )
        except Exception:
            log.exception("callback_failed", callback="on_message")

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

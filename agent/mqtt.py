"""The one paho-mqtt client: connect, reconnect with backoff and jitter, subscribe, manual ack, publish.

paho's network I/O runs in one thread of ours (``MqttLink``) rather than ``loop_start()``, because paho's own
reconnect loop has no jitter (a fleet of gateways would reconnect in lock-step after a broker restart) and we
want the thread's liveness for the systemd watchdog. Every paho callback catches everything: an exception
escaping a callback would kill the network thread (thingsboard-gateway #2086).
"""

from __future__ import annotations

import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.config import MqttSettings
from agent.errors import ConfigError
from agent.telemetry import get_logger

log = get_logger(__name__)


class InboundMessage(NamedTuple):
    """A device message as paho handed it over (NamedTuple: cheapest immutable value on the hot path)."""

    topic: str
    payload: bytes
    qos: int
    mid: int
    dup: bool
    received_at: float  # wall clock, for dead letters and the latency figures


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


class MqttLink:
    """Owns the paho client and its network thread.

    ``on_message`` and ``on_puback`` run on the network thread and must be quick; ``on_connected`` too.
    ``ack`` and ``publish`` may be called from any thread (paho queues the packet and wakes our select()).
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
        self._filters = list(topic_filters)
        self._on_message_cb = on_message
        self._on_puback_cb = on_puback
        self._on_connected_cb = on_connected
        # Filters our persistent session may still hold from earlier routes; dropped at the next CONNACK.
        self._unsubscribe = list(unsubscribe)
        self._rng = random.Random()
        self._stop = threading.Event()
        self._reconnect_requested = threading.Event()
        self._thread: threading.Thread | None = None
        self.connected = threading.Event()
        self.heartbeat = time.monotonic()  # refreshed by every pass of the network loop (watchdog)
        self.server_receive_maximum = 65535
        self._v5 = settings.protocol == "5"
        self._last_refusal: str | None = None
        self._awaiting_connack = False

        protocol = paho.MQTTv5 if self._v5 else paho.MQTTv311
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            # 3.1.1: a persistent session; MQTT 5 uses clean_start=False plus a session expiry on connect.
            clean_session=None if self._v5 else False,
            manual_ack=True,
            reconnect_on_failure=False,
        )
        # We bound the results awaiting PUBACK ourselves; paho's limit costs O(in-flight) per PUBACK (STYLE.md).
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        if settings.username:
            password = settings.password.get_secret_value() if settings.password else None
            client.username_pw_set(settings.username, password)
        if settings.tls.enabled:
            client.tls_set_context(tls_context(settings))
        client.will_set(status_topic(agent_id), b"offline", qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        self._client = client

    # ----------------------------------------------------------------- lifecycle (any thread)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mqtt-network", daemon=True)
        # paho writes queued packets from the calling thread when it thinks no network thread exists, which
        # would race with ours; naming our thread as its network thread makes publish()/ack() only wake it.
        self._client._thread = self._thread
        self._thread.start()

    def request_reconnect(self) -> None:
        """Reconnect so the broker redelivers the QoS 1 messages we left unacknowledged (store was full)."""
        self._reconnect_requested.set()

    def alive(self, within_s: float) -> bool:
        return self._thread is not None and self._thread.is_alive() and (
            time.monotonic() - self.heartbeat < within_s
        )

    def stop(self, timeout_s: float) -> None:
        """Publish the retained ``offline`` status (waiting for its PUBACK), disconnect, end the thread."""
        if self._thread is None:
            return
        if self.connected.is_set():
            info = self._client.publish(status_topic(self._agent_id), b"offline", qos=1, retain=True)
            deadline = time.monotonic() + min(timeout_s, 5.0)
            while not info.is_published() and time.monotonic() < deadline and self.connected.is_set():
                time.sleep(0.01)
        self._stop.set()
        self._thread.join(timeout=timeout_s)
        self._thread = None

    # ----------------------------------------------------------------- any thread

    def ack(self, mid: int, qos: int) -> None:
        if qos > 0:
            self._client.ack(mid, qos)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int | None:
        """Queue a publish; returns its mid, or None when paho did not take it (caller retries later).

        While disconnected paho keeps QoS 1 messages and sends them after the next CONNACK (``NO_CONN``).
        """
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            return int(info.mid)
        log.warning("publish_refused", topic=topic, rc=paho.error_string(info.rc))
        return None

    # ----------------------------------------------------------------- network thread

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            if not self.connected.is_set() and not self._connecting() and not self._try_connect():
                delay = backoff_delay(attempt, self._settings.reconnect_min_s,
                                      self._settings.reconnect_max_s, self._rng)
                attempt += 1
                log.info("mqtt_reconnect_wait", seconds=round(delay, 2), attempt=attempt)
                self._sleep(delay)
                continue
            if self.connected.is_set():
                attempt = 0
            if self._reconnect_requested.is_set():
                self._reconnect_requested.clear()
                log.info("mqtt_reconnect_for_redelivery")
                self._drop_connection()
                continue
            try:
                rc = self._client.loop(timeout=0.5)
            except Exception as exc:  # noqa: BLE001 - paho raises on some socket errors; the thread must live
                log.warning("mqtt_loop_error", error=repr(exc))
                rc = MQTTErrorCode.MQTT_ERR_CONN_LOST
            if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN):
                if self.connected.is_set():
                    log.warning("mqtt_connection_lost", rc=paho.error_string(rc))
                elif self._awaiting_connack:
                    self._refused_before_connack()
                self._awaiting_connack = False
                self._mark_disconnected()
                delay = backoff_delay(attempt, self._settings.reconnect_min_s,
                                      self._settings.reconnect_max_s, self._rng)
                attempt += 1
                self._sleep(delay)
        self._disconnect_cleanly()

    def _connecting(self) -> bool:
        # Between CONNECT and CONNACK the socket exists but we are not connected yet.
        return self._client.socket() is not None and not self.connected.is_set()

    def _try_connect(self) -> bool:
        properties: Properties | None = None
        if self._v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = self._settings.session_expiry_s
            properties.ReceiveMaximum = self._settings.receive_maximum
        try:
            self._client.connect(
                self._settings.host,
                self._settings.port,
                keepalive=self._settings.keepalive_s,
                clean_start=False if self._v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
                properties=properties,
            )
        except (OSError, ssl.SSLError, ValueError) as exc:
            message = explain_connect_error(exc, self._settings)
            if message != self._last_refusal:
                log.warning("mqtt_connect_failed", host=self._settings.host, port=self._settings.port,
                            error=message)
                self._last_refusal = message
            return False
        self._awaiting_connack = True
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

    def _drop_connection(self) -> None:
        # We own the network thread, so reconnecting here cannot race paho's socket handling.
        self._mark_disconnected()
        try:
            self._client.reconnect()
        except (OSError, ssl.SSLError) as exc:
            log.warning("mqtt_connect_failed", host=self._settings.host, port=self._settings.port,
                        error=f"{type(exc).__name__}: {exc}")

    def _mark_disconnected(self) -> None:
        self.connected.clear()

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stop.is_set() and not self._reconnect_requested.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self.heartbeat = time.monotonic()
            self._stop.wait(min(remaining, 0.5))

    def _disconnect_cleanly(self) -> None:
        try:
            self._client.disconnect()
            # Let paho flush the DISCONNECT packet.
            for _ in range(5):
                if self._client.loop(timeout=0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
        except Exception as exc:  # noqa: BLE001 - best effort on the way out
            log.debug("mqtt_disconnect_error", error=repr(exc))
        self.connected.clear()

    # ----------------------------------------------------------------- paho callbacks (network thread)

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

    def set_subscriptions(self, topic_filters: Sequence[tuple[str, int]], unsubscribe: Sequence[str]) -> None:
        """New routes (SIGHUP): subscribe now when connected, and after every later CONNACK."""
        self._filters = list(topic_filters)
        self._unsubscribe = list(unsubscribe)
        if self.connected.is_set():
            self._subscribe_all(session_present=True)

    def _subscribe_all(self, session_present: bool) -> None:
        group = self._settings.shared_group
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
        self._client.subscribe(subscriptions)

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reason_codes: list[ReasonCode],
                      properties: Properties | None) -> None:
        try:
            failed = [str(code) for code in reason_codes if code.is_failure]
            if failed:
                log.error("mqtt_subscribe_refused", reasons=failed)
        except Exception:
            log.exception("callback_failed", callback="on_subscribe")

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Properties | None) -> None:
        try:
            if not self._stop.is_set():
                log.warning("mqtt_disconnected", reason=str(reason))
            self._mark_disconnected()
        except Exception:
            log.exception("callback_failed", callback="on_disconnect")

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
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

"""The archive query over MQTT 5 request/response: ``edge/<agent_id>/archive/query``.

A request is a JSON object ``{"route": FILTER, "from": T1, "to": T2}`` (Unix seconds; ``from`` defaults to the
beginning, ``to`` to now) published with a Response Topic and, usually, Correlation Data. The answer is a series
of messages on the response topic, each carrying the request's correlation data and a JSON object: ``seq`` (0,
1, …), ``messages`` (each ``topic``, ``received_at``, ``task_id``, ``payload`` as in `edge-agent archive query`),
``done`` (true on the last) and, on the last, ``count``; or ``error`` with ``done``. Each message stays under
``EDGE_AGENT_ARCHIVE__QUERY_CHUNK_BYTES`` unless one archived message alone is larger.

It runs on an MQTT 5 connection of its own, paho's loop on a thread of its own that reconnects with backoff and
moves to the next broker of ``EDGE_AGENT_MQTT__HOSTS`` after a failed connect, and answers one query at a time on
a worker thread (a query may read segments from cloud storage for seconds): the agent's own link and event loop
never wait for it. Each chunk is published at QoS 1 and the next waits for its PUBACK, so a large answer is held
in memory one chunk at a time.
"""

from __future__ import annotations

import contextlib
import json
import queue
import random
import threading
import time
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.archive.cli import as_json
from agent.archive.query import Query, Reader
from agent.backoff import compute_backoff
from agent.mqtt.tls import authenticate
from agent.telemetry import get_logger

if TYPE_CHECKING:
    from agent.config import Settings

log = get_logger(__name__)

WAITING_MAX = 8  # queries waiting for the worker; more are answered "busy"
PUBLISH_TIMEOUT_S = 60.0


def query_topic(agent_id: str) -> str:
    return f"edge/{agent_id}/archive/query"


class Responder:
    def __init__(self, settings: Settings, reader: Reader) -> None:
        self._settings = settings
        self._reader = reader
        self.topic = query_topic(settings.agent_id)
        self._chunk = settings.archive.query_chunk_bytes
        self._queue: queue.Queue[tuple[str, bytes | None, bytes] | None] = queue.Queue(WAITING_MAX)
        self.answered = 0
        self.failed = 0
        self.subscribed = threading.Event()
        # Reconnects are ours (_network): after a lost connection the next broker of EDGE_AGENT_MQTT__HOSTS is
        # tried, as the agent's own link fails over.
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{settings.client_id}-archive",
                             protocol=paho.MQTTv5, reconnect_on_failure=False)
        authenticate(client, settings.mqtt)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self._client = client
        self._worker = threading.Thread(target=self._work, name="archive-query", daemon=True)
        self._network_thread = threading.Thread(target=self._network, name="archive-query-mqtt", daemon=True)
        self._stopping = threading.Event()

    def start(self) -> None:
        self._network_thread.start()
        self._worker.start()

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self._client.disconnect()  # loop_forever returns
        self._network_thread.join(5)
        self._worker.join(5)

    def _network(self) -> None:
        """Connect to the brokers in turn, run paho's loop while connected, back off between attempts."""
        s = self._settings.mqtt
        nodes, turn, attempt = s.nodes, 0, 0
        while not self._stopping.is_set():
            node = nodes[turn % len(nodes)]
            try:
                self._client.connect(node.host, node.port, keepalive=s.keepalive_s, clean_start=True)
                attempt = 0
                self._client.loop_forever()  # until the connection ends (reconnect_on_failure is off)
            except (OSError, ValueError) as exc:
                log.debug("archive_query_connect_failed", node=f"{node.host}:{node.port}", error=str(exc))
                turn += 1
            except Exception:
                log.exception("archive_query_connection_failed")
                turn += 1
            self.subscribed.clear()
            attempt += 1
            # The agent's one backoff, jittered like the link's, so a fleet's query connections do not stampede.
            if self._stopping.wait(compute_backoff(attempt, s.reconnect_min_s, s.reconnect_max_s, random.random())):
                break

    # ------------------------------------------------------------------ paho's thread

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Properties | None) -> None:
        try:
            if reason.is_failure:
                log.warning("archive_query_connect_refused", reason=str(reason))
                return
            client.subscribe(self.topic, qos=1)
        except Exception:
            log.exception("archive_query_callback_failed")  # never let an exception unwind paho's loop

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: list[ReasonCode],
                      properties: Properties | None) -> None:
        self.subscribed.set()
        log.info("archive_query_subscribed", topic=self.topic)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            props = msg.properties
            response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
            correlation = getattr(props, "CorrelationData", None) if props is not None else None
            if not response_topic:
                log.warning("archive_query_without_response_topic", topic=msg.topic)
                return
            try:
                self._queue.put_nowait((str(response_topic), correlation, bytes(msg.payload)))
            except queue.Full:
                self._publish(response_topic, correlation, {"seq": 0, "error": "busy: too many queries waiting",
                                                            "done": True}, wait=False)
        except Exception:
            log.exception("archive_query_callback_failed")

    # ------------------------------------------------------------------ the worker

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            response_topic, correlation, body = item
            try:
                self._answer(response_topic, correlation, body)
            except Exception as exc:  # noqa: BLE001 - the connection went while answering: the asker times out
                self.failed += 1
                log.warning("archive_query_failed", error=str(exc))

    def _answer(self, response_topic: str, correlation: bytes | None, body: bytes) -> None:
        try:
            request = json.loads(body)
            q = Query(str(request["route"]), float(request.get("from", 0.0)),
                      float(request.get("to", time.time())))
        except (ValueError, KeyError, TypeError) as exc:
            self._publish(response_topic, correlation, {
                "seq": 0, "error": f"bad request: {exc}; expected {{\"route\": FILTER, \"from\": T1, \"to\": T2}}",
                "done": True})
            return
        seq = count = size = 0
        batch: list[dict[str, Any]] = []
        started = time.monotonic()
        try:
            for record in self._reader.query(q):
                item = as_json(record)
                item_size = len(json.dumps(item)) + 2
                if batch and size + item_size > self._chunk - 64:  # 64: the envelope around the messages
                    self._publish(response_topic, correlation, {"seq": seq, "messages": batch, "done": False})
                    seq, batch, size = seq + 1, [], 0
                batch.append(item)
                size += item_size
                count += 1
        except Exception as exc:  # noqa: BLE001 - a segment unreadable now (cloud, checksum): said in the answer
            # What was sent stands; the last message says the answer is incomplete and why.
            self.failed += 1
            log.warning("archive_query_failed", route=q.topic_filter, error=str(exc), after=count)
            self._publish(response_topic, correlation, {"seq": seq, "messages": batch, "done": True,
                                                        "count": count, "error": str(exc)})
            return
        self._publish(response_topic, correlation, {"seq": seq, "messages": batch, "done": True, "count": count})
        self.answered += 1
        log.info("archive_query_answered", route=q.topic_filter, messages=count, chunks=seq + 1,
                 seconds=round(time.monotonic() - started, 3))

    def _publish(self, topic: str, correlation: bytes | None, answer: dict[str, Any], wait: bool = True) -> None:
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if correlation is not None:
            properties.CorrelationData = correlation
        properties.ContentType = "application/json"
        info = self._client.publish(topic, json.dumps(answer).encode(), qos=1, properties=properties)
        if wait:
            info.wait_for_publish(PUBLISH_TIMEOUT_S)

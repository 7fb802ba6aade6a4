"""Devices and a results consumer that fail over between a cluster's nodes, and the fleet's accounting.

A device publishes QoS 1 readings with its own sequence number at a steady pace; when its node goes away it
moves to the next node of its list and paho sends again, with DUP, what the lost node had not acknowledged.
Such a message may already be in the cluster (the node queued it and died before its PUBACK left): it is then
there twice, a second message with the same sequence, which the agent cannot tell from a new one. The device
notes those sequences (``resent``), and the accounting allows them a second ``task_id``, and only them.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from support import wait_for

TOPIC = "city/{district}/traffic/{device}/data"


class FailoverClient:
    """A paho client with a persistent session (MQTT 3.1.1) that moves to the next node when its node is lost."""

    def __init__(self, nodes: Sequence[str], client_id: str) -> None:
        self.nodes = list(nodes)
        self._at = 0
        self.moves = 0
        self.client_id = client_id
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311,
                                  clean_session=False)
        self.client.max_inflight_messages_set(100)
        self.client.reconnect_delay_set(0.1, 1.0)
        self.client.on_disconnect = self._next_node
        self.client.on_connect_fail = self._next_node

    def _next_node(self, *args: Any) -> None:
        # From paho's loop thread, whose reconnect then goes to the node set here (the session is kept).
        self._at = (self._at + 1) % len(self.nodes)
        self.moves += 1
        host, port = self.nodes[self._at].rsplit(":", 1)
        self.client.connect_async(host, int(port))

    def connect(self) -> None:
        host, port = self.nodes[0].rsplit(":", 1)
        self.client.connect(host, int(port))
        self.client.loop_start()
        wait_for(self.client.is_connected, 15, "a connection to the cluster")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Device(FailoverClient):
    """Publishes ``{"seq": n, …}`` on its topic at ``rate`` per second from a thread of its own (``start``)."""

    def __init__(self, nodes: Sequence[str], district: str, name: str, rate: float) -> None:
        super().__init__(nodes, f"device-{name}-{uuid.uuid4().hex[:6]}")
        self.topic = TOPIC.format(district=district, device=name)
        self.rate = rate
        self.count = 0
        self.resent: set[int] = set()  # in flight when a connection was lost: paho publishes them again
        # PUBACKs by packet id, and per packet id the sequences published under it, oldest first. (paho's
        # MQTTMessageInfo cannot say: one published while disconnected reports an error though it is queued.)
        self._acks: Counter[int] = Counter()
        self._seqs: dict[int, list[int]] = defaultdict(list)
        self._lock = threading.Lock()  # never held while calling paho, which calls on_publish with its own held
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"device-{name}")
        self.client.on_disconnect = self._lost
        self.client.on_publish = self._on_publish

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        with self._lock:
            self._acks[mid] += 1

    def unacknowledged(self) -> set[int]:
        with self._lock:
            return {seq for mid, seqs in self._seqs.items() for seq in seqs[self._acks[mid]:]}

    def _lost(self, *args: Any) -> None:
        self.resent |= self.unacknowledged()
        self._next_node()

    def start(self) -> None:
        self.connect()
        self._thread.start()

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            seq = self.count
            body = {"seq": seq, "vehicleCount": seq % 37, "avgSpeed": 40 + seq % 23, "status": "OK"}
            info = self.client.publish(self.topic, json.dumps(body), qos=1)  # kept by paho while disconnected
            with self._lock:
                self._seqs[info.mid].append(seq)
            self.count = seq + 1
            self._stop.wait(max(0.0, start + self.count / self.rate - time.monotonic()))  # the device's pace

    def stop(self, timeout: float = 60) -> None:
        """Stop publishing and wait until the cluster has acknowledged everything this device sent."""
        self._stop.set()
        self._thread.join(10)
        wait_for(lambda: not self.unacknowledged(), timeout,
                 f"the cluster to acknowledge every message of {self.topic}", interval=0.2)
        self.close()


class Results(FailoverClient):
    """A consumer of every agent's results (``edge/+/results/#``) on a persistent session, kept by (topic, seq)."""

    def __init__(self, nodes: Sequence[str]) -> None:
        super().__init__(nodes, f"consumer-{uuid.uuid4().hex[:6]}")
        self.task_ids: dict[tuple[str, int], set[str]] = defaultdict(set)
        self.received = 0
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("edge/+/results/#", qos=1)
        self.client.on_subscribe = lambda c, u, mid, codes, p: subscribed.set()
        self.client.on_message = self._on_message
        self.connect()
        wait_for(subscribed.is_set, 15, "the consumer's subscription")

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        device_topic = msg.topic.split("/", 3)[3]
        body = json.loads(msg.payload)
        with self._lock:
            self.received += 1
            self.task_ids[(device_topic, int(body["result"]["fields"]["seq"]["value"]))].add(body["task_id"])

    def snapshot(self) -> dict[tuple[str, int], set[str]]:
        with self._lock:
            return {key: set(ids) for key, ids in self.task_ids.items()}

    def close(self) -> None:
        """Disconnect and end the session: otherwise the cluster keeps queueing every later result for it."""
        super().close()
        ender = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=paho.MQTTv311,
                            clean_session=True)
        for node in self.nodes:
            host, port = node.rsplit(":", 1)
            with contextlib.suppress(OSError):
                ender.connect(host, int(port))
                ender.loop_start()
                wait_for(ender.is_connected, 10, "a clean-session connection")
                ender.loop_stop()
                ender.disconnect()
                return


@dataclass
class Accounting:
    """Every message the devices published against the results: what is missing, what ran twice."""

    published: int = 0
    missing: list[tuple[str, int]] = field(default_factory=list)
    two_task_ids: list[tuple[str, int]] = field(default_factory=list)  # not explained by a device's resend
    device_resends: int = 0  # sequences a device published again after losing its node
    resends_run_twice: int = 0  # of those, how many the cluster held twice (two task_ids, allowed)

    @property
    def exact(self) -> bool:
        return not self.missing and not self.two_task_ids

    def __str__(self) -> str:
        return (f"{self.published} published, {len(self.missing)} missing {self.missing[:10]}, "
                f"{len(self.two_task_ids)} with two task_ids {self.two_task_ids[:10]}; device resends "
                f"{self.device_resends}, of which run twice {self.resends_run_twice}")


def account(devices: Sequence[Device], results: Results) -> Accounting:
    got = results.snapshot()
    out = Accounting()
    for device in devices:
        out.device_resends += len(device.resent)
        for seq in range(device.count):
            out.published += 1
            ids = got.get((device.topic, seq), set())
            if not ids:
                out.missing.append((device.topic, seq))
            elif len(ids) > 1:
                if seq in device.resent:
                    out.resends_run_twice += 1
                else:
                    out.two_task_ids.append((device.topic, seq))
    return out


def wait_accounted(devices: Sequence[Device], results: Results, timeout: float) -> Accounting:
    """Wait until every published message has a result (or ``timeout``), then account."""
    with contextlib.suppress(AssertionError):  # the accounting says what is missing
        wait_for(lambda: not account(devices, results).missing, timeout, "a result for every message", interval=0.5)
    return account(devices, results)

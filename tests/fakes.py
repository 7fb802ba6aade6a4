"""Stand-ins for the daemon's boundaries, to build the real ``Daemon`` in-process (agent/daemon.py).

``FakeBroker`` is the broker and the MQTT link in one: pass ``broker.link`` as ``Daemon(..., link=...)``. It
records every publish and acknowledgement, pushes device messages queued by ``publish`` as a broker does (a burst
a loop turn, at most the Receive Maximum unacknowledged, none while the agent pauses reading) and acknowledges
each publish (PUBACK) on the loop's next turn unless ``ack_publishes`` is off. It satisfies ``agent.mqtt.Link``.

``StalledCloud`` (an ``agent.cloud.Cloud`` whose submissions hang until the test lets them answer) and
``GatedPool`` (the worker pool, running heavy tasks only once the test opens its gate) make the timing of hedges
and late binding the test's to choose: no real cloud or pool can be held at a chosen moment.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from agent.cloud import CircuitState
from agent.cloud._client import CloudResult, LeaseSnapshot
from agent.config import BrokerNode
from agent.daemon import Daemon
from agent.executor import LocalExecutor
from agent.mqtt.link import InboundMessage
from agent.tasks import default_registry

if TYPE_CHECKING:
    from agent.config import MqttSettings
    from agent.metrics import AgentCollector
    from agent.mqtt.wire import Outgoing


class FakeBroker:
    def __init__(self, *, ack_publishes: bool = True) -> None:
        self.ack_publishes = ack_publishes
        self.published: list[tuple[str, bytes]] = []  # (topic, payload) of each result or dead letter, in order
        self.acks: list[tuple[int, int]] = []  # (mid, qos) of each device message acknowledged
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.left = threading.Event()
        self.server_receive_maximum = 65535
        self.subscribe_pending = False
        self.subscriptions: dict[str, str] = {}
        self.last_connect_error: str | None = None
        self.node = BrokerNode("broker.invalid", 1883)
        self.nodes = (self.node,)
        self.failovers = 0
        self.session_present: bool | None = None
        self._next_in = 0
        self._queued: deque[tuple[str, bytes, int]] = deque()
        self._unacked: set[int] = set()
        self._paused = False
        self._receive_maximum = 65535
        self._pushing = False
        self._next_out = 0
        self._on_message: Callable[[InboundMessage], None] | None = None
        self._on_puback: Callable[[int], None] = lambda mid: None
        self._on_connected: Callable[[bool], None] = lambda session_present: None
        self._loop: asyncio.AbstractEventLoop | None = None

    def link(self, settings: MqttSettings, *, client_id: str, agent_id: str,
             topic_filters: Sequence[tuple[str, int]], on_message: Callable[[InboundMessage], None],
             on_puback: Callable[[int], None], on_connected: Callable[[bool], None] = lambda sp: None,
             unsubscribe: Sequence[str] = ()) -> FakeBroker:
        """The ``LinkFactory``: the daemon hands its callbacks over here."""
        self._on_message, self._on_puback, self._on_connected = on_message, on_puback, on_connected
        self._receive_maximum = settings.receive_maximum
        self.subscriptions = {f: "subscribed" for f, _ in topic_filters}
        return self

    # ------------------------------------------------------------------ the test's side

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """A device publishes: the message goes to the agent once the link has started (call it on the loop)."""
        self._queued.append((topic, payload, qos))
        self._push_soon()

    def _push_soon(self) -> None:
        if self._loop is not None and not self._pushing:
            self._pushing = True
            self._loop.call_soon(self._push)

    def _push(self, burst: int = 200) -> None:
        self._pushing = False
        assert self._on_message is not None
        while (self._queued and burst > 0 and not self._paused and self.connected.is_set()
               and len(self._unacked) < self._receive_maximum):
            topic, payload, qos = self._queued.popleft()
            self._next_in += 1
            if qos:
                self._unacked.add(self._next_in)
            self._on_message(InboundMessage(topic, payload, qos, self._next_in, False, time.time()))
            burst -= 1
        if burst == 0 and self._queued:
            self._push_soon()

    # ------------------------------------------------------------------ agent.mqtt.Link

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.connected.set()
        self.subscribed.set()
        self.session_present = False
        self._loop.call_soon(self._on_connected, False)
        self._push_soon()

    async def stop(self, timeout_s: float) -> None:
        self.connected.clear()

    async def end_session(self, timeout_s: float) -> bool:
        return True

    def alive(self, within_s: float) -> bool:
        return True

    def request_reconnect(self) -> None:
        pass

    def pause_reading(self, paused: bool) -> None:
        self._paused = paused
        self._push_soon()

    def ack(self, mid: int, qos: int) -> None:
        self.ack_many([(mid, qos)])

    def ack_many(self, acks: Sequence[tuple[int, int]]) -> None:
        for mid, qos in acks:
            if qos > 0:
                self.acks.append((mid, qos))
                self._unacked.discard(mid)
        self._push_soon()

    def send(self, messages: Sequence[Outgoing], mids: Sequence[int] | None = None) -> list[int]:
        if not self.connected.is_set():
            return []  # as MqttLink: the publisher tries again after the next CONNACK
        sent = []
        for i, message in enumerate(messages):
            self.published.append((message.topic, message.payload))
            if mids is None:
                self._next_out += 1
                sent.append(self._next_out)
            else:
                sent.append(mids[i])
        if self.ack_publishes and self._loop is not None:
            for mid in sent:
                self._loop.call_soon(self._on_puback, mid)
        return sent

    def set_subscriptions(self, topic_filters: Sequence[tuple[str, int]], unsubscribe: Sequence[str]) -> None:
        self.subscriptions = {f: "subscribed" for f, _ in topic_filters}

    def leave(self) -> None:
        self.subscriptions = {}
        self.left.set()

    def describe(self) -> str:
        return "connected" if self.connected.is_set() else "reconnecting"

    def add_metrics(self, collector: AgentCollector) -> None:
        pass



class StalledCloud:
    """Answers a submission only when ``answer`` is set; records submissions and cancellations."""

    def __init__(self) -> None:
        self.answer = asyncio.Event()
        self.submitted: list[str] = []
        self.cancelled: list[str] = []
        self.sees_uploads = False  # as where the kernel's send queue cannot be read
        self.uploaded = asyncio.Event()  # with sees_uploads: the upload ends when this is set
        self.circuit_state = CircuitState.CLOSED

    def circuit_open(self, now: float) -> bool:
        return False

    def prewarm(self) -> None:
        pass

    def lease_status(self) -> LeaseSnapshot:
        return LeaseSnapshot(ready=True, slots=4, provisioning=False)

    def describe(self) -> dict[str, Any]:
        return {}

    async def submit(self, task_id: str, kind: str, payload: bytes,
                     options: Mapping[str, Any] | None = None,
                     on_uploaded: Callable[[], None] | None = None) -> CloudResult:
        self.submitted.append(task_id)
        try:
            if self.sees_uploads:
                await self.uploaded.wait()
                if on_uploaded is not None:
                    on_uploaded()
            await self.answer.wait()
        except asyncio.CancelledError:
            self.cancelled.append(task_id)
            raise
        result, exec_s = LocalExecutor.run_inline(default_registry().get(kind), payload, options or {})
        return CloudResult(task_id, kind, result, exec_s, exec_s + 0.05, 0.01, 1, "lease-1")

    async def aclose(self) -> None:
        pass


class GatedPool:
    """The worker pool, except that a heavy task runs only once ``gate`` is open."""

    workers = 1
    run_inline = staticmethod(LocalExecutor.run_inline)

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.started = 0

    async def warm_up(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    async def run_in_pool(self, kind: str, payload: bytes, options: Mapping[str, Any]) -> tuple[dict[str, Any], float]:
        self.started += 1
        await self.gate.wait()
        return LocalExecutor.run_inline(default_registry().get(kind), payload, options)


async def start(daemon: Daemon, broker: FakeBroker, timeout_s: float = 10.0) -> asyncio.Future[int]:
    """Run the daemon on this loop until its link has started; stop it with ``daemon.request_stop`` and await the
    returned future (the exit status)."""
    running = asyncio.ensure_future(daemon.run())
    deadline = time.monotonic() + timeout_s
    while not broker.connected.is_set():
        if running.done():
            running.result()  # raises what stopped it
            raise AssertionError("the daemon stopped before its link started")
        assert time.monotonic() < deadline, "the daemon's link did not start"
        await asyncio.sleep(0.005)
    return running



if TYPE_CHECKING:  # mypy checks the stand-in against the Protocol the daemon takes
    from agent.cloud import Cloud
    from agent.mqtt import LinkFactory

    _link: LinkFactory = FakeBroker().link
    _cloud: Cloud = StalledCloud()

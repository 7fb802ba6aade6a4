"""The stages between store and broker on real SQLite: spilling to disk and reading back, in order, once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.config import Settings
from agent.decision import Policy
from agent.dispatch import Dispatcher
from agent.egress import Publisher, Sent
from agent.executor import LocalExecutor
from agent.mqtt import InboundMessage, MqttLink
from agent.store import Committed, NewTask, Store
from agent.tasks import default_registry


def task(i: int) -> NewTask:
    body = json.dumps({"seq": i, "speed": 40 + i % 7}).encode()
    return NewTask(f"t{i}", "city/a/traffic/1/data", "sensor.stats", "auto", {"topic": "city/a/traffic/1/data"},
                   body, len(body), 1000.0, None, None)


async def run_pipeline(tmp_path: Path, n: int, *, publish_cap: int, dispatch_cap: int, preload: bool,
                       direct_cap: int | None = None,
                       outbox_rows: list[int] | None = None) -> tuple[list[dict[str, Any]], Store]:
    """Tasks through dispatcher and publisher with a broker stand-in that acknowledges every publish.

    ``direct_cap``: results of light tasks skip the outbox, at most that many waiting for the window (as the
    daemon wires it); ``outbox_rows`` collects how many rows each write to the outbox carried."""
    loop = asyncio.get_running_loop()
    store = Store(tmp_path, max_tasks=100_000, max_bytes=100_000_000)
    published: list[dict[str, Any]] = []
    mids = iter(range(1, 1_000_000))
    boxes: dict[str, Any] = {}

    def send(messages: Sequence[Sent], resend: Sequence[int] | None = None) -> list[int]:
        sent = []
        for i, message in enumerate(messages):
            published.append(json.loads(message.payload))
            sent.append(next(mids) if resend is None else resend[i])
        loop.call_soon(boxes["publisher"].acked, sent)  # the broker's PUBACKs
        return sent

    settings = Settings(state_dir=tmp_path, local={"workers": 1})  # type: ignore[arg-type]
    dispatcher = Dispatcher(agent_id="gw", registry=default_registry(), executor=LocalExecutor(1, settings),
                            store=store, policy=Policy(settings.decision, inline_kinds=["sensor.stats"]),
                            memory_cap_tasks=dispatch_cap)
    publisher = Publisher(store, send, window=7, memory_cap=publish_cap)
    boxes["publisher"] = publisher
    if direct_cap is not None:
        publisher.fresh_cap = direct_cap
        publisher.on_room = dispatcher.connect_publisher(publisher.offer, publisher.room)

    def deliver(committed: Committed) -> None:
        dispatcher.accept(committed.tasks, committed.number)
        publisher.accept(committed.outbox, committed.number)

    if preload:  # as after a restart: everything is already in the store
        store.start(lambda c: None)
        store.ingest([task(i) for i in range(n)], [])
        done = asyncio.Event()
        store.call(lambda: loop.call_soon_threadsafe(done.set))
        await done.wait()
        store.stop()
        store = Store(tmp_path, max_tasks=100_000, max_bytes=100_000_000)
        dispatcher._store = store
        publisher._store = store
    if outbox_rows is not None:
        complete = store.complete
        store.complete = lambda results, *dead: (outbox_rows.append(len(results)), complete(results, *dead))[1]  # type: ignore[method-assign]
    store.start(lambda c: loop.call_soon_threadsafe(deliver, c))
    dispatcher.start(loop)
    publisher.start(loop)
    if not preload:
        for i in range(n):
            store.ingest([task(i)], [])
    for _ in range(2000):
        await asyncio.sleep(0.01)
        if len(published) >= n and publisher.idle() and dispatcher.idle():
            break
    await asyncio.sleep(0.1)
    # Every task the policy was told about has left its queues again.
    snapshot = dispatcher.policy.snapshot(loop.time())
    assert snapshot["inline_tasks"] == 0
    assert snapshot["local_tasks"] == 0
    return published, store


def test_spilled_tasks_and_results_come_back_once_and_in_order(tmp_path: Path) -> None:
    published, store = asyncio.run(run_pipeline(tmp_path, 3000, publish_cap=50, dispatch_cap=40, preload=False))
    seqs = [m["result"]["fields"]["seq"]["value"] for m in published]
    assert sorted(seqs) == list(range(3000))
    assert len(seqs) == 3000  # nothing twice
    assert store.outstanding_rows == 0
    assert store.counts()["published"] == 3000
    store.stop()


def test_light_results_skip_the_outbox_and_tasks_wait_for_the_publisher(tmp_path: Path) -> None:
    # A publisher taking 20 results at a time and a window of 7: the dispatcher must hold its light tasks
    # rather than overflow results into the outbox, and every pending row becomes a tombstone directly.
    outbox_rows: list[int] = []
    published, store = asyncio.run(run_pipeline(tmp_path, 3000, publish_cap=50, dispatch_cap=400, preload=False,
                                                direct_cap=20, outbox_rows=outbox_rows))
    seqs = [m["result"]["fields"]["seq"]["value"] for m in published]
    assert seqs == list(range(3000))  # once each, in commit order
    assert sum(outbox_rows) == 0
    assert store.outstanding_rows == 0 and store.outstanding_bytes == 0
    assert store.counts() == {"pending": 0, "outbox": 0, "published": 3000}
    store.stop()


def test_unacknowledged_direct_results_go_to_the_outbox_at_a_stop(tmp_path: Path) -> None:
    # A broker that takes results and never acknowledges them: at a stop the results sent and those waiting
    # for the window are handed back for the outbox, and the next start publishes those same bytes.
    async def scenario() -> list[bytes]:
        loop = asyncio.get_running_loop()
        store = Store(tmp_path, max_tasks=100, max_bytes=1_000_000)
        hooked: list[Committed] = []
        store.start(lambda c: loop.call_soon_threadsafe(hooked.append, c))
        store.ingest([task(i) for i in range(5)], [])
        while sum(len(c.tasks) for c in hooked) < 5:
            await asyncio.sleep(0.01)
        refs = [ref for c in hooked for ref in c.tasks]
        sent: list[bytes] = []
        mids = iter(range(1, 100))

        def send(messages: Sequence[Sent], resend: Sequence[int] | None = None) -> list[int]:
            sent.extend(message.payload for message in messages)
            return [next(mids) for _ in messages] if resend is None else list(resend)

        publisher = Publisher(store, send, window=2)
        publisher.start(loop)
        await asyncio.sleep(0.05)  # the (empty) outbox read-back
        results = [(ref.id, ref.size, "edge/gw/results/x", f"r{ref.task_id}".encode()) for ref in refs]
        assert publisher.offer(results) == []
        assert sent == [b"rt0", b"rt1"]  # the window
        unconfirmed = publisher.take_unconfirmed()
        assert sorted(r[3] for r in unconfirmed) == [f"rt{i}".encode() for i in range(5)]
        assert publisher.idle()
        store.complete(unconfirmed)
        store.stop()
        again = Store(tmp_path, max_tasks=100, max_bytes=1_000_000)
        got: asyncio.Future[list[bytes]] = loop.create_future()
        again.start(lambda c: None)
        again.load_outbox(0, 100, lambda rows: loop.call_soon_threadsafe(got.set_result, [r.payload for r in rows]))
        payloads = await got
        assert again.counts()["pending"] == 0
        again.stop()
        return payloads

    assert sorted(asyncio.run(scenario())) == [f"rt{i}".encode() for i in range(5)]


def test_restart_resumes_pending_tasks(tmp_path: Path) -> None:
    published, store = asyncio.run(run_pipeline(tmp_path, 2500, publish_cap=100, dispatch_cap=300, preload=True))
    assert sorted(m["result"]["fields"]["seq"]["value"] for m in published) == list(range(2500))
    # Light tasks run in commit order, so the windows see the readings in the order they arrived.
    assert [m["result"]["fields"]["seq"]["value"] for m in published] == list(range(2500))
    store.stop()


def test_no_exception_escapes_a_paho_callback(tmp_path: Path) -> None:
    def explode(*args: object) -> None:
        raise RuntimeError("bug in a stage")

    settings = Settings(state_dir=tmp_path)  # type: ignore[call-arg]
    link = MqttLink(settings.mqtt, client_id="c", agent_id="gw", topic_filters=[("a/#", 1)],
                    on_message=explode, on_puback=explode, on_connected=explode)

    class Message:
        topic = "a/b"
        payload = b"{}"
        qos = 1
        mid = 3
        dup = False

    link._on_message(link._client, None, Message())  # type: ignore[arg-type]
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    link._on_publish(link._client, None, 3, ReasonCode(PacketTypes.PUBACK), None)
    link._on_connect(link._client, None, None, ReasonCode(PacketTypes.CONNACK), None)
    link._on_disconnect(link._client, None, None, ReasonCode(PacketTypes.DISCONNECT), None)
    assert isinstance(InboundMessage("a", b"", 0, 0, False, 0.0), tuple)

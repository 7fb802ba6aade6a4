"""The daemon in-process between a stand-in broker and real SQLite: work spilled to disk comes back, in order, once.

``Daemon`` is built as ``edge-agent run`` builds it, with the link replaced by tests/fakes.py's ``FakeBroker``
and memory limits small enough that tasks and results spill to the store and are read back.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from fakes import FakeBroker, start

from agent.config import Settings
from agent.daemon import Daemon, Limits
from agent.mqtt import InboundMessage, MqttLink
from agent.store import NewTask, Store

from support import wait_until

TOPIC = "city/a/traffic/1/data"


def settings_for(tmp_path: Path) -> Settings:
    return Settings(state_dir=tmp_path, local={"workers": 1}, metrics={"port": 0},  # type: ignore[arg-type]
                    routes=[{"topic": "city/+/traffic/+/data", "task": "sensor.stats"}])


def body(i: int) -> bytes:
    return json.dumps({"seq": i, "speed": 40 + i % 7}).encode()


def task(i: int) -> NewTask:
    return NewTask(f"t{i}", TOPIC, "sensor.stats", "auto", {"topic": TOPIC}, body(i), len(body(i)), 1000.0, None,
                   None)


def seqs(broker: FakeBroker) -> list[int]:
    return [json.loads(payload)["result"]["fields"]["seq"]["value"] for _, payload in broker.published]


async def run_agent(tmp_path: Path, broker: FakeBroker, n_published: int, *, limits: Limits, sent: int = 0,
                    store: Store | None = None, settle: bool = True, vanish: bool = False) -> Daemon:
    """Start the daemon, have devices publish ``sent`` messages, wait for ``n_published`` results, stop it
    (``vanish``: the broker goes away first, so the stop does not wait for its acknowledgements)."""
    daemon = Daemon(settings_for(tmp_path), link=broker.link, store=store, limits=limits, tune_process=False)
    running = await start(daemon, broker)
    for i in range(sent):
        broker.publish(TOPIC, body(i))
    await wait_until(lambda: len(broker.published) >= n_published, 20, f"{n_published} results", interval=0.005)
    if settle:
        await wait_until(lambda: daemon.publisher.idle() and daemon.dispatcher.idle(), 20, "the stages to settle",
                         interval=0.005)
        # Every task the policy was told about has left its queues again.
        snapshot = daemon.policy.snapshot(asyncio.get_running_loop().time())
        assert snapshot["inline_tasks"] == 0
        assert snapshot["local_tasks"] == 0
    if vanish:
        broker.connected.clear()
    daemon.request_stop("test")
    assert await running == 0
    return daemon


def counts(tmp_path: Path) -> dict[str, int]:
    store = Store(tmp_path, max_tasks=100_000, max_bytes=100_000_000)
    try:
        return store.counts()
    finally:
        store.stop()


def test_spilled_tasks_come_back_once_and_in_order(tmp_path: Path) -> None:
    # 3000 messages against a dispatcher holding 40 tasks and a publisher taking 20 results at a time: the rest
    # waits in the store, is read back in commit order, and every device message is acknowledged once stored.
    broker = FakeBroker()
    outbox_rows: list[int] = []
    store = Store(tmp_path, max_tasks=100_000, max_bytes=100_000_000)
    complete = store.complete
    store.complete = lambda results, *dead: (outbox_rows.append(len(results)), complete(results, *dead))[1]  # type: ignore[method-assign]
    daemon = asyncio.run(run_agent(tmp_path, broker, 3000, sent=3000, store=store,
                                   limits=Limits(dispatch_tasks=40, publish_rows=50, fresh_results=20)))
    assert seqs(broker) == list(range(3000))  # once each, in commit order
    assert sorted(mid for mid, _ in broker.acks) == list(range(1, 3001))
    # Light results skip the outbox: the dispatcher holds its tasks rather than overflow results into it.
    assert sum(outbox_rows) == 0
    assert daemon.dispatcher.completed == 3000
    assert counts(tmp_path) == {"pending": 0, "outbox": 0, "published": 3000}


def test_unacknowledged_results_go_to_the_outbox_at_a_stop_and_the_next_start_publishes_them(tmp_path: Path) -> None:
    # A broker that takes results and never acknowledges them: at a stop the results sent and those waiting for
    # the window go to the outbox, and the next start publishes those same bytes, read back 50 rows at a time.
    silent = FakeBroker(ack_publishes=False)
    asyncio.run(run_agent(tmp_path, silent, 300, sent=300, settle=False, vanish=True,
                          limits=Limits(dispatch_tasks=40, fresh_results=400)))
    assert counts(tmp_path) == {"pending": 0, "outbox": 300, "published": 0}
    broker = FakeBroker()
    asyncio.run(run_agent(tmp_path, broker, 300, limits=Limits(publish_rows=50)))
    assert sorted(p for _, p in broker.published) == sorted(p for _, p in silent.published)
    assert counts(tmp_path) == {"pending": 0, "outbox": 0, "published": 300}


def test_restart_resumes_pending_tasks(tmp_path: Path) -> None:
    async def preload() -> None:  # as after a restart: everything is already in the store
        loop = asyncio.get_running_loop()
        store = Store(tmp_path, max_tasks=100_000, max_bytes=100_000_000)
        store.start(lambda c: None)
        store.ingest([task(i) for i in range(2500)], [])
        done = asyncio.Event()
        store.call(lambda: loop.call_soon_threadsafe(done.set))
        await done.wait()
        store.stop()

    asyncio.run(preload())
    broker = FakeBroker()
    asyncio.run(run_agent(tmp_path, broker, 2500, limits=Limits(dispatch_tasks=300, publish_rows=100)))
    # Light tasks run in commit order, so the windows see the readings in the order they arrived.
    assert seqs(broker) == list(range(2500))
    assert counts(tmp_path) == {"pending": 0, "outbox": 0, "published": 2500}


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

    link._client.on_message(link._client, None, Message())  # type: ignore[arg-type,misc]  # Inbound.from_paho
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    link._on_publish(link._client, None, 3, ReasonCode(PacketTypes.PUBACK), None)
    link._on_connect(link._client, None, None, ReasonCode(PacketTypes.CONNACK), None)
    link._on_disconnect(link._client, None, None, ReasonCode(PacketTypes.DISCONNECT), None)
    assert isinstance(InboundMessage("a", b"", 0, 0, False, 0.0), tuple)

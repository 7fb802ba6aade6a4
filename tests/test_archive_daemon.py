"""The archive in the daemon, in process (the quick tier's end to end): the real daemon between tests/fakes.py's
FakeBroker and real SQLite, with a real Mosquitto for the archive's own MQTT 5 query connection. Archive routes'
inputs are archived once and in order, other routes' are not, and the MQTT query answers in bounded chunks with
the request's correlation data (agent/archive/service.py, agent/archive/responder.py)."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from fakes import FakeBroker, start
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import Settings
from agent.daemon import Daemon

from support import Mosquitto, wait_for, wait_until

KEPT = "city/+/noise/+/data"


def mqtt_query(port: int, agent_id: str, request: dict[str, Any], timeout: float = 60) -> list[dict[str, Any]]:
    """Ask over MQTT 5 with a response topic and correlation data; the answer's messages in the order they came."""
    correlation = uuid.uuid4().bytes
    response_topic = f"clients/{uuid.uuid4().hex}/answers"
    chunks: list[dict[str, Any]] = []
    done, subscribed = threading.Event(), threading.Event()

    def on_message(client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        assert msg.properties is not None and msg.properties.CorrelationData == correlation
        chunks.append(json.loads(msg.payload) | {"_size": len(msg.payload)})
        if chunks[-1]["done"]:
            done.set()

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"asker-{uuid.uuid4().hex[:8]}",
                         protocol=paho.MQTTv5)
    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.subscribe(response_topic, qos=1)
        wait_for(subscribed.is_set, 10, "the asker's subscription")
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = response_topic
        props.CorrelationData = correlation
        client.publish(f"edge/{agent_id}/archive/query", json.dumps(request).encode(), qos=1, properties=props)
        wait_for(done.is_set, timeout, "the last message of the answer")
    finally:
        client.loop_stop()
        client.disconnect()
    return chunks


def settings_for(tmp_path: Path, port: int) -> Settings:
    return Settings(  # type: ignore[arg-type]
        agent_id="gw-archive", state_dir=tmp_path, local={"workers": 1}, metrics={"port": 0},
        mqtt={"host": "127.0.0.1", "port": port},
        routes=[{"topic": KEPT, "task": "sensor.stats", "archive": {"days": 7}},
                {"topic": "city/+/traffic/+/data", "task": "sensor.stats"}],
        archive={"seal_age_s": 0.2, "seal_bytes": 4096, "pass_interval_s": 0.05, "query_chunk_bytes": 4096})


def test_the_daemon_archives_its_archive_routes_and_answers_mqtt_queries(tmp_path: Path, broker: Mosquitto) -> None:
    sent = [(f"city/a/{'noise' if i % 3 else 'traffic'}/{i % 4}/data",
             json.dumps({"seq": i, "db": 40 + i % 9}).encode()) for i in range(120)]
    kept = [(t, p) for t, p in sent if "noise" in t]

    async def scenario() -> list[dict[str, Any]]:
        fake = FakeBroker()
        daemon = Daemon(settings_for(tmp_path, broker.port), link=fake.link, tune_process=False)
        running = await start(daemon, fake)
        assert daemon.archive is not None and daemon.archive.responder is not None
        for topic, payload in sent:
            fake.publish(topic, payload)
        await wait_until(lambda: len(fake.published) >= len(sent), 20, "every result", interval=0.01)
        archive = daemon.archive
        await wait_until(lambda: sum(e.count for e in archive.catalog.entries()) == len(kept), 20,
                         "every archived input sealed", interval=0.02)
        await wait_until(archive.responder.subscribed.is_set, 20, "the query connection's subscription")
        chunks = await asyncio.to_thread(mqtt_query, broker.port, "gw-archive", {"route": "city/#"})
        daemon.request_stop("test")
        assert await running == 0
        return chunks

    chunks = asyncio.run(scenario())
    messages = [m for c in chunks for m in c["messages"]]
    assert [(m["topic"], m["payload"].encode()) for m in messages] == kept
    assert [c["seq"] for c in chunks] == list(range(len(chunks))) and len(chunks) > 1
    assert all(c["_size"] <= 4096 for c in chunks) and chunks[-1]["count"] == len(kept)


def test_the_query_connection_comes_back_after_a_broker_restart(tmp_path: Path, broker: Mosquitto) -> None:
    from agent.archive.catalog import Catalog
    from agent.archive.query import Reader
    from agent.archive.responder import Responder
    from agent.archive.segment import Record

    root = tmp_path / "archive"
    (root / "routes").mkdir(parents=True)
    settings = settings_for(tmp_path, broker.port)
    responder = Responder(settings, Reader(root, Catalog(root / "catalog.db"), lambda: None,
                                           unsealed=lambda route: [("", [Record(1.0, "city/a/noise/1/data", b"x",
                                                                                 "0" * 32)])]))
    responder.start()
    try:
        wait_for(responder.subscribed.is_set, 20, "the query subscription")
        assert mqtt_query(broker.port, "gw-archive", {"route": "#"})[-1]["count"] == 0  # no route directories
        line = re.compile(rf"^\d+: {re.escape(settings.client_id)}-archive \d edge/gw-archive/archive/query$",
                          re.MULTILINE)
        assert len(line.findall(broker.log.read_text())) == 1
        broker.restart()
        # The broker's log shows the subscription made again on the new connection.
        wait_for(lambda: len(line.findall(broker.log.read_text())) == 2, 30, "the subscription after the restart")
        answer = mqtt_query(broker.port, "gw-archive", {"route": "#", "from": "x"})
        assert "bad request" in answer[-1]["error"]
    finally:
        responder.stop()

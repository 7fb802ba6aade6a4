"""The agent as operators run it: a real process, a real Mosquitto, real signals."""

from __future__ import annotations

import json
import math
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support import Agent, Agents, Collector, Mosquitto, Relay, citypulse_rows, pcm_sine, publisher, wait_for

pytestmark = pytest.mark.integration

TRAFFIC = "city/aarhus/traffic/{}/data"
ROUTES = [
    {"topic": "city/+/traffic/+/data", "task": "sensor.stats", "placement": "auto"},
    {"topic": "city/+/noise/+/pcm", "task": "noise.spectrum"},
]


def results_by_seq(collector: Collector, agent: Agent) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    for msg in collector.json_under(f"edge/{agent.agent_id}/results/"):
        out.setdefault(int(msg["result"]["fields"]["seq"]["value"]), []).append(msg)
    return out


@pytest.fixture
def agent_routes() -> list[dict[str, Any]]:
    return ROUTES


def test_happy_path_citypulse_rows(broker: Mosquitto, agents: Agents) -> None:
    agent = agents(broker)
    collector = Collector(broker.port, f"edge/{agent.agent_id}/#")
    agent.start()
    device = publisher(broker.port)
    rows = list(citypulse_rows(300))
    for row in rows:
        device.publish(TRAFFIC.format(row["REPORT_ID"]), json.dumps(row), qos=1)
    wait_for(lambda: len(results_by_seq(collector, agent)) == len(rows), 60, "300 results")

    results = results_by_seq(collector, agent)
    first = results[0][0]
    assert first["kind"] == "sensor.stats"
    assert first["topic"] == TRAFFIC.format(rows[0]["REPORT_ID"])
    assert first["placement"] == "local"
    assert first["decision"]["reason"] == "model"  # a light task: the gateway wins on the model's totals
    assert 0 < first["decision"]["t_local_s"] < first["decision"]["t_cloud_s"]
    assert set(first["timings"]) == {"queued_s", "exec_s", "total_s"}
    assert first["result"]["fields"]["vehicleCount"]["value"] == rows[0]["vehicleCount"]
    assert set(first["result"]["fields"]["avgSpeed"]) == {"value", "mean", "std", "z", "anomaly"}
    assert len({r[0]["task_id"] for r in results.values()}) == len(rows)
    # The retained status says the agent is online.
    assert (f"edge/{agent.agent_id}/status", b"online") in collector.snapshot()

    assert agent.terminate() == 0
    wait_for(lambda: (f"edge/{agent.agent_id}/status", b"offline") in collector.snapshot(), 10, "offline status")
    device.loop_stop()
    collector.close()


def test_noise_spectrum_runs_in_the_worker_pool(broker: Mosquitto, agents: Agents) -> None:
    agent = agents(broker)
    collector = Collector(broker.port, f"edge/{agent.agent_id}/results/#")
    agent.start()
    device = publisher(broker.port)
    for i in range(5):
        device.publish(f"city/aarhus/noise/mic{i}/pcm", pcm_sine(1.0 + i * 0.5), qos=1)
    wait_for(lambda: len(collector.snapshot()) == 5, 60, "5 spectra")
    for msg in collector.json_under(f"edge/{agent.agent_id}/results/"):
        assert msg["kind"] == "noise.spectrum"
        assert msg["result"]["leq_db"] == pytest.approx(20 * math.log10(0.3 / math.sqrt(2)), abs=0.1)
        assert msg["timings"]["exec_s"] > 0
    assert agent.terminate() == 0


@pytest.mark.slow
def test_a_task_the_model_sends_to_the_cloud_runs_locally_without_a_cloud(
        broker: Mosquitto, agents: Agents) -> None:
    # Priors that make the cloud look far faster: a fast uplink, no provisioning, a slow gateway.
    kinds = {"noise.spectrum": {"local_fixed_s": 5.0, "local_per_byte_s": 1e-4, "cloud_fixed_s": 0.001,
                                "cloud_per_byte_s": 1e-9, "out_bytes": 300}}
    agent = agents(broker, extra_env={"EDGE_AGENT_DECISION__KINDS": json.dumps(kinds),
                                      "EDGE_AGENT_DECISION__UPLINK_MBPS": "1000",
                                      "EDGE_AGENT_DECISION__PROVISIONING_S": "0"})
    collector = Collector(broker.port, f"edge/{agent.agent_id}/results/#")
    agent.start()
    device = publisher(broker.port)
    device.publish("city/aarhus/noise/mic1/pcm", pcm_sine(1.0), qos=1)
    wait_for(lambda: len(collector.snapshot()) == 1, 30, "the spectrum")
    (msg,) = collector.json_under(f"edge/{agent.agent_id}/results/")
    assert msg["placement"] == "local"
    assert msg["decision"]["reason"] == "no_cloud"
    assert msg["decision"]["t_cloud_s"] < msg["decision"]["t_local_s"]
    assert agent.terminate() == 0


@pytest.mark.slow
def test_mosquitto_clients_as_device_and_consumer(broker: Mosquitto, agents: Agents, tmp_path: Path) -> None:
    """Independent clients: mosquitto_pub as the device, mosquitto_sub as the consumer of results."""
    for tool in ("mosquitto_pub", "mosquitto_sub"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: apt-get install mosquitto-clients")
    agent = agents(broker, extra_env={"EDGE_AGENT_MQTT__PROTOCOL": "3.1.1"})
    out = (tmp_path / "sub.out").open("wb")
    sub_id = f"sub-{agent.agent_id}"
    sub = subprocess.Popen(["mosquitto_sub", "-p", str(broker.port), "-i", sub_id, "-q", "1", "-v",
                            "-t", f"edge/{agent.agent_id}/results/#", "-t", f"edge/{agent.agent_id}/dead-letter/#"],
                           stdout=out)
    agent.start()
    # mosquitto_sub subscribes to no persistent session: what is published before its SUBSCRIBE is not for it.
    wait_for(lambda: broker.subscribed(sub_id, f"edge/{agent.agent_id}/dead-letter/#"), 10, "mosquitto_sub")
    rows = list(citypulse_rows(100))
    lines = "\n".join(json.dumps(r) for r in rows) + "\n" + "this is not json\n"
    subprocess.run(["mosquitto_pub", "-p", str(broker.port), "-q", "1", "-l", "-t", TRAFFIC.format("158324")],
                   input=lines.encode(), check=True)

    def received() -> list[str]:
        return (tmp_path / "sub.out").read_text().splitlines()

    wait_for(lambda: len(received()) >= 101, 60, "101 lines from mosquitto_sub")
    sub.terminate()
    sub.wait(10)
    out.close()
    seqs = set()
    dead = []
    for line in received():
        topic, payload = line.split(" ", 1)
        body = json.loads(payload)
        if "/dead-letter/" in topic:
            dead.append(body)
        else:
            seqs.add(body["result"]["fields"]["seq"]["value"])
    assert seqs == {r["seq"] for r in rows}
    assert [d["reason"] for d in dead] == ["invalid_json"]
    assert agent.terminate() == 0


@pytest.mark.slow
def test_each_dead_letter_reason(broker: Mosquitto, agents: Agents, tmp_path: Path) -> None:
    plugin = _failing_plugin(tmp_path / "plugin")
    routes = [*ROUTES, {"topic": "city/+/boom/+/data", "task": "test.boom"}]
    first = agents(broker, routes=[*routes, {"topic": "city/old/route/+", "task": "sensor.stats"}],
                   extra_env={"EDGE_AGENT_MAX_PAYLOAD_BYTES": "2048"}, pythonpath=plugin)
    collector = Collector(broker.port, f"edge/{first.agent_id}/dead-letter/#")
    first.start()
    assert first.terminate() == 0
    device = publisher(broker.port)
    # Sent while the agent is down, to a filter the next configuration no longer routes: the persistent
    # session still holds the subscription, so the broker delivers it and the agent has no task for it.
    device.publish("city/old/route/x", b'{"a": 1}', qos=1).wait_for_publish(5)

    second = agents(broker, agent_id=first.agent_id, routes=routes,
                    extra_env={"EDGE_AGENT_MAX_PAYLOAD_BYTES": "2048"}, pythonpath=plugin)
    second.start()
    device.publish("city/a/traffic/1/data", b"x" * 4096, qos=1)
    device.publish("city/a/traffic/2/data", b"{not json", qos=1)
    device.publish("city/a/traffic/3/data", b'["a", "b"]', qos=1)
    device.publish("city/a/traffic/4/data", b'{"speed": NaN}', qos=1)
    device.publish("city/a/noise/5/pcm", b"\x01\x02\x03", qos=1)
    device.publish("city/a/boom/6/data", b'{"a": 1}', qos=1)
    device.publish("city/a/traffic/7/data", b'{"ok": 1}', qos=1)  # the daemon carries on
    wait_for(lambda: len(collector.snapshot()) >= 7, 30, "7 dead letters")
    by_topic = {t.split("/dead-letter/", 1)[1]: json.loads(p) for t, p in collector.snapshot()}
    assert by_topic["city/old/route/x"]["reason"] == "unknown_task"
    assert by_topic["city/a/traffic/1/data"]["reason"] == "too_large"
    assert by_topic["city/a/traffic/1/data"]["size"] == 4096
    assert by_topic["city/a/traffic/2/data"]["reason"] == "invalid_json"
    assert by_topic["city/a/traffic/3/data"]["reason"] == "invalid_payload"
    assert by_topic["city/a/traffic/4/data"]["reason"] == "invalid_json"  # NaN is not JSON (RFC 8259)
    assert by_topic["city/a/noise/5/pcm"]["reason"] == "invalid_payload"
    assert by_topic["city/a/boom/6/data"]["reason"] == "task_failed"
    assert "RuntimeError" in by_topic["city/a/boom/6/data"]["detail"]
    for body in by_topic.values():
        assert set(body) == {"topic", "reason", "detail", "size", "received_at", "id"}
    assert len({body["id"] for body in by_topic.values()}) == 7
    assert "city/a/traffic/7/data" not in by_topic
    assert second.terminate() == 0


def _plugin(root: Path, name: str, source: str) -> Path:
    """A user task installed the way a package would install it: a dist-info with an entry point."""
    root.mkdir(parents=True)
    (root / f"{name}_task.py").write_text(source)
    dist = root / f"{name}_task-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}-task\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[edge_agent.tasks]\ntest.{name} = {name}_task:{name}\n")
    return root


def _failing_plugin(root: Path) -> Path:
    return _plugin(root, "boom", "def boom(payload, options):\n    raise RuntimeError('the sensor driver exploded')\n")


@pytest.mark.slow
def test_light_tasks_do_not_wait_behind_heavy_ones(broker: Mosquitto, agents: Agents, tmp_path: Path) -> None:
    plugin = _plugin(tmp_path / "plugin", "slow",
                     "import time\ndef slow(payload, options):\n    time.sleep(0.5)\n    return {'slept': 0.5}\n")
    routes = [*ROUTES, {"topic": "city/+/camera/+/frame", "task": "test.slow"}]
    agent = agents(broker, routes=routes, pythonpath=plugin)
    collector = Collector(broker.port, f"edge/{agent.agent_id}/results/#")
    agent.start()
    device = publisher(broker.port)
    for i in range(8):  # four seconds of work for the single worker
        device.publish(f"city/aarhus/camera/c{i}/frame", b"frame", qos=1)
    rows = list(citypulse_rows(20))
    for row in rows:
        device.publish(TRAFFIC.format(row["REPORT_ID"]), json.dumps(row), qos=1)
    wait_for(lambda: len(results_by_seq(collector, agent)) == len(rows), 10, "the light results")
    slow_done = [p for t, p in collector.snapshot() if "/camera/" in t]
    assert len(slow_done) < 8, "the light tasks waited for the heavy ones"
    wait_for(lambda: len(collector.snapshot()) == 28, 30, "the heavy results too")
    assert agent.terminate() == 0


@pytest.mark.slow
def test_sigkill_mid_stream_loses_nothing(broker: Mosquitto, agents: Agents) -> None:
    agent = agents(broker)
    collector = Collector(broker.port, f"edge/{agent.agent_id}/results/#")
    agent.start()
    device = publisher(broker.port)
    rows = list(citypulse_rows(3000))
    for row in rows:
        device.publish(TRAFFIC.format(row["REPORT_ID"]), json.dumps(row), qos=1)
    status = Collector(broker.port, f"edge/{agent.agent_id}/status")
    wait_for(lambda: len(collector.snapshot()) >= 300, 60, "the first results")
    agent.kill()
    # The broker publishes our last will when the connection drops without a DISCONNECT.
    # The retained "online" may still be on its way to the collector: look at the last message, if any.
    wait_for(lambda: [m for _, m in status.snapshot()][-1:] == [b"offline"], 10, "the last will")
    got_at_kill = len(results_by_seq(collector, agent))
    agent.start()
    wait_for(lambda: len(results_by_seq(collector, agent)) == len(rows), 120,
             "every row's result after the restart")
    assert got_at_kill < len(rows), "the kill came too late to test anything"
    results = results_by_seq(collector, agent)
    for copies in results.values():
        # A result published twice (kill before the broker's PUBACK reached us) keeps its task_id.
        assert len({c["task_id"] for c in copies}) == 1
    assert agent.terminate() == 0


@pytest.mark.slow
def test_broker_restart_mid_stream_loses_nothing(broker: Mosquitto, agents: Agents) -> None:
    agent = agents(broker)
    collector = Collector(broker.port, f"edge/{agent.agent_id}/results/#", client_id="results-consumer")
    agent.start()
    device = publisher(broker.port, client_id="traffic-device")
    rows = list(citypulse_rows(3000))
    for row in rows[:2000]:
        device.publish(TRAFFIC.format(row["REPORT_ID"]), json.dumps(row), qos=1)
    wait_for(lambda: len(collector.snapshot()) >= 200, 60, "the first results")
    broker.restart()
    for row in rows[2000:]:
        device.publish(TRAFFIC.format(row["REPORT_ID"]), json.dumps(row), qos=1)
    wait_for(lambda: len(results_by_seq(collector, agent)) == len(rows), 120,
             "every row's result after the broker restart")
    events = agent.events()
    assert any(e.get("event") == "mqtt_connected" for e in events[1:])
    # The operator reads a lost connection, not a refusal: a CONNACK read before the connecting thread noted
    # that it awaited one made every later drop look like "closed before accepting it" (an error).
    assert any(e.get("event") == "mqtt_connection_lost" for e in events)
    assert not [e for e in events if e.get("level") == "error"], agent.log_tail()
    assert agent.terminate() == 0


@pytest.mark.slow
def test_messages_sent_while_down_arrive_on_return(broker: Mosquitto, agents: Agents) -> None:
    agent = agents(broker)
    collector = Collector(broker.port, f"edge/{agent.agent_id}/results/#")
    agent.start()
    assert agent.terminate() == 0
    device = publisher(broker.port)
    rows = list(citypulse_rows(50))
    for row in rows:
        device.publish(TRAFFIC.format(row["REPORT_ID"]), json.dumps(row), qos=1).wait_for_publish(5)
    agent.start()
    wait_for(lambda: len(results_by_seq(collector, agent)) == len(rows), 60, "results of queued messages")
    assert agent.terminate() == 0


@pytest.mark.slow
def test_full_store_pauses_intake_and_loses_nothing(broker: Mosquitto, agents: Agents) -> None:
    agent = agents(broker, extra_env={"EDGE_AGENT_STORE__MAX_TASKS": "10",
                                      "EDGE_AGENT_MQTT__RECEIVE_MAXIMUM": "20"})
    collector = Collector(broker.port, f"edge/{agent.agent_id}/results/#")
    agent.start()
    device = publisher(broker.port)
    chunk = pcm_sine(2.0)
    for i in range(60):
        device.publish(f"city/aarhus/noise/mic{i % 4}/pcm", chunk, qos=1)
    # At-least-once: a result in flight during a reconnect may arrive twice; the task_id tells.
    wait_for(lambda: len({json.loads(p)["task_id"] for _, p in collector.snapshot()}) == 60, 120,
             "all 60 spectra")
    events = [e["event"] for e in agent.events()]
    assert "store_full_intake_paused" in events
    assert "store_intake_resumed" in events
    assert agent.terminate() == 0


@pytest.mark.slow
def test_sigterm_while_busy_exits_zero_and_resumes(broker: Mosquitto, agents: Agents) -> None:
    agent = agents(broker)
    collector = Collector(broker.port, f"edge/{agent.agent_id}/results/#")
    agent.start()
    device = publisher(broker.port)
    for i in range(30):
        device.publish(f"city/aarhus/noise/mic{i}/pcm", pcm_sine(3.0), qos=1)
    wait_for(lambda: len(collector.snapshot()) >= 2, 60, "the first spectra")
    started = time.monotonic()
    assert agent.terminate() == 0
    assert time.monotonic() - started < 15
    agent.start()
    wait_for(lambda: len({json.loads(p)["topic"] for _, p in collector.snapshot()}) == 30, 120,
             "all 30 spectra after the restart")
    assert agent.terminate() == 0


@pytest.mark.slow
def test_sigint_stops_like_sigterm(broker: Mosquitto, agents: Agents) -> None:
    agent = agents(broker)
    agent.start()
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGINT)
    assert agent.proc.wait(20) == 0


@pytest.mark.slow
def test_shared_group_splits_a_stream_between_agents(broker: Mosquitto, agents: Agents) -> None:
    group = {"EDGE_AGENT_MQTT__SHARED_GROUP": "gateways"}
    first = agents(broker, name="a", extra_env=group)
    second = agents(broker, name="b", extra_env=group)
    collector = Collector(broker.port, "edge/+/results/#")
    first.start()
    second.start()
    device = publisher(broker.port)
    rows = list(citypulse_rows(400))
    for row in rows:
        device.publish(TRAFFIC.format(row["REPORT_ID"]), json.dumps(row), qos=1)

    def seqs_by_agent() -> dict[str, list[int]]:
        out: dict[str, list[int]] = {first.agent_id: [], second.agent_id: []}
        for topic, payload in collector.snapshot():
            out[topic.split("/")[1]].append(json.loads(payload)["result"]["fields"]["seq"]["value"])
        return out

    wait_for(lambda: sum(map(len, seqs_by_agent().values())) >= len(rows), 60, "400 results from two agents")
    split = seqs_by_agent()
    assert sorted(split[first.agent_id] + split[second.agent_id]) == [r["seq"] for r in rows]  # each once
    assert split[first.agent_id] and split[second.agent_id]
    for agent in (first, second):  # the log names what the broker confirmed, in the group's form
        confirmed = [f for e in agent.events() if e.get("event") == "mqtt_subscribed" for f in e["filters"]]
        assert confirmed and all(f.startswith("$share/gateways/") for f in confirmed), confirmed
    assert first.terminate() == 0
    assert second.terminate() == 0


@pytest.mark.slow
def test_windows_carry_on_across_a_clean_restart_and_a_power_cut(broker: Mosquitto, agents: Agents) -> None:
    agent = agents(broker, extra_env={"EDGE_AGENT_STORE__STATE_INTERVAL_S": "0.5"})
    collector = Collector(broker.port, f"edge/{agent.agent_id}/results/#")
    device = publisher(broker.port)
    topic = TRAFFIC.format("w1")
    sent: list[float] = []

    def send(speeds: list[float]) -> dict[str, Any]:
        """Publish readings in order; the last one's judgement, once every result is in."""
        for speed in speeds:
            device.publish(topic, json.dumps({"avgSpeed": speed, "seq": len(sent)}), qos=1)
            sent.append(speed)
        wait_for(lambda: len(results_by_seq(collector, agent)) == len(sent), 60, "every result")
        return results_by_seq(collector, agent)[len(sent) - 1][0]["result"]["fields"]["avgSpeed"]

    def judged_on(history: list[float]) -> tuple[float, float]:
        mean = sum(history) / len(history)
        return mean, math.sqrt(sum((x - mean) ** 2 for x in history) / len(history))

    agent.start()
    send([50.0 + i % 5 for i in range(30)])
    assert agent.terminate() == 0  # a clean stop saves the windows
    agent.start()
    spike = send([90.0])
    mean, std = judged_on(sent[:-1])
    assert spike["mean"] == pytest.approx(mean) and spike["std"] == pytest.approx(std)
    assert spike["anomaly"]  # without the saved window this first reading would have nothing to stand out from
    send([52.0 + i % 3 for i in range(10)])
    wait_for(lambda: saved_readings(agent, topic, "avgSpeed") == len(sent), 30,
             "the periodic save to hold these ten")
    agent.kill()  # a power cut: no save at the stop
    agent.start()
    last = send([53.0])
    mean, std = judged_on(sent[:-1])
    assert last["mean"] == pytest.approx(mean) and last["std"] == pytest.approx(std)
    assert agent.terminate() == 0


def stored(agent: Agent, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Rows of the agent's own store, read beside the running agent (SQLite in WAL mode allows it)."""
    db = sqlite3.connect(agent.workdir / "state" / "edge-agent.db")
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


def saved_readings(agent: Agent, topic: str, field: str, window: int = 60) -> int:
    """How many readings of ``field`` the store's saved sensor.stats window of ``topic`` holds."""
    rows = stored(agent, "SELECT state FROM task_state WHERE kind='sensor.stats' AND key=?",
                  json.dumps([topic, window], separators=(",", ":")))
    if not rows:
        return 0
    head = json.loads(bytes(rows[0][0]).partition(b"\n")[0])
    fields = head["fields"] if isinstance(head, dict) else head  # a list alone before the sequence was saved
    return dict(map(tuple, fields)).get(field, 0)


@pytest.fixture
def relay(broker: Mosquitto) -> Iterator[Relay]:
    relay = Relay(broker.port)
    yield relay
    relay.close()


@pytest.mark.slow
def test_a_restart_reruns_a_task_its_saved_window_holds_and_counts_it_once(
        broker: Mosquitto, agents: Agents, relay: Relay) -> None:
    # The agent reaches the broker through a relay; cutting its agent → broker direction keeps the PUBACK
    # of the next message and its result from arriving, as when power fails before they leave the gateway.
    agent = agents(broker, extra_env={"EDGE_AGENT_STORE__STATE_INTERVAL_S": "0.5",
                                      "EDGE_AGENT_MQTT__PORT": str(relay.port)})
    collector = Collector(broker.port, f"edge/{agent.agent_id}/results/#")
    device = publisher(broker.port)
    topic = TRAFFIC.format("w2")
    sent: list[float] = []

    def publish(speed: float) -> None:
        device.publish(topic, json.dumps({"avgSpeed": speed, "seq": len(sent)}), qos=1)
        sent.append(speed)

    def judgement(seq: int) -> dict[str, Any]:
        wait_for(lambda: seq in results_by_seq(collector, agent), 60, f"the result of reading {seq}")
        return results_by_seq(collector, agent)[seq][0]["result"]["fields"]["avgSpeed"]

    def judged_on(history: list[float]) -> tuple[float, float]:
        mean = sum(history) / len(history)
        return mean, math.sqrt(sum((x - mean) ** 2 for x in history) / len(history))

    agent.start()
    for i in range(20):
        publish(50.0 + i % 5)
    judgement(19)
    wait_for(lambda: stored(agent, "SELECT count(*) FROM tasks WHERE state < 2") == [(0,)], 30,
             "every result confirmed by the broker")

    relay.cut.set()
    publish(90.0)  # reading 20: the agent takes it, commits it and counts it in the window...
    wait_for(lambda: saved_readings(agent, topic, "avgSpeed") == 21, 30, "the periodic save to hold reading 20")
    # ... but its result was never confirmed, so the row is still pending, and the broker never got it.
    assert stored(agent, "SELECT count(*) FROM tasks WHERE state = 0") == [(1,)]
    assert 20 not in results_by_seq(collector, agent)
    agent.kill()
    relay.close()

    agent.write_env(EDGE_AGENT_MQTT__PORT=str(broker.port))
    agent.start()
    rerun = judgement(20)  # the same task runs again: judged against the restored window, which holds it
    mean, std = judged_on(sent)
    assert rerun["value"] == 90.0 and rerun["mean"] == pytest.approx(mean) and rerun["std"] == pytest.approx(std)
    publish(53.0)
    after = judgement(21)
    mean, std = judged_on(sent[:-1])  # reading 20 counted once
    assert after["mean"] == pytest.approx(mean) and after["std"] == pytest.approx(std)
    assert agent.terminate() == 0
    assert saved_readings(agent, topic, "avgSpeed") == len(sent) == 22
    results = results_by_seq(collector, agent)
    assert sorted(results) == list(range(22)) and all(len(r) == 1 for r in results.values())

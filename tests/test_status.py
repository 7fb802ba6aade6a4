"""`edge-agent status` and `edge-agent explain --live` against a real running agent (Mosquitto, devcloud)."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main

from support import (
    Agent,
    Agents,
    Collector,
    DevCloud,
    Mosquitto,
    citypulse_rows,
    free_port,
    pcm_noise,
    publisher,
    wait_for,
)

pytestmark = pytest.mark.integration

TRAFFIC = "city/+/traffic/+/data"
ROUTES = [{"topic": TRAFFIC, "task": "sensor.stats"}, {"topic": "city/+/noise/+/pcm", "task": "noise.spectrum"}]


def start_agent(agents: Agents, broker: Mosquitto, **env: str) -> Agent:
    agent = agents(broker, routes=ROUTES, extra_env={"EDGE_AGENT_METRICS__PORT": str(free_port()), **env})
    agent.start()
    return agent


def cli_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main([*args, "--json"]) == 0, capsys.readouterr().err
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    return out


def test_status_shows_the_running_agent_on_one_screen(broker: Mosquitto, agents: Agents, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    agent = start_agent(agents, broker)
    device = publisher(broker.port)
    for row in citypulse_rows(30):
        device.publish("city/aarhus/traffic/1/data", json.dumps(row), qos=1)
    device.publish("city/aarhus/traffic/1/data", b"{broken", qos=1).wait_for_publish(5)
    env = ("--env-file", str(agent.env_file))

    def totals() -> dict[str, Any]:
        return dict(cli_json(capsys, "status", *env)["totals"])

    wait_for(lambda: totals()["done"] == 30 and totals()["dead_lettered"] == 1, 20, "31 messages handled")
    wait_for(lambda: cli_json(capsys, "status", *env)["per_minute"]["window_s"] >= 1, 10, "a second of rates")
    status = cli_json(capsys, "status", *env)
    assert status["agent_id"] == agent.agent_id and status["ready"] is True and status["healthy"] is True
    assert status["broker"] | {"port": 0} == {
        "host": "127.0.0.1", "port": 0, "protocol": "5", "tls": False, "client_id": f"edge-agent-{agent.agent_id}",
        "shared_group": None, "connected": True, "last_error": None, "node": f"127.0.0.1:{broker.port}",
        "nodes": [f"127.0.0.1:{broker.port}"], "failovers": 0, "session_present": False}
    assert [(r["topic"], r["subscription"], r["messages"]) for r in status["routes"]] == [
        (TRAFFIC, "subscribed", 31), ("city/+/noise/+/pcm", "subscribed", 0)]
    assert status["totals"]["received"] == 31
    rates = status["per_minute"]
    assert rates["window_s"] >= 1 and rates["received"] > 0 and rates["dead_lettered"] > 0
    assert status["store"]["pending"] == 0 and status["store"]["outbox"] == 0
    assert status["backlog"]["queued"] == 0 and status["cloud"] is None
    assert status["archive"] is None  # no route keeps its inputs: nothing of the archive, not even a heading
    assert status["estimates"]["uplink_mbps"] == pytest.approx(2.0)  # the prior: no cloud measures it
    (dead,) = [p for p in status["problems"] if p["event"] == "dead_letter"]
    assert dead["level"] == "warning" and dead["count"] == 1 and "reason=invalid_json" in dead["detail"]

    assert main(["status", *env]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"edge-agent {agent.agent_id} (version ")
    assert f"broker     mqtt://127.0.0.1:{broker.port} (MQTT 5), connected" in text
    assert f"routes     {TRAFFIC} → sensor.stats" in text and "subscribed, 31 message(s)" in text
    assert "since start 31 received, 30 done, 1 dead-lettered" in text
    assert "cloud      none configured" in text
    assert "\narchive" not in text
    assert "warning dead_letter  reason=invalid_json" in text

    # Gone: said plainly, with the status LSB and systemctl use for a program that is not running.
    assert agent.terminate() == 0
    assert main(["status", *env]) == 3
    assert "edge-agent status: the agent is not running, or not at http://127.0.0.1:" in capsys.readouterr().err


def test_status_says_when_the_agent_serves_none(tmp_path: Path, agents: Agents,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    env_file = tmp_path / "agent.env"
    env_file.write_text(f"EDGE_AGENT_STATE_DIR={tmp_path / 'state'}\nEDGE_AGENT_METRICS__PORT=0\n")
    assert main(["status", "--env-file", str(env_file)]) == 4
    assert "metrics are off (EDGE_AGENT_METRICS__PORT=0)" in capsys.readouterr().err


def test_explain_live_gives_the_daemons_own_numbers(broker: Mosquitto, agents: Agents, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    agent = start_agent(agents, broker)
    collector = Collector(broker.port, f"edge/{agent.agent_id}/results/#")
    payload = json.dumps(next(citypulse_rows(1))).encode()
    device = publisher(broker.port)
    topic = "city/aarhus/traffic/1/data"
    for _ in range(40):
        device.publish(topic, payload, qos=1)
    wait_for(lambda: len(collector.snapshot()) == 40, 20, "40 results")
    ask = ("explain", "--env-file", str(agent.env_file), "--topic", topic, "--bytes", str(len(payload)))

    settings = cli_json(capsys, *ask)
    live = cli_json(capsys, *ask, "--live")
    assert live["source"] == "live" and live["agent_id"] == agent.agent_id and live["kind"] == "sensor.stats"
    learned = live["estimates"]["kinds"]["sensor.stats"]
    assert learned["local_samples"] > 10
    # The prior of sensor.stats is 1 ms; this machine runs it in microseconds.
    assert live["terms"]["local_service_s"] != pytest.approx(settings["terms"]["local_service_s"], rel=0.2)
    assert live["terms"]["local_service_s"] == pytest.approx(
        learned["local_fixed_s"] + learned["local_per_byte_s"] * len(payload))

    # The next message of that size is decided as explain said it would be: nothing ran in between.
    device.publish(topic, payload, qos=1)
    wait_for(lambda: len(collector.snapshot()) == 41, 20, "the 41st result")
    decision = json.loads(collector.snapshot()[-1][1])["decision"]
    assert decision["reason"] == live["reason"] == "model"
    assert decision["t_local_s"] == pytest.approx(live["t_local_s"], rel=0.05, abs=2e-6)
    assert decision["t_cloud_s"] == pytest.approx(live["t_cloud_s"], rel=1e-3)

    # Asking changes nothing: a kind asked about but never run does not join the agent's estimates.
    cli_json(capsys, "explain", "--env-file", str(agent.env_file), "--kind", "noise.spectrum", "--bytes", "1000",
             "--live")
    assert "noise.spectrum" not in cli_json(capsys, "status", "--env-file", str(agent.env_file))["estimates"]["kinds"]

    assert main([*ask, "--live"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"Asked the running agent {agent.agent_id} at http://127.0.0.1:")
    assert "learned from ~" in text
    # Routing is the agent's: a topic no route takes would be a dead letter there too.
    out = cli_json(capsys, "explain", "--env-file", str(agent.env_file), "--topic", "plant/1", "--bytes", "5",
                   "--live")
    assert out["dead_letter"]["reason"] == "unknown_task"


@pytest.mark.slow
def test_status_shows_the_cloud_circuit_and_lease(broker: Mosquitto, agents: Agents, devcloud: DevCloud,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    agent = start_agent(agents, broker, EDGE_AGENT_ROUTES=json.dumps(
        [{"topic": "city/+/noise/+/pcm", "task": "noise.spectrum", "placement": "cloud"}]), **devcloud.agent_env())
    collector = Collector(broker.port, f"edge/{agent.agent_id}/results/#")
    publisher(broker.port).publish("city/aarhus/noise/1/pcm", pcm_noise(1.0, seed=1), qos=1)
    wait_for(lambda: len(collector.snapshot()) == 1, 30, "the spectrum")
    assert json.loads(collector.snapshot()[0][1])["placement"] == "cloud"
    cloud = cli_json(capsys, "status", "--env-file", str(agent.env_file))["cloud"]
    assert cloud["url"] == devcloud.url and cloud["circuit"] == "closed" and cloud["lease_warm"] is True
    (lease,) = cloud["leases"]
    assert lease["stage"] == "ready" and lease["vcpus"] >= 1 and lease["in_use"] == 0
    assert main(["status", "--env-file", str(agent.env_file)]) == 0
    assert f"cloud      {devcloud.url}: circuit closed; lease ready " in capsys.readouterr().out


@pytest.mark.slow
def test_a_management_address_serves_status_to_this_machine(broker: Mosquitto, agents: Agents,
                                                            tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    # The gateway's own non-loopback address, as a management interface would have.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.254", 9))  # no packet is sent: this only picks the outgoing interface
        address = probe.getsockname()[0]
    if address.startswith("127."):
        pytest.skip("this machine has no non-loopback IPv4 address")
    agent = start_agent(agents, broker, EDGE_AGENT_METRICS__HOST=address)
    port = agent.env_file.read_text().split("EDGE_AGENT_METRICS__PORT=")[1].split()[0]
    with urllib.request.urlopen(f"http://{address}:{port}/metrics", timeout=5) as response:
        assert b"edge_agent_mqtt_connected" in response.read()
    assert cli_json(capsys, "status", "--env-file", str(agent.env_file))["agent_id"] == agent.agent_id
    with pytest.raises(urllib.error.URLError):  # nothing on loopback: the bind is the management address only
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)

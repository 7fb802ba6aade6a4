"""What an operator relies on: systemd notify and watchdog, /metrics and health, SIGHUP reloads."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from support import Agent, Agents, Collector, Mosquitto, Relay, citypulse_rows, free_port, publisher, wait_for

pytestmark = pytest.mark.integration

TRAFFIC_ROUTE = {"topic": "city/+/traffic/+/data", "task": "sensor.stats"}


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - our own loopback endpoint
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.slow
def test_notify_ready_watchdog_status_and_stopping(broker: Mosquitto, agents: Agents, tmp_path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(0.2)
    agent = agents(broker, process_env={"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "1000000"})
    received: list[dict[str, str]] = []

    def drain() -> list[dict[str, str]]:
        while True:
            try:
                datagram = sock.recv(4096)
            except TimeoutError:
                return received
            received.append(dict(line.split("=", 1) for line in datagram.decode().splitlines()))

    agent.start()
    wait_for(lambda: any(m.get("READY") == "1" for m in drain()), 20, "READY=1")
    ready = next(m for m in received if m.get("READY") == "1")
    assert "connected" in ready["STATUS"]
    wait_for(lambda: sum(m.get("WATCHDOG") == "1" for m in drain()) >= 3, 20, "watchdog pings")
    assert agent.terminate() == 0
    drain()
    assert any(m.get("STOPPING") == "1" for m in received)
    sock.close()


def test_metrics_health_and_readiness(broker: Mosquitto, agents: Agents) -> None:
    port = free_port()
    agent = agents(broker, extra_env={"EDGE_AGENT_METRICS__PORT": str(port)})
    agent.start()
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: get(base + "/readyz")[0] == 200, 20, "readiness")
    assert get(base + "/healthz") == (200, "ok\n")
    device = publisher(broker.port)
    for row in citypulse_rows(30):
        device.publish("city/aarhus/traffic/1/data", json.dumps(row), qos=1)
    device.publish("city/aarhus/traffic/1/data", b"{broken", qos=1).wait_for_publish(5)

    def metrics() -> str:
        return get(base + "/metrics")[1]

    wait_for(lambda: 'edge_agent_dead_letters_total{reason="invalid_json"} 1.0' in metrics(), 20, "metrics")
    text = metrics()
    assert 'edge_agent_messages_total{route="city/+/traffic/+/data"} 31.0' in text
    assert 'edge_agent_decisions_total{reason="model",target="local"} 31.0' in text  # the broken one too
    assert 'edge_agent_estimate{name="uplink_mbps"}' in text
    assert 'edge_agent_decision_term_seconds{kind="sensor.stats",term="local_service_s"}' in text
    assert 'edge_agent_task_duration_seconds_count{kind="sensor.stats",placement="local"} 30.0' in text
    assert "edge_agent_mqtt_connected 1.0" in text
    assert "edge_agent_store_tasks " in text
    assert get(base + "/nothing")[0] == 404

    # The Grafana dashboard only asks for series the agent exposes (the archive's, which only an agent with an
    # archive route exposes, are checked against one in tests/test_status_archive.py).
    dashboard = json.loads((Path(__file__).resolve().parents[1] / "deploy/grafana/edge-agent.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]  # a row has none
    used = {m for e in exprs for m in re.findall(r"\b(edge_agent_[a-z_]+)", e)}
    used -= {m for m in used if m.startswith("edge_agent_archive_")}
    exposed = set(re.findall(r"^# TYPE (edge_agent_[a-z_]+) (\w+)", text, re.MULTILINE))
    names = {n for n, _ in exposed}
    names |= {n + suffix for n, kind in exposed if kind == "counter" for suffix in ("_total",)}
    names |= {n + suffix for n, kind in exposed if kind == "histogram" for suffix in ("_bucket", "_sum", "_count")}
    assert used and used <= names, f"the dashboard queries series the agent does not expose: {used - names}"

    broker.stop()
    wait_for(lambda: get(base + "/readyz")[0] == 503, 20, "not ready without the broker")
    assert "broker" in get(base + "/readyz")[1]
    assert get(base + "/healthz")[0] == 200  # alive: reconnecting is not a failure
    broker.start()
    wait_for(lambda: get(base + "/readyz")[0] == 200, 30, "ready again")
    assert agent.terminate() == 0


@pytest.mark.slow
def test_ready_only_once_the_broker_answered_the_subscribe(broker: Mosquitto, agents: Agents, tmp_path: Path) -> None:
    # Between CONNACK and SUBACK a fresh client id's session holds nothing: a device publishing then, on the
    # strength of READY=1 or /readyz, would publish to no one. The relay holds the SUBSCRIBE back.
    relay = Relay(broker.port)
    relay.held.set()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(0.2)
    port = free_port()
    agent = agents(broker, extra_env={"EDGE_AGENT_METRICS__PORT": str(port), "EDGE_AGENT_MQTT__PORT": str(relay.port)},
                   process_env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
    collector = Collector(broker.port, f"edge/{agent.agent_id}/results/#")
    notified: list[str] = []

    def drain() -> list[str]:
        with contextlib.suppress(TimeoutError):
            while True:
                notified.extend(sock.recv(4096).decode().splitlines())
        return notified

    try:
        agent.start(wait_connected=False)
        agent.wait_logged("mqtt_connected")
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: get(base + "/readyz")[0] == 503, 20, "the metrics server")
        time.sleep(1.5)  # the readiness check runs every second: it has had its chance to say READY too early
        assert get(base + "/readyz") == (503, "waiting for the broker to confirm the subscriptions\n")
        assert "READY=1" not in drain()
        relay.release()
        wait_for(lambda: get(base + "/readyz")[0] == 200, 20, "readiness once the SUBACK came")
        wait_for(lambda: "READY=1" in drain(), 20, "READY=1")
        device = publisher(broker.port)
        device.publish("city/aarhus/traffic/1/data", b'{"speed": 3}', qos=1)
        wait_for(lambda: len(collector.snapshot()) == 1, 20, "the result of a message published once ready")
        assert agent.terminate() == 0
    finally:
        relay.close()
        sock.close()


def test_metrics_port_in_use_is_a_config_error(broker: Mosquitto, agents: Agents) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        agent = agents(broker, extra_env={"EDGE_AGENT_METRICS__PORT": str(taken.getsockname()[1])})
        proc = subprocess.run([sys.executable, "-m", "agent", "run", "--env-file", str(agent.env_file)],
                              capture_output=True, text=True, timeout=30)
    assert proc.returncode == 78
    assert "EDGE_AGENT_METRICS__PORT" in proc.stderr


@pytest.mark.slow
def test_sighup_reloads_routes_without_losing_messages(broker: Mosquitto, agents: Agents) -> None:
    agent = agents(broker)
    collector = Collector(broker.port, f"edge/{agent.agent_id}/results/#")
    agent.start()
    device = publisher(broker.port)
    device.publish("city/a/traffic/1/data", b'{"speed": 1}', qos=1)
    wait_for(lambda: len(collector.snapshot()) == 1, 20, "the first result")

    agent.write_env(EDGE_AGENT_ROUTES=json.dumps([{"topic": "city/+/parking/+/data", "task": "sensor.stats"}]),
                    EDGE_AGENT_DECISION__MARGIN_S="0.5")
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)
    agent.wait_logged("reload_applied")
    applied = next(e for e in agent.events() if e.get("event") == "reload_applied")
    assert applied["decision_changed"] is True
    assert not any(e.get("event") == "reload_needs_restart" for e in agent.events())
    wait_for(lambda: any("city/+/parking/+/data" in e.get("filters", ()) for e in agent.events()
                         if e.get("event") == "mqtt_subscribed"), 20, "the broker to confirm the new route")
    device.publish("city/a/parking/2/data", b'{"free": 10}', qos=1)
    device.publish("city/a/traffic/1/data", b'{"speed": 2}', qos=1)  # no longer routed, nor subscribed
    wait_for(lambda: any("/parking/" in t for t, _ in collector.snapshot()), 20, "a result on the new route")
    time.sleep(1)  # what must not come has nothing to signal: a second for a result of the old route to show
    assert [t for t, _ in collector.snapshot() if "/traffic/" in t] == [
        f"edge/{agent.agent_id}/results/city/a/traffic/1/data"]

    # A bad value on reload keeps the running settings.
    agent.write_env(EDGE_AGENT_ROUTES="[{broken")
    agent.proc.send_signal(signal.SIGHUP)
    agent.wait_logged("reload_failed")
    device.publish("city/a/parking/3/data", b'{"free": 9}', qos=1)
    wait_for(lambda: sum("/parking/" in t for t, _ in collector.snapshot()) == 2, 20, "still working")
    failed = next(e for e in agent.events() if e.get("event") == "reload_failed")
    assert failed["variable"] == "EDGE_AGENT_ROUTES"
    assert agent.terminate() == 0


def test_sighup_with_unknown_names_keeps_running_and_logs_every_problem(
        broker: Mosquitto, agents: Agents) -> None:
    agent = agents(broker)
    collector = Collector(broker.port, f"edge/{agent.agent_id}/results/#")
    agent.start()
    assert agent.proc is not None
    shipped = agent.env_file.read_text()

    # A typo in the edited file and a misspelt route option: the reload fails with both, nothing changes.
    agent.write_env(EDGE_AGENT_MQTT_HOST="broker.example",
                    EDGE_AGENT_ROUTES=json.dumps([{**TRAFFIC_ROUTE, "windw": 5}]))
    agent.proc.send_signal(signal.SIGHUP)
    agent.wait_logged("reload_failed")
    wait_for(lambda: sum(e.get("event") == "reload_failed" for e in agent.events()) == 2, 10, "both problems")
    failed = [e for e in agent.events() if e.get("event") == "reload_failed"]
    assert [(e["variable"], e["problem"]) for e in failed] == [
        ("EDGE_AGENT_MQTT_HOST", f"unknown setting (from {agent.env_file}) — did you mean EDGE_AGENT_MQTT__HOST?"),
        ("EDGE_AGENT_ROUTES[0].windw", "unknown key — did you mean window?"),
    ]
    assert all(e["level"] == "error" and e["kept"] == "the running settings" for e in failed)
    device = publisher(broker.port)
    device.publish("city/a/traffic/1/data", b'{"speed": 1}', qos=1)
    wait_for(lambda: len(collector.snapshot()) == 1, 20, "a result with the running settings")

    # Fixed, with settings that wait for a restart: each is named by its variable.
    agent.env_file.write_text(shipped)
    agent.write_env(EDGE_AGENT_MQTT__KEEPALIVE_S="45", EDGE_AGENT_STORE__MAX_TASKS="5000",
                    EDGE_AGENT_ROUTES=json.dumps([{**TRAFFIC_ROUTE, "window": 5}]))
    agent.proc.send_signal(signal.SIGHUP)
    agent.wait_logged("reload_applied")
    (restart,) = [e for e in agent.events() if e.get("event") == "reload_needs_restart"]
    assert restart["settings"] == ["EDGE_AGENT_MQTT__KEEPALIVE_S", "EDGE_AGENT_STORE__MAX_TASKS"]
    assert agent.terminate() == 0


@pytest.mark.slow
def test_sigusr1_to_every_process_retires_the_agent_cleanly(broker: Mosquitto, agents: Agents) -> None:
    """`systemctl kill --signal=SIGUSR1` signals every process of the unit, not only the agent: its workers and
    multiprocessing's resource tracker must live through it while the agent finishes what it holds and leaves."""
    agent = agents(broker, routes=[TRAFFIC_ROUTE, {"topic": "city/+/noise/+/pcm", "task": "noise.spectrum"}],
                   extra_env={"EDGE_AGENT_LOCAL__WORKERS": "2"})
    collector = Collector(broker.port, "edge/+/results/#")
    agent.start()  # the worker processes are up once it is connected
    device = publisher(broker.port)
    clips = [device.publish(f"city/aarhus/noise/mic{i}/pcm", os.urandom(64_000), qos=1) for i in range(20)]
    for info in clips:
        info.wait_for_publish(10)
    assert agent.proc is not None
    os.killpg(agent.proc.pid, signal.SIGUSR1)
    assert agent.proc.wait(60) == 0, agent.log_tail()
    wait_for(lambda: len(collector.json_under("edge/")) >= 20, 10, "a result for every clip")
    assert sorted(m["topic"] for m in collector.json_under("edge/")) == sorted(
        f"city/aarhus/noise/mic{i}/pcm" for i in range(20))
    lines = agent.log_path.read_text().splitlines()
    assert all(line.startswith("{") for line in lines), [line for line in lines if not line.startswith("{")]
    events = agent.events()
    assert not [e for e in events if e.get("level") in ("warning", "error")], agent.log_tail()
    assert {"leaving_group", "left_group_drained", "left_group"} <= {e.get("event") for e in events}
    device.loop_stop()
    device.disconnect()


def test_sighup_applies_the_env_file_also_copied_into_the_environment(broker: Mosquitto, agents: Agents) -> None:
    """systemd's EnvironmentFile= puts the file's lines into the agent's environment at start, where they used to
    win over the same file read again at a reload: `reload_applied` then listed the old routes."""
    agent = agents(broker)
    lines = dict(line.split("=", 1) for line in agent.env_file.read_text().splitlines())
    agent.process_env = lines  # as EnvironmentFile= does
    collector = Collector(broker.port, f"edge/{agent.agent_id}/results/#")
    agent.start()
    assert agent.proc is not None
    parking = [{"topic": "city/+/parking/+/data", "task": "sensor.stats"}]
    agent.write_env(EDGE_AGENT_ROUTES=json.dumps(parking))
    agent.proc.send_signal(signal.SIGHUP)
    agent.wait_logged("reload_applied")
    applied = next(e for e in agent.events() if e.get("event") == "reload_applied")
    assert applied["routes"] == ["city/+/parking/+/data"]
    wait_for(lambda: any("city/+/parking/+/data" in e.get("filters", ()) for e in agent.events()
                         if e.get("event") == "mqtt_subscribed"), 20, "the broker to confirm the new route")
    device = publisher(broker.port)
    device.publish("city/a/parking/2/data", b'{"free": 10}', qos=1)
    wait_for(lambda: any("/parking/" in t for t, _ in collector.snapshot()), 20, "a result on the new route")
    assert agent.terminate() == 0


def reload_command(agent: Agent, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    assert agent.proc is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_") and k != "STATE_DIRECTORY"}
    return subprocess.run([sys.executable, "-m", "agent", "reload", "--pid", str(agent.proc.pid),
                           "--state-dir", str(agent.workdir / "state"), "--timeout", str(timeout)],
                          capture_output=True, text=True, timeout=timeout + 30, env=env)


@pytest.mark.slow
def test_reload_command_waits_for_the_outcome_and_fails_on_an_invalid_file(broker: Mosquitto, agents: Agents) -> None:
    agent = agents(broker)
    collector = Collector(broker.port, f"edge/{agent.agent_id}/results/#")
    agent.start()
    assert agent.proc is not None
    device = publisher(broker.port)
    shipped = agent.env_file.read_text()

    # Applied, and done when the command returns: the broker has confirmed the new route, so a message
    # published right away is routed by it.
    agent.write_env(EDGE_AGENT_ROUTES=json.dumps([{"topic": "city/+/parking/+/data", "task": "sensor.stats"}]),
                    EDGE_AGENT_MQTT__KEEPALIVE_S="45")
    done = reload_command(agent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "edge-agent reload: EDGE_AGENT_MQTT__KEEPALIVE_S: changed; takes effect at the next start (restart the agent)",
        "edge-agent reload: reload applied; routes: city/+/parking/+/data"]
    device.publish("city/a/parking/1/data", b'{"free": 10}', qos=1)
    wait_for(lambda: len(collector.snapshot()) == 1, 20, "a result on the new route")

    # Invalid: exit status 1 with every problem; the running settings keep working.
    agent.write_env(EDGE_AGENT_ROUTES="[{broken", EDGE_AGENT_MQTT_HOST="broker.example")
    done = reload_command(agent)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"edge-agent reload: configuration error: EDGE_AGENT_MQTT_HOST: unknown setting (from {agent.env_file})"
        " — did you mean EDGE_AGENT_MQTT__HOST?",
        "edge-agent reload: configuration error: EDGE_AGENT_ROUTES: not valid JSON (Expecting property name "
        "enclosed in double quotes: line 1 column 3 (char 2))",
        "edge-agent reload: reload failed (2 problems); the agent keeps running with its previous settings"]
    device.publish("city/a/parking/2/data", b'{"free": 9}', qos=1)
    wait_for(lambda: len(collector.snapshot()) == 2, 20, "a result with the running settings")

    # No answer (the event loop stopped): a timeout, not a success.
    agent.env_file.write_text(shipped)
    agent.proc.send_signal(signal.SIGSTOP)
    try:
        done = reload_command(agent, timeout=1)
    finally:
        agent.proc.send_signal(signal.SIGCONT)
    assert done.returncode == 1 and "did not report the reload within 1 s" in done.stderr
    assert agent.terminate() == 0

"""The shipped units under a real systemd: Debian 12's systemd 252 as PID 1 (see systemd_machine.py).

The agent is installed with `deploy/install.sh` from this checkout exactly as docs/operations.md says, into a
minimal Debian without procps, and driven with systemctl against a Mosquitto on the host's loopback. The units
run as shipped, every hardening option included; the one test-only drop-in shortens WatchdogSec= so that a
watchdog kill takes seconds. The tests run in order, on one machine: about a minute once the root is cached
(building it takes about one more).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from systemd_machine import Machine, booted, cached_root, lines_containing, missing_prerequisites, wait_until

from support import Collector, DevCloud, Mosquitto, free_port, publisher

pytestmark = [pytest.mark.systemd_real, pytest.mark.integration, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
UNIT = "edge-agent.service"
ENV_FILE = "/etc/edge-agent/agent.env"
EDGE_AGENT = "/opt/edge-agent/venv/bin/edge-agent"
TRAFFIC = {"topic": "city/+/traffic/+/data", "task": "sensor.stats"}
PARKING = {"topic": "city/+/parking/+/data", "task": "sensor.stats"}
WATCHDOG_S = 6  # instead of the unit's 30 s; the agent pings every second
# The only change to the units: a watchdog kill in seconds rather than half a minute.
TEST_DROP_IN = f"[Service]\nWatchdogSec={WATCHDOG_S}s\n"

why_not = missing_prerequisites()
if why_not is not None:
    pytest.skip(f"a real systemd cannot be booted here: {why_not}", allow_module_level=True)


class Gateway:
    """The booted machine with the agent installed, its broker, and what the tests share."""

    def __init__(self, machine: Machine, broker: Mosquitto, install_output: str) -> None:
        self.machine = machine
        self.broker = broker
        self.install_output = install_output
        self.agent_id = f"sd-{uuid.uuid4().hex[:6]}"
        self.example = machine.path(ENV_FILE).read_text()

    def configure(self, path: str = ENV_FILE, *, example: bool = True, **values: str) -> None:
        """Edit an env file as an operator does: the installed example, the broker line set, our lines added."""
        lines = [line for line in self.example.splitlines() if not line.startswith("EDGE_AGENT_MQTT__HOST=")
                 ] if example else []
        settings = {"EDGE_AGENT_MQTT__HOST": "127.0.0.1", "EDGE_AGENT_MQTT__PORT": str(self.broker.port),
                    "EDGE_AGENT_MQTT__RECONNECT_MAX_S": "1", "EDGE_AGENT_METRICS__PORT": "0",
                    "EDGE_AGENT_LOCAL__WORKERS": "1", "EDGE_AGENT_ROUTES": json.dumps([TRAFFIC]), **values}
        lines += [f"{name}={value}" for name, value in settings.items() if value]
        target = self.machine.path(path)
        existed = target.exists()
        target.write_text("\n".join(lines) + "\n")  # in place: owner and mode stay
        if not existed:
            self.machine.run("chgrp", "edge-agent", path)
            self.machine.run("chmod", "0640", path)

    def systemctl(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.machine.run("systemctl", *args, check=check, timeout=timeout)

    def main_pid(self, unit: str = UNIT) -> int:
        return int(self.machine.show(unit, "MainPID")["MainPID"])

    def running(self, unit: str = UNIT) -> None:
        """Make sure the unit runs (a test may follow any other, or run alone)."""
        if self.machine.show(unit, "ActiveState")["ActiveState"] != "active":
            self.systemctl("reset-failed", unit, check=False)
            self.systemctl("start", unit)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    workdir = tmp_path_factory.mktemp("systemd-real")
    try:
        base = cached_root(workdir / "debootstrap.log")
    except RuntimeError as exc:
        pytest.fail(str(exc))
    broker = Mosquitto(workdir / "broker", port=free_port())  # started by the first test
    with booted(base, workdir / "machine") as machine:
        machine.copy_checkout(REPO, "/src/edge-agent")
        installed = machine.run("bash", "-c", "cd /src/edge-agent && deploy/install.sh", timeout=600)
        for unit in (UNIT, "edge-agent@.service"):
            drop_in = machine.path(f"/etc/systemd/system/{unit}.d/test-watchdog.conf")
            drop_in.parent.mkdir(parents=True)
            drop_in.write_text(TEST_DROP_IN)
        machine.run("systemctl", "daemon-reload")
        gateway = Gateway(machine, broker, installed.stdout + installed.stderr)
        gateway.configure(EDGE_AGENT_AGENT_ID=gateway.agent_id)
        try:
            yield gateway
        finally:
            broker.stop()


def results(collector: Collector) -> dict[str, dict[str, Any]]:
    """Results by the topic they answer (each test publishes to topics of its own)."""
    return {json.loads(payload)["topic"]: json.loads(payload) for _, payload in collector.snapshot()}


def test_install_as_documented_and_check_config_as_the_service_user(gateway: Gateway) -> None:
    machine = gateway.machine
    assert "install.sh: done" in gateway.install_output, gateway.install_output
    assert not machine.path("/bin/kill").exists() and not machine.path("/usr/bin/kill").exists()  # no procps
    checked = machine.run("runuser", "-u", "edge-agent", "--", EDGE_AGENT, "check-config", "--env-file", ENV_FILE)
    assert json.loads(checked.stdout)["agent_id"] == gateway.agent_id


def test_start_returns_once_connected_and_subscribed(gateway: Gateway) -> None:
    machine = gateway.machine
    # The broker is down: `systemctl start` waits (TimeoutStartSec=infinity) while the agent reconnects.
    starting = machine.start("systemctl", "enable", "--now", UNIT)
    wait_until(lambda: machine.show(UNIT, "ActiveState")["ActiveState"] == "activating", 30, "activating")
    status = wait_until(lambda: machine.show(UNIT, "StatusText")["StatusText"], 30, "a status line")
    assert status == f"connecting to the broker at 127.0.0.1:{gateway.broker.port}"
    time.sleep(3)
    assert starting.poll() is None, starting.communicate()
    assert machine.show(UNIT, "ActiveState")["ActiveState"] == "activating"
    assert not machine.events(UNIT, "agent_ready")

    gateway.broker.start()
    assert starting.wait(60) == 0, starting.communicate()
    starting.communicate()
    # Returned only after READY=1, which comes once the broker confirmed the routes: a message published now
    # is the agent's.
    assert machine.events(UNIT, "mqtt_subscribed") and machine.events(UNIT, "agent_ready")
    collector = Collector(gateway.broker.port, f"edge/{gateway.agent_id}/results/#")
    device = publisher(gateway.broker.port)
    try:
        device.publish("city/a/traffic/start/data", b'{"speed": 1}', qos=1)
        wait_until(lambda: "city/a/traffic/start/data" in results(collector), 20, "the first result")
    finally:
        device.disconnect()
        collector.close()


def test_the_status_line_says_what_the_agent_does(gateway: Gateway) -> None:
    gateway.running()
    device = publisher(gateway.broker.port)
    try:
        for i in range(5):
            device.publish(f"city/a/traffic/status{i}/data", json.dumps({"speed": i}), qos=1).wait_for_publish(10)
    finally:
        device.disconnect()

    def counted() -> str:
        text = gateway.machine.show(UNIT, "StatusText")["StatusText"]
        return text if any(f"; {n} received, {n} done, 0 dead-lettered, 0 queued" in text for n in range(5, 50)) else ""

    status = wait_until(counted, 20, "a status line with the messages")  # refreshed every 5 s
    assert status.startswith("connected; ") and status.endswith(" in store"), status
    assert f'Status: "{status}"' in gateway.systemctl("status", "--no-pager", UNIT).stdout


def test_reload_applies_a_changed_route_and_waits_for_it(gateway: Gateway) -> None:
    gateway.running()
    machine = gateway.machine
    collector = Collector(gateway.broker.port, f"edge/{gateway.agent_id}/results/#")
    device = publisher(gateway.broker.port)
    try:
        pid = gateway.main_pid()
        gateway.configure(EDGE_AGENT_AGENT_ID=gateway.agent_id, EDGE_AGENT_ROUTES=json.dumps([TRAFFIC, PARKING]))
        reloaded = gateway.systemctl("reload", UNIT)
        assert reloaded.returncode == 0
        # Done when systemctl returns: the outcome is in, the broker confirmed the new route.
        assert machine.events(UNIT, "reload_applied")[-1]["routes"] == [TRAFFIC["topic"], PARKING["topic"]]
        assert lines_containing(machine.journal(UNIT), "edge-agent reload: reload applied; routes: "
                                f"{TRAFFIC['topic']}, {PARKING['topic']}")
        assert gateway.main_pid() == pid
        device.publish("city/a/parking/reload/data", b'{"free": 3}', qos=1)
        wait_until(lambda: "city/a/parking/reload/data" in results(collector), 20, "a result on the new route")
    finally:
        device.disconnect()
        collector.close()


def test_reload_of_an_invalid_file_fails_and_the_running_routes_keep_working(gateway: Gateway) -> None:
    gateway.running()
    machine = gateway.machine
    gateway.configure(EDGE_AGENT_AGENT_ID=gateway.agent_id, EDGE_AGENT_ROUTES=json.dumps([TRAFFIC, PARKING]))
    gateway.systemctl("reload", UNIT)
    pid = gateway.main_pid()
    gateway.configure(EDGE_AGENT_AGENT_ID=gateway.agent_id, EDGE_AGENT_ROUTES="[{broken",
                      EDGE_AGENT_MQTT_HOST="broker.example")
    failed = gateway.systemctl("reload", UNIT, check=False)
    assert failed.returncode != 0
    status = gateway.systemctl("status", "--no-pager", "--lines=20", UNIT, check=False).stdout
    assert "Active: active (running)" in status and "ExecReload=" in status and "status=1/FAILURE" in status
    assert "configuration error: EDGE_AGENT_ROUTES: not valid JSON" in status
    assert "configuration error: EDGE_AGENT_MQTT_HOST: unknown setting" in status
    assert {e["variable"] for e in machine.events(UNIT, "reload_failed")} >= {"EDGE_AGENT_ROUTES",
                                                                              "EDGE_AGENT_MQTT_HOST"}
    assert gateway.main_pid() == pid
    collector = Collector(gateway.broker.port, f"edge/{gateway.agent_id}/results/#")
    device = publisher(gateway.broker.port)
    try:
        device.publish("city/a/parking/invalid/data", b'{"free": 2}', qos=1)
        device.publish("city/a/traffic/invalid/data", b'{"speed": 2}', qos=1)
        wait_until(lambda: {"city/a/parking/invalid/data", "city/a/traffic/invalid/data"} <= results(collector).keys(),
                   20, "results with the running routes")
    finally:
        device.disconnect()
        collector.close()
        gateway.configure(EDGE_AGENT_AGENT_ID=gateway.agent_id)
        gateway.systemctl("reload", UNIT)


def test_sigkill_restarts_the_agent_and_loses_nothing(gateway: Gateway) -> None:
    gateway.running()
    machine = gateway.machine
    restarts = int(machine.show(UNIT, "NRestarts")["NRestarts"])
    pid = gateway.main_pid()
    collector = Collector(gateway.broker.port, f"edge/{gateway.agent_id}/results/#")
    device = publisher(gateway.broker.port)
    total = 300
    topics = [f"city/a/traffic/kill{i}/data" for i in range(total)]
    sent = threading.Event()

    def publish() -> None:
        for i, topic in enumerate(topics):  # QoS 1 before, while and after the kill
            device.publish(topic, json.dumps({"speed": i}), qos=1)
            time.sleep(0.01)
        sent.set()

    sender = threading.Thread(target=publish)
    try:
        sender.start()
        wait_until(lambda: len(results(collector)) >= 50, 30, "results before the kill")
        gateway.systemctl("kill", "--signal=SIGKILL", "--kill-whom=main", UNIT)
        wait_until(lambda: gateway.main_pid() not in (0, pid) and
                   machine.show(UNIT, "ActiveState")["ActiveState"] == "active", 60, "the restarted agent")
        assert int(machine.show(UNIT, "NRestarts")["NRestarts"]) == restarts + 1
        sender.join(60)
        assert sent.is_set()
        wait_until(lambda: len(results(collector)) == total, 60, "a result for every message")
        assert sorted(results(collector)) == sorted(topics)
        # A message redelivered after the kill keeps its task: one task id per message, duplicates or not.
        assert len({json.loads(payload)["task_id"] for _, payload in collector.snapshot()}) == total
    finally:
        sender.join(60)
        device.disconnect()
        collector.close()


def test_a_stopped_event_loop_is_killed_by_the_watchdog_and_restarted(gateway: Gateway) -> None:
    gateway.running()
    machine = gateway.machine
    restarts = int(machine.show(UNIT, "NRestarts")["NRestarts"])
    pid = gateway.main_pid()
    machine.run("python3", "-c", f"import os, signal; os.kill({pid}, signal.SIGSTOP)")  # no procps, no kill
    began = time.monotonic()
    wait_until(lambda: gateway.main_pid() not in (0, pid) and
               machine.show(UNIT, "ActiveState")["ActiveState"] == "active", WATCHDOG_S + 60, "the restarted agent")
    assert time.monotonic() - began >= WATCHDOG_S - 1
    assert int(machine.show(UNIT, "NRestarts")["NRestarts"]) == restarts + 1
    journal = machine.journal(UNIT)
    assert lines_containing(journal, f"{UNIT}: Watchdog timeout (limit {WATCHDOG_S}s)!")
    assert lines_containing(journal, "Fatal Python error: Aborted")  # faulthandler: every thread's traceback


def test_a_configuration_error_exit_78_is_not_restarted(gateway: Gateway) -> None:
    gateway.running()
    machine = gateway.machine
    try:
        gateway.configure(EDGE_AGENT_AGENT_ID=gateway.agent_id, EDGE_AGENT_MQTT__PORT="70000")
        assert gateway.systemctl("restart", UNIT, check=False).returncode != 0
        time.sleep(4)  # twice RestartSec=2s: a restart would have happened
        # NRestarts counts automatic restarts since the last start an operator asked for (this restart).
        shown = machine.show(UNIT, "ActiveState", "ExecMainStatus", "NRestarts", "Result")
        assert shown == {"ActiveState": "failed", "ExecMainStatus": "78", "NRestarts": "0", "Result": "exit-code"}
        status = gateway.systemctl("status", "--no-pager", UNIT, check=False).stdout
        assert "configuration error: EDGE_AGENT_MQTT__PORT: Input should be less than or equal to 65535" in status
    finally:
        gateway.configure(EDGE_AGENT_AGENT_ID=gateway.agent_id)
        gateway.systemctl("reset-failed", UNIT)
        gateway.systemctl("start", UNIT)


def test_load_credential_delivers_the_cloud_token(gateway: Gateway, tmp_path: Path) -> None:
    machine = gateway.machine
    cloud = DevCloud(tmp_path / "devcloud.log")
    collector = Collector(gateway.broker.port, f"edge/{gateway.agent_id}/results/#")
    device = publisher(gateway.broker.port)
    try:
        machine.run("install", "-d", "-m", "0700", "/etc/credstore")
        machine.run("sh", "-c", "umask 077 && cat > /etc/credstore/edge-agent.cloud-token", input=cloud.token)
        offload = {"topic": "city/+/cloud/+/data", "task": "sensor.stats", "placement": "cloud"}
        gateway.configure(EDGE_AGENT_AGENT_ID=gateway.agent_id, EDGE_AGENT_CLOUD__URL=cloud.url,
                          EDGE_AGENT_ROUTES=json.dumps([TRAFFIC, offload]))
        gateway.systemctl("restart", UNIT)
        listed = machine.run("ls", f"/run/credentials/{UNIT}").stdout.split()
        assert "EDGE_AGENT_CLOUD__TOKEN" in listed and "EDGE_AGENT_MQTT__PASSWORD" not in listed  # skipped
        assert cloud.token not in machine.run("systemctl", "show", UNIT).stdout
        assert cloud.token.encode() not in machine.path(f"/proc/{gateway.main_pid()}/environ").read_bytes()
        device.publish("city/a/cloud/1/data", b'{"speed": 4}', qos=1)
        result = wait_until(lambda: results(collector).get("city/a/cloud/1/data"), 60, "the offloaded result")
        # The devcloud refuses requests without its token (401): the task would have run here instead.
        assert result["placement"] == "cloud" and "fallback" not in result["decision"], result
    finally:
        device.disconnect()
        collector.close()
        cloud.stop()
        machine.run("rm", "-f", "/etc/credstore/edge-agent.cloud-token")
        gateway.configure(EDGE_AGENT_AGENT_ID=gateway.agent_id)
        gateway.systemctl("restart", UNIT)


def test_stop_exits_0_and_leaves_the_retained_offline_status(gateway: Gateway) -> None:
    gateway.running()
    assert gateway.systemctl("stop", UNIT).returncode == 0
    shown = gateway.machine.show(UNIT, "ActiveState", "ExecMainStatus", "ExecMainCode", "Result")
    assert shown == {"ActiveState": "inactive", "ExecMainStatus": "0", "ExecMainCode": "1", "Result": "success"}
    assert gateway.machine.events(UNIT, "agent_stopped")
    status = Collector(gateway.broker.port, f"edge/{gateway.agent_id}/status")  # a new subscriber: the retained one
    try:
        wait_until(lambda: status.snapshot(), 10, "the retained status")
        assert status.snapshot()[-1][1] == b"offline"
    finally:
        status.close()


def test_the_template_runs_two_instances_side_by_side(gateway: Gateway) -> None:
    """north takes its instance name as agent id; south's env file sets its own, and south keeps the
    EnvironmentFile= of an operator's own drop-in, under which a reload still applies the edited file."""
    machine = gateway.machine
    gateway.configure("/etc/edge-agent/north.env", example=False)
    gateway.configure("/etc/edge-agent/south.env", example=False, EDGE_AGENT_AGENT_ID="gw-south",
                      EDGE_AGENT_ROUTES=json.dumps([PARKING]))
    drop_in = machine.path("/etc/systemd/system/edge-agent@south.service.d/operator.conf")
    drop_in.parent.mkdir(parents=True, exist_ok=True)
    drop_in.write_text("[Service]\nEnvironmentFile=/etc/edge-agent/south.env\n")
    machine.run("systemctl", "daemon-reload")
    statuses = Collector(gateway.broker.port, "edge/+/status")
    results_ = Collector(gateway.broker.port, "edge/+/results/#")
    device = publisher(gateway.broker.port)
    try:
        gateway.systemctl("start", "edge-agent@north", "edge-agent@south")
        assert machine.show("edge-agent@north", "ActiveState")["ActiveState"] == "active"
        assert machine.show("edge-agent@south", "ActiveState")["ActiveState"] == "active"
        south_pid = gateway.main_pid("edge-agent@south")
        environ = machine.path(f"/proc/{south_pid}/environ").read_bytes().split(b"\0")
        assert b"EDGE_AGENT_AGENT_ID=gw-south" in environ  # EnvironmentFile= copied the file
        wait_until(lambda: {("edge/north/status", b"online"), ("edge/gw-south/status", b"online")}
                   <= set(statuses.snapshot()), 20, "both instances online")
        assert machine.path("/var/lib/edge-agent/north/edge-agent.db").exists()
        assert machine.path("/var/lib/edge-agent/south/edge-agent.db").exists()

        device.publish("city/a/traffic/north/data", b'{"speed": 5}', qos=1)
        device.publish("city/a/parking/south/data", b'{"free": 5}', qos=1)
        wait_until(lambda: {"edge/north/results/city/a/traffic/north/data",
                            "edge/gw-south/results/city/a/parking/south/data"} <= {t for t, _ in results_.snapshot()},
                   20, "a result from each instance")

        # south's file, copied into its environment at start by EnvironmentFile=, is still what a reload reads.
        gateway.configure("/etc/edge-agent/south.env", example=False, EDGE_AGENT_AGENT_ID="gw-south",
                          EDGE_AGENT_ROUTES=json.dumps([PARKING, TRAFFIC]))
        gateway.systemctl("reload", "edge-agent@south")
        assert machine.events("edge-agent@south", "reload_applied")[-1]["routes"] == [PARKING["topic"],
                                                                                      TRAFFIC["topic"]]
        device.publish("city/b/traffic/both/data", b'{"speed": 6}', qos=1)
        wait_until(lambda: {"edge/north/results/city/b/traffic/both/data",
                            "edge/gw-south/results/city/b/traffic/both/data"} <= {t for t, _ in results_.snapshot()},
                   20, "a result from both instances")
        for instance in ("edge-agent@north", "edge-agent@south"):
            gateway.systemctl("stop", instance)
            assert machine.show(instance, "Result")["Result"] == "success"
    finally:
        device.disconnect()
        statuses.close()
        results_.close()


def test_the_hardening_is_in_force(gateway: Gateway) -> None:
    """Nothing of the unit's sandbox is relaxed for these tests: it is what the agent ran in above."""
    gateway.running()
    machine = gateway.machine
    pid = gateway.main_pid()
    assert machine.path(f"/proc/{pid}/uid_map").read_text().split() != ["0", "0", "4294967295"]  # PrivateUsers=
    status = dict(line.split(":", 1) for line in machine.path(f"/proc/{pid}/status").read_text().splitlines())
    assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2"
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0
    mounts = machine.path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    root = next(line.split() for line in mounts if line.split()[4] == "/")
    assert "ro" in root[5].split(","), root  # ProtectSystem=strict

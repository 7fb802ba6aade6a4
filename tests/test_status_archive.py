"""`edge-agent status` shows the archive, against the real agent process and a real Mosquitto (the devcloud and
its S3 server for the cloud): per archive route what is kept and where, the disk budget, uploads pending, and
why the cloud is unavailable or the budget is full (the report the archive's manager leaves after each pass,
agent/archive/report.py)."""

from __future__ import annotations

import base64
import json
import os
import re
import urllib.request
from typing import Any

import pytest
from test_status import cli_json

from agent.cli import main

from support import ROOT, Agent, Agents, DevCloud, Mosquitto, citypulse_rows, free_port, publisher, wait_for

pytestmark = pytest.mark.integration

KEPT = "city/+/noise/+/data"
ROUTES = [{"topic": KEPT, "task": "sensor.stats", "archive": {"days": 7, "retrievals_per_month": 2}},
          {"topic": "city/+/traffic/+/data", "task": "sensor.stats"}]
QUICK = {"EDGE_AGENT_ARCHIVE__SEAL_AGE_S": "0.5", "EDGE_AGENT_ARCHIVE__SEAL_BYTES": "65536",
         "EDGE_AGENT_ARCHIVE__PASS_INTERVAL_S": "0.2"}


def start_agent(agents: Agents, broker: Mosquitto, routes: list[dict[str, Any]], **env: str) -> Agent:
    agent = agents(broker, routes=routes, extra_env={"EDGE_AGENT_METRICS__PORT": str(free_port()), **QUICK, **env})
    agent.start()
    return agent


def test_status_shows_the_archive_and_a_full_disk_budget(broker: Mosquitto, agents: Agents,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    budget = 1024 * 1024  # the least the settings allow; ~1.5 MB of clips overfill it
    agent = start_agent(agents, broker, ROUTES, EDGE_AGENT_ARCHIVE__DISK_BUDGET_BYTES=str(budget))
    env = ("--env-file", str(agent.env_file))
    device = publisher(broker.port)

    def status() -> dict[str, Any]:
        return cli_json(capsys, "status", *env)

    def settled(inputs: int, done: int) -> bool:
        now = status()
        archive = now["archive"]
        return (now["totals"]["done"] == done and archive["as_of"] is not None
                and archive["inputs_archived"] + archive["disk"]["inputs_refused"] == inputs)

    for batch in range(10):  # in steps, so that the journal is sealed at its size, not once at the end
        for i in range(25):  # random bytes, base64: compressed to about three quarters
            clip = {"db": 40 + i % 9, "clip": base64.b64encode(os.urandom(6000)).decode()}
            device.publish(f"city/aarhus/noise/{i % 3}/data", json.dumps(clip), qos=1)
        wait_for(lambda n=25 * (batch + 1): settled(n, n), 30, "the batch archived or refused, its tasks done")
    for row in citypulse_rows(5):
        device.publish("city/aarhus/traffic/1/data", json.dumps(row), qos=1)
    wait_for(lambda: settled(250, 255), 30, "the traffic route's tasks done, nothing of it archived")
    archive = status()["archive"]
    disk = archive["disk"]
    # The budget holds: new inputs were refused rather than the disk overfilled; the tasks ran all the same.
    assert disk["full"] and disk["inputs_refused"] > 0 and disk["budget_bytes"] == budget
    assert budget <= disk["used_bytes"] <= budget + 250_000  # at most the batch that crossed it
    assert archive["cloud"] is None and archive["uploads_pending"] == 0
    [route] = archive["routes"]  # the traffic route keeps nothing
    assert (route["route"], route["archived"], route["days"], route["prior_per_month"]) == (KEPT, True, 7, 2)
    assert route["segments"]["gateway"] >= 4 and route["segments"]["cloud"] == 0
    assert route["bytes"]["gateway"] <= disk["used_bytes"] and 0 < route["retrievals_per_month"] <= 2

    assert main(["status", *env]) == 0
    text = capsys.readouterr().out
    assert "\narchive    disk 1." in text and "MiB of its 1.0 MiB budget" in text
    assert "no cloud (EDGE_AGENT_CLOUD__URL unset)" in text
    assert f"           {KEPT}  kept 7 days: gateway {route['segments']['gateway']} segment(s)" in text
    assert "DISK BUDGET FULL: new inputs are not archived until segments leave or expire" in text

    # The dashboard's archive row asks only for series such an agent exposes (tests/test_operations_e2e.py
    # checks the other rows against an agent without an archive).
    port = agent.env_file.read_text().split("EDGE_AGENT_METRICS__PORT=")[1].split()[0]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        metrics = response.read().decode()
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "edge-agent.json").read_text())
    used = {name for panel in dashboard["panels"] for target in panel.get("targets", [])
            for name in re.findall(r"\b(edge_agent_archive_[a-z_]+)", target["expr"])}
    exposed = re.findall(r"^# TYPE (edge_agent_archive_[a-z_]+) (\w+)", metrics, re.MULTILINE)
    names = {name for name, _ in exposed} | {f"{name}_total" for name, kind in exposed if kind == "counter"}
    assert len(used) >= 14 and used <= names, used - names
    assert agent.terminate() == 0


@pytest.mark.slow  # the devcloud's S3 server
def test_status_shows_that_the_cloud_quota_is_full(broker: Mosquitto, agents: Agents, storage_devcloud: DevCloud,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    storage_devcloud.knobs(storage_gb_bytes=6000)  # the agent's 1 GB quota holds a few segments
    try:
        # Read back often, over a dear uplink: every segment is cheaper in the cloud.
        routes = [{"topic": KEPT, "task": "sensor.stats", "archive": {"days": 30, "retrievals_per_month": 50}}]
        agent = start_agent(agents, broker, routes, **storage_devcloud.agent_env(), **{
            "EDGE_AGENT_ARCHIVE__UPLINK_PER_GB": "0.5", "EDGE_AGENT_ARCHIVE__CLOUD_EGRESS_PER_GB": "0.01",
            "EDGE_AGENT_ARCHIVE__CLOUD_QUOTA_GB": "1", "EDGE_AGENT_ARCHIVE__SEAL_BYTES": "8192"})
        env = ("--env-file", str(agent.env_file))
        device = publisher(broker.port)

        def archive() -> dict[str, Any]:
            return dict(cli_json(capsys, "status", *env)["archive"])

        rows = citypulse_rows(300)
        for batch in range(10):  # in steps: segments of a few kB each
            for i in range(30):
                device.publish(f"city/aarhus/noise/{i % 3}/data", json.dumps(next(rows)), qos=1)
            wait_for(lambda n=30 * (batch + 1): archive()["inputs_archived"] == n, 30, "the batch archived")
        wait_for(lambda: archive()["cloud"]["available"] is False, 60, "the quota full")
        wait_for(lambda: archive()["uploads_pending"] > 0, 60, "segments waiting for room")
        report = archive()
        cloud = report["cloud"]
        assert cloud["reason"] == "quota_exceeded" and "QuotaExceeded" in cloud["error"]
        assert cloud["uploads"] >= 1 and cloud["quota_bytes"] == 10**9 and not report["disk"]["full"]
        [route] = report["routes"]
        assert 0 < route["bytes"]["cloud"] <= 6000 and route["segments"]["gateway"] >= report["uploads_pending"]
        assert [e["event"] for e in agent.events()].count("archive_cloud_unavailable") == 1  # warned once

        assert main(["status", *env]) == 0
        text = capsys.readouterr().out
        assert "of its 1 GB quota, UNAVAILABLE" in text
        assert "CLOUD UNAVAILABLE for " in text and "the storage resource's quota is full (QuotaExceeded" in text
        assert "segments stay on the gateway, within its disk budget, until retention frees room in the cloud" in text
        assert agent.terminate() == 0
    finally:
        storage_devcloud.reset()

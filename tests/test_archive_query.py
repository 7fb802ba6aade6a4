"""The archive in the running agent, end to end: a real Mosquitto, the agent as a process, the devcloud with its
S3 server. Inputs of archive routes land in segments; the read-heavy route's go to cloud storage and the other's
stay on the gateway; `edge-agent archive query` and the MQTT 5 request/response query return every archived
message exactly once, in order, across both places; a SIGKILL of the agent loses no committed input."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from test_archive_daemon import mqtt_query

from agent.archive.catalog import Catalog

from support import Agent, Agents, DevCloud, Mosquitto, citypulse_rows, publisher, wait_for

READ_OFTEN = "city/+/traffic/+/data"  # read back often: cheaper in the cloud (a dear uplink, cheap egress)
NEVER_READ = "city/+/parking/+/data"  # never read: the gateway's disk is paid for already
ROUTES = [
    {"topic": READ_OFTEN, "task": "sensor.stats", "archive": {"days": 30, "retrievals_per_month": 50}},
    {"topic": NEVER_READ, "task": "sensor.stats", "archive": {"days": 30, "retrievals_per_month": 0}},
]
ARCHIVE_ENV = {
    "EDGE_AGENT_ARCHIVE__UPLINK_PER_GB": "0.5", "EDGE_AGENT_ARCHIVE__CLOUD_STORAGE_PER_GB_MONTH": "0.02",
    "EDGE_AGENT_ARCHIVE__CLOUD_EGRESS_PER_GB": "0.01", "EDGE_AGENT_ARCHIVE__SEAL_BYTES": "8192",
    "EDGE_AGENT_ARCHIVE__SEAL_AGE_S": "1", "EDGE_AGENT_ARCHIVE__PASS_INTERVAL_S": "0.2",
    "EDGE_AGENT_ARCHIVE__QUERY_CHUNK_BYTES": "8192",
}


def start_agent(agents: Agents, broker: Mosquitto, cloud: DevCloud, name: str = "agent") -> Agent:
    agent = agents(broker, name, routes=ROUTES, extra_env={**cloud.agent_env(), **ARCHIVE_ENV})
    agent.start()
    return agent


def publish(port: int, n: int, start: int = 0) -> list[tuple[str, bytes]]:
    """``n`` readings alternating between the two routes, in order; returns (topic, payload) as sent."""
    device = publisher(port)
    sent = []
    for i, row in enumerate(citypulse_rows(n, start)):
        topic = f"city/aarhus/{'traffic' if i % 2 else 'parking'}/{i % 5}/data"
        payload = json.dumps(row).encode()
        device.publish(topic, payload, qos=1).wait_for_publish(10)
        sent.append((topic, payload))
    device.loop_stop()
    device.disconnect()
    return sent


def catalog_of(agent: Agent) -> Catalog:
    return Catalog(agent.workdir / "state" / "archive" / "catalog.db")


def archived(agent: Agent) -> int:
    path = agent.workdir / "state" / "archive" / "catalog.db"
    return sum(e.count for e in Catalog(path).entries()) if path.exists() else 0


def cli_query(agent: Agent, route: str, *extra: str) -> list[dict[str, Any]]:
    out = subprocess.run([sys.executable, "-m", "agent", "archive", "query", "--env-file", str(agent.env_file),
                          "--route", route, *extra], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.mark.slow
def test_queries_return_every_archived_message_once_in_order_from_both_places(
        agents: Agents, broker: Mosquitto, storage_devcloud: DevCloud) -> None:
    agent = start_agent(agents, broker, storage_devcloud)
    agent.wait_logged("archive_query_subscribed")
    sent = publish(broker.port, 200)
    wait_for(lambda: archived(agent) == 200, 60, "every input sealed in a segment")
    catalog = catalog_of(agent)
    wait_for(lambda: all(e.place == "cloud" for e in catalog.entries() if "traffic" in e.route), 60,
             "the read-heavy route's segments in the cloud")
    places = {(e.route, e.place) for e in catalog.entries()}
    assert places == {(READ_OFTEN, "cloud"), (NEVER_READ, "gateway")}, places

    answer = cli_query(agent, "city/#")
    assert [(m["topic"], m["payload"].encode()) for m in answer] == sent
    assert len({m["task_id"] for m in answer}) == len(sent)
    assert [m["received_at"] for m in answer] == sorted(m["received_at"] for m in answer)
    # A range and a narrower filter.
    middle = answer[50]["received_at"], answer[149]["received_at"]
    part = cli_query(agent, READ_OFTEN, "--from", str(middle[0]), "--to", str(middle[1]))
    assert [m["task_id"] for m in part] == [m["task_id"] for m in answer[50:150] if "traffic" in m["topic"]]

    chunks = mqtt_query(broker.port, agent.agent_id, {"route": "city/#"})
    assert [c["seq"] for c in chunks] == list(range(len(chunks))) and len(chunks) > 1
    assert all(len(json.dumps(c)) <= 8192 for c in chunks)
    messages = [m for c in chunks for m in c["messages"]]
    assert [m["task_id"] for m in messages] == [m["task_id"] for m in answer]
    assert chunks[-1]["count"] == len(sent)
    # Each query fed the retrieval-rate estimate.
    assert {route for _, route, *_ in catalog.reads_since(0)} == {READ_OFTEN, NEVER_READ}
    bad = mqtt_query(broker.port, agent.agent_id, {"from": 0})
    assert bad[-1]["done"] and "bad request" in bad[-1]["error"]


@pytest.mark.slow
def test_a_sigkill_during_intake_loses_no_committed_input(agents: Agents, broker: Mosquitto,
                                                          storage_devcloud: DevCloud) -> None:
    agent = start_agent(agents, broker, storage_devcloud)
    device = publisher(broker.port)
    sent = []
    for i, row in enumerate(citypulse_rows(400)):
        topic = f"city/aarhus/{'traffic' if i % 2 else 'parking'}/{i % 5}/data"
        payload = json.dumps(row).encode()
        device.publish(topic, payload, qos=1)
        sent.append((topic, payload))
        if i == 150:
            wait_for(lambda: archived(agent) > 0, 30, "a first seal")
            agent.kill()  # a power cut in the middle of the stream
            agent.start()  # the broker kept what was not acknowledged
    wait_for(lambda: archived(agent) >= len(sent), 90, "every input archived")
    device.loop_stop()
    device.disconnect()
    answer = cli_query(agent, "city/#")
    got = [(m["topic"], m["payload"].encode()) for m in answer]
    assert sorted(got) == sorted(sent)  # every committed input, once: none lost, none twice

"""A move at a read, against real S3 through the devcloud's storage resources: when the disk will need room
before a segment's deletion, the segment a query of the agent is about to read is the one that leaves (its
upload carries the read), and the query reads it from the cloud; with room to spare, or for a query with no
placement manager behind it (`edge-agent archive query`), it is read where it is (agent/archive/manager.py:
before_read, agent/archive/cost.py: read_disk_used). The manager in-process, then the agent as a process
answering the MQTT query on a real Mosquitto."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs
from test_archive_daemon import mqtt_query
from test_archive_manager import PRICES, ROUTE, fill, make
from test_archive_query import ARCHIVE_ENV, archived, catalog_of, cli_query

from agent.archive.cost import KNEE, ArchivePrices
from agent.archive.manager import Manager, object_key
from agent.archive.objectstore import ObjectStore
from agent.archive.query import Query, Reader

from support import Agents, DevCloud, Mosquitto, citypulse_rows, publisher, wait_for

EVERYTHING = Query(ROUTE, 0.0, float("inf"))


def reader(manager: Manager, objects: ObjectStore, *, moves: bool) -> Reader:
    """The agent's reader (the manager sees each segment before it is read), or the command's (it does not)."""
    return Reader(manager.intake.root, manager.catalog, lambda: objects,
                  before_read=manager.before_read if moves else None)


def test_on_a_filling_disk_the_segment_being_read_is_the_one_that_goes_to_the_cloud(
        tmp_path: Path, object_store: ObjectStore) -> None:
    # Never read before (prior 0): at their seal the segments stay, the disk is far from its budget now. But the
    # route seals all the time and keeps its segments 30 days: the disk will be full long before then.
    clock = [time.time()]
    manager = make(tmp_path, PRICES, object_store, reads=0.0, clock=clock)
    ids = fill(manager, 4)  # each record received at a time of its own
    entries = manager.catalog.entries(route=ROUTE)
    assert [e.place for e in entries] == ["gateway"] * 4
    assert manager.disk_used() < 0.7 * PRICES.disk_budget_bytes
    until = entries[1].last_at + 30 * 86_400
    assert manager.forecast_disk(clock[0], manager.disk_used()).peak(until) > KNEE * PRICES.disk_budget_bytes

    # A query reads the second segment only.
    target = entries[1]
    with capture_logs() as logs:
        got = [r.task_id for r in reader(manager, object_store, moves=True).query(
            Query(ROUTE, target.first_at, target.last_at))]
    assert got == ids[60:120]  # every record of it, once, in order, read from the cloud

    after = {e.segment_id: e for e in manager.catalog.entries(route=ROUTE)}
    assert after[target.segment_id].place == "cloud"
    assert [after[e.segment_id].place for e in entries if e is not target] == ["gateway"] * 3
    assert not manager.local_path(target).exists()
    stored = object_store.head(object_key(ROUTE, target.segment_id))
    assert stored is not None and stored.sha256 == target.sha256
    decision = after[target.segment_id].decision
    assert decision is not None and decision["reason"] == "read" and decision["choice"] == "cloud"
    assert decision["disk"]["used_bytes"] < decision["disk"]["priced_at_bytes"] <= KNEE * PRICES.disk_budget_bytes
    assert decision["cloud"]["total"] < decision["gateway"]["total"]
    assert manager.counters.read_moves == 1 and manager.counters.uploads == 1
    placed = [e for e in logs if e["event"] == "archive_segment_placed"]
    assert [(e["segment"], e["reason"], e["choice"]) for e in placed] == [(target.segment_id, "read", "cloud")]

    # A later pass leaves it there and the rest where they are; a query of everything reads both places.
    manager.run_once()
    assert [e.place for e in manager.catalog.entries(route=ROUTE)] == ["gateway", "cloud", "gateway", "gateway"]
    assert [r.task_id for r in reader(manager, object_store, moves=True).query(EVERYTHING)] == ids
    # The route's reads were all recorded (the moved segment's too): the rate learns from them.
    assert sum(1 for _ in manager.catalog.reads_since(0)) == 1 + 4


def test_with_room_to_spare_a_read_is_answered_from_the_gateway(tmp_path: Path,
                                                                 object_store: ObjectStore) -> None:
    roomy = ArchivePrices(uplink_per_gb=PRICES.uplink_per_gb,
                          cloud_storage_per_gb_month=PRICES.cloud_storage_per_gb_month,
                          cloud_egress_per_gb=PRICES.cloud_egress_per_gb, disk_budget_bytes=100_000_000,
                          margin=PRICES.margin)
    clock = [time.time()]
    manager = make(tmp_path, roomy, object_store, reads=0.0, clock=clock)
    ids = fill(manager, 4)
    # Thirty days of this route's seals fit the budget many times: no room will be needed.
    assert manager.forecast_disk(clock[0], manager.disk_used()).peak(clock[0] + 30 * 86_400) < 0.1 * 100_000_000
    assert [r.task_id for r in reader(manager, object_store, moves=True).query(EVERYTHING)] == ids
    assert {e.place for e in manager.catalog.entries()} == {"gateway"}
    assert manager.counters.read_moves == 0 and object_store.list() == []


def test_the_query_command_reads_segments_where_they_are(tmp_path: Path, object_store: ObjectStore) -> None:
    clock = [time.time()]
    manager = make(tmp_path, PRICES, object_store, reads=0.0, clock=clock)
    ids = fill(manager, 4)
    assert [r.task_id for r in reader(manager, object_store, moves=False).query(EVERYTHING)] == ids
    assert {e.place for e in manager.catalog.entries()} == {"gateway"}
    assert object_store.list() == []


# --- in the running agent -------------------------------------------------------------------------------------

KEPT = "city/+/parking/+/data"  # never read before: at its seal each segment stays on the gateway's disk
BUDGET = 1_048_576  # the least the settings allow


@pytest.mark.slow
def test_the_agents_mqtt_query_moves_the_segment_it_reads_when_the_disk_will_need_the_room(
        agents: Agents, broker: Mosquitto, storage_devcloud: DevCloud) -> None:
    env = {**ARCHIVE_ENV, "EDGE_AGENT_ARCHIVE__DISK_BUDGET_BYTES": str(BUDGET)}
    agent = agents(broker, "agent", routes=[{"topic": KEPT, "task": "sensor.stats",
                                             "archive": {"days": 30, "retrievals_per_month": 0}}],
                   extra_env={**storage_devcloud.agent_env(), **env})
    agent.start()
    agent.wait_logged("agent_ready")
    device = publisher(broker.port)
    for i, row in enumerate(citypulse_rows(200)):
        # About 1 KB each in a segment (a random field does not compress): a fifth of the budget in all.
        payload = json.dumps({**row, "note": os.urandom(1000).hex()}).encode()
        device.publish(f"city/aarhus/parking/{i % 5}/data", payload, qos=1).wait_for_publish(10)
        if i % 50 == 49:  # four segments at least

            def sealed(sent: int = i + 1) -> bool:
                return archived(agent) == sent

            wait_for(sealed, 60, f"{i + 1} inputs sealed")
    device.loop_stop()
    device.disconnect()
    catalog = catalog_of(agent)
    entries = catalog.entries()
    # Far from the budget now (every segment stayed), but 30 days of this route would fill it many times over.
    assert len(entries) >= 3 and {e.place for e in entries} == {"gateway"}
    assert catalog.disk_bytes() < 0.5 * BUDGET

    target = entries[1]
    chunks = mqtt_query(broker.port, agent.agent_id, {"route": KEPT, "from": target.first_at, "to": target.last_at})
    messages = [m for c in chunks for m in c["messages"]]
    assert len(messages) == target.count and "error" not in chunks[-1]
    places = {e.segment_id: e for e in catalog.entries()}
    assert places[target.segment_id].place == "cloud"
    assert {e.place for e in places.values() if e.segment_id != target.segment_id} == {"gateway"}
    decision = places[target.segment_id].decision
    assert decision is not None and decision["reason"] == "read"
    # Every archived message is still there, once and in order, from both places.
    answer = cli_query(agent, KEPT)
    assert len(answer) == 200 and len({m["task_id"] for m in answer}) == 200
    assert [m["received_at"] for m in answer] == sorted(m["received_at"] for m in answer)
    assert [m["task_id"] for m in messages] == [m["task_id"] for m in answer
                                                if target.first_at <= m["received_at"] <= target.last_at]

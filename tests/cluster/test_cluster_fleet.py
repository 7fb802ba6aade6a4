"""A fleet on a real 3-node RabbitMQ cluster (3.10, MQTT 3.1.1, sessions on quorum queues): node deaths, a
rolling restart and an agent's own crash under a steady stream, with every message accounted for.

RabbitMQ 3.10 has no shared subscriptions, so the fleet splits the work by topic: one agent per district,
each subscribed to its district's topics. Each agent lists the three nodes in another order
(EDGE_AGENT_MQTT__HOSTS), so the three start on different nodes. Devices publish QoS 1 readings with their own
sequence numbers at a steady pace through all three nodes and move to the next node when theirs goes away; one
consumer reads every result. The accounting (tests/cluster/traffic.py): every message published gets a result;
several results for one message must share its ``task_id``, except for a message its device had to publish
again because its node died before acknowledging it (then the cluster may hold it twice, and it runs twice).
docs/fleets.md#rabbitmq-310 gives the figures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest
from rabbit import RabbitCluster, RabbitNode
from test_failover import connected_to
from traffic import Device, Results, wait_accounted

from support import Agent, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

DISTRICTS = ("north", "south", "west")
DEVICE_RATE = 25.0  # msgs/s per device; six devices: 150 msgs/s through the cluster


@dataclass
class Fleet:
    agents: dict[str, Agent]
    devices: list[Device]
    results: Results

    def stop_devices(self) -> None:
        for device in self.devices:
            device.stop()

    def close(self) -> None:
        for device in self.devices:
            device.close()
        self.results.close()


def rotated(nodes: list[RabbitNode], by: int) -> list[RabbitNode]:
    return nodes[by % len(nodes):] + nodes[:by % len(nodes)]


@pytest.fixture
def fleet(cluster: RabbitCluster, fleet_agent: Any) -> Any:
    """Three agents, one per district, each first on another node; a consumer; six devices publishing, two per
    district, on the two nodes other than their agent's."""
    nodes = cluster.nodes
    agents = {district: fleet_agent(district, rotated(nodes, i),
                                    [{"topic": f"city/{district}/traffic/+/data", "task": "sensor.stats"}])
              for i, district in enumerate(DISTRICTS)}
    for agent in agents.values():
        agent.start(wait_connected=False)
    for agent in agents.values():
        # Subscribed: from then on the cluster keeps every message for the agent's session.
        agent.wait_logged("mqtt_subscribed", timeout=60)
    assert [connected_to(a) for a in agents.values()] == [[n.address] for n in nodes]
    results = Results([n.address for n in rotated(nodes, 1)])
    devices = [Device([n.address for n in rotated(nodes, i + k)], district, f"{district}{k}", DEVICE_RATE)
               for i, district in enumerate(DISTRICTS) for k in (1, 2)]
    made = Fleet(agents, devices, results)
    try:
        for device in devices:
            device.start()
        yield made
    finally:
        made.close()


def stamps(agent: Agent, event: str) -> list[float]:
    return [datetime.fromisoformat(e["timestamp"]).timestamp() for e in agent.events() if e.get("event") == event]


def failover_seconds(agent: Agent) -> list[float]:
    """Per lost connection, the time from the loss to the broker's SUBACK on the next connection."""
    subscribed = stamps(agent, "mqtt_subscribed")
    return [min(s for s in subscribed if s > lost) - lost for lost in stamps(agent, "mqtt_connection_lost")
            if any(s > lost for s in subscribed)]


def wait_moved(agent: Agent, away_from: RabbitNode, connections: int) -> None:
    """The agent's ``connections``-th connection is up, on another node than ``away_from``, and subscribed."""
    wait_for(lambda: len(connected_to(agent)) >= connections, 15, f"agent {agent.agent_id} on another node")
    assert connected_to(agent)[-1] != away_from.address
    wait_for(lambda: len(stamps(agent, "mqtt_subscribed")) >= connections, 15, "its subscription there")


def test_killing_an_agents_node_loses_nothing(cluster: RabbitCluster, fleet: Fleet) -> None:
    north = fleet.agents["north"]
    node = cluster.node_at(connected_to(north)[-1])
    time.sleep(3)  # the stream before the failure
    node.kill()
    wait_moved(north, node, 2)
    moved = [e for e in north.events() if e.get("event") == "mqtt_failover"]
    # Quorum queues: the session, with what was queued in it and not yet acknowledged, is on the other nodes.
    assert len(moved) == 1 and moved[0]["session_present"] is True, moved
    (seconds,) = failover_seconds(north)
    assert seconds < 10, seconds
    for other in ("south", "west"):  # on nodes that stayed up: not moved
        assert len(connected_to(fleet.agents[other])) == 1
    time.sleep(3)  # the stream after the failure, through the two nodes left
    fleet.stop_devices()
    accounting = wait_accounted(fleet.devices, fleet.results, 60)
    assert accounting.exact, accounting


def test_a_rolling_restart_under_load_loses_nothing(cluster: RabbitCluster, fleet: Fleet) -> None:
    time.sleep(2)  # the stream before the first restart
    for node in cluster.nodes:
        # What an operator waits for before each node: every quorum queue keeps its majority without it.
        cluster.await_quorum_plus_one(node)
        on_it = [(a, len(connected_to(a))) for a in fleet.agents.values() if connected_to(a)[-1] == node.address]
        node.stop()  # graceful: the node closes its clients' connections
        for agent, connections in on_it:
            wait_moved(agent, node, connections + 1)
        cluster.restart(node)
    assert all(len(connected_to(a)) >= 2 for a in fleet.agents.values())  # every agent moved at least once
    assert all(e["session_present"] for a in fleet.agents.values() for e in a.events()
               if e.get("event") == "mqtt_failover")
    time.sleep(2)  # the stream after the last restart
    fleet.stop_devices()
    accounting = wait_accounted(fleet.devices, fleet.results, 90)
    assert accounting.exact, accounting


def test_an_agent_killed_while_the_cluster_is_degraded_loses_nothing(cluster: RabbitCluster, fleet: Fleet) -> None:
    north, west = fleet.agents["north"], fleet.agents["west"]
    down = cluster.node_at(connected_to(west)[-1])  # not north's node
    time.sleep(2)  # the stream before
    down.kill()
    wait_moved(west, down, 2)
    time.sleep(2)  # degraded: two nodes of three carry the stream
    north.kill()  # SIGKILL, the whole process group: committed tasks and results in flight are in its store
    time.sleep(2)  # the agent's outage: the cluster keeps its district's messages in its session
    north.start()  # the same state dir; waits for the connection and the subscription
    assert [e["session_present"] for e in north.events() if e.get("event") == "mqtt_connected"][-1] is True
    time.sleep(2)  # the stream after
    fleet.stop_devices()
    accounting = wait_accounted(fleet.devices, fleet.results, 60)
    assert accounting.exact, accounting

"""A fleet's broker cluster: failover time when a node dies, and one agent's results/s through the cluster
against the same through one Mosquitto, in one run.

    python benchmarks/fleet.py [--kills K] [--rate R] [--messages N] [--rounds K] [--prefetch P] [--json]

Needs Debian's rabbitmq-server (3.10 with its MQTT plugin) and mosquitto. Everything runs on this machine: a
3-node RabbitMQ cluster on loopback, MQTT sessions on quorum queues (the fixture of tests/cluster,
tests/cluster/rabbit.py), and one Mosquitto (started here on a free port, ``max_inflight_messages 1000`` as in
``throughput.py``).

1. failover: one agent (a real process, MQTT 3.1.1, the three nodes in EDGE_AGENT_MQTT__HOSTS) and a device
   publishing ``--rate`` QoS 1 msgs/s through another node. K times: SIGKILL the node the agent is on, and read
   from the agent's log the time from ``mqtt_connection_lost`` to the ``mqtt_subscribed`` of its next
   connection (the broker has then taken its subscription again on another node); the node is started again
   and the cluster waits for it before the next kill. At the end every message must have its result, several
   results of one message sharing its task_id (tests/cluster/traffic.py's accounting).
2. throughput: N QoS 1 messages (200-byte CityPulse-like JSON) queued for a stopped agent's session, then the
   agent drains them; msgs/s from its first to its N-th result, as ``throughput.py`` measures. On the cluster
   the messages are published through node 1, the agent is on node 2 and the consumer (``mosquitto_sub``)
   reads through node 1, so every message and result crosses nodes. The Mosquitto round and the cluster round
   alternate K times; the medians and their ratio (cluster / Mosquitto) are reported, with each round's.

RabbitMQ's MQTT plugin gives a subscriber at most ``mqtt.prefetch`` unacknowledged messages (10 by default);
the agent acknowledges after its group commit, so that window paces it. ``--prefetch`` sets it on every node
(docs/fleets.md#sizing).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The tests' helpers: the cluster, the devices, the agents.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "cluster"))
from rabbit import RabbitCluster, installed
from test_failover import connected_to, failover_agent_at
from throughput import agent_round, payloads
from traffic import Device, Results, wait_accounted

from support import Agent, Agents, Mosquitto, wait_for

ROUTES = [{"topic": "city/+/traffic/+/data", "task": "sensor.stats"}]


def failover_seconds(agent: Agent) -> list[float]:
    """Per lost connection, seconds from the loss to the SUBACK of the next connection (from the agent's log)."""
    from datetime import datetime

    def at(event: str) -> list[float]:
        return [datetime.fromisoformat(e["timestamp"]).timestamp() for e in agent.events() if e.get("event") == event]

    subscribed = at("mqtt_subscribed")
    return [min(s for s in subscribed if s > lost) - lost for lost in at("mqtt_connection_lost")
            if any(s > lost for s in subscribed)]


def failover_phase(work: Path, cluster: RabbitCluster, kills: int, rate: float,
                   say: Any) -> dict[str, Any]:
    nodes = cluster.nodes
    agent = failover_agent_at(Agents(work / "failover", ROUTES), nodes[0], [n.address for n in nodes],
                              EDGE_AGENT_MQTT__PROTOCOL="3.1.1", EDGE_AGENT_MQTT__RENUMBERED_REDELIVERIES="true")
    results = Results([n.address for n in nodes[2:] + nodes[:2]])
    device = Device([n.address for n in nodes[1:] + nodes[:1]], "bench", "d0", rate)
    try:
        agent.start()
        device.start()
        for k in range(kills):
            time.sleep(2)  # the stream between two failures
            node = cluster.node_at(connected_to(agent)[-1])
            node.kill()
            wait_for(lambda: len(failover_seconds(agent)) > k, 60, "the agent on another node")  # noqa: B023
            say(f"  kill {k + 1}/{kills}: {node.name}; the agent resubscribed on "
                f"{connected_to(agent)[-1]} after {failover_seconds(agent)[-1]:.2f} s")
            cluster.restart(node)
        device.stop()
        accounting = wait_accounted([device], results, 120)
        seconds = failover_seconds(agent)
        sessions = [e["session_present"] for e in agent.events() if e.get("event") == "mqtt_failover"]
        agent.terminate()
    finally:
        device.close()
        results.close()
        agent.cleanup()
    return {
        "failover_s": [round(s, 3) for s in seconds],
        "failover_median_s": round(statistics.median(seconds), 3),
        "failover_max_s": round(max(seconds), 3),
        "session_present": sessions,
        "device_rate": rate,
        "published": accounting.published,
        "missing": len(accounting.missing),
        "two_task_ids": len(accounting.two_task_ids),
        "device_resends": accounting.device_resends,
        "device_resends_run_twice": accounting.resends_run_twice,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=3,
                        help="node kills in the failover phase (default 3; 0 leaves the phase out)")
    parser.add_argument("--rate", type=float, default=100.0, help="the device's msgs/s meanwhile (default 100)")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=2, help="Mosquitto and cluster drains, alternated")
    parser.add_argument("--prefetch", type=int, default=None,
                        help="mqtt.prefetch on every node (RabbitMQ's default: 10)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.kills < 0 or args.rounds < 1 or args.messages < 1 or args.rate <= 0:
        parser.error("--kills, --rounds, --messages and --rate must be positive")
    if not installed():
        raise SystemExit("rabbitmq-server is needed (Debian: apt-get install rabbitmq-server)")

    def say(line: str) -> None:
        if not args.json:
            print(line, file=sys.stderr, flush=True)

    work = Path(tempfile.mkdtemp(prefix="edge-agent-fleet-"))
    cluster = RabbitCluster(work / "rabbit",
                            extra_conf="" if args.prefetch is None else f"mqtt.prefetch = {args.prefetch}\n")
    broker = Mosquitto(work / "mosquitto", extra_conf="max_inflight_messages 1000\n")
    agents: list[Agent] = []
    try:
        say("starting a 3-node RabbitMQ cluster …")
        started = time.monotonic()
        cluster.start()
        say(f"  up in {time.monotonic() - started:.0f} s")
        broker.start()
        failover: dict[str, Any] = {}
        if args.kills:
            say(f"failover: {args.kills} node kills under {args.rate:.0f} msgs/s …")
            failover = failover_phase(work, cluster, args.kills, args.rate, say)

        bodies = payloads(args.messages)
        n1, n2, n3 = cluster.nodes
        on_mosquitto = Agent(work / "agent-mosquitto", broker.port, agent_id="bench-m", routes=ROUTES)
        # On node 2 first; the messages are queued and the results read through node 1.
        on_cluster = failover_agent_at(Agents(work / "agent-cluster", ROUTES), n1,
                                       [n2.address, n3.address, n1.address], EDGE_AGENT_MQTT__PROTOCOL="3.1.1",
                                       EDGE_AGENT_MQTT__RENUMBERED_REDELIVERIES="true")
        agents += [on_mosquitto, on_cluster]
        for agent in agents:
            agent.start()  # subscribes, so the broker queues for its session while it is stopped
            agent.terminate()
        rounds: dict[str, list[tuple[float, float, float]]] = {"mosquitto": [], "cluster": []}
        for n in range(1, args.rounds + 1):
            for name, agent, port in (("mosquitto", on_mosquitto, broker.port), ("cluster", on_cluster, n1.port)):
                say(f"round {n}/{args.rounds}: the agent drains {args.messages:,} messages queued on {name} …")
                rounds[name].append(agent_round(work, port, agent, bodies, n))
                say(f"  {rounds[name][-1][0]:,.0f} msgs/s ({rounds[name][-1][1]:.1f} µs CPU a message)")
                agent.terminate()
    finally:
        for agent in agents:
            agent.cleanup()
        cluster.stop()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)

    mosquitto_rate = statistics.median(r for r, _, _ in rounds["mosquitto"])
    cluster_rate = statistics.median(r for r, _, _ in rounds["cluster"])
    figures = {
        **failover,
        "messages": args.messages,
        "rounds": args.rounds,
        "prefetch": args.prefetch,
        "mosquitto_msgs_per_s": round(mosquitto_rate, 1),
        "cluster_msgs_per_s": round(cluster_rate, 1),
        "ratio": round(cluster_rate / mosquitto_rate, 3),
        "ratio_by_round": [round(c[0] / m[0], 3) for c, m in zip(rounds["cluster"], rounds["mosquitto"],
                                                                  strict=True)],
        "mosquitto_cpu_us_per_msg": round(statistics.median(c for _, c, _ in rounds["mosquitto"]), 1),
        "cluster_cpu_us_per_msg": round(statistics.median(c for _, c, _ in rounds["cluster"]), 1),
    }
    if args.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key:>26}: {value}")
        print(f"cluster / Mosquitto: {figures['ratio']:.2f}")
    ok = failover.get("missing", 0) == 0 and failover.get("two_task_ids", 0) == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

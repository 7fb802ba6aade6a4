"""Offloading for real: Mosquitto, the devcloud and the agent as processes; the cloud never costs a task."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

import pytest

from support import Agent, Agents, Collector, DevCloud, Mosquitto, free_port, pcm_noise, publisher, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # bursts of 2-20 s clips, outages: 5-10 s each

NOISE_ROUTE = {"topic": "city/+/noise/+/pcm", "task": "noise.spectrum"}


@pytest.fixture
def agent_routes() -> list[dict[str, Any]]:
    return [NOISE_ROUTE]


def cloud_env(devcloud: DevCloud, **cloud: Any) -> dict[str, str]:
    return devcloud.agent_env(connect_timeout_s=1, circuit_failures=3, circuit_cooldown_s=5, **cloud)


def spectra(collector: Collector, agent: Agent) -> dict[str, dict[str, Any]]:
    return {m["topic"]: m for m in collector.json_under(f"edge/{agent.agent_id}/results/")}


def publish_burst(port: int, start: int, count: int, seconds: float) -> None:
    device = publisher(port)
    infos = [device.publish(f"city/aarhus/noise/mic{i}/pcm", pcm_noise(seconds, seed=i), qos=1)
             for i in range(start, start + count)]
    for info in infos:
        info.wait_for_publish(30)
    device.loop_stop()
    device.disconnect()


# Priors for a resource API on this host, as an operator would set them for theirs: with the defaults (3 s to
# provision, a 2 Mbit/s uplink) a 60-clip burst queues barely long enough for the model to offload at all, so
# whether any task went to the cloud depended on how fast this machine drained it (1-10 of 60 did).
LAN_PRIORS = {"EDGE_AGENT_DECISION__PROVISIONING_S": "0.5", "EDGE_AGENT_DECISION__UPLINK_MBPS": "50"}


def test_a_burst_splits_between_gateway_and_cloud_and_survives_a_killed_cloud(
        broker: Mosquitto, devcloud: DevCloud, agents: Agents) -> None:
    agent = agents(broker, extra_env={**cloud_env(devcloud), **LAN_PRIORS})
    collector = Collector(broker.port, f"edge/{agent.agent_id}/#")
    agent.start()
    publish_burst(broker.port, 0, 60, 20.0)
    wait_for(lambda: len(spectra(collector, agent)) == 60, 120, "60 spectra")
    placements = [m["placement"] for m in spectra(collector, agent).values()]
    assert "cloud" in placements, "nothing was offloaded"
    assert "local" in placements, "nothing ran on the gateway"
    # How many go where is the model's business (the policy unit tests and the replay cover it). Here: the
    # burst splits, and cloud results arrive and are whole.
    cloud_result = next(m for m in spectra(collector, agent).values() if m["placement"] == "cloud")
    assert cloud_result["decision"]["reason"] == "model"
    assert cloud_result["result"]["samples"] == 320_000
    assert cloud_result["timings"]["exec_s"] > 0

    devcloud.kill()  # the cloud vanishes mid-stream
    publish_burst(broker.port, 60, 20, 20.0)
    wait_for(lambda: len(spectra(collector, agent)) == 80, 120, "all 80 spectra after the cloud died")
    assert not [t for t, _ in collector.snapshot() if "/dead-letter/" in t]
    late = [spectra(collector, agent)[f"city/aarhus/noise/mic{i}/pcm"] for i in range(60, 80)]
    assert all(m["placement"] == "local" for m in late)
    assert agent.terminate() == 0


def test_an_outage_opens_the_circuit_and_every_task_still_finishes(broker: Mosquitto, devcloud: DevCloud,
                                                                   agents: Agents) -> None:
    # placement "cloud": every task goes to the cloud while it works, so the outage is met for sure.
    route = NOISE_ROUTE | {"placement": "cloud"}
    agent = agents(broker, routes=[route], extra_env=cloud_env(devcloud))
    collector = Collector(broker.port, f"edge/{agent.agent_id}/#")
    agent.start()
    publish_burst(broker.port, 0, 6, 2.0)
    wait_for(lambda: len(spectra(collector, agent)) == 6, 60, "6 spectra from the cloud")
    assert {m["placement"] for m in spectra(collector, agent).values()} == {"cloud"}
    devcloud.knobs(outage=True)
    publish_burst(broker.port, 6, 12, 2.0)
    wait_for(lambda: len(spectra(collector, agent)) == 18, 60, "every spectrum during the outage")
    during = [spectra(collector, agent)[f"city/aarhus/noise/mic{i}/pcm"] for i in range(6, 18)]
    assert {m["placement"] for m in during} == {"local"}
    assert all("fallback" in m["decision"] for m in during)  # tried the cloud, then ran here
    assert "cloud_circuit_open" in agent.log_path.read_text()
    # While the circuit is open, new tasks are not even tried: decided local with reason circuit_open.
    publish_burst(broker.port, 18, 3, 2.0)
    wait_for(lambda: len(spectra(collector, agent)) == 21, 60, "the spectra sent while the circuit is open")
    after = [spectra(collector, agent)[f"city/aarhus/noise/mic{i}/pcm"] for i in range(18, 21)]
    assert [m["decision"]["reason"] for m in after] == ["circuit_open"] * 3
    assert not [t for t, _ in collector.snapshot() if "/dead-letter/" in t]
    assert agent.terminate() == 0


def test_a_bad_token_is_said_plainly_and_tasks_run_locally(broker: Mosquitto, devcloud: DevCloud,
                                                           agents: Agents) -> None:
    # Priors that make the cloud look faster, so the agent tries it.
    kinds = {"noise.spectrum": {"local_fixed_s": 2.0, "local_per_byte_s": 1e-5, "cloud_fixed_s": 0.001,
                                "cloud_per_byte_s": 1e-9, "out_bytes": 300}}
    wrong = cloud_env(devcloud, token="wrong-token")  # noqa: S106 - a wrong token on purpose
    env = wrong | {"EDGE_AGENT_DECISION__KINDS": json.dumps(kinds), "EDGE_AGENT_DECISION__UPLINK_MBPS": "1000",
                   "EDGE_AGENT_DECISION__PROVISIONING_S": "0"}
    agent = agents(broker, extra_env=env)
    collector = Collector(broker.port, f"edge/{agent.agent_id}/results/#")
    agent.start()
    publish_burst(broker.port, 0, 8, 2.0)
    wait_for(lambda: len(spectra(collector, agent)) == 8, 60, "8 spectra")
    results = list(spectra(collector, agent).values())
    assert all(m["placement"] == "local" for m in results)
    assert any("fallback" in m["decision"] or m["decision"]["reason"] == "circuit_open" for m in results)
    text = agent.log_path.read_text()
    assert text.count("the cloud rejected the token") == 1
    assert "wrong-token" not in text
    assert agent.terminate() == 0


def test_an_upload_stalled_by_a_slow_link_is_hedged_on_the_gateway_and_reported_once(
        broker: Mosquitto, devcloud: DevCloud, agents: Agents) -> None:
    # Priors that make the cloud look far faster, so the model offloads; then the link nearly stops.
    kinds = {"noise.spectrum": {"local_fixed_s": 2.0, "local_per_byte_s": 1e-5, "cloud_fixed_s": 0.001,
                                "cloud_per_byte_s": 1e-9, "out_bytes": 300}}
    env = cloud_env(devcloud) | {"EDGE_AGENT_DECISION__KINDS": json.dumps(kinds),
                                 "EDGE_AGENT_DECISION__UPLINK_MBPS": "1000",
                                 "EDGE_AGENT_DECISION__PROVISIONING_S": "0",
                                 "EDGE_AGENT_DECISION__PROBE_INTERVAL_S": "0"}
    metrics_port = free_port()
    env["EDGE_AGENT_METRICS__PORT"] = str(metrics_port)
    agent = agents(broker, extra_env=env)
    collector = Collector(broker.port, f"edge/{agent.agent_id}/results/#")
    agent.start()
    devcloud.knobs(bandwidth_bytes_per_s=2000)  # a 64 kB clip would need 32 s to upload
    publish_burst(broker.port, 0, 2, 2.0)
    wait_for(lambda: len(collector.json_under(f"edge/{agent.agent_id}/results/")) >= 2, 30, "2 spectra")
    devcloud.knobs(bandwidth_bytes_per_s=0)  # the link recovers: a late cloud answer could come now
    time.sleep(3.0)  # and must not: an answer that never comes has no signal, so it gets 3 s to show
    results = collector.json_under(f"edge/{agent.agent_id}/results/")
    assert len(results) == 2, [(m["task_id"], m["placement"]) for m in results]  # one per task, no second
    assert len({m["task_id"] for m in results}) == 2
    for m in results:
        assert m["placement"] == "local"
        assert m["decision"]["reason"] == "model"
        assert m["decision"]["hedged"] is True
        assert "fallback" not in m["decision"]
        assert m["result"]["samples"] == 32_000
    assert devcloud.stats()["executions_total"] == 0  # the cancelled uploads never reached the cloud's workers
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        metrics = response.read().decode()
    assert "edge_agent_hedges_total 2.0" in metrics and "edge_agent_hedges_won_total 2.0" in metrics
    assert 'edge_agent_cloud_requests_total{outcome="cancelled"} 2.0' in metrics
    assert agent.terminate() == 0

"""Broker failover (EDGE_AGENT_MQTT__HOSTS): the settings, and an agent between two real, independent Mosquittos.

Two independent brokers share no sessions: a message lives on the broker it was published to. What devices
publish to A while the agent is on B waits in the agent's session on A until the agent comes back to A; the
accounting below counts every message on the broker it was published to (docs/fleets.md#broker-failover).
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from agent.config import BrokerNode, MqttSettings, load_settings
from agent.errors import ConfigError

from support import Agent, Agents, Collector, Mosquitto, citypulse_rows, free_port, publisher, wait_for
from tls import CertificateAuthority

TRAFFIC = "city/aarhus/traffic/{}/data"
FILTER = "city/+/traffic/+/data"


# ----------------------------------------------------------------------------------------------- settings


def test_hosts_entries_parse_with_the_default_port_and_ipv6_in_brackets() -> None:
    settings = MqttSettings(hosts=["mqtt-a.city.example:8883", "10.0.0.7", "[fd00::7]:8884", "[::1]"], port=1884)
    assert settings.nodes == (BrokerNode("mqtt-a.city.example", 8883), BrokerNode("10.0.0.7", 1884),
                              BrokerNode("fd00::7", 8884), BrokerNode("::1", 1884))
    assert [str(n) for n in settings.nodes] == ["mqtt-a.city.example:8883", "10.0.0.7:1884", "[fd00::7]:8884",
                                                "[::1]:1884"]
    # The single host stays the shorthand for one broker.
    assert MqttSettings(host="broker", port=8883).nodes == (BrokerNode("broker", 8883),)


@pytest.mark.parametrize(("entry", "says"), [
    ("broker:x", "the port must be a number from 1 to 65535"),
    ("broker:0", "the port must be a number from 1 to 65535"),
    ("broker:65536", "the port must be a number from 1 to 65535"),
    ("fd00::7", "an IPv6 address goes in brackets"),
    ("[fd00::7", "no closing bracket"),
    ("[broker]:1883", "is not an IPv6 address"),
    ("[::1]1883", "only :port may follow"),
    ("mqtts://broker:8883", "without a scheme"),
    ("two words", "is not a host name"),
    ("", "an empty entry"),
])
def test_a_bad_hosts_entry_is_named(entry: str, says: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    problems = _problems(tmp_path, monkeypatch, EDGE_AGENT_MQTT__HOSTS=json.dumps(["good:1883", entry]))
    assert "EDGE_AGENT_MQTT__HOSTS" in problems and "entry 1" in problems and says in problems, problems


def test_hosts_must_be_a_json_list_of_distinct_brokers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "EDGE_AGENT_MQTT__HOSTS: not valid JSON" in _problems(tmp_path, monkeypatch,
                                                                EDGE_AGENT_MQTT__HOSTS="a:1883,b:1883")
    assert "at least one broker" in _problems(tmp_path, monkeypatch, EDGE_AGENT_MQTT__HOSTS="[]")
    assert "repeats entry 0" in _problems(tmp_path, monkeypatch, EDGE_AGENT_MQTT__HOSTS='["a:1", "a:1"]')
    # An entry without a port takes PORT: the same broker twice.
    assert "names one broker twice" in _problems(tmp_path, monkeypatch, EDGE_AGENT_MQTT__PORT="1883",
                                                 EDGE_AGENT_MQTT__HOSTS='["a", "a:1883"]')


def test_host_and_hosts_together_are_an_error_naming_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    problems = _problems(tmp_path, monkeypatch, EDGE_AGENT_MQTT__HOST="a", EDGE_AGENT_MQTT__HOSTS='["b"]')
    assert "EDGE_AGENT_MQTT__HOST and EDGE_AGENT_MQTT__HOSTS are both set" in problems, problems
    # PORT with HOSTS is fine: the port of the entries that name none.
    env = tmp_path / "ok.env"
    env.write_text('EDGE_AGENT_MQTT__PORT=8883\nEDGE_AGENT_MQTT__HOSTS=["a", "b:1883"]\n')
    assert load_settings(env, explicit=True).mqtt.nodes == (BrokerNode("a", 8883), BrokerNode("b", 1883))


def test_the_status_line_names_the_node_only_when_there_are_several() -> None:
    from agent.mqtt import MqttLink

    def link(settings: MqttSettings) -> MqttLink:
        return MqttLink(settings, client_id="c", agent_id="gw", topic_filters=[("a/#", 1)],
                        on_message=lambda m: None, on_puback=lambda mid: None)

    assert link(MqttSettings(host="broker")).describe() == "reconnecting"  # as before failover existed
    several = link(MqttSettings(hosts=["mqtt-a:8883", "[fd00::7]:8883"]))
    assert several.describe() == "reconnecting trying mqtt-a:8883 (node 1 of 2, 0 failovers)"
    assert [str(n) for n in several.nodes] == ["mqtt-a:8883", "[fd00::7]:8883"]
    assert several.connected_node is None


def test_the_order_of_nodes_after_a_loss_a_dead_round_and_a_redelivery() -> None:
    # The bookkeeping alone (agent.mqtt.failover): the tests below drive the same through real brokers.
    from agent.mqtt.failover import Failover

    a, b, c = BrokerNode("a", 1883), BrokerNode("b", 1883), BrokerNode("c", 1883)
    failover = Failover((a, b, c))

    def round_from_here() -> list[BrokerNode]:
        tried = []
        while not failover.round_over:
            tried.append(failover.advance())
        return tried

    assert failover.advance() == a and failover.accepted() is None  # the first connection is no failover
    failover.lost()
    assert failover.round_over  # back off before anything else
    failover.next_round()
    assert round_from_here() == [b, c, a]  # the others in order of preference, then the one just lost
    failover.next_round()  # no node answered: after the next backoff, every node in order
    assert failover.advance() == a
    assert failover.advance() == b and failover.accepted() == a and failover.failovers == 1
    failover.dropped()  # our own reconnect: back to b, whose session holds what we left unacknowledged
    assert round_from_here() == [b, a, c]
    assert failover.describe(connected=False) == " trying c:1883 (node 3 of 3, 1 failover)"


def test_a_refusal_is_reported_once_per_node_and_reason_until_a_connection_is_accepted() -> None:
    from agent.mqtt.failover import Failover

    failover = Failover((BrokerNode("a", 1883), BrokerNode("b", 1883)))
    failover.advance()
    assert failover.refused("refused") and not failover.refused("refused")
    assert failover.refused("timed out") and failover.last_refusal == "timed out"
    failover.advance()
    assert failover.refused("timed out")  # another node: its own first time
    failover.accepted()
    assert failover.last_refusal is None and failover.refused("timed out")
    assert Failover((BrokerNode("a", 1883),)).describe(connected=True) == ""


def _problems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    for name in [n for n in os.environ if n.startswith("EDGE_AGENT_")]:
        monkeypatch.delenv(name)
    path = tmp_path / "agent.env"
    path.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    with pytest.raises(ConfigError) as caught:
        load_settings(path, explicit=True)
    return str(caught.value)


# ----------------------------------------------------------------------------------------------- two brokers


@pytest.fixture
def agent_routes() -> list[dict[str, Any]]:
    return [{"topic": FILTER, "task": "sensor.stats"}]


@pytest.fixture
def brokers(tmp_path: Path) -> Any:
    made = [Mosquitto(tmp_path / "broker-a"), Mosquitto(tmp_path / "broker-b")]
    for broker in made:
        broker.start()
    yield made
    for broker in made:
        broker.stop()


def failover_agent(agents: Agents, first: Mosquitto, ports: list[int], **env: str) -> Agent:
    """An agent whose env file names the brokers in EDGE_AGENT_MQTT__HOSTS instead of HOST and PORT."""
    return failover_agent_at(agents, first, [f"127.0.0.1:{port}" for port in ports], **env)


def failover_agent_at(agents: Agents, first: Mosquitto, nodes: list[str], **env: str) -> Agent:
    agent = agents(first, extra_env={"EDGE_AGENT_MQTT__RECONNECT_MIN_S": "0.1",
                                     "EDGE_AGENT_MQTT__RECONNECT_MAX_S": "0.5", **env})
    lines = [line for line in agent.env_file.read_text().splitlines()
             if not line.startswith(("EDGE_AGENT_MQTT__HOST=", "EDGE_AGENT_MQTT__PORT="))]
    lines.append("EDGE_AGENT_MQTT__HOSTS=" + json.dumps(nodes))
    agent.env_file.write_text("".join(line + "\n" for line in lines))
    return agent


def connected_to(agent: Agent) -> list[str]:
    return [e["node"] for e in agent.events() if e.get("event") == "mqtt_connected"]


def seqs(collector: Collector, agent: Agent) -> list[int]:
    return sorted({int(m["result"]["fields"]["seq"]["value"])
                   for m in collector.json_under(f"edge/{agent.agent_id}/results/")})


def publish_rows(port: int, start: int, n: int) -> None:
    device = publisher(port)
    infos = [device.publish(TRAFFIC.format(row["REPORT_ID"]), json.dumps(row), qos=1)
             for row in citypulse_rows(n, start_seq=start)]
    for info in infos:
        info.wait_for_publish(10)
    device.loop_stop()
    device.disconnect()


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


@pytest.mark.integration
def test_the_agent_fails_over_to_the_next_broker_and_back(brokers: list[Mosquitto], agents: Agents,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    a, b = brokers
    metrics_port = free_port()
    agent = failover_agent(agents, a, [a.port, b.port], EDGE_AGENT_METRICS__PORT=str(metrics_port))
    client_id = f"edge-agent-{agent.agent_id}"
    results_a = Collector(a.port, f"edge/{agent.agent_id}/results/#")
    results_b = Collector(b.port, f"edge/{agent.agent_id}/results/#")
    agent.start()
    assert connected_to(agent) == [f"127.0.0.1:{a.port}"]  # the first that answers
    assert not b.subscribed(client_id, FILTER)

    publish_rows(a.port, 0, 20)
    wait_for(lambda: seqs(results_a, agent) == list(range(20)), 20, "20 results on A")

    # A goes away: the agent is on B within a few seconds, and messages published on B get their results there.
    results_a.close()
    lost_at = time.monotonic()
    a.stop()
    wait_for(lambda: any(e.get("event") == "mqtt_failover" for e in agent.events()), 10, "the failover to B")
    assert time.monotonic() - lost_at < 5
    failover = next(e for e in agent.events() if e.get("event") == "mqtt_failover")
    assert failover["from_node"] == f"127.0.0.1:{a.port}" and failover["to_node"] == f"127.0.0.1:{b.port}"
    assert failover["session_present"] is False  # independent brokers: B never had this session
    wait_for(lambda: b.subscribed(client_id, FILTER), 10, "the agent's subscription on B")
    publish_rows(b.port, 100, 20)
    wait_for(lambda: seqs(results_b, agent) == list(range(100, 120)), 20, "20 results on B")

    assert 'edge_agent_mqtt_failovers_total 1.0' in metrics(metrics_port)
    text = metrics(metrics_port)
    assert f'edge_agent_mqtt_node{{node="127.0.0.1:{b.port}"}} 1.0' in text
    assert f'edge_agent_mqtt_node{{node="127.0.0.1:{a.port}"}} 0.0' in text
    assert main(["status", "--env-file", str(agent.env_file), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)["broker"]
    assert status["node"] == f"127.0.0.1:{b.port}" and status["failovers"] == 1 and status["connected"]
    assert status["nodes"] == [f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]
    assert main(["status", "--env-file", str(agent.env_file)]) == 0
    assert f"mqtt://127.0.0.1:{b.port} (MQTT 5), connected" in capsys.readouterr().out

    # A comes back: the agent stays on B while connected. What devices publish on A now waits in the agent's
    # session there (A's persistence kept it), not on B: the two brokers share nothing.
    a.start()
    results_a = Collector(a.port, f"edge/{agent.agent_id}/results/#")
    publish_rows(a.port, 200, 10)
    time.sleep(1.0)
    assert connected_to(agent)[-1] == f"127.0.0.1:{b.port}"
    assert seqs(results_a, agent) == [] and seqs(results_b, agent) == list(range(100, 120))

    # B goes away: back on A, whose session is resumed (session_present) with the 10 messages it kept.
    b.stop()
    wait_for(lambda: len(connected_to(agent)) == 3, 10, "the failover back to A")
    assert connected_to(agent)[-1] == f"127.0.0.1:{a.port}"
    back = [e for e in agent.events() if e.get("event") == "mqtt_failover"][-1]
    assert back["session_present"] is True and back["failovers"] == 2
    wait_for(lambda: seqs(results_a, agent) == list(range(200, 210)), 20, "the 10 results A kept")
    text = metrics(metrics_port)
    assert 'edge_agent_mqtt_failovers_total 2.0' in text
    assert 'edge_agent_mqtt_connections_total{session_present="true"} 1.0' in text
    assert 'edge_agent_mqtt_connections_total{session_present="false"} 2.0' in text
    results_a.close()
    results_b.close()


@pytest.mark.integration
def test_a_refusing_node_is_skipped_and_the_order_is_kept(brokers: list[Mosquitto], agents: Agents) -> None:
    a, b = brokers
    closed = free_port()  # nothing listens there: the connection is refused
    agent = failover_agent(agents, a, [closed, a.port, b.port])
    agent.start()
    assert connected_to(agent) == [f"127.0.0.1:{a.port}"]  # not B, though B answers too
    refused = [e for e in agent.events() if e.get("event") == "mqtt_connect_failed"]
    assert refused and refused[0]["node"] == f"127.0.0.1:{closed}"
    assert "nothing accepts connections" in refused[0]["error"]
    assert not b.subscribed(f"edge-agent-{agent.agent_id}", FILTER)
    assert not any(e.get("event") == "mqtt_failover" for e in agent.events())  # starting on A is no failover


@pytest.mark.integration
def test_each_node_is_verified_against_its_own_name(tmp_path: Path, agents: Agents) -> None:
    # A's certificate names only "localhost", B's only "127.0.0.1". The agent must check each node against the
    # name it connects to: A reached as 127.0.0.1 is refused, A as localhost is accepted, and after A is gone
    # B as 127.0.0.1 is accepted (checked against "localhost", or a single configured name, it would not be).
    ca = CertificateAuthority(tmp_path / "ca")
    made = []
    for name, names in (("a", ("localhost",)), ("b", ("127.0.0.1",))):
        issued = ca.issue(f"broker-{name}", server=True, names=names)
        made.append(Mosquitto(tmp_path / f"broker-{name}", extra_conf=(
            f"cafile {ca.ca_file}\ncertfile {issued.cert}\nkeyfile {issued.key}\n")))
    a, b = made
    for broker in made:
        broker.start()
    try:
        agent = failover_agent_at(agents, a, [f"127.0.0.1:{a.port}", f"localhost:{a.port}", f"127.0.0.1:{b.port}"],
                                  EDGE_AGENT_MQTT__TLS__CA_FILE=str(ca.ca_file))
        agent.start()
        assert connected_to(agent) == [f"localhost:{a.port}"]
        (refused, *_) = [e for e in agent.events() if e.get("event") == "mqtt_connect_failed"]
        assert refused["node"] == f"127.0.0.1:{a.port}"
        assert f"certificate at 127.0.0.1:{a.port} does not name '127.0.0.1'" in refused["error"], refused

        a.stop()
        wait_for(lambda: len(connected_to(agent)) == 2, 15, "the failover to B")
        assert connected_to(agent)[-1] == f"127.0.0.1:{b.port}"
    finally:
        for broker in made:
            broker.stop()

"""Mutual TLS to a real Mosquitto with certificates made here, and the errors operators see when it is wrong."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from support import Agent, Collector, DevCloud, Mosquitto, publisher, wait_for
from tls import CertificateAuthority, Issued

pytestmark = pytest.mark.integration


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Any]:
    ca = CertificateAuthority(tmp_path / "ca")
    return {"ca": ca, "broker": ca.issue("broker", server=True), "agent": ca.issue("gateway"),
            "expired": ca.issue("old-gateway", expired=True),
            "other": CertificateAuthority(tmp_path / "other", "unrelated CA")}


@pytest.fixture
def tls_broker(tmp_path: Path, pki: dict[str, Any]):  # type: ignore[no-untyped-def]
    server: Issued = pki["broker"]
    broker = Mosquitto(tmp_path / "broker", extra_conf=(
        f"cafile {pki['ca'].ca_file}\ncertfile {server.cert}\nkeyfile {server.key}\nrequire_certificate true\n"))
    broker.start()
    yield broker
    broker.stop()


def tls_env(ca: Path, issued: Issued) -> dict[str, str]:
    return {"EDGE_AGENT_MQTT__TLS__CA_FILE": str(ca), "EDGE_AGENT_MQTT__TLS__CERT_FILE": str(issued.cert),
            "EDGE_AGENT_MQTT__TLS__KEY_FILE": str(issued.key)}


def tls_client(broker: Mosquitto, ca: Path, issued: Issued) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"device-{uuid.uuid4().hex[:6]}",
                         protocol=paho.MQTTv311)
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(issued.cert), str(issued.key))
    client.tls_set_context(context)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    wait_for(client.is_connected, 10, "a TLS device connection")
    return client


@pytest.mark.slow
def test_mutual_tls_end_to_end(tls_broker: Mosquitto, pki: dict[str, Any], tmp_path: Path) -> None:
    agent = Agent(tmp_path / "agent", tls_broker.port, extra_env=tls_env(pki["ca"].ca_file, pki["agent"]),
                  routes=[{"topic": "city/+/traffic/+/data", "task": "sensor.stats"}])
    try:
        agent.start()
        device = tls_client(tls_broker, pki["ca"].ca_file, pki["ca"].issue("device"))
        got: list[bytes] = []
        device.on_message = lambda c, u, m: got.append(m.payload)
        device.subscribe(f"edge/{agent.agent_id}/results/#", qos=1)
        device.publish("city/a/traffic/1/data", json.dumps({"speed": 42}), qos=1)
        wait_for(lambda: len(got) == 1, 20, "a result over TLS")
        assert json.loads(got[0])["result"]["fields"]["speed"]["value"] == 42
        device.loop_stop()
        device.disconnect()
        assert agent.terminate() == 0
    finally:
        agent.cleanup()


@pytest.mark.slow
def test_wrong_ca_is_reported_in_plain_words(tls_broker: Mosquitto, pki: dict[str, Any], tmp_path: Path) -> None:
    agent = Agent(tmp_path / "agent", tls_broker.port, extra_env=tls_env(pki["other"].ca_file, pki["agent"]))
    try:
        agent.start(wait_connected=False)
        wait_for(lambda: any(e.get("event") == "mqtt_connect_failed" for e in agent.events()), 20, "the error")
        error = next(e for e in agent.events() if e.get("event") == "mqtt_connect_failed")["error"]
        assert "is not signed by the CA in EDGE_AGENT_MQTT__TLS__CA_FILE" in error
        assert agent.terminate() == 0  # it keeps retrying and still stops cleanly
    finally:
        agent.cleanup()


@pytest.mark.slow
def test_expired_client_certificate_stops_start_up(tls_broker: Mosquitto, pki: dict[str, Any],
                                                    tmp_path: Path) -> None:
    agent = Agent(tmp_path / "agent", tls_broker.port, extra_env=tls_env(pki["ca"].ca_file, pki["expired"]))
    proc = subprocess.run([sys.executable, "-m", "agent", "run", "--env-file", str(agent.env_file)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 78
    assert "EDGE_AGENT_MQTT__TLS__CERT_FILE: the certificate expired on" in proc.stderr


@pytest.mark.slow
def test_certificate_the_broker_refuses_is_explained(tls_broker: Mosquitto, pki: dict[str, Any],
                                                     tmp_path: Path) -> None:
    stranger = pki["other"].issue("stranger")  # valid, but from a CA the broker does not trust
    agent = Agent(tmp_path / "agent", tls_broker.port, extra_env=tls_env(pki["ca"].ca_file, stranger))
    try:
        agent.start(wait_connected=False)
        wait_for(lambda: any(e.get("event") == "mqtt_connect_failed" for e in agent.events()), 20, "the error")
        error = next(e for e in agent.events() if e.get("event") == "mqtt_connect_failed")["error"]
        assert "EDGE_AGENT_MQTT__TLS__CERT_FILE" in error
        assert agent.terminate() == 0
    finally:
        agent.cleanup()


def test_missing_key_file_is_a_config_error(tls_broker: Mosquitto, pki: dict[str, Any], tmp_path: Path) -> None:
    env = tls_env(pki["ca"].ca_file, pki["agent"]) | {"EDGE_AGENT_MQTT__TLS__KEY_FILE": str(tmp_path / "gone.key")}
    agent = Agent(tmp_path / "agent", tls_broker.port, extra_env=env)
    proc = subprocess.run([sys.executable, "-m", "agent", "check-config", "--env-file", str(agent.env_file)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 78
    assert "EDGE_AGENT_MQTT__TLS__KEY_FILE" in proc.stderr and "does not exist" in proc.stderr


@pytest.mark.slow
def test_https_to_the_resource_api_with_a_custom_ca(broker: Mosquitto, pki: dict[str, Any], tmp_path: Path) -> None:
    server: Issued = pki["ca"].issue("devcloud", server=True)
    devcloud = DevCloud(tmp_path / "devcloud.log", "--tls-cert", str(server.cert), "--tls-key", str(server.key),
                        ca_file=pki["ca"].ca_file)
    route = {"topic": "city/+/noise/+/pcm", "task": "noise.spectrum", "placement": "cloud"}
    good = Agent(tmp_path / "good", broker.port, routes=[route], extra_env=devcloud.agent_env())
    # The same server, but the agent trusts another CA: every offload fails, plainly, and runs locally.
    wrong = Agent(tmp_path / "wrong", broker.port, routes=[route],
                  extra_env=devcloud.agent_env(ca_file=pki["other"].ca_file))
    try:
        for agent in (good, wrong):
            agent.start()
            collector = Collector(broker.port, f"edge/{agent.agent_id}/results/#")
            device = publisher(broker.port)
            device.publish(f"city/a/noise/{agent.agent_id}/pcm", b"\x01\x00" * 16000, qos=1)
            wait_for(lambda c=collector: len(c.snapshot()) == 1, 30, "the spectrum")
            (result,) = [json.loads(p) for _, p in collector.snapshot()]
            if agent is good:
                assert result["placement"] == "cloud"
            else:
                assert result["placement"] == "local"
                assert "certificate" in result["decision"]["fallback"].lower()
            device.loop_stop()
            device.disconnect()
            collector.close()
            assert agent.terminate() == 0
    finally:
        good.cleanup()
        wrong.cleanup()
        devcloud.stop()

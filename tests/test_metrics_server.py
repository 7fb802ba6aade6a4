"""The metrics server's address (EDGE_AGENT_METRICS__HOST) and its JSON endpoints for clients on this machine."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

from agent.config import MetricsSettings
from agent.errors import ConfigError
from agent.metrics import AgentCollector, is_local_client
from agent.metrics_server import MetricsServer


@pytest.fixture
def serve() -> Iterator[Callable[..., MetricsServer]]:
    servers: list[MetricsServer] = []

    def make(host: str, endpoints: Mapping[str, Any] | None = None) -> MetricsServer:
        server = MetricsServer(0, AgentCollector(), healthy=lambda: (True, "ok"), ready=lambda: (True, "ok"),
                               host=host, endpoints=endpoints)
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def get(url: str) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_the_host_is_an_ip_address() -> None:
    assert MetricsSettings().host == "127.0.0.1"
    assert MetricsSettings(host="[::]").host == "::"
    assert MetricsSettings(host=" 10.0.8.4 ").host == "10.0.8.4"
    with pytest.raises(ValidationError, match=r"not an IP address: 'gw-north\.local'"):
        MetricsSettings(host="gw-north.local")


def test_it_listens_on_the_address_given(serve: Callable[..., MetricsServer]) -> None:
    server = serve("127.0.0.1")
    assert server.url == f"http://127.0.0.1:{server.port}"
    assert get(f"{server.url}/healthz") == (200, b"ok\n")


def test_it_listens_on_ipv6(serve: Callable[..., MetricsServer]) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    try:
        server = serve("::1")
    except ConfigError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    assert server.url == f"http://[::1]:{server.port}"
    assert get(f"{server.url}/readyz") == (200, b"ok\n")


def test_an_address_not_yet_on_this_machine_is_bound_anyway(serve: Callable[..., MetricsServer]) -> None:
    # A management VLAN still coming up at boot: listening now beats exit 78 (never restarted by the unit).
    with capture_logs() as logs:
        serve("198.51.100.7")  # TEST-NET-2: on no interface of a test machine
    assert [e["event"] for e in logs] == ["metrics_listening", "metrics_address_not_here"]
    assert logs[1]["log_level"] == "warning" and logs[1]["host"] == "198.51.100.7"


def test_a_port_in_use_names_the_port(serve: Callable[..., MetricsServer]) -> None:
    taken = serve("127.0.0.1")
    with pytest.raises(ConfigError) as exc:
        MetricsServer(taken.port, AgentCollector(), healthy=lambda: (True, "ok"), ready=lambda: (True, "ok"))
    assert exc.value.variable == "EDGE_AGENT_METRICS__PORT"
    assert f"cannot listen on 127.0.0.1:{taken.port}" in exc.value.problem


def test_json_endpoints_answer_with_json(serve: Callable[..., MetricsServer]) -> None:
    def status(query: Mapping[str, str]) -> tuple[int, Any]:
        return 200, {"asked": dict(query)}

    def broken(query: Mapping[str, str]) -> tuple[int, Any]:
        raise RuntimeError("boom")

    server = serve("127.0.0.1", {"/status": status, "/explain": broken})
    code, body = get(f"{server.url}/status?kind=noise.spectrum&bytes=10")
    assert code == 200 and json.loads(body) == {"asked": {"kind": "noise.spectrum", "bytes": "10"}}
    code, body = get(f"{server.url}/explain")
    assert code == 500 and json.loads(body) == {"error": "RuntimeError: boom"}
    code, body = get(f"{server.url}/nothing")
    assert code == 404 and b"/status, /explain" in body


def test_only_clients_on_this_machine_are_local() -> None:
    assert is_local_client("127.0.0.1", "127.0.0.1")
    assert is_local_client("127.0.0.9", "0.0.0.0")
    assert is_local_client("::1", "::1")
    assert is_local_client("::ffff:127.0.0.1", "::ffff:10.0.8.4")
    assert is_local_client("10.0.8.4", "10.0.8.4")  # a process here, through the management address
    assert not is_local_client("10.0.8.9", "10.0.8.4")  # the central Prometheus
    assert not is_local_client("fd00::9", "fd00::2")
    assert not is_local_client("garbage", "10.0.8.4")

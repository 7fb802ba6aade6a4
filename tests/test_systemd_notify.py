"""The notify protocol against a real AF_UNIX datagram socket, as systemd listens on it."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.systemd import Notifier, notify_address, watchdog_interval_s


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(2)
    yield sock, path
    sock.close()


def fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().splitlines())


def test_messages_reach_a_path_socket(listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch) -> None:
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    notifier = Notifier()
    assert notifier.ready("connected, 0 messages")
    assert fields(sock.recv(4096)) == {"READY": "1", "STATUS": "connected, 0 messages"}
    notifier.watchdog()
    assert fields(sock.recv(4096)) == {"WATCHDOG": "1"}
    notifier.reloading()
    reload = fields(sock.recv(4096))
    assert reload["RELOADING"] == "1" and int(reload["MONOTONIC_USEC"]) > 0
    notifier.stopping()
    assert fields(sock.recv(4096))["STOPPING"] == "1"
    notifier.close()
    # Worker processes started after this must not inherit the socket in our name.
    assert "NOTIFY_SOCKET" not in os.environ


def test_messages_reach_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"edge-agent-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        notifier = Notifier()
        assert notifier.status("3 queued")
        assert fields(sock.recv(4096)) == {"STATUS": "3 queued"}
        notifier.close()
    finally:
        sock.close()


def test_no_op_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    assert not notifier.ready("x")
    assert notifier.watchdog_s is None


def test_a_vanished_socket_does_not_stop_the_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    notifier = Notifier()
    assert not notifier.ready("x")
    notifier.close()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"NOTIFY_SOCKET": "/run/systemd/notify"}, "/run/systemd/notify"),
        ({"NOTIFY_SOCKET": "@abstract"}, "\0abstract"),
        ({"NOTIFY_SOCKET": "vsock:2:1234"}, None),
        ({}, None),
    ],
)
def test_notify_address(env: dict[str, str], expected: str | None) -> None:
    assert notify_address(env) == expected


def test_watchdog_interval_is_half_the_timeout_and_only_for_us() -> None:
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}, pid=42) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, pid=42) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, pid=42) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}, pid=42) is None
    assert watchdog_interval_s({}, pid=42) is None

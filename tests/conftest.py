"""Fixtures that start real parts: Mosquitto on a free port, the devcloud and the agent as processes; and the
test tiers: ``-m "not slow"`` is the quick loop, plain ``pytest`` (what CI runs) everything."""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

import support
from support import Agents, DevCloud, Mosquitto

# The object-storage fixtures (storage_devcloud, storage_client, storage, object_store).
pytest_plugins = ["storage_fixtures"]


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: the marks added here count
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The suite under a real systemd (tests/systemd_real) boots a machine per module: never the quick loop.
    for item in items:
        if item.get_closest_marker("systemd_real") is not None:
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    support.AGENTS.clear()  # before the fixtures make this test's agents
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    # A failure shows what each agent of the test logged last: a flaky failure in CI is all there is to read.
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.failed and call.when != "teardown":
        for agent in support.AGENTS:
            report.sections.append((f"agent {agent.agent_id} ({agent.log_path.parent.name}), last lines",
                                    agent.log_tail(60)))


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A fresh Mosquitto per test. Missing Mosquitto fails the test: CI must install it, not skip it."""
    try:
        mosquitto = Mosquitto(tmp_path / "broker")
    except RuntimeError as exc:
        pytest.fail(str(exc))
    mosquitto.start()
    yield mosquitto
    mosquitto.stop()


@pytest.fixture
def agent_routes() -> list[dict[str, Any]]:
    """The routes of an agent that ``agents`` makes without any; a module overrides this for its own."""
    return [{"topic": "city/+/traffic/+/data", "task": "sensor.stats"}]


@pytest.fixture
def agents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, agent_routes: list[dict[str, Any]]) -> Iterator[Agents]:
    """``agents(broker, name="agent", routes=…, **Agent's arguments)``: agents as processes, killed after the test."""
    for name in [n for n in os.environ if n.startswith("EDGE_AGENT_")]:
        monkeypatch.delenv(name)  # the CLI run in this process (status, explain) reads only the agent's env file
    made = Agents(tmp_path, agent_routes)
    yield made
    made.cleanup()


@pytest.fixture
def devcloud(tmp_path: Path) -> Iterator[DevCloud]:
    """The reference resource API as a process of its own, stopped after the test."""
    server = DevCloud(tmp_path / "devcloud.log")
    yield server
    server.stop()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """For in-process load_settings: no EDGE_AGENT_* names and no credentials directory from the caller."""
    for name in list(os.environ):
        if name.upper().startswith("EDGE_AGENT_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)
    return monkeypatch

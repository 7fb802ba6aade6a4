"""Fixtures that start real parts: Mosquitto on a free port and the agent as a process."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

import support
from support import Mosquitto


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

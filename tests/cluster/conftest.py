"""The cluster fixture: one 3-node RabbitMQ cluster for the module (starting it takes 40 - 70 s), brought back to
three running nodes after each test. Without rabbitmq-server the tests marked ``cluster`` are skipped, saying
so; CI installs it (.ci/run), so there they run."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from rabbit import RabbitCluster, installed

from support import Agent, Agents


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("cluster") is not None and not installed():
            item.add_marker(pytest.mark.skip(
                reason="rabbitmq-server is not installed (apt-get install rabbitmq-server): no cluster to test"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    # A failure shows what the nodes logged last, beside the agents' lines (tests/conftest.py).
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    made = item.funcargs.get("cluster") if hasattr(item, "funcargs") else None
    if report.failed and isinstance(made, RabbitCluster):
        report.sections.append(("RabbitMQ nodes, last lines", made.log_tails()))


@pytest.fixture(scope="module")
def module_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    made = RabbitCluster(tmp_path_factory.mktemp("rabbit"))
    try:
        made.start()
    except BaseException:
        made.stop()
        raise
    yield made
    made.stop()


@pytest.fixture
def cluster(module_cluster: RabbitCluster) -> Iterator[RabbitCluster]:
    """The module's cluster with its three nodes running, and again so after the test (a node it killed or
    stopped is started again)."""
    yield module_cluster
    for node in module_cluster.nodes:
        if not node.running:
            module_cluster.restart(node)
    module_cluster.wait_members(len(module_cluster.nodes))


@pytest.fixture
def fleet_agent(tmp_path: Path) -> Iterator[Any]:
    """``fleet_agent(name, nodes, routes, **env)``: an agent (a process, MQTT 3.1.1, recognising RabbitMQ's
    renumbered redeliveries) whose EDGE_AGENT_MQTT__HOSTS lists ``nodes`` in that order, in a folder of its own;
    killed after the test."""
    from test_failover import failover_agent_at  # the helper that writes EDGE_AGENT_MQTT__HOSTS

    made: list[Agents] = []

    def make(name: str, nodes: list[Any], routes: list[dict[str, Any]], **env: str) -> Agent:
        folder = Agents(tmp_path / name, routes)
        made.append(folder)
        return failover_agent_at(folder, nodes[0], [node.address for node in nodes],
                                 EDGE_AGENT_MQTT__PROTOCOL="3.1.1", EDGE_AGENT_MQTT__RENUMBERED_REDELIVERIES="true",
                                 **env)

    yield make
    for folder in made:
        folder.cleanup()

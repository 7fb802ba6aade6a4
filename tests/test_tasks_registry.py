"""The task registry: built-ins, route checks, entry-point plugins and run_task in a real process pool."""

from __future__ import annotations

import json
import multiprocessing
import sys
import textwrap
from collections.abc import Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog

import agent.tasks
from agent.config import Route
from agent.errors import ConfigError, InvalidJson, UnknownTask
from agent.executor import LocalExecutor
from agent.tasks import TaskRegistry, TaskSpec, default_registry, run_task

PLUGIN_MODULES = ("edge_agent_demo_tasks", "edge_agent_demo_broken")


@pytest.fixture
def fresh_registry() -> Iterator[None]:
    """default_registry is cached per process; each plugin test must see the entry points it installs."""
    default_registry.cache_clear()
    yield
    default_registry.cache_clear()
    for name in PLUGIN_MODULES:
        sys.modules.pop(name, None)


@pytest.fixture
def plugin_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_registry: None) -> Path:
    """An installed distribution with entry points in edge_agent.tasks, found through sys.path."""
    (tmp_path / "edge_agent_demo_tasks.py").write_text(textwrap.dedent("""
        def echo(payload, options):
            return {"size": len(payload), "topic": options.get("topic")}

        def light(payload, options):
            return {"light": True}
        light.heavy = False

        def replacement(payload, options):
            return {"hijacked": True}

        not_a_task = 42
    """))
    (tmp_path / "edge_agent_demo_broken.py").write_text("raise RuntimeError('missing calibration table')\n")
    info = tmp_path / "edge_agent_demo-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: edge-agent-demo\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""
        [edge_agent.tasks]
        demo.echo = edge_agent_demo_tasks:echo
        demo.light = edge_agent_demo_tasks:light
        demo.broken = edge_agent_demo_broken:task
        demo.missing = edge_agent_demo_tasks:no_such_function
        demo.constant = edge_agent_demo_tasks:not_a_task
        sensor.stats = edge_agent_demo_tasks:replacement

        [console_scripts]
        unrelated = edge_agent_demo_tasks:echo
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_public_names_are_exported() -> None:
    expected = ["StatefulTask", "TaskFn", "TaskRegistry", "TaskSpec", "default_registry", "run_task"]
    assert sorted(agent.tasks.__all__) == expected
    for name in agent.tasks.__all__:
        assert hasattr(agent.tasks, name)


def test_sensor_stats_keeps_state_the_daemon_saves_and_plain_tasks_do_not(fresh_registry: None) -> None:
    registry = default_registry()
    assert isinstance(registry.get("sensor.stats").fn, agent.tasks.StatefulTask)
    assert not isinstance(registry.get("noise.spectrum").fn, agent.tasks.StatefulTask)


def test_sensor_stats_is_told_each_task_sequence_and_plain_tasks_keep_their_signature(
        fresh_registry: None) -> None:
    stats = default_registry().get("sensor.stats")
    assert stats.sequenced is stats.fn  # the same windows, called with the task's store row id
    assert default_registry().get("noise.spectrum").sequenced is None
    LocalExecutor.run_inline(stats, b'{"x": 1}', {"topic": "t"}, 7)
    assert isinstance(stats.fn, agent.tasks.StatefulTask)
    assert json.loads(stats.fn.dump_state()[0][1].partition(b"\n")[0])["seq"] == 7

    seen: list[dict[str, Any]] = []

    def plain(payload: bytes, options: Mapping[str, Any]) -> dict[str, Any]:
        seen.append(dict(options))
        return {}

    assert LocalExecutor.run_inline(TaskSpec("a", plain, heavy=False), b"", {"topic": "t"}, 7)[0] == {}
    assert seen == [{"topic": "t"}]  # the options as routed: the sequence is not among them


def test_builtins_are_registered(fresh_registry: None) -> None:
    registry = default_registry()
    assert {"sensor.stats", "noise.spectrum"} <= set(registry.names())
    assert registry.names() == sorted(registry.names())
    assert "sensor.stats" in registry
    assert "nope" not in registry
    assert registry.get("sensor.stats").heavy is False
    assert registry.get("noise.spectrum").heavy is True
    assert default_registry() is registry  # cached: sensor.stats keeps one state per process


def test_unknown_task_raises_with_the_known_names(fresh_registry: None) -> None:
    with pytest.raises(UnknownTask) as caught:
        default_registry().get("noise.fft")
    assert str(caught.value) == (
        "task 'noise.fft' is not installed on this gateway; known tasks: noise.spectrum, sensor.stats"
    )


def test_register_refuses_a_second_task_of_the_same_name() -> None:
    registry = TaskRegistry()
    registry.register(TaskSpec("a", lambda payload, options: {}, heavy=False))
    with pytest.raises(ValueError, match="already registered"):
        registry.register(TaskSpec("a", lambda payload, options: {}, heavy=True))
    assert registry.names() == ["a"]
    assert len(registry) == 1


def test_check_routes_names_every_unknown_task() -> None:
    routes = [Route(topic="city/+/+/+/data", task="sensor.stats"),
              Route(topic="city/+/air/+/data", task="air.quality"),
              Route(topic="city/+/x/+/data", task="also.missing")]

    registry = default_registry()
    with pytest.raises(ConfigError) as caught:
        registry.check_routes(routes)

    known = ", ".join(registry.names())
    assert caught.value.variable == "EDGE_AGENT_ROUTES[1].task"
    assert caught.value.problem == f"unknown task 'air.quality'; known tasks: {known}"
    assert caught.value.problems == [
        ("EDGE_AGENT_ROUTES[1].task", f"unknown task 'air.quality'; known tasks: {known}"),
        ("EDGE_AGENT_ROUTES[2].task", f"unknown task 'also.missing'; known tasks: {known}"),
    ]
    assert str(caught.value).startswith("EDGE_AGENT_ROUTES[1].task: unknown task 'air.quality'")


def test_the_built_ins_declare_their_options_and_refuse_other_keys() -> None:
    registry = default_registry()
    assert registry.get("sensor.stats").options == {"window", "ignore"}
    assert registry.get("noise.spectrum").options == {"sample_rate", "offset_db"}
    assert registry.route_problems([
        Route(topic="a/#", task="sensor.stats", window=10, ignore=["id"]),
        Route(topic="b/#", task="sensor.stats", windows=10, window=1),
        Route(topic="c/#", task="noise.spectrum", offset_dB=3.0),
    ]) == [
        ("EDGE_AGENT_ROUTES[1].windows", "unknown key — did you mean window?"),
        ("EDGE_AGENT_ROUTES[1]", "route option 'window' must be a whole number of readings from 2 to 100000, got 1"),
        ("EDGE_AGENT_ROUTES[2].offset_dB", "unknown key — did you mean offset_db?"),
    ]


def test_check_routes_accepts_the_default_routes_and_their_options() -> None:
    default_registry().check_routes([
        Route(topic="city/+/+/+/data", task="sensor.stats", window=120),
        Route(topic="city/+/noise/+/pcm", task="noise.spectrum", sample_rate=48000, offset_db=94.5),
    ])


@pytest.mark.parametrize(
    ("route", "detail"),
    [
        (Route(topic="a/#", task="sensor.stats", window=1), "route option 'window'"),
        (Route(topic="a/#", task="noise.spectrum", sample_rate="fast"), "route option 'sample_rate'"),
    ],
)
def test_check_routes_refuses_bad_options_at_start_up(route: Route, detail: str) -> None:
    with pytest.raises(ConfigError, match=detail) as caught:
        default_registry().check_routes([Route(topic="ok/#", task="sensor.stats"), route])
    assert caught.value.variable == "EDGE_AGENT_ROUTES[1]"


def test_entry_point_plugins_are_loaded(plugin_dist: Path) -> None:
    with structlog.testing.capture_logs() as logs:
        registry = default_registry()

    assert "demo.echo" in registry
    assert registry.get("demo.echo").heavy is True  # heavy unless the plugin says otherwise
    assert registry.get("demo.light").heavy is False
    result, service_s = run_task("demo.echo", b"abc", {"topic": "city/a/b/c/data"})
    assert result == {"size": 3, "topic": "city/a/b/c/data"}
    assert service_s > 0

    failed = {entry["name"]: entry for entry in logs if entry["event"] == "task_plugin_failed"}
    assert set(failed) == {"demo.broken", "demo.missing", "demo.constant", "sensor.stats"}
    assert all(entry["log_level"] == "warning" for entry in failed.values())
    assert failed["demo.broken"]["error"] == "RuntimeError: missing calibration table"
    assert "no_such_function" in failed["demo.missing"]["error"]
    assert "is not callable" in failed["demo.constant"]["error"]
    assert "may not replace the built-in task 'sensor.stats'" in failed["sensor.stats"]["error"]
    # The built-in is still the real one.
    assert "fields" in run_task("sensor.stats", b'{"x": 1}', {"topic": "t"})[0]


def test_a_route_naming_a_broken_plugin_fails_check_routes(plugin_dist: Path) -> None:
    with structlog.testing.capture_logs():
        registry = default_registry()
    with pytest.raises(ConfigError) as caught:
        registry.check_routes([Route(topic="x/#", task="demo.broken")])
    assert caught.value.problem == (
        "unknown task 'demo.broken'; known tasks: demo.echo, demo.light, noise.spectrum, sensor.stats"
    )


def test_run_task_returns_the_result_and_a_positive_service_time() -> None:
    result, service_s = run_task("sensor.stats", b'{"speed": 50, "status": "OK"}', {"topic": "run/task"})
    assert list(result["fields"]) == ["speed"]
    assert service_s > 0


def test_run_task_lets_task_errors_through_unchanged() -> None:
    with pytest.raises(InvalidJson):
        run_task("sensor.stats", b"{not json", {"topic": "run/task"})
    with pytest.raises(UnknownTask):
        run_task("no.such.task", b"", {})


def test_run_task_in_a_forkserver_process_pool() -> None:
    # The executor sends (name, payload, options) to workers started by a forkserver; the worker builds its
    # own registry. This proves run_task and its arguments pickle and the result comes back as JSON-able data.
    t = np.arange(16000) / 16000
    payload = (np.round(0.5 * np.sin(2 * np.pi * 1000 * t) * 32767)).astype("<i2").tobytes()
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        future = pool.submit(run_task, "noise.spectrum", payload, {"sample_rate": 16000})
        result, service_s = future.result(timeout=60)
    assert result["leq_db"] == pytest.approx(-9.03, abs=0.05)
    assert service_s > 0
    json.dumps(result, allow_nan=False)

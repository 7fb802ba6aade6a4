"""Task names → callables: the two built-ins plus user tasks from the ``edge_agent.tasks`` entry points.

A user task may declare the route options it takes as an ``options`` attribute of the callable: a set (or any
collection) of option names, or a mapping keyed by them (e.g. name → description). A route giving it any other
key then stops start-up with a "did you mean" line, as for the built-ins. A user task that declares nothing is
given every key of its route unchecked.
"""

from __future__ import annotations

import functools
import importlib.metadata
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from agent.config import Route, did_you_mean
from agent.errors import ConfigError, UnknownTask
from agent.tasks import noise_spectrum, sensor_stats
from agent.telemetry import get_logger

ENTRY_POINT_GROUP = "edge_agent.tasks"

TaskFn = Callable[[bytes, Mapping[str, Any]], dict[str, Any]]
# A task that is also told the task's sequence: its store row id, which only grows (see TaskSpec.sequenced).
SequencedTaskFn = Callable[[bytes, Mapping[str, Any], int], dict[str, Any]]
OptionsCheck = Callable[[Mapping[str, Any]], None]


@runtime_checkable
class StatefulTask(Protocol):
    """A light task that keeps state between messages (``sensor.stats``: its windows) which the daemon saves
    in the store now and then and at a clean stop, and restores at start, so a restart does not start it
    from nothing. ``state_limit``: how many saved entries are worth keeping."""

    @property
    def state_limit(self) -> int: ...

    def dump_state(self, everything: bool = False, limit: int | None = None) -> list[tuple[str, bytes]]:
        """(key, state) entries changed since they were last dumped (or all), oldest first, at most ``limit``."""
        ...

    def load_state(self, entries: list[tuple[str, bytes]]) -> tuple[int, int]:
        """Restore saved entries, oldest first; returns (restored, skipped)."""
        ...


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """A task: ``heavy`` ones run in the process pool, light ones inline on the daemon's event loop.

    ``options`` names the route options the task takes: any other key in its route stops start-up (a misspelt
    option would otherwise silently keep its default). None: the task takes any key (user tasks that declare
    nothing). ``check_options``, when given, validates a route's options at start-up and raises ValueError with
    a message for the operator; without it a bad option would fail every message instead.

    ``sequenced``, when given, is what the daemon calls instead of ``fn`` for a light task, with the task's
    sequence besides: a task whose state must not take the same task twice (``sensor.stats``, when a task
    runs again after a restart) tells them apart by it. A separate callable, not an option: ``options`` stay
    the operator's (they also travel to the cloud), and ``fn`` keeps the signature user tasks have.
    """

    name: str
    fn: TaskFn
    heavy: bool
    check_options: OptionsCheck | None = None
    sequenced: SequencedTaskFn | None = None
    options: frozenset[str] | None = None


class TaskRegistry:
    def __init__(self) -> None:
        self._specs: dict[str, TaskSpec] = {}

    def register(self, spec: TaskSpec) -> None:
        if not spec.name:
            raise ValueError("a task name must not be empty")
        if spec.name in self._specs:
            raise ValueError(f"a task named {spec.name!r} is already registered")
        self._specs[spec.name] = spec

    def get(self, name: str) -> TaskSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise UnknownTask(
                f"task {name!r} is not installed on this gateway; known tasks: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[TaskSpec]:
        return iter([self._specs[name] for name in self.names()])

    def __len__(self) -> int:
        return len(self._specs)

    def route_problems(self, routes: Sequence[Route]) -> list[tuple[str, str]]:
        """Every route naming a task that is not here, a key its task does not take, or a bad option value."""
        problems: list[tuple[str, str]] = []
        for i, route in enumerate(routes):
            spec = self._specs.get(route.task)
            if spec is None:
                problems.append((f"EDGE_AGENT_ROUTES[{i}].task",
                                 f"unknown task {route.task!r}; known tasks: {', '.join(self.names())}"))
                continue
            if spec.options is not None:
                keys = [*Route.model_fields, *sorted(spec.options)]
                for key in route.options:
                    if key not in spec.options:
                        hint = did_you_mean(key, keys) or f"; a {spec.name} route takes {', '.join(keys)}"
                        problems.append((f"EDGE_AGENT_ROUTES[{i}].{key}", f"unknown key{hint}"))
            if spec.check_options is not None:
                try:
                    spec.check_options(route.options)
                except ValueError as exc:
                    problems.append((f"EDGE_AGENT_ROUTES[{i}]", str(exc)))
        return problems

    def check_routes(self, routes: Sequence[Route]) -> None:
        """Stop start-up with every problem :meth:`route_problems` finds."""
        problems = self.route_problems(routes)
        if problems:
            raise ConfigError.listing(problems)


def builtin_specs() -> list[TaskSpec]:
    """Fresh built-ins (a new, empty ``sensor.stats`` state each call)."""
    stats = sensor_stats.SensorStats()
    return [
        TaskSpec("sensor.stats", stats, heavy=False, check_options=sensor_stats.check_options, sequenced=stats,
                 options=sensor_stats.OPTIONS),
        TaskSpec("noise.spectrum", noise_spectrum.noise_spectrum, heavy=True,
                 check_options=noise_spectrum.check_options, options=noise_spectrum.OPTIONS),
    ]


def _plugin_spec(entry_point: importlib.metadata.EntryPoint) -> TaskSpec | None:
    log = get_logger(__name__)
    try:
        fn = entry_point.load()
    except Exception as exc:  # noqa: BLE001 - a broken plugin must not stop the gateway; check_routes names it
        log.warning("task_plugin_failed", name=entry_point.name, error=f"{type(exc).__name__}: {exc}")
        return None
    if not callable(fn):
        log.warning("task_plugin_failed", name=entry_point.name,
                    error=f"{entry_point.value} is not callable (got {type(fn).__name__})")
        return None
    declared = getattr(fn, "options", None)
    if declared is not None and (isinstance(declared, (str, bytes)) or not isinstance(declared, Collection)
                                 or not all(isinstance(name, str) for name in declared)):
        log.warning("task_plugin_failed", name=entry_point.name,
                    error=f"{entry_point.value}.options must be a set of option names or a mapping keyed by them "
                    f"(got {type(declared).__name__})")
        return None
    # Heavy unless the plugin says otherwise: running a slow task inline would stall the event loop.
    return TaskSpec(entry_point.name, fn, heavy=bool(getattr(fn, "heavy", True)),
                    options=None if declared is None else frozenset(declared))


@functools.cache
def default_registry() -> TaskRegistry:
    """Built-ins and installed user tasks, built once per process (each pool worker builds its own)."""
    registry = TaskRegistry()
    for spec in builtin_specs():
        registry.register(spec)
    builtins = set(registry.names())
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name in builtins:
            get_logger(__name__).warning(
                "task_plugin_failed", name=entry_point.name,
                error=f"{entry_point.value} may not replace the built-in task {entry_point.name!r}",
            )
            continue
        if entry_point.name in registry:
            get_logger(__name__).warning(
                "task_plugin_failed", name=entry_point.name,
                error=f"{entry_point.value}: another installed package already provides this task",
            )
            continue
        plugin = _plugin_spec(entry_point)
        if plugin is not None:
            registry.register(plugin)
    return registry


def run_task(name: str, payload: bytes, options: Mapping[str, Any]) -> tuple[dict[str, Any], float]:
    """Run a task by name and time it; top-level so the process pool can pickle a reference to it."""
    spec = default_registry().get(name)
    started = time.perf_counter()
    result = spec.fn(payload, options)
    return result, time.perf_counter() - started

"""What the running agent says about itself, and what ``edge-agent explain`` shares with it.

The daemon serves two JSON endpoints on its metrics port (to clients on the gateway only, see agent/metrics.py):

- ``/status``: connection, routes and their subscriptions, rates, backlog, store, cloud, estimates, the archive
  (when a route keeps its inputs: the report its manager leaves after each pass, agent/archive/report.py) and
  the recent warnings and errors (``edge-agent status``);
- ``/explain?kind=K&bytes=N&topic=T&placement=P``: the decision a task would get now (``explain --live``).

Both are gathered on the event loop, where the stages live, so what they report is one consistent moment; the
HTTP thread waits for that at most :data:`ANSWER_WITHIN_S`. ``/explain`` goes through the same routing
(:class:`agent.ingress.Router`), the same checks in the same order as ingress, and the same decision call as
the dispatcher, on a copy of the live policy (``Dispatcher.preview``); ``edge-agent explain`` without
``--live`` uses :func:`resolve` and :func:`build_policy`'s inputs too, so the two cannot disagree on them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast, get_args

from agent import __version__
from agent.config import Route, Settings
from agent.decision import Placement, Policy, Task
from agent.decision.explain import Scenario, as_json, explain
from agent.mqtt.topics import subscription_filter
from agent.tasks import TaskRegistry
from agent.telemetry import PROBLEMS

if TYPE_CHECKING:
    from agent.archive.service import ArchiveService
    from agent.cloud import Cloud
    from agent.dispatch import Dispatcher
    from agent.egress import Publisher
    from agent.ingress import Ingress, Router
    from agent.mqtt import Link
    from agent.store import Store

T = TypeVar("T")

ANSWER_WITHIN_S = 2.0  # a loop that cannot answer in this time is stuck (the watchdog will say so too)
RATE_WINDOW_S = 60.0
RATE_SAMPLE_S = 5.0
PLACEMENTS: tuple[str, ...] = get_args(Placement)
MAX_EXPLAIN_BYTES = 1 << 40


# ---------------------------------------------------------------------------------------------- shared


def inline_kinds(registry: TaskRegistry) -> list[str]:
    """Light kinds: they run one at a time on the event loop, and the policy queues them there."""
    return [spec.name for spec in registry if not spec.heavy]


def build_policy(settings: Settings, registry: TaskRegistry) -> Policy:
    """The daemon's policy: its workers, how long a lease stays warm, which kinds wait for the event loop."""
    return Policy(settings.decision, local_workers=settings.local.workers, lease_idle_s=settings.cloud.lease_idle_s,
                  inline_kinds=inline_kinds(registry))


class Unanswerable(ValueError):
    """The question contradicts itself (a kind that is not the task of the topic's route)."""


@dataclass(slots=True)
class Resolved:
    """What the agent makes of a message of ``in_bytes`` on a topic (or of a kind asked about directly)."""

    kind: str
    placement: Placement
    route: Route | None = None
    dead_letter: tuple[str, str] | None = None  # (reason, detail): ingress refuses it, nothing is decided
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def resolve(router: Router, registry: TaskRegistry, max_payload_bytes: int, *, kind: str | None, in_bytes: int,
            topic: str | None, placement: Placement | None) -> Resolved:
    """Ingress's checks in its order (the size, then the first route whose filter matches), then the registry.

    ``placement`` replaces the route's (a what-if); a ``kind`` that contradicts the route of ``topic`` is
    :class:`Unanswerable`, since the agent would run the route's task whatever was asked.
    """
    route = router.match(topic) if topic is not None else None
    if route is not None:
        if kind is not None and kind != route.task:
            raise Unanswerable(f"topic {topic!r} is routed to task {route.task} (route {route.topic!r}), not {kind}; "
                             "drop --kind or give a topic of a route of that task")
        kind = route.task
    result = Resolved(kind or "", placement or (route.placement if route is not None else "auto"), route)
    if in_bytes > max_payload_bytes:
        result.dead_letter = ("too_large",
                              f"payload of {in_bytes} bytes exceeds EDGE_AGENT_MAX_PAYLOAD_BYTES={max_payload_bytes}")
    elif topic is not None and route is None:
        result.dead_letter = ("unknown_task", f"no route matches topic {topic!r}")
    if result.dead_letter is not None or not result.kind:
        return result
    if result.kind not in registry:
        result.warnings.append(
            f"no installed task is named {result.kind!r} (installed: {', '.join(registry.names())}): no route can "
            "name it, so the agent never decides such a task; explained with the priors of "
            "EDGE_AGENT_DECISION__KINDS['*']")
    if topic is None:
        placed = [f"{r.topic} → {r.placement}" for r in router.routes
                  if r.task == result.kind and r.placement != "auto"]
        if placed and placement is None:
            result.notes.append(f"routes that fix where {result.kind} runs: {'; '.join(placed)}; "
                                "--topic applies the route a message would take")
    return result


def _route_json(route: Route | None) -> dict[str, Any] | None:
    if route is None:
        return None
    return {"topic": route.topic, "task": route.task, "placement": route.placement, "qos": route.qos}


def explain_settings(settings: Settings, registry: TaskRegistry, router: Router, scenario: Scenario, *,
                     kind: str | None, topic: str | None, placement: Placement | None) -> dict[str, Any]:
    """``edge-agent explain`` from the settings: their priors, routes, cloud URL and payload bound, with the
    scenario's figures in place of measurements. The same JSON shape as the agent's /explain."""
    resolved = resolve(router, registry, settings.max_payload_bytes, kind=kind, in_bytes=scenario.in_bytes,
                       topic=topic, placement=placement)
    out = _explanation_base("settings", settings.agent_id, topic, resolved, registry)
    if resolved.dead_letter is not None:
        return {**out, "kind": resolved.kind or None, "bytes": scenario.in_bytes}
    # No URL, no cloud client: the daemon then passes cloud_available=False (reason no_cloud).
    scenario = replace(scenario, kind=resolved.kind, placement=resolved.placement,
                       cloud_available=scenario.cloud_available and settings.cloud.url is not None)
    params = settings.decision.as_params()
    decision, snapshot = explain(params, scenario, inline_kinds=inline_kinds(registry),
                                 lease_idle_s=settings.cloud.lease_idle_s)
    return {**out, **as_json(resolved.kind, scenario.in_bytes, decision, snapshot, params,
                             inline=_inline(registry, resolved.kind))}


def _explanation_base(source: str, agent_id: str, topic: str | None, resolved: Resolved,
                      registry: TaskRegistry) -> dict[str, Any]:
    reason, detail = resolved.dead_letter or (None, None)
    return {"source": source, "agent_id": agent_id, "topic": topic, "route": _route_json(resolved.route),
            "placement": resolved.placement, "installed": resolved.kind in registry,
            "dead_letter": None if reason is None else {"reason": reason, "detail": detail},
            "warnings": resolved.warnings, "notes": resolved.notes}


def _inline(registry: TaskRegistry, kind: str) -> bool:
    return kind in registry and not registry.get(kind).heavy


# ---------------------------------------------------------------------------------------------- daemon side


class _Rates:
    """Received, done and dead-lettered per minute over the last minute, from samples of the counters."""

    def __init__(self) -> None:
        self.samples: deque[tuple[float, int, int, int]] = deque(maxlen=int(RATE_WINDOW_S / RATE_SAMPLE_S) + 1)

    def add(self, now: float, counts: tuple[int, int, int]) -> None:
        self.samples.append((now, *counts))

    def per_minute(self, now: float, counts: tuple[int, int, int]) -> dict[str, Any]:
        oldest = next((s for s in self.samples if now - s[0] <= RATE_WINDOW_S + RATE_SAMPLE_S), None)
        if oldest is None or now - oldest[0] < 1.0:
            return {"window_s": 0.0, "received": None, "done": None, "dead_lettered": None}
        span = now - oldest[0]
        received, done, dead = (round((c - o) * 60.0 / span, 1) for c, o in zip(counts, oldest[1:], strict=True))
        return {"window_s": round(span, 1), "received": received, "done": done, "dead_lettered": dead}


class Introspection:
    """Gathers /status and /explain for the metrics server. Built by the daemon with its stages."""

    def __init__(self, *, settings: Callable[[], Settings], registry: TaskRegistry, ingress: Ingress,
                 dispatcher: Dispatcher, store: Store, link: Link, publisher: Publisher,
                 cloud: Cloud | None, healthy: Callable[[], tuple[bool, str]],
                 ready: Callable[[], tuple[bool, str]], clock: Callable[[], float] = time.monotonic,
                 archive: ArchiveService | None = None) -> None:
        self._settings = settings
        self._registry = registry
        self._ingress = ingress
        self._dispatcher = dispatcher
        self._store = store
        self._link = link
        self._publisher = publisher
        self._cloud = cloud
        self._archive = archive
        self._healthy = healthy
        self._ready = ready
        self._clock = clock
        self._started = clock()
        self._rates = _Rates()
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._sample()

    def endpoints(self) -> dict[str, Callable[[Mapping[str, str]], tuple[int, Any]]]:
        return {"/status": self._status_endpoint, "/explain": self._explain_endpoint}

    # -------------------------------------------------------------- HTTP thread

    def _status_endpoint(self, query: Mapping[str, str]) -> tuple[int, Any]:
        answer = self._ask(self.status)
        if isinstance(answer, tuple):
            return answer
        # Counting rows takes a moment on a large store: here, on a connection of its own, not on the loop.
        answer["store"].update(_census(self._store.path))
        return 200, answer

    def _explain_endpoint(self, query: Mapping[str, str]) -> tuple[int, Any]:
        try:
            in_bytes = int(query.get("bytes", ""))
            if not 0 <= in_bytes <= MAX_EXPLAIN_BYTES:
                raise ValueError
        except ValueError:
            return 400, {"error": "bytes must be a whole number of bytes, 0 or more"}
        kind, topic, placement = query.get("kind") or None, query.get("topic") or None, query.get("placement") or None
        if kind is None and topic is None:
            return 400, {"error": "give kind, topic or both"}
        if placement is not None and placement not in PLACEMENTS:
            return 400, {"error": f"placement must be one of {', '.join(PLACEMENTS)}"}
        answer = self._ask(lambda: self.explain(kind, in_bytes, topic, cast("Placement | None", placement)))
        return answer if isinstance(answer, tuple) else (200, answer)

    def _ask(self, fn: Callable[[], T]) -> T | tuple[int, dict[str, str]]:
        """Run ``fn`` on the event loop and wait for its answer, or the HTTP answer saying why there is none."""
        loop = self._loop
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as exc:  # noqa: BLE001 - handed to the waiting thread
                    future.set_exception(exc)

        try:
            if loop is None:
                raise RuntimeError
            loop.call_soon_threadsafe(run)
        except RuntimeError:  # not started, or the loop is closed
            return 503, {"error": "the agent is starting or stopping"}
        try:
            return future.result(ANSWER_WITHIN_S)
        except concurrent.futures.TimeoutError:
            future.cancel()
            return 503, {"error": f"the event loop did not answer within {ANSWER_WITHIN_S:.0f} s (see /healthz)"}
        except Unanswerable as exc:
            return 400, {"error": str(exc)}

    # -------------------------------------------------------------- event loop

    def _counts(self) -> tuple[int, int, int]:
        c, d = self._ingress.counters, self._dispatcher
        return c.received, d.completed, c.dead_lettered + d.dead_lettered

    def _sample(self) -> None:
        self._rates.add(self._clock(), self._counts())
        assert self._loop is not None
        self._loop.call_later(RATE_SAMPLE_S, self._sample)

    def status(self) -> dict[str, Any]:
        s = self._settings()
        now = self._clock()
        ingress, dispatcher, link, publisher = self._ingress, self._dispatcher, self._link, self._publisher
        counters = ingress.counters
        ready, ready_detail = self._ready()
        healthy, health_detail = self._healthy()
        connected = link.connected.is_set()
        group = s.mqtt.shared_group
        routes = []
        for route in ingress.router.routes:
            state = link.subscriptions.get(subscription_filter(route.topic, group), "not subscribed")
            routes.append({**(_route_json(route) or {}), "subscription": state if connected else "not connected",
                           "messages": counters.by_route.get(route.topic, 0)})
        estimates = dispatcher.policy.snapshot(now)
        cloud: dict[str, Any] | None = None
        if self._cloud is not None:
            cloud = {"url": s.cloud.url, **self._cloud.describe(), "lease_warm": estimates["lease_warm"]}
        return {
            "agent_id": s.agent_id, "version": __version__, "pid": os.getpid(),
            "uptime_s": round(now - self._started, 1),
            "ready": ready, "ready_detail": ready_detail, "healthy": healthy, "health_detail": health_detail,
            "broker": {"host": link.node.host, "port": link.node.port, "protocol": s.mqtt.protocol,
                       "tls": s.mqtt.tls.enabled, "client_id": s.client_id, "shared_group": group,
                       "connected": connected, "last_error": link.last_connect_error,
                       # Failover: host and port above are the node in use (or being tried).
                       "node": str(link.node), "nodes": [str(n) for n in link.nodes],
                       "failovers": link.failovers, "session_present": link.session_present},
            "routes": routes,
            "per_minute": self._rates.per_minute(now, self._counts()),
            "totals": {"received": counters.received, "done": dispatcher.completed,
                       "dead_lettered": counters.dead_lettered + dispatcher.dead_lettered,
                       "duplicates": counters.duplicates, "held_back": counters.held_back},
            "backlog": {"queued": dispatcher.backlog, "running": dispatcher.running,
                        "results_unacknowledged": publisher.inflight, "results_waiting": publisher.backlog},
            "store": {"path": str(self._store.path), "tasks": self._store.outstanding_rows,
                      "bytes": self._store.outstanding_bytes, "max_tasks": self._store.max_tasks,
                      "max_bytes": self._store.max_bytes, "intake_paused": ingress.paused},
            "cloud": cloud,
            "archive": None if self._archive is None else self._archive.report(),
            "estimates": estimates,
            "problems": PROBLEMS.latest(),
        }

    def explain(self, kind: str | None, in_bytes: int, topic: str | None,
                placement: Placement | None) -> dict[str, Any]:
        s = self._settings()
        resolved = resolve(self._ingress.router, self._registry, s.max_payload_bytes, kind=kind, in_bytes=in_bytes,
                           topic=topic, placement=placement)
        out = _explanation_base("live", s.agent_id, topic, resolved, self._registry)
        if resolved.dead_letter is not None:
            return {**out, "kind": resolved.kind or None, "bytes": in_bytes}
        decision, snapshot = self._dispatcher.preview(Task(resolved.kind, in_bytes), resolved.placement)
        return {**out, **as_json(resolved.kind, in_bytes, decision, snapshot, s.decision.as_params(),
                                 inline=_inline(self._registry, resolved.kind))}


def _census(path: Path) -> dict[str, int | None]:
    """Pending tasks and outbox rows (results and dead letters not yet acknowledged), counted on a read-only
    connection: a WAL reader holds the writer up for nothing."""
    try:
        db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=1.0)
        try:
            rows = dict(db.execute("SELECT state, count(*) FROM tasks WHERE state < 2 GROUP BY state").fetchall())
        finally:
            db.close()
    except sqlite3.Error:
        return {"pending": None, "outbox": None}
    return {"pending": int(rows.get(0, 0)), "outbox": int(rows.get(1, 0))}

"""What ``edge-agent explain`` shares with the daemon: how it builds its policy, and what ingress and the task
registry make of a message (its size, the first route whose filter matches, the task), so that an explanation
from the settings decides as the agent would.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from agent.config import Placement, Route, Settings
from agent.decision import Policy
from agent.decision.explain import Scenario, as_json, explain
from agent.tasks import TaskRegistry

if TYPE_CHECKING:
    from agent.ingress import Router


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
    decision, snapshot = explain(settings.decision, scenario, inline_kinds=inline_kinds(registry),
                                 lease_idle_s=settings.cloud.lease_idle_s)
    return {**out, **as_json(resolved.kind, scenario.in_bytes, decision, snapshot, settings.decision,
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

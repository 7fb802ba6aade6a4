"""``edge-agent explain``: one decision, both totals term by term, in words an operator reads."""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import Any

from agent.decision.model import REBIND_MARGIN_RATIO, REBIND_MARGIN_S, Decision, Placement, Policy, Task
from agent.decision.params import DecisionParams


@dataclass(frozen=True, slots=True)
class Scenario:
    """The conditions to explain a decision under; None keeps the configured prior."""

    kind: str
    in_bytes: int
    uplink_mbps: float | None = None
    downlink_mbps: float | None = None
    rtt_s: float | None = None
    provisioning_s: float | None = None
    local_backlog: int = 0  # tasks of the same kind already queued or running on the gateway
    uplink_queued_bytes: int = 0
    lease_warm: bool = False
    local_workers: int = 1
    placement: Placement = "auto"
    cloud_available: bool = True
    circuit_open: bool = False


def explain(params: DecisionParams, scenario: Scenario, *, inline_kinds: Collection[str] = (),
            lease_idle_s: float = 60.0) -> tuple[Decision, dict[str, Any]]:
    """Build a fresh policy whose priors are the scenario's figures, load its queues, and decide.

    ``inline_kinds`` and ``lease_idle_s`` as the daemon builds its policy (light kinds wait for the event loop,
    not for a worker)."""
    updates: dict[str, Any] = {"probe_interval_s": 0.0}  # explain the model's choice, not an exploration step
    for name in ("uplink_mbps", "downlink_mbps", "rtt_s", "provisioning_s"):
        value = getattr(scenario, name)
        if value is not None:
            updates[name] = value
    policy = Policy(replace(params, **updates), local_workers=scenario.local_workers,
                    inline_kinds=inline_kinds, lease_idle_s=lease_idle_s)
    now = 0.0
    for _ in range(scenario.local_backlog):
        policy.task_started("local", Task(scenario.kind, scenario.in_bytes), now)
    if scenario.lease_warm:
        policy.observe_lease(True)
    if scenario.uplink_queued_bytes:
        # Other inputs waiting on the uplink, as one more task of this kind on its way to the cloud.
        policy.task_started("cloud", Task(scenario.kind, scenario.uplink_queued_bytes), now)
    decision = policy.decide(
        Task(scenario.kind, scenario.in_bytes),
        now,
        placement=scenario.placement,
        cloud_available=scenario.cloud_available,
        circuit_open=scenario.circuit_open,
    )
    return decision, policy.snapshot(now)


def as_json(kind: str, in_bytes: int, decision: Decision, snapshot: dict[str, Any], params: DecisionParams,
            *, inline: bool) -> dict[str, Any]:
    """One decision as plain data: what ``explain --json`` prints, what the agent's /explain answers, and what
    :func:`render` reads. ``inline``: the kind runs on the event loop (its wait is the loop's, not a worker's)."""

    def finite(value: float) -> float | None:
        return value if math.isfinite(value) else None

    return {
        "kind": kind, "bytes": in_bytes, "target": decision.target, "reason": decision.reason,
        "t_local_s": decision.t_local_s, "t_cloud_s": decision.t_cloud_s, "terms": dict(decision.terms),
        "margin_s": max(params.margin_s, params.margin_ratio * decision.t_local_s),
        "probe": decision.probe, "prewarm": decision.prewarm,
        "hedge_after_s": finite(decision.hedge_after_s), "upload_by_s": finite(decision.upload_by_s),
        "inline": inline, "estimates": snapshot,
        "rebound": decision.rebound,
        # Late binding: a heavy task the model keeps on the gateway is asked again while it waits there.
        "rebind_margin_s": max(REBIND_MARGIN_S, REBIND_MARGIN_RATIO * decision.t_local_s, params.margin_s,
                               params.margin_ratio * decision.t_local_s)
        if decision.target == "local" and decision.reason == "model" and not inline else None,
        # … and a cloud task the model chose, while its upload has not started (Policy.move_back).
        "move_back_margin_s": max(REBIND_MARGIN_S, REBIND_MARGIN_RATIO * decision.t_cloud_s, params.margin_s,
                                  params.margin_ratio * decision.t_cloud_s)
        if decision.target == "cloud" and decision.reason == "model" and not decision.probe else None,
    }


def _mbps(bytes_per_s: float) -> str:
    return f"{bytes_per_s * 8 / 1e6:.2f} Mbit/s"


_WHY = {
    "model": "the model's choice",
    "placement": "the route's placement setting",
    "no_cloud": "no cloud is configured: EDGE_AGENT_CLOUD__URL is unset",
    "circuit_open": "the cloud circuit breaker is open",
}


def render(data: dict[str, Any], asked: str | None = None) -> str:
    """``explain``'s text from its JSON (:func:`as_json` and the context ``edge-agent explain`` adds: source,
    topic, route, dead letter, notes): what was asked of whom, then the decision term by term, or why there is
    none. ``asked``: the address of the running agent that answered."""
    lines: list[str] = []
    if data.get("source") == "live":
        lines.append(f"Asked the running agent {data['agent_id']} at {asked}: its estimates, queues and lease now.")
    route = data.get("route")
    if data.get("topic") is not None and route is not None:
        placed = f"placement {route['placement']}"
        if data["placement"] != route["placement"]:
            placed = f"placement {data['placement']} as asked (the route says {route['placement']})"
        lines.append(f"Topic {data['topic']} → route {route['topic']}: task {route['task']}, {placed}.")
    if lines:
        lines.append("")
    dead = data.get("dead_letter")
    if dead is not None:
        what = data["topic"] if data.get("topic") is not None else data["kind"]
        lines.append(f"{what}, {data['bytes']:,} bytes → a dead letter ({dead['reason']}): {dead['detail']}. "
                     "No decision is made.")
    else:
        lines += _decision(data)
    lines += [f"Note: {note}" for note in data.get("notes", ())]
    return "\n".join(lines)


def _decision(data: dict[str, Any]) -> list[str]:
    """Both totals and every term, one per line, with the estimate each term came from."""
    t = data["terms"]
    snapshot = data["estimates"]
    kind = snapshot["kinds"][data["kind"]]
    t_local, t_cloud, in_bytes = data["t_local_s"], data["t_cloud_s"], data["bytes"]
    winner = "on the gateway" if data["target"] == "local" else "in the cloud"
    why = "a probe: the cloud's estimates are stale" if data["probe"] else _WHY[data["reason"]]
    faster = "cloud" if t_cloud < t_local else "gateway"
    up = snapshot["uplink_mbps"] * 1e6 / 8
    down = snapshot["downlink_mbps"] * 1e6 / 8
    if data["inline"]:
        wait_label = "  wait for the event loop"
        ahead = f"{snapshot['inline_tasks']} light task(s) ahead, run one at a time"
    else:
        wait_label = "  wait for a worker"
        ahead = f"{snapshot['local_tasks']} task(s) ahead, {snapshot['local_workers']} worker(s)"
    lines = [
        f"{data['kind']}, {in_bytes:,} bytes → runs {winner} ({why}).",
        f"Expected: {t_local:.3f} s on the gateway, {t_cloud:.3f} s in the cloud; "
        f"the {faster} is faster by {abs(t_local - t_cloud):.3f} s "
        f"(the cloud must win by more than {data['margin_s']:.3f} s).",
        "",
        f"{'on the gateway':<32}{t_local:>9.3f} s",
        f"{wait_label:<32}{t['local_wait_s']:>9.3f} s   {ahead}",
        f"{'  service time':<32}{t['local_service_s']:>9.3f} s   "
        f"{_fixed(kind['local_fixed_s'])} + {kind['local_per_byte_s'] * 1e6:.3f} µs/byte"
        f"{_samples(kind['local_samples'])}",
        f"{'in the cloud':<32}{t_cloud:>9.3f} s",
        f"{'  provisioning':<32}{t['provisioning_s']:>9.3f} s   "
        + ("a ready lease is warm" if t["provisioning_s"] == 0 else "no warm lease: one must be started"),
        f"{'  round trip':<32}{t['rtt_s']:>9.3f} s",
        f"{'  uplink queue':<32}{t['uplink_queue_s']:>9.3f} s   "
        f"{snapshot['uplink_queued_bytes']:,} bytes ahead at {_mbps(up)}",
        f"{'  upload':<32}{t['upload_s']:>9.3f} s   {in_bytes:,} bytes at {_mbps(up)}",
        f"{'  wait for a cloud slot':<32}{t['cloud_wait_s']:>9.3f} s   "
        f"{snapshot['cloud_tasks']} task(s) in the cloud, {snapshot['cloud_slots']} slot(s)",
        f"{'  cloud service time':<32}{t['cloud_service_s']:>9.3f} s   "
        f"{_fixed(kind['cloud_fixed_s'])} + {kind['cloud_per_byte_s'] * 1e6:.3f} µs/byte"
        f"{_samples(kind['cloud_samples'])}",
        f"{'  download the result':<32}{t['download_s']:>9.3f} s   "
        f"{kind['out_bytes']:,.0f} bytes at {_mbps(down)}",
    ]
    if data["prewarm"]:
        lines.append("Without provisioning the cloud would win: the agent starts a lease now for the next tasks.")
    rebind = data.get("rebind_margin_s")
    if rebind is not None:
        lines.append(f"While it waits for a worker the agent asks again: if the cloud becomes sooner by more than "
                     f"{rebind:.3f} s, even with its upload taking twice as long, the task moves there before it "
                     'starts (late binding; its result then says "rebound": true).')
    back = data.get("move_back_margin_s")
    if back is not None:
        lines.append(f"Until its upload starts the agent asks again: if the gateway becomes sooner by more than "
                     f"about {back:.3f} s, even with the upload twice as fast as measured, the task comes back to "
                     'the gateway (late binding; its result then says "rebound": true and placement "local").')
    hedge_after, upload_by = data["hedge_after_s"], data["upload_by_s"]
    if hedge_after is not None:
        lines.append(f"If the cloud's answer has not come {hedge_after:.3f} s after the decision, the task "
                     "also runs on the gateway; the first result counts and the other copy is cancelled.")
        if upload_by is not None and upload_by < hedge_after:
            lines.append(f"So does it if its upload has not ended {upload_by:.3f} s after the decision "
                         "(an upload that late has met a fade or an outage).")
    return lines


def _fixed(seconds: float) -> str:
    # Light tasks cost microseconds: at four decimals of a second they would all read 0.0000 s.
    return f"{seconds:.4f} s" if seconds >= 0.001 else f"{seconds * 1e6:.1f} µs"


def _samples(n: float) -> str:
    # The effective weight of measured runs still counting (they fade by count and by age), not a total.
    return f", learned from ~{n:,.0f} recent run(s)" if n >= 0.5 else ", the prior"

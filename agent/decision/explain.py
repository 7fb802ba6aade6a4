"""``edge-agent explain``: one decision, both totals term by term, in words an operator reads."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from agent.config import DecisionSettings
from agent.decision.model import Decision, Placement, Policy, Task


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


def explain(settings: DecisionSettings, scenario: Scenario) -> tuple[Decision, dict[str, Any]]:
    """Build a fresh policy whose priors are the scenario's figures, load its queues, and decide."""
    updates: dict[str, Any] = {"probe_interval_s": 0.0}  # explain the model's choice, not an exploration step
    for name in ("uplink_mbps", "downlink_mbps", "rtt_s", "provisioning_s"):
        value = getattr(scenario, name)
        if value is not None:
            updates[name] = value
    policy = Policy(settings.model_copy(update=updates), local_workers=scenario.local_workers)
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


def _mbps(bytes_per_s: float) -> str:
    return f"{bytes_per_s * 8 / 1e6:.2f} Mbit/s"


_WHY = {
    "model": "the model's choice",
    "placement": "the route's placement setting",
    "no_cloud": "no cloud is configured (EDGE_AGENT_CLOUD__URL unset)",
    "circuit_open": "the cloud circuit breaker is open",
}


def render(scenario: Scenario, decision: Decision, snapshot: dict[str, Any], settings: DecisionSettings) -> str:
    """Both totals and every term, one per line, with the estimate each term came from."""
    t = decision.terms
    kind = snapshot["kinds"][scenario.kind]
    winner = "on the gateway" if decision.target == "local" else "in the cloud"
    faster = "cloud" if decision.t_cloud_s < decision.t_local_s else "gateway"
    margin = max(settings.margin_s, settings.margin_ratio * decision.t_local_s)
    up = snapshot["uplink_mbps"] * 1e6 / 8
    down = snapshot["downlink_mbps"] * 1e6 / 8
    lines = [
        f"{scenario.kind}, {scenario.in_bytes:,} bytes → runs {winner} ({_WHY[decision.reason]}).",
        f"Expected: {decision.t_local_s:.3f} s on the gateway, {decision.t_cloud_s:.3f} s in the cloud; "
        f"the {faster} is faster by {abs(decision.t_local_s - decision.t_cloud_s):.3f} s "
        f"(the cloud must win by more than {margin:.3f} s).",
        "",
        f"{'on the gateway':<32}{decision.t_local_s:>9.3f} s",
        f"{'  wait for a worker':<32}{t['local_wait_s']:>9.3f} s   "
        f"{scenario.local_backlog} task(s) ahead, {scenario.local_workers} worker(s)",
        f"{'  service time':<32}{t['local_service_s']:>9.3f} s   "
        f"{kind['local_fixed_s']:.4f} s + {kind['local_per_byte_s'] * 1e6:.3f} µs/byte",
        f"{'in the cloud':<32}{decision.t_cloud_s:>9.3f} s",
        f"{'  provisioning':<32}{t['provisioning_s']:>9.3f} s   "
        + ("a ready lease is warm" if t["provisioning_s"] == 0 else "no warm lease: one must be started"),
        f"{'  round trip':<32}{t['rtt_s']:>9.3f} s",
        f"{'  uplink queue':<32}{t['uplink_queue_s']:>9.3f} s   "
        f"{snapshot['uplink_queued_bytes']:,} bytes ahead at {_mbps(up)}",
        f"{'  upload':<32}{t['upload_s']:>9.3f} s   {scenario.in_bytes:,} bytes at {_mbps(up)}",
        f"{'  wait for a cloud slot':<32}{t['cloud_wait_s']:>9.3f} s   "
        f"{snapshot['cloud_tasks']} task(s) in the cloud, {snapshot['cloud_slots']} slot(s)",
        f"{'  cloud service time':<32}{t['cloud_service_s']:>9.3f} s   "
        f"{kind['cloud_fixed_s']:.4f} s + {kind['cloud_per_byte_s'] * 1e6:.3f} µs/byte",
        f"{'  download the result':<32}{t['download_s']:>9.3f} s   "
        f"{kind['out_bytes']:,.0f} bytes at {_mbps(down)}",
    ]
    if decision.prewarm:
        lines.append("Without provisioning the cloud would win: the agent starts a lease now for the next tasks.")
    if math.isfinite(decision.hedge_after_s):
        lines.append(f"If the cloud's answer has not come {decision.hedge_after_s:.3f} s after the decision, the task "
                     "also runs on the gateway; the first result counts and the other copy is cancelled.")
    if decision.upload_by_s < decision.hedge_after_s:
        lines.append(f"So does it if its upload has not ended {decision.upload_by_s:.3f} s after the decision "
                     "(an upload that late has met a fade or an outage).")
    return "\n".join(lines)

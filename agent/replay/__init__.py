"""``edge-agent replay``: what-if replay of real bandwidth traces through the real Policy and baselines.

The Policy and its interface are described in docs/design.md#decision-model, the replay in docs/decision.md.

``run_replay`` loads the traces, draws the workload once, runs every policy over it and summarises completion
times. ``format_table`` and ``as_json`` render the result (the ``--json`` shape is a contract).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.decision import DecisionParams, ParamsSource
from agent.replay.simulate import POLICIES, Outcome, run_policy
from agent.replay.traces import Trace, TraceError, load_trace
from agent.replay.workload import DEFAULT_WORKLOAD, Arrivals, Workload, generate, load_workload

__all__ = [
    "DEFAULT_WORKLOAD",
    "POLICIES",
    "PolicyStats",
    "Replay",
    "Trace",
    "TraceError",
    "Workload",
    "as_json",
    "format_table",
    "load_trace",
    "load_workload",
    "run_replay",
]


@dataclass(frozen=True, slots=True)
class PolicyStats:
    mean_s: float
    p95_s: float
    offloaded: float  # share of tasks sent to the cloud


@dataclass(frozen=True, slots=True)
class Replay:
    trace: str
    uplink: Trace
    downlink: Trace
    arrivals: Arrivals
    outcomes: dict[str, Outcome]
    stats: dict[str, PolicyStats]

    def ratio(self, policy: str) -> float:
        """Mean completion time relative to the oracle's."""
        return self.stats[policy].mean_s / self.stats["oracle"].mean_s


def run_replay(
    uplink: Path,
    downlink: Path | None = None,
    *,
    seed: int = 1,
    workload: Workload = DEFAULT_WORKLOAD,
    settings: DecisionParams | ParamsSource | None = None,
    policies: tuple[str, ...] = POLICIES,
) -> Replay:
    up = load_trace(uplink)
    down = load_trace(downlink) if downlink is not None else up
    workload.check()
    arrivals = generate(workload, seed)
    outcomes = {name: run_policy(name, workload, arrivals, up, down, settings) for name in policies}
    stats = {name: _stats(outcome) for name, outcome in outcomes.items()}
    return Replay(str(uplink), up, down, arrivals, outcomes, stats)


def _stats(outcome: Outcome) -> PolicyStats:
    times = np.asarray(outcome.completion_s)
    if times.size == 0:
        return PolicyStats(0.0, 0.0, 0.0)
    return PolicyStats(float(times.mean()), float(np.percentile(times, 95)), float(np.mean(outcome.cloud)))


def as_json(replay: Replay) -> dict[str, Any]:
    """The contract shape: ``{"trace", "tasks", "policies": {name: {"mean_s", "p95_s"}}}``."""
    return {
        "trace": replay.trace,
        "tasks": len(replay.arrivals),
        "policies": {
            name: {"mean_s": round(s.mean_s, 6), "p95_s": round(s.p95_s, 6)} for name, s in replay.stats.items()
        },
    }


def format_table(replay: Replay) -> str:
    up, down = replay.uplink, replay.downlink
    lines = [
        f"trace {replay.trace}",
        f"uplink {up.name} ({up.format}, {up.period_s:.0f} s, mean {up.mean_mbps:.2f} Mbit/s); "
        f"downlink {down.name} (mean {down.mean_mbps:.2f} Mbit/s); {len(replay.arrivals)} tasks",
        "",
        f"{'policy':<18} {'mean s':>9} {'p95 s':>9} {'× oracle':>9} {'offloaded':>10}",
    ]
    oracle = replay.stats.get("oracle")
    for name, s in replay.stats.items():
        ratio = f"{s.mean_s / oracle.mean_s:9.3f}" if oracle and oracle.mean_s > 0 else f"{'-':>9}"
        lines.append(f"{name:<18} {s.mean_s:9.3f} {s.p95_s:9.3f} {ratio} {s.offloaded:9.1%}")
    return "\n".join(lines)

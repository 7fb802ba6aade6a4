"""What /metrics, /status and the leave protocol read off the dispatcher (agent/agent_metrics.py).

Written on the event loop only; a scrape from the metrics thread reads whole values (a dict may be a turn old).
"""

from __future__ import annotations

from collections.abc import Mapping

from agent.metrics import Histogram


class DispatchCounters:
    """The dispatcher's totals since the start. Each has one writer: the method here that counts it."""

    def __init__(self) -> None:
        self.completed = 0  # tasks that succeeded (one result each, wherever they ran)
        self.dead_lettered = 0
        self.decisions: dict[tuple[str, str], int] = {}  # (target, reason) → count
        self.dead_by_reason: dict[str, int] = {}
        self.durations: dict[tuple[str, str], Histogram] = {}  # (placement, kind) → service time
        self.cloud_outcomes: dict[str, int] = {}  # ok, transient, permanent, circuit_open, cancelled → count
        self.hedges = 0  # cloud tasks that also ran on the gateway because they were overdue
        self.hedges_won = 0  # … of which the gateway copy succeeded first
        self.rebinds = 0  # tasks queued for the gateway moved to the cloud before they started (late binding)
        self.moves_back = 0  # cloud tasks moved back to the gateway before their upload started
        self.last_terms: dict[str, Mapping[str, float]] = {}  # kind → the terms of its latest decision

    def _count_decision(self, kind: str, target: str, reason: str, terms: Mapping[str, float]) -> None:
        key = (target, reason)
        self.decisions[key] = self.decisions.get(key, 0) + 1
        self.last_terms[kind] = terms  # each decision has its own; no copy per task

    def _count_cloud(self, outcome: str) -> None:
        self.cloud_outcomes[outcome] = self.cloud_outcomes.get(outcome, 0) + 1

    def _count_success(self, placement: str, kind: str, service_s: float) -> None:
        key = (placement, kind)
        histogram = self.durations.get(key)
        if histogram is None:
            histogram = self.durations[key] = Histogram()
        histogram.observe(service_s)
        self.completed += 1

    def _count_dead_letter(self, reason: str) -> None:
        self.dead_lettered += 1
        self.dead_by_reason[reason] = self.dead_by_reason.get(reason, 0) + 1

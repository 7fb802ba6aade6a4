"""The agent's metric table: what /metrics exports, each series read from the running parts at scrape time.

``agent.metrics`` holds the collector and server types; this module only names the series and where each is
read, so the daemon wires one call: ``build_collector(ingress=..., dispatcher=..., ...)``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from agent.cloud import CircuitState
from agent.metrics import AgentCollector, Gauge, LabelledCounter, LabelledHistogram

if TYPE_CHECKING:
    from agent.cloud import Cloud
    from agent.decision import Policy
    from agent.dispatch import Dispatcher
    from agent.egress import Publisher
    from agent.ingress import Ingress
    from agent.mqtt import Link
    from agent.store import Store


def build_collector(*, ingress: Ingress, dispatcher: Dispatcher, store: Store, link: Link,
                    publisher: Publisher, policy: Policy, cloud: Cloud | None) -> AgentCollector:
    c = AgentCollector()

    def dead_letters() -> dict[str, int]:
        merged = dict(ingress.counters.dead_by_reason)
        for reason, n in dispatcher.dead_by_reason.items():
            merged[reason] = merged.get(reason, 0) + n
        return merged

    c.counters += [
        LabelledCounter("edge_agent_messages", "Messages accepted as tasks, by route filter.", ("route",),
                        lambda: ingress.counters.by_route),
        LabelledCounter("edge_agent_decisions", "Placement decisions, by target and reason.",
                        ("target", "reason"), lambda: dispatcher.decisions),
        LabelledCounter("edge_agent_dead_letters", "Messages sent to the dead-letter topic, by reason.",
                        ("reason",), dead_letters),
        LabelledCounter("edge_agent_cloud_requests", "Cloud submissions by outcome (ok, transient, permanent, "
                        "circuit_open, cancelled: a hedged task's gateway copy finished first, moved_back: moved "
                        "to the gateway before its upload); every failed, cancelled or moved one ran on the "
                        "gateway.", ("outcome",),
                        lambda: dispatcher.cloud_outcomes),
        LabelledCounter("edge_agent_hedges", "Cloud tasks that also ran on the gateway because the cloud's "
                        "answer was overdue.", (), lambda: {(): dispatcher.hedges}),
        LabelledCounter("edge_agent_hedges_won", "Hedged tasks whose gateway copy finished first (the cloud "
                        "request was cancelled).", (), lambda: {(): dispatcher.hedges_won}),
        LabelledCounter("edge_agent_rebinds", "Tasks moved before they started because the other side would now "
                        "finish them sooner (late binding): queued for the gateway to the cloud (direction "
                        "to_cloud), or sent to the cloud and not yet uploaded back (to_gateway).", ("direction",),
                        lambda: {("to_cloud",): dispatcher.rebinds, ("to_gateway",): dispatcher.moves_back}),
        LabelledCounter("edge_agent_messages_received", "Messages received from the broker.", (),
                        lambda: {(): ingress.counters.received}),
        LabelledCounter("edge_agent_duplicates_received", "Redeliveries recognised as already stored.", (),
                        lambda: {(): ingress.counters.duplicates}),
        LabelledCounter("edge_agent_store_commits", "Group commits of the store.", (),
                        lambda: {(): store.commits}),
        LabelledCounter("edge_agent_dead_letters_dropped", "Kept dead letters dropped, oldest first, to hold "
                        "EDGE_AGENT_DEAD_LETTERS__MAX_COUNT and __MAX_BYTES.", (),
                        lambda: {(): store.dead_letters.dropped}),
        LabelledCounter("edge_agent_dead_letters_replayed", "Dead letters re-admitted as new tasks by "
                        "`edge-agent dead-letters replay`.", (), lambda: {(): ingress.counters.replayed}),
    ]
    c.histograms.append(LabelledHistogram(
        "edge_agent_task_duration_seconds", "Measured service time of each task, by placement and kind.",
        ("placement", "kind"), lambda: dispatcher.durations))

    def estimates() -> dict[str, float]:
        snapshot = policy.snapshot(time.monotonic())
        return {k: float(v) for k, v in snapshot.items() if isinstance(v, int | float)}

    def terms() -> dict[tuple[str, str], float]:
        return {(kind, term): value for kind, t in dispatcher.last_terms.items() for term, value in t.items()}

    def circuit() -> dict[str, float]:
        state = cloud.circuit_state if cloud is not None else None
        return {s.value: float(state is s) for s in CircuitState}

    c.gauge_maps += [
        ("edge_agent_circuit_state", "1 for the cloud circuit breaker's current state (all 0: no cloud).",
         ("state",), circuit),
        ("edge_agent_estimate", "The decision model's current estimates (Mbit/s, seconds, counts, bytes).",
         ("name",), estimates),
        ("edge_agent_decision_term_seconds", "Terms of the latest decision per task kind.", ("kind", "term"),
         terms),
    ]
    c.gauges += [
        Gauge("edge_agent_store_tasks", "Tasks and results in the store not yet acknowledged by the broker.",
              lambda: store.outstanding_rows),
        Gauge("edge_agent_store_bytes", "Bytes of inputs and results held in the store.",
              lambda: store.outstanding_bytes),
        Gauge("edge_agent_queue_depth", "Committed tasks waiting to run.", lambda: dispatcher.backlog),
        Gauge("edge_agent_running_tasks", "Tasks running: in the worker pool, and cloud requests in flight.",
              lambda: dispatcher.running),
        Gauge("edge_agent_results_unacknowledged", "Results published, awaiting the broker's PUBACK.",
              lambda: publisher.inflight),
        Gauge("edge_agent_mqtt_connected", "1 while connected to the broker.",
              lambda: float(link.connected.is_set())),
        Gauge("edge_agent_intake_paused", "1 while the store is full and intake is paused.",
              lambda: float(ingress.paused)),
        Gauge("edge_agent_dead_letters_kept", "Dead letters whose payload the store keeps.",
              lambda: store.dead_letters.kept),
        Gauge("edge_agent_dead_letters_kept_bytes", "Bytes of the dead-letter payloads the store keeps.",
              lambda: store.dead_letters.bytes),
    ]
    link.add_metrics(c)  # failover: connections by session_present, failovers, the node in use
    return c

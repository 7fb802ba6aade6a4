"""What the demo shows, gathered as an operator would: the agent's ``/metrics`` and its result topics.

No private channel into the agent: everything here is available to any Prometheus and any MQTT subscriber.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from agent.mqtt.topics import dead_letters_filter, results_filter, topic_matches


@dataclass(frozen=True, slots=True)
class Result:
    at: float  # wall clock when it arrived
    topic: str
    kind: str
    placement: str
    reason: str
    probe: bool
    t_local_s: float | None  # what the model expected on each side when it decided
    t_cloud_s: float | None
    total_s: float
    summary: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    at: float
    topic: str
    reason: str
    detail: str


def _summary(kind: str, result: Any) -> str:
    """One line of what the task found, so the view shows results rather than only their count."""
    if not isinstance(result, dict):
        return ""
    if kind == "noise.spectrum":
        leq, lmax, n = result.get("leq_db"), result.get("lmax_db"), result.get("samples")
        if isinstance(leq, int | float) and isinstance(lmax, int | float) and isinstance(n, int):
            return f"Leq {leq:.1f} dB, Lmax {lmax:.1f} dB, {n / 16000:.1f} s"
    fields = result.get("fields")
    if isinstance(fields, dict):
        anomalies = [name for name, f in fields.items() if isinstance(f, dict) and f.get("anomaly")]
        text = f"{len(fields)} readings"
        return text + (f", anomaly in {', '.join(anomalies)}" if anomalies else "")
    return ""


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


class ResultWatch:
    """Subscribes to ``edge/<agent_id>/results/#`` and ``…/dead-letter/#`` and keeps tallies and the latest few."""

    def __init__(self, host: str, port: int, agent_id: str, recent: int = 6) -> None:
        self._filters = (results_filter(agent_id), dead_letters_filter(agent_id))
        self._lock = threading.Lock()
        self.count: Counter[tuple[str, str]] = Counter()  # (kind, placement)
        self.total_s: dict[tuple[str, str], float] = {}
        self.probes = 0
        self.dead: Counter[str] = Counter()
        # The latest few of each kind: 40 sensor rows a second would otherwise push every spectrum out of view.
        self._recent_per_kind = recent
        self.recent: dict[str, deque[Result]] = {}
        self.recent_dead: deque[DeadLetter] = deque(maxlen=4)
        self.unreadable = 0
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"demo-view-{uuid.uuid4().hex[:8]}",
                                  protocol=paho.MQTTv311)
        self.client.on_message = self._on_message
        self._subscribed = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.connect(host, port)
        self.client.loop_start()

    def _on_connect(self, client: paho.Client, _userdata: Any, _flags: Any, _rc: Any, _props: Any) -> None:
        client.subscribe([(topic_filter, 1) for topic_filter in self._filters])

    def wait_subscribed(self, timeout: float) -> bool:
        return self._subscribed.wait(timeout)

    def _on_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        now = time.time()
        try:
            body = orjson.loads(msg.payload)
            if topic_matches(self._filters[1], msg.topic):
                letter = DeadLetter(now, str(body.get("topic")), str(body.get("reason")), str(body.get("detail")))
                with self._lock:
                    self.dead[letter.reason] += 1
                    self.recent_dead.append(letter)
                return
            kind, placement = str(body["kind"]), str(body["placement"])
            decision = body.get("decision") or {}
            result = Result(now, str(body["topic"]), kind, placement, str(decision.get("reason", "?")),
                            bool(decision.get("probe")), _float(decision.get("t_local_s")),
                            _float(decision.get("t_cloud_s")), float(body["timings"]["total_s"]),
                            _summary(kind, body.get("result")))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            with self._lock:
                self.unreadable += 1
            return
        with self._lock:
            self.count[kind, placement] += 1
            self.total_s[kind, placement] = self.total_s.get((kind, placement), 0.0) + result.total_s
            self.probes += result.probe
            self.recent.setdefault(kind, deque(maxlen=self._recent_per_kind)).append(result)

    def snapshot(self) -> ResultSnapshot:
        with self._lock:
            return ResultSnapshot(Counter(self.count), dict(self.total_s), self.probes, Counter(self.dead),
                                  sorted((r for q in self.recent.values() for r in q), key=lambda r: r.at),
                                  list(self.recent_dead), self.unreadable)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass(frozen=True, slots=True)
class ResultSnapshot:
    count: Counter[tuple[str, str]]
    total_s: dict[tuple[str, str], float]
    probes: int
    dead: Counter[str]
    recent: list[Result]
    recent_dead: list[DeadLetter]
    unreadable: int

    @property
    def results(self) -> int:
        return sum(self.count.values())

    def mean_total_s(self, kind: str, placement: str) -> float | None:
        n = self.count[kind, placement]
        return self.total_s.get((kind, placement), 0.0) / n if n else None

    def kinds(self) -> list[str]:
        return sorted({kind for kind, _ in self.count})


ARCHIVE_SERIES = frozenset({
    "edge_agent_archive_segments", "edge_agent_archive_bytes", "edge_agent_archive_cost",
    "edge_agent_archive_disk_used_bytes", "edge_agent_archive_disk_budget_bytes", "edge_agent_archive_uploads_total",
    "edge_agent_archive_forced_uploads_total", "edge_agent_archive_cloud_available",
})


@dataclass(slots=True)
class Metrics:
    """The figures the view needs from one scrape of the agent's ``/metrics``."""

    received: float = 0.0
    decisions: dict[tuple[str, str], float] = field(default_factory=dict)  # (target, reason)
    estimates: dict[str, float] = field(default_factory=dict)
    cloud_requests: dict[str, float] = field(default_factory=dict)
    circuit: str = "off"
    dead_letters: dict[str, float] = field(default_factory=dict)
    service_s: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)  # (placement, kind)
    queue_depth: float = 0.0
    running: float = 0.0
    connected: bool = False
    # The archive: sealed segments, their bytes and the expected cost of those placed, by place.
    archive_segments: dict[str, float] = field(default_factory=dict)
    archive_bytes: dict[str, float] = field(default_factory=dict)
    archive_cost: dict[str, float] = field(default_factory=dict)
    archive_disk_used: float = 0.0
    archive_disk_budget: float = 0.0
    archive_uploads: float = 0.0
    archive_forced: float = 0.0
    archive_cloud_available: bool = False

    @classmethod
    def parse(cls, text: str) -> Metrics:
        m = cls()
        sums: dict[tuple[str, str], float] = {}
        counts: dict[tuple[str, str], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                name, labels, value = s.name, s.labels, float(s.value)
                if name == "edge_agent_messages_received_total":
                    m.received = value
                elif name == "edge_agent_decisions_total":
                    m.decisions[labels["target"], labels["reason"]] = value
                elif name == "edge_agent_estimate":
                    m.estimates[labels["name"]] = value
                elif name == "edge_agent_cloud_requests_total":
                    m.cloud_requests[labels["outcome"]] = value
                elif name == "edge_agent_circuit_state" and value == 1.0:
                    m.circuit = labels["state"]
                elif name == "edge_agent_dead_letters_total":
                    m.dead_letters[labels["reason"]] = value
                elif name == "edge_agent_task_duration_seconds_sum":
                    sums[labels["placement"], labels["kind"]] = value
                elif name == "edge_agent_task_duration_seconds_count":
                    counts[labels["placement"], labels["kind"]] = value
                elif name == "edge_agent_queue_depth":
                    m.queue_depth = value
                elif name == "edge_agent_running_tasks":
                    m.running = value
                elif name == "edge_agent_mqtt_connected":
                    m.connected = value == 1.0
                elif name in ARCHIVE_SERIES:
                    m._archive(name, labels, value)
        m.service_s = {key: (sums.get(key, 0.0), n) for key, n in counts.items()}
        return m

    def _archive(self, name: str, labels: dict[str, str], value: float) -> None:
        if name == "edge_agent_archive_segments":
            self.archive_segments[labels["place"]] = value
        elif name == "edge_agent_archive_bytes":
            self.archive_bytes[labels["place"]] = value
        elif name == "edge_agent_archive_cost":
            self.archive_cost[labels["place"]] = value
        elif name == "edge_agent_archive_disk_used_bytes":
            self.archive_disk_used = value
        elif name == "edge_agent_archive_disk_budget_bytes":
            self.archive_disk_budget = value
        elif name == "edge_agent_archive_uploads_total":
            self.archive_uploads = value
        elif name == "edge_agent_archive_forced_uploads_total":
            self.archive_forced = value
        elif name == "edge_agent_archive_cloud_available":
            self.archive_cloud_available = value == 1.0


class Scraper:
    def __init__(self, port: int) -> None:
        self._client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=1.0)
        self.last: Metrics | None = None
        self.failures = 0

    def scrape(self) -> Metrics | None:
        """The latest figures; on a failed scrape the previous ones (the agent may be busy or restarting)."""
        try:
            response = self._client.get("/metrics")
            response.raise_for_status()
            self.last = Metrics.parse(response.text)
        except (httpx.HTTPError, ValueError):
            self.failures += 1
        return self.last

    def ready(self) -> bool:
        """``/readyz`` says 200: connected, and the broker has answered the SUBSCRIBE, so it keeps what the
        devices publish from now on (on a first start it keeps nothing before)."""
        try:
            return self._client.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        self._client.close()


@dataclass(slots=True)
class Rates:
    """Messages in and results out per second over the last few seconds."""

    window_s: float = 3.0
    _points: deque[tuple[float, float, float]] = field(default_factory=deque)

    def add(self, now: float, received: float, results: float) -> tuple[float, float]:
        self._points.append((now, received, results))
        while len(self._points) > 2 and now - self._points[1][0] >= self.window_s:
            self._points.popleft()
        t0, r0, o0 = self._points[0]
        span = now - t0
        if span <= 0:
            return 0.0, 0.0
        return (received - r0) / span, (results - o0) / span

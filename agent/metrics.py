"""Prometheus metrics, /healthz and /readyz on 127.0.0.1.

The hot path only bumps plain integers and fixed-bucket histograms owned by the stages; prometheus-client
reads them at scrape time through a custom collector, so metrics cost nothing per message beyond a dict
increment.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.errors import ConfigError
from agent.telemetry import get_logger

log = get_logger(__name__)

# Task durations on a gateway range from tens of microseconds (sensor.stats) to seconds (noise.spectrum, cloud).
DURATION_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(slots=True)
class Histogram:
    """Cumulative-on-export histogram; ``observe`` is a bisect and two additions."""

    bounds: tuple[float, ...] = DURATION_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        running = 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


@dataclass(slots=True)
class Gauge:
    name: str
    documentation: str
    read: Callable[[], float]


@dataclass(slots=True)
class LabelledCounter:
    """A counter family read from a dict keyed by label values (one label or a tuple of them)."""

    name: str
    documentation: str
    labels: tuple[str, ...]
    read: Callable[[], Mapping[Any, int]]


@dataclass(slots=True)
class LabelledHistogram:
    name: str
    documentation: str
    labels: tuple[str, ...]
    read: Callable[[], Mapping[Any, Histogram]]


class AgentCollector(Collector):
    """Exposes whatever the daemon registered, read at scrape time."""

    def __init__(self) -> None:
        self.gauges: list[Gauge] = []
        self.counters: list[LabelledCounter] = []
        self.histograms: list[LabelledHistogram] = []
        self.gauge_maps: list[tuple[str, str, tuple[str, ...], Callable[[], Mapping[Any, float]]]] = []

    def collect(self) -> Iterable[Metric]:
        for gauge in self.gauges:
            yield GaugeMetricFamily(gauge.name, gauge.documentation, value=gauge.read())
        for name, documentation, labels, read in self.gauge_maps:
            family = GaugeMetricFamily(name, documentation, labels=list(labels))
            for key, value in sorted(read().items(), key=lambda kv: str(kv[0])):
                family.add_metric(_label_values(key), value)
            yield family
        for counter in self.counters:
            cfamily = CounterMetricFamily(counter.name, counter.documentation, labels=list(counter.labels))
            for key, value in sorted(counter.read().items(), key=lambda kv: str(kv[0])):
                cfamily.add_metric(_label_values(key), value)
            yield cfamily
        for histogram in self.histograms:
            hfamily = HistogramMetricFamily(histogram.name, histogram.documentation, labels=list(histogram.labels))
            for key, hist in sorted(histogram.read().items(), key=lambda kv: str(kv[0])):
                hfamily.add_metric(_label_values(key), hist.buckets(), hist.total)
            yield hfamily


def _label_values(key: Any) -> list[str]:
    return [str(part) for part in key] if isinstance(key, tuple) else [str(key)]


class MetricsServer:
    """A small threaded HTTP server: /metrics, /healthz (the agent's loops are alive), /readyz (it can work)."""

    def __init__(self, port: int, collector: AgentCollector, *, healthy: Callable[[], tuple[bool, str]],
                 ready: Callable[[], tuple[bool, str]], host: str = "127.0.0.1") -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        registry = self.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._answer(200, generate_latest(registry), "text/plain; version=0.0.4; charset=utf-8")
                elif path in ("/healthz", "/readyz"):
                    ok, detail = (healthy if path == "/healthz" else ready)()
                    self._answer(200 if ok else 503, (detail + "\n").encode(), "text/plain; charset=utf-8")
                else:
                    self._answer(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain")

            def _answer(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return  # scrapes every few seconds would flood the journal

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise ConfigError("EDGE_AGENT_METRICS__PORT", f"cannot listen on {host}:{port}: {exc.strerror}") from exc
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("metrics_listening", url=f"http://127.0.0.1:{self.port}/metrics")

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


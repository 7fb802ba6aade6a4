"""Prometheus metrics, /healthz and /readyz, and the JSON endpoints of ``edge-agent status`` and ``explain --live``.

The hot path only bumps plain integers and fixed-bucket histograms owned by the stages; prometheus-client
reads them at scrape time through a custom collector, so metrics cost nothing per message beyond a dict
increment.

The server listens on ``EDGE_AGENT_METRICS__HOST`` (127.0.0.1 by default). /metrics, /healthz and /readyz
answer anyone who can reach it; the JSON endpoints (/status, /explain) answer only clients on this machine,
since they name the broker, the cloud, the routes and recent errors (docs/operations.md#scraping-a-fleet).
"""

from __future__ import annotations

import bisect
import errno
import ipaddress
import json
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from agent.errors import ConfigError
from agent.telemetry import get_logger

if TYPE_CHECKING:
    # prometheus-client is imported by the server and at scrape time: an agent with metrics off never loads it.
    from prometheus_client.core import Metric

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


class AgentCollector:
    """Exposes whatever the daemon registered, read at scrape time (a prometheus-client collector)."""

    def __init__(self) -> None:
        self.gauges: list[Gauge] = []
        self.counters: list[LabelledCounter] = []
        self.histograms: list[LabelledHistogram] = []
        self.gauge_maps: list[tuple[str, str, tuple[str, ...], Callable[[], Mapping[Any, float]]]] = []

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

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


# A JSON endpoint: the query's parameters → HTTP status and a value JSON can hold.
JsonEndpoint = Callable[[Mapping[str, str]], tuple[int, Any]]


def is_local_client(peer: str, local: str) -> bool:
    """True for a client on this machine: a loopback address, or the address it reached us on (a process here
    that connects to this machine's own interface address has that address as its source)."""
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback or peer == local


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], *, freebind: bool) -> None:
        self.address_family = socket.AF_INET6 if ipaddress.ip_address(address[0]).version == 6 else socket.AF_INET
        self._freebind = freebind
        super().__init__(address, handler)

    def server_bind(self) -> None:
        if self._freebind:
            # The address is not (yet) on any interface, e.g. a management VLAN still coming up at boot: listen
            # anyway, so the agent need not be restarted once it appears.
            self.socket.setsockopt(socket.SOL_IP, getattr(socket, "IP_FREEBIND", 15), 1)
        super().server_bind()


def _bind(host: str, port: int, handler: type[BaseHTTPRequestHandler]) -> tuple[_Server, bool]:
    """The listening server, and whether the address had to be bound before it exists on this machine."""
    try:
        return _Server((host, port), handler, freebind=False), False
    except OSError as exc:
        if exc.errno != errno.EADDRNOTAVAIL or ipaddress.ip_address(host).is_loopback:
            raise
    return _Server((host, port), handler, freebind=True), True


class MetricsServer:
    """A small threaded HTTP server: /metrics, /healthz (the agent's loops are alive), /readyz (it can work),
    and JSON endpoints for clients on this machine only."""

    def __init__(self, port: int, collector: AgentCollector, *, healthy: Callable[[], tuple[bool, str]],
                 ready: Callable[[], tuple[bool, str]], host: str = "127.0.0.1",
                 endpoints: Mapping[str, JsonEndpoint] | None = None) -> None:
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.registry import Collector

        class Scraped(Collector):
            def collect(self) -> Iterable[Metric]:
                return collector.collect()

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(Scraped())
        registry = self.registry
        json_endpoints = dict(endpoints or {})
        known = ", ".join(["/metrics", "/healthz", "/readyz", *json_endpoints])

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path, _, query = self.path.partition("?")
                if path == "/metrics":
                    self._answer(200, generate_latest(registry), "text/plain; version=0.0.4; charset=utf-8")
                elif path in ("/healthz", "/readyz"):
                    ok, detail = (healthy if path == "/healthz" else ready)()
                    self._answer(200 if ok else 503, (detail + "\n").encode(), "text/plain; charset=utf-8")
                elif path in json_endpoints:
                    if not is_local_client(self.client_address[0], self.connection.getsockname()[0]):
                        self._json(403, {"error": f"{path} answers clients on the gateway only "
                                                  "(it names the broker, the cloud and the routes)"})
                        return
                    try:
                        status, body = json_endpoints[path](dict(parse_qsl(query)))
                    except Exception as exc:  # an answer beats a dropped connection
                        log.exception("status_endpoint_failed", path=path)
                        status, body = 500, {"error": f"{type(exc).__name__}: {exc}"}
                    self._json(status, body)
                else:
                    self._answer(404, f"not found: try {known}\n".encode(), "text/plain")

            def _json(self, status: int, body: Any) -> None:
                self._answer(status, json.dumps(body).encode(), "application/json")

            def _answer(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return  # scrapes every few seconds would flood the journal

        try:
            self._server, not_here = _bind(host, port, Handler)
        except OSError as exc:
            # A port in use or reserved is the port's fault; anything else (no IPv6 here) the address's.
            variable = "PORT" if exc.errno in (errno.EADDRINUSE, errno.EACCES) else "HOST"
            raise ConfigError(f"EDGE_AGENT_METRICS__{variable}", f"cannot listen on {_url_host(host)}:{port}: "
                              f"{exc.strerror}") from exc
        self.host = host
        self.port = int(self._server.server_address[1])
        self._not_here = not_here
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.port}"

    def start(self) -> None:
        self._thread.start()
        log.info("metrics_listening", url=f"{self.url}/metrics")
        if self._not_here:
            log.warning("metrics_address_not_here", host=self.host,
                        detail="no interface has this address yet: /metrics answers once one has it "
                        "(check EDGE_AGENT_METRICS__HOST if it never does)")

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host

"""Prometheus metrics, /healthz and /readyz, and the JSON endpoints of ``edge-agent status`` and ``explain --live``.

The hot path only bumps plain integers and fixed-bucket histograms owned by the stages; prometheus-client
reads them at scrape time through a custom collector, so metrics cost nothing per message beyond a dict
increment.

The server (``agent.metrics_server``, imported only with the port open) listens on
``EDGE_AGENT_METRICS__HOST`` (127.0.0.1 by default). /metrics, /healthz and /readyz
answer anyone who can reach it; the JSON endpoints (/status, /explain) answer only clients on this machine,
since they name the broker, the cloud, the routes and recent errors (docs/operations.md#scraping-a-fleet).
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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

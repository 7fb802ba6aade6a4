"""Replay workloads: task arrivals with sizes and true service times, and the world they run in.

The default mix (``DEFAULT_WORKLOAD``, also in docs/decision.md):

- ``sensor.stats``: Poisson arrivals at 8/s (a district's traffic, parking and weather rows), inputs uniform in
  120–400 bytes (CityPulse rows as JSON), 1 ms + 20 ns/byte on the gateway, 2× faster in the cloud, 350-byte
  results.
- ``noise.spectrum``: Poisson arrivals at 1.8/s (about a hundred monitors sending a clip a minute), 16 kHz 16-bit
  clips of 1–10 s, i.e. inputs uniform in 32,000–320,000 bytes; 20 ms + 4 µs/byte on the gateway (0.66 s for a
  5 s clip: an FFT plus band filtering on a low-power ARM core), 4× faster on a cloud vCPU, 270-byte results.
- Every true service time is the line above times a log-normal factor (σ = 0.15): executions vary.
- Gateway: 2 pool workers with one FIFO queue for the heavy kind; the light kind runs inline on the event
  loop (as the dispatcher does). With everything local the pool is ~66 % busy, so queueing matters and
  offloading in good moments pays.
- Cloud: a lease of 4 slots, provisioned in 2.5 s (log-normal σ = 0.3) on the first offload, released after
  60 s without cloud tasks; RTT 60 ms (log-normal σ = 0.2) per request.
- 600 s of arrivals (~5,900 tasks).

A ``--workload FILE`` is JSON with the same fields (see :func:`load_workload`); omitted fields keep the defaults.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class Stream:
    """One kind of task: Poisson arrivals, uniform input sizes, a linear true service time on the gateway."""

    kind: str
    rate_per_s: float
    min_bytes: int
    max_bytes: int
    local_fixed_s: float
    local_per_byte_s: float
    cloud_speedup: float
    out_bytes: int
    # Light kinds run inline on the daemon's event loop, one at a time; heavy ones in the worker pool.
    heavy: bool = True
    # Bursts on top of the Poisson arrivals: ``burst_size`` tasks arriving at the same instant every
    # ``burst_interval_s`` (the first one interval in), as when a fleet of devices reconnects and flushes.
    burst_size: int = 0
    burst_interval_s: float = 0.0
    # The agent's prior for this kind, as a factor of the true mean lines (0.1: it believes the kind 10x
    # faster than it is; 10: 10x slower). None: the settings' prior (the built-in one, or "*").
    prior_factor: float | None = None

    def check(self) -> None:
        if not self.kind:
            raise ValueError("a stream needs a kind")
        if self.rate_per_s < 0 or self.cloud_speedup <= 0:
            raise ValueError(f"{self.kind}: rate_per_s must be >= 0 and cloud_speedup > 0")
        if not 0 <= self.min_bytes <= self.max_bytes:
            raise ValueError(f"{self.kind}: need 0 <= min_bytes <= max_bytes")
        if self.local_fixed_s < 0 or self.local_per_byte_s < 0 or self.out_bytes < 0:
            raise ValueError(f"{self.kind}: service times and out_bytes must be >= 0")
        if self.burst_size < 0 or (self.burst_size and self.burst_interval_s <= 0):
            raise ValueError(f"{self.kind}: burst_size must be >= 0, with burst_interval_s > 0")
        if self.prior_factor is not None and self.prior_factor <= 0:
            raise ValueError(f"{self.kind}: prior_factor must be > 0")


@dataclass(frozen=True, slots=True)
class Workload:
    duration_s: float = 600.0
    streams: tuple[Stream, ...] = ()
    workers: int = 2
    cloud_slots: int = 4
    provisioning_s: float = 2.5
    provisioning_sigma: float = 0.3
    rtt_s: float = 0.06
    rtt_sigma: float = 0.2
    service_sigma: float = 0.15
    lease_idle_s: float = 60.0
    # Baselines' fixed parameters. The size threshold offloads inputs of 4 s of audio and more; the network
    # threshold is EdgeCloudSim's "offload when the uplink exceeds 6 Mbit/s", measured over the last second.
    size_threshold_bytes: int = 128_000
    network_threshold_mbps: float = 6.0
    network_window_s: float = 1.0
    # The gateway slows down mid-run (thermal throttling, a neighbour process): tasks that arrive from
    # ``slowdown_at_s`` on take ``slowdown_factor`` times as long on the gateway. None: it never does.
    slowdown_at_s: float | None = None
    slowdown_factor: float = 1.0

    def check(self) -> None:
        if self.duration_s <= 0 or not self.streams:
            raise ValueError("a workload needs duration_s > 0 and at least one stream")
        if self.workers < 1 or self.cloud_slots < 1:
            raise ValueError("workers and cloud_slots must be at least 1")
        if min(self.provisioning_s, self.rtt_s, self.lease_idle_s, self.network_window_s) < 0:
            raise ValueError("times must be >= 0")
        if self.slowdown_factor <= 0:
            raise ValueError("slowdown_factor must be > 0")
        for stream in self.streams:
            stream.check()


DEFAULT_WORKLOAD = Workload(
    streams=(
        Stream("sensor.stats", rate_per_s=8.0, min_bytes=120, max_bytes=400, local_fixed_s=0.001,
               local_per_byte_s=2e-8, cloud_speedup=2.0, out_bytes=350, heavy=False),
        Stream("noise.spectrum", rate_per_s=1.8, min_bytes=32_000, max_bytes=320_000, local_fixed_s=0.02,
               local_per_byte_s=4e-6, cloud_speedup=4.0, out_bytes=270),
    ),
)


def load_workload(path: Path) -> Workload:
    """A workload from JSON: top-level fields of :class:`Workload`, ``streams`` a list of :class:`Stream`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read: {exc.strerror}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return workload_from_dict(data)


def workload_from_dict(data: Mapping[str, Any]) -> Workload:
    known = {f.name for f in fields(Workload)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown workload fields: {', '.join(sorted(unknown))}")
    values = dict(data)
    if "streams" in values:
        stream_fields = {f.name for f in fields(Stream)}
        streams = []
        for item in values["streams"]:
            if not isinstance(item, dict) or set(item) - stream_fields or "kind" not in item:
                raise ValueError(f"each stream is an object with 'kind' and fields among {sorted(stream_fields)}")
            default = next((s for s in DEFAULT_WORKLOAD.streams if s.kind == item["kind"]), None)
            if default is None:
                missing = {f.name for f in fields(Stream) if f.default is MISSING} - set(item)
                if missing:
                    raise ValueError(f"stream {item['kind']!r} needs {', '.join(sorted(missing))}")
                streams.append(Stream(**item))
            else:
                streams.append(replace(default, **item))
        values["streams"] = tuple(streams)
    try:
        workload = replace(DEFAULT_WORKLOAD, **values)
    except TypeError as exc:
        raise ValueError(f"bad workload: {exc}") from None
    workload.check()
    return workload


@dataclass(frozen=True, slots=True)
class Arrivals:
    """The tasks of one replay, in arrival order, with everything random drawn once (common to all policies)."""

    arrival_s: list[float]
    kind: list[str]
    in_bytes: list[int]
    local_s: list[float]
    cloud_s: list[float]
    out_bytes: list[int]
    rtt_s: list[float]
    provisioning_s: list[float]  # used when this task's offload starts a lease
    kinds: dict[str, Stream] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.arrival_s)


def generate(workload: Workload, seed: int) -> Arrivals:
    rng = np.random.default_rng(seed)
    times: list[np.ndarray[Any, Any]] = []
    index: list[np.ndarray[Any, Any]] = []
    for i, stream in enumerate(workload.streams):
        n = int(rng.poisson(stream.rate_per_s * workload.duration_s))
        times.append(np.sort(rng.uniform(0.0, workload.duration_s, n)))
        index.append(np.full(n, i))
    for i, stream in enumerate(workload.streams):  # after the Poisson draws: a workload without bursts is unchanged
        if stream.burst_size:
            at = np.arange(stream.burst_interval_s, workload.duration_s, stream.burst_interval_s)
            times.append(np.repeat(at, stream.burst_size))
            index.append(np.full(at.size * stream.burst_size, i))
    t_all = np.concatenate(times)
    s_all = np.concatenate(index)
    order = np.argsort(t_all, kind="stable")
    t_all, s_all = t_all[order], s_all[order]
    n = t_all.size
    streams = workload.streams
    lo = np.array([streams[i].min_bytes for i in s_all], dtype=np.int64)
    hi = np.array([streams[i].max_bytes for i in s_all], dtype=np.int64)
    sizes = rng.integers(lo, hi + 1)
    fixed = np.array([streams[i].local_fixed_s for i in s_all])
    per_byte = np.array([streams[i].local_per_byte_s for i in s_all])
    speedup = np.array([streams[i].cloud_speedup for i in s_all])
    base = fixed + per_byte * sizes
    local = base * rng.lognormal(0.0, workload.service_sigma, n)
    if workload.slowdown_at_s is not None:
        local = np.where(t_all >= workload.slowdown_at_s, local * workload.slowdown_factor, local)
    cloud = base / speedup * rng.lognormal(0.0, workload.service_sigma, n)
    rtt = workload.rtt_s * rng.lognormal(0.0, workload.rtt_sigma, n)
    provisioning = workload.provisioning_s * rng.lognormal(0.0, workload.provisioning_sigma, n)
    return Arrivals(
        arrival_s=t_all.tolist(),
        kind=[streams[i].kind for i in s_all],
        in_bytes=[int(x) for x in sizes],
        local_s=local.tolist(),
        cloud_s=cloud.tolist(),
        out_bytes=[streams[i].out_bytes for i in s_all],
        rtt_s=rtt.tolist(),
        provisioning_s=provisioning.tolist(),
        kinds={s.kind: s for s in streams},
    )

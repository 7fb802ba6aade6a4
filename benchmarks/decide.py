"""Latency of ``Policy.decide()`` (target: median ≤ 20 µs), beside a trivial call measured the same way.

A realistic state: estimates learned from a few hundred observations, tasks queued on both sides, a warm
lease. Each call is timed on its own with ``perf_counter_ns`` so the median and p99 are per call; the
baseline (a method call building a small frozen dataclass) shows the floor of the measurement itself.

    .venv/bin/python benchmarks/decide.py [--calls N] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.config import DecisionSettings
from agent.decision import Policy, Task


@dataclass(frozen=True, slots=True)
class _Value:
    a: float
    b: float


class _Trivial:
    def call(self, task: Task, now: float) -> _Value:
        return _Value(now, float(task.in_bytes))


def _warm_policy() -> Policy:
    policy = Policy(DecisionSettings(), local_workers=2, inline_kinds={"sensor.stats"})
    now = 0.0
    for i in range(300):
        now += 0.1
        size = 32_000 + (i * 7919) % 288_000
        policy.observe_local("noise.spectrum", size, 0.02 + 4e-6 * size, now)
        policy.observe_cloud("noise.spectrum", size, (0.02 + 4e-6 * size) / 4, now)
        policy.observe_local("sensor.stats", 250, 0.001, now)
        policy.observe_transfer("up", size, size / 250_000, now)
        policy.observe_transfer("down", 270, 0.002, now)
        policy.observe_rtt(0.06, now)
        policy.observe_output("noise.spectrum", 270, now)
    policy.observe_lease(True)
    for _ in range(3):
        policy.task_started("local", Task("noise.spectrum", 160_000), now)
        policy.task_started("cloud", Task("noise.spectrum", 100_000), now)
    return policy


def _time(call: Callable[[Task, float], object], tasks: list[Task], start: float) -> list[int]:
    samples = []
    now = start
    for task in tasks:
        now += 1e-4
        t0 = time.perf_counter_ns()
        call(task, now)
        samples.append(time.perf_counter_ns() - t0)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    policy = _warm_policy()
    tasks = [Task("noise.spectrum", 32_000 + (i * 104_729) % 288_000) if i % 5 == 0 else Task("sensor.stats", 250)
             for i in range(args.calls)]
    trivial = _Trivial()
    _time(policy.decide, tasks[:5000], 100.0)  # warm up caches and the interpreter's specialisation
    _time(trivial.call, tasks[:5000], 100.0)
    decide_ns = _time(policy.decide, tasks, 100.0)
    baseline_ns = _time(trivial.call, tasks, 100.0)

    def summary(ns: list[int]) -> dict[str, float]:
        ordered = sorted(ns)
        return {"median_us": statistics.median(ordered) / 1000, "p99_us": ordered[int(len(ordered) * 0.99)] / 1000}

    d, b = summary(decide_ns), summary(baseline_ns)
    if args.json:
        print(json.dumps({"calls": args.calls, "decide": d, "trivial_call": b}))
    else:
        print(f"decide():      median {d['median_us']:.2f} µs   p99 {d['p99_us']:.2f} µs   ({args.calls} calls)")
        print(f"trivial call:  median {b['median_us']:.2f} µs   p99 {b['p99_us']:.2f} µs")
        print(f"target: median ≤ 20 µs → {'met' if d['median_us'] <= 20 else 'NOT met'}")


if __name__ == "__main__":
    main()

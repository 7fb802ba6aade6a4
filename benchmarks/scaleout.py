"""Scale-out: how the throughput of a fleet sharing one subscription grows with the number of agents.

    python benchmarks/scaleout.py [--messages N] [--agents 1,2,3,4] [--rounds R] [--env EDGE_AGENT_X=V] [--json]

For each agent count k, on a fresh real Mosquitto (started here on a free port, ``max_inflight_messages 1000``
as in ``throughput.py``):

1. a consumer's (``mosquitto_sub``) persistent session subscribes to ``edge/+/results/#``; k agents (real
   processes, default settings: fsync per group commit, ``sensor.stats`` inline) start with
   ``EDGE_AGENT_MQTT__SHARED_GROUP=bench``,
   each with its own store and client id, connect and subscribe ``$share/bench/city/+/traffic/+/data``;
2. once they are up, every agent is paused (SIGSTOP to its process group) and N QoS 1 messages (200-byte
   CityPulse-like JSON, unique ``seq``) are published and acknowledged by the broker;
3. all k agents resume at once (SIGCONT) and drain the backlog; msgs/s is N over the time from the resume to
   the N-th result seen by the consumer.

Why this is fair. A shared subscription only receives messages once it exists, so the members subscribe
before anything is published. Queueing the whole backlog first takes the devices out of the loop (a publisher
would compete for the CPUs and pace the run), and pausing the agents instead of stopping them keeps their
start-up (interpreter, imports, worker pool) out of the measured window, so every count starts draining at
the same instant with warm processes. Mosquitto 2.0 hands shared-subscription messages out round robin at
publish time, so each member holds N/k of them (about ``max_inflight_messages`` in its socket, the rest queued
in its session): the split is the broker's, the same for every k, and a run ends when the slowest member has
finished its share. Each count gets a fresh broker, so no session or queue carries over. (Stopping the agents
with SIGTERM while queueing, as ``throughput.py`` does, gives the same split but puts k start-ups inside the
window, which penalises the larger fleets on a small machine.)

The run also checks the fleet: every ``seq`` must come back exactly once (duplicates and missing ones are
reported, and fail the run). Each agent publishes under its own id (``edge/<agent_id>/results/…``), which
gives its share. CPU seconds spent during the drain by the agents (with their workers), the broker and the
consumer show where the machine's time went.

Broker, agents and the consumer share the machine's CPUs, so growth stops once they are saturated (on a
2-core machine, at 2 agents); ``--rounds`` repeats each count and reports the median. ``--env`` passes a
setting to every agent (e.g. ``EDGE_AGENT_STORE__SYNCHRONOUS=normal``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from throughput import Sub, payloads, peak_rss_mb, queue_messages, subscribe_once

from support import Agent, Mosquitto

GROUP = "bench"
ROUTES = [{"topic": "city/+/traffic/+/data", "task": "sensor.stats"}]
RESULTS = "edge/+/results/#"
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    agents: int
    msgs_per_s: float
    seconds: float
    share: dict[str, int]
    duplicates: int
    missing: int
    cpu_s: dict[str, float]
    peak_rss_mb: list[float] = field(default_factory=list)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes and the threads of each, now."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def children_cpu_s() -> float:
    """User + system CPU time of this process's children that have exited (the consumer)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def group_pids(leader: int) -> list[int]:
    """The agent and its worker processes (its process group)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == leader:
                    out.append(int(entry.name))
            except OSError:
                continue
    return out


def one_run(work: Path, count: int, bodies: list[bytes], env: dict[str, str], say: Callable[[str], None]) -> Run:
    broker = Mosquitto(work / "broker", extra_conf="max_inflight_messages 1000\n")
    broker.start()
    fleet = [Agent(work / f"agent{i}", broker.port, agent_id=f"bench{i}", routes=ROUTES,
                   extra_env={**env, "EDGE_AGENT_MQTT__SHARED_GROUP": GROUP}) for i in range(count)]
    try:
        subscribe_once(broker.port, "bench-results", RESULTS)
        for agent in fleet:
            agent.start(wait_connected=False)
        for agent in fleet:
            agent.wait_logged("mqtt_subscribed")  # the broker keeps the queued messages for it from then on
        time.sleep(2)  # let the worker pools finish starting, so that the agents are idle when paused
        leaders = [agent.proc.pid for agent in fleet if agent.proc is not None]
        for leader in leaders:
            os.killpg(leader, signal.SIGSTOP)
        say(f"  {count} agent(s): queueing {len(bodies):,} messages …")
        queue_messages(broker.port, bodies)
        # Counted by mosquitto_sub (C), as in throughput.py: a Python consumer took more than a CPU second a
        # run, a good part of what a second agent needs on two cores.
        sub = Sub(work, broker.port, "bench-results", RESULTS, len(bodies), payloads=True, topics=True)
        time.sleep(0.5)  # connected and subscribed before the results come
        agent_pids = [pid for leader in leaders for pid in group_pids(leader)]
        assert broker.proc is not None
        before = (cpu_seconds(agent_pids), cpu_seconds([broker.proc.pid]), children_cpu_s())
        resumed = time.time()
        for leader in leaders:
            os.killpg(leader, signal.SIGCONT)
        kept = sub.wait(900)  # mosquitto_sub exits at the N-th result; its CPU time then counts as a child's
        seconds = kept[-1][0] - resumed
        cpu = {
            "agents": cpu_seconds(agent_pids) - before[0],
            "broker": cpu_seconds([broker.proc.pid]) - before[1],
            "consumer": children_cpu_s() - before[2],
        }
        rss = [peak_rss_mb(leader) for leader in leaders]
        seqs = Counter(int(json.loads(body)["result"]["fields"]["seq"]["value"]) for _, body in kept)
        by_agent = Counter(topic.split("/", 2)[1] for topic in sub.topics)
        for agent in fleet:
            agent.terminate()
    finally:
        for agent in fleet:
            agent.cleanup()
        broker.stop()
    return Run(
        agents=count,
        msgs_per_s=len(bodies) / seconds,
        seconds=seconds,
        share=dict(sorted(by_agent.items())),
        duplicates=sum(n - 1 for n in seqs.values()),
        missing=len(bodies) - len(seqs),
        cpu_s={role: round(value, 1) for role, value in cpu.items()},
        peak_rss_mb=rss,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--agents", default="1,2,3,4", help="comma-separated agent counts (default 1,2,3,4)")
    parser.add_argument("--rounds", type=int, default=1, help="runs per count; the median is reported")
    parser.add_argument("--env", action="append", default=[], metavar="EDGE_AGENT_…=VALUE",
                        help="a setting for every agent, e.g. EDGE_AGENT_STORE__SYNCHRONOUS=normal (repeatable)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    counts = [int(c) for c in args.agents.split(",") if c.strip()]
    if not counts or min(counts) < 1 or args.rounds < 1 or args.messages < 1:
        parser.error("agent counts, --rounds and --messages must be positive")
    env = dict(item.split("=", 1) for item in args.env if "=" in item)
    if len(env) != len(args.env) or not all(key.startswith("EDGE_AGENT_") for key in env):
        parser.error("--env takes EDGE_AGENT_NAME=VALUE")

    def say(line: str) -> None:
        if not args.json:
            print(line, file=sys.stderr, flush=True)

    work = Path(tempfile.mkdtemp(prefix="edge-agent-scaleout-"))
    bodies = payloads(args.messages)
    runs: dict[int, list[Run]] = {}
    try:
        for round_no in range(args.rounds):
            for count in counts:
                run = one_run(work / f"r{round_no}-k{count}", count, bodies, env, say)
                runs.setdefault(count, []).append(run)
                say(f"  {count} agent(s): {run.msgs_per_s:,.0f} msgs/s in {run.seconds:.1f} s; "
                    f"CPU s {run.cpu_s}; shares {run.share}; duplicates {run.duplicates}, missing {run.missing}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base = statistics.median(r.msgs_per_s for r in runs[1]) if 1 in runs else None
    figures: dict[str, Any] = {"messages": args.messages, "rounds": args.rounds, "env": env,
                               "cpus": len(os.sched_getaffinity(0)), "agents": {}}
    ok = True
    for count, of_count in runs.items():
        median = statistics.median(r.msgs_per_s for r in of_count)
        ok = ok and all(r.duplicates == 0 and r.missing == 0 for r in of_count)
        figures["agents"][str(count)] = {
            "msgs_per_s": round(median, 1),
            "speedup": round(median / base, 2) if base else None,
            "runs_msgs_per_s": [round(r.msgs_per_s, 1) for r in of_count],
            "cpu_s": {role: round(statistics.median(r.cpu_s[role] for r in of_count), 1)
                      for role in of_count[0].cpu_s},
            "share": of_count[-1].share,
            "duplicates": sum(r.duplicates for r in of_count),
            "missing": sum(r.missing for r in of_count),
            "agent_peak_rss_mb": round(max(max(r.peak_rss_mb, default=0.0) for r in of_count), 1),
        }
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"{'agents':>6} {'msgs/s':>10} {'speedup':>8}  {'CPU s (agents/broker/consumer)':<32} runs")
        for count, row in figures["agents"].items():
            speedup = f"{row['speedup']:.2f}" if row["speedup"] is not None else "-"
            cpu = "/".join(f"{v:.1f}" for v in row["cpu_s"].values())
            print(f"{count:>6} {row['msgs_per_s']:>10,.0f} {speedup:>8}  {cpu:<32} {row['runs_msgs_per_s']}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""A burst of a user task the agent has no prior for, with a real Mosquitto, the devcloud and the agent as
processes: the makespan under ``placement`` auto, cloud and local (tests/test_burst.py, benchmarks/burst.py).

The task (``burst.sleep``, an entry-point plugin installed for the run in a folder on ``PYTHONPATH``) sleeps
``service_s`` a call, on the gateway and in the devcloud alike, so the figures depend on the pools, the
network and the decisions, not on how busy the machine's CPUs are. The agent has one worker
(``EDGE_AGENT_LOCAL__WORKERS=1``) and its default priors, so the task is priced with the ``*`` prior (about
0.03 s for these inputs); the devcloud has its default pool (one worker per CPU). All ``count`` messages are
published at once once the agent is subscribed; the makespan runs from the first publish to the last result.
"""

from __future__ import annotations

import json
import os
import textwrap
import time
from pathlib import Path
from typing import Any

from support import Agent, Collector, DevCloud, Mosquitto, publisher, wait_for

TASK = "burst.sleep"
INPUT_BYTES = 20_000  # the "*" prior: 0.01 s + 1 µs/byte, 0.03 s


def install_task(folder: Path, service_s: float) -> Path:
    """A distribution with the entry point ``burst.sleep`` in ``folder``; put ``folder`` on PYTHONPATH."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "edge_agent_burst_tasks.py").write_text(textwrap.dedent(f"""
        import time

        def sleep(payload, options):
            time.sleep({service_s!r})
            return {{"size": len(payload)}}
    """))
    info = folder / "edge_agent_burst-1.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: edge-agent-burst\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[edge_agent.tasks]\n{TASK} = edge_agent_burst_tasks:sleep\n")
    return folder


def run_burst(workdir: Path, placement: str, *, count: int = 120, service_s: float = 0.25,
              timeout_s: float = 180.0) -> dict[str, Any]:
    """One burst on a fresh broker, devcloud and agent: the makespan in seconds and where the tasks ran."""
    workdir.mkdir(parents=True, exist_ok=True)
    plugins = install_task(workdir / "plugins", service_s)
    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(plugins) + (os.pathsep + old_path if old_path else "")
    broker = Mosquitto(workdir / "broker")
    broker.start()
    devcloud: DevCloud | None = None
    agent: Agent | None = None
    collector: Collector | None = None
    try:
        devcloud = DevCloud(workdir / "devcloud.log", workers=os.cpu_count() or 1)  # its default pool
        route = {"topic": "burst/+/in", "task": TASK, "placement": placement}
        agent = Agent(workdir / "agent", broker.port, routes=[route], pythonpath=plugins,
                      extra_env={**devcloud.agent_env(), "EDGE_AGENT_LOCAL__WORKERS": "1"})
        results = f"edge/{agent.agent_id}/results/"
        collector = Collector(broker.port, f"{results}#")
        agent.start()
        device = publisher(broker.port)
        body = os.urandom(INPUT_BYTES)
        started = time.monotonic()
        infos = [device.publish(f"burst/d{i}/in", body, qos=1) for i in range(count)]
        for info in infos:
            info.wait_for_publish(30)
        last = [started]

        def done() -> bool:
            n = len(collector.json_under(results)) if collector is not None else 0
            if n >= count:
                last[0] = time.monotonic()
            return n >= count

        wait_for(done, timeout_s, f"{count} results", interval=0.02)
        device.loop_stop()
        device.disconnect()
        out = collector.json_under(results)
        where = [m["placement"] for m in out]
        return {
            "placement": placement,
            "makespan_s": last[0] - started,
            "local": where.count("local"),
            "cloud": where.count("cloud"),
            "rebound": sum(1 for m in out if m["decision"].get("rebound")),
            "hedged": sum(1 for m in out if m["decision"].get("hedged")),
            "task_ids": len({m["task_id"] for m in out}),
            "results": len(out),
        }
    finally:
        if collector is not None:
            collector.close()
        if agent is not None:
            agent.cleanup()
        if devcloud is not None:
            devcloud.stop()
        broker.stop()
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path


def ideal_split_s(local_s: float, cloud_s: float) -> float:
    """The makespan of a split that keeps both sides busy to the end: their throughputs added."""
    return local_s * cloud_s / (local_s + cloud_s)


def run_move_back(workdir: Path, *, count: int = 12, service_s: float = 0.05, provisioning_s: float = 4.0,
                  timeout_s: float = 60.0) -> dict[str, Any]:
    """Cloud tasks waiting for their lease come back to the gateway once it has proved faster than its prior.

    The agent's prior says the task takes 1 s on the gateway (it takes ``service_s``) and expects a lease to
    take ``provisioning_s``, which is what the devcloud takes: of ``count`` tasks published at once, the first
    few stay on the gateway and the rest are sent to the cloud, where they wait for the lease. The first runs
    on the gateway teach the agent that it is fast, and the tasks still waiting for the lease come back.
    Returns where each result ran, how many moved back, and what the devcloud executed."""
    workdir.mkdir(parents=True, exist_ok=True)
    plugins = install_task(workdir / "plugins", service_s)
    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(plugins) + (os.pathsep + old_path if old_path else "")
    broker = Mosquitto(workdir / "broker")
    broker.start()
    devcloud: DevCloud | None = None
    agent: Agent | None = None
    collector: Collector | None = None
    try:
        devcloud = DevCloud(workdir / "devcloud.log", provisioning_s=provisioning_s)
        prior = {"local_fixed_s": 1.0, "local_per_byte_s": 0.0, "cloud_fixed_s": 0.05, "cloud_per_byte_s": 0.0,
                 "out_bytes": 20}
        agent = Agent(workdir / "agent", broker.port, routes=[{"topic": "burst/+/in", "task": TASK}],
                      pythonpath=plugins,
                      extra_env={**devcloud.agent_env(), "EDGE_AGENT_LOCAL__WORKERS": "1",
                                 "EDGE_AGENT_DECISION__PROVISIONING_S": str(provisioning_s),
                                 "EDGE_AGENT_DECISION__PROBE_INTERVAL_S": "0",
                                 f"EDGE_AGENT_DECISION__KINDS__{TASK}": json.dumps(prior)})
        results = f"edge/{agent.agent_id}/results/"
        collector = Collector(broker.port, f"{results}#")
        agent.start()
        device = publisher(broker.port)
        body = os.urandom(INPUT_BYTES)
        infos = [device.publish(f"burst/d{i}/in", body, qos=1) for i in range(count)]
        for info in infos:
            info.wait_for_publish(30)
        wait_for(lambda: collector is not None and len(collector.json_under(results)) >= count, timeout_s,
                 f"{count} results", interval=0.02)
        time.sleep(0.5)  # time for a second result of a row, which must not come
        device.loop_stop()
        device.disconnect()
        out = collector.json_under(results)
        return {
            "local": sum(1 for m in out if m["placement"] == "local"),
            "cloud": sum(1 for m in out if m["placement"] == "cloud"),
            "moved_back": sum(1 for m in out if m["placement"] == "local" and m["decision"].get("rebound")),
            "hedged": sum(1 for m in out if m["decision"].get("hedged")),
            "task_ids": len({m["task_id"] for m in out}),
            "results": len(out),
            "cloud_executions": devcloud.stats()["executions_total"],
        }
    finally:
        if collector is not None:
            collector.close()
        if agent is not None:
            agent.cleanup()
        if devcloud is not None:
            devcloud.stop()
        broker.stop()
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path

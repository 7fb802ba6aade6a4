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

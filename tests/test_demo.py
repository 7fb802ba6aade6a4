"""`edge-agent demo` as a user runs it: a real process tree, plain output (stdout is a pipe), clean stops."""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("amqtt", reason="the demo extra is not installed")
pytest.importorskip("rich", reason="the demo extra is not installed")

from agent.demo import devices, options, uplink, view, watch  # noqa: E402 - rich comes with the extra checked above

# What the view reads from a scrape of the agent's /metrics (names as the daemon registers them).
METRICS = """\
# TYPE edge_agent_messages_received_total counter
edge_agent_messages_received_total 13.0
# TYPE edge_agent_decisions_total counter
edge_agent_decisions_total{target="local",reason="model"} 10.0
edge_agent_decisions_total{target="cloud",reason="model"} 2.0
# TYPE edge_agent_estimate gauge
edge_agent_estimate{name="uplink_mbps"} 3.25
# TYPE edge_agent_cloud_requests_total counter
edge_agent_cloud_requests_total{outcome="ok"} 2.0
# TYPE edge_agent_queue_depth gauge
edge_agent_queue_depth 4.0
# TYPE edge_agent_mqtt_connected gauge
edge_agent_mqtt_connected 1.0
"""


def start_demo(*args: str) -> tuple[subprocess.Popen[str], psutil.Process]:
    proc = subprocess.Popen([sys.executable, "-m", "agent", "demo", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    return proc, psutil.Process(proc.pid)


def descendants(parent: psutil.Process) -> list[psutil.Process]:
    try:
        return parent.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def wait_for_children(parent: psutil.Process, timeout: float) -> list[psutil.Process]:
    """Every process the demo started (broker, devcloud, agent and their workers) once all have started."""
    seen: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in descendants(parent):
            seen.setdefault(child.pid, child)
        commands = [" ".join(p.cmdline()) for p in descendants(parent) if p.is_running()]
        if any("agent run" in c for c in commands) and any("agent.devcloud" in c for c in commands):
            break
        time.sleep(0.1)
    for child in descendants(parent):
        seen.setdefault(child.pid, child)
    return list(seen.values())


def survivors(processes: list[psutil.Process]) -> list[str]:
    alive = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{p.pid} {' '.join(p.cmdline())}")
        except psutil.NoSuchProcess:
            continue
    return alive


def results(summary: str, kind: str) -> int:
    match = re.search(rf"{re.escape(kind)} (\d+) \(", summary.split("results", 1)[1].splitlines()[0])
    assert match, summary
    return int(match.group(1))


@pytest.mark.slow  # the demo runs for its duration: 25 s
def test_the_demo_runs_for_its_duration_shows_results_and_leaves_nothing_behind() -> None:
    proc, parent = start_demo("--duration", "20")
    children = wait_for_children(parent, 30)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
    summary = out[out.index("edge-agent demo: summary"):]
    assert results(summary, "sensor.stats") > 0
    assert results(summary, "noise.spectrum") > 0
    decisions = re.search(r"decisions\s+(.*)", summary)
    assert decisions and re.search(r"(local|cloud)/\w+ [1-9]", decisions.group(1)), summary
    assert re.search(r"^\[\s*\d+ s\] in ", out, re.MULTILINE), "no plain progress line"
    assert "\x1b[" not in out, "terminal control codes in piped output"
    assert len(children) >= 3, [p.pid for p in children]  # broker, devcloud, agent (and its worker)
    assert not survivors(children)


@pytest.mark.slow
def test_sigint_in_the_middle_stops_everything_cleanly() -> None:
    proc, parent = start_demo()  # no duration: only the signal ends it
    children = wait_for_children(parent, 30)
    assert proc.stdout is not None
    for line in proc.stdout:  # the first progress line: devices and agent are running
        if line.startswith("["):
            break
    time.sleep(2)  # "in the middle": the stop meets devices publishing and tasks running, the point of the test
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=45)
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
    assert "edge-agent demo: summary" in out
    assert not survivors(children)


def test_the_demos_parts_read_the_sample_and_write_plain_lines() -> None:
    """The quick loop's stand-in for the runs above: the demo's options, the sample its devices replay, the
    figures it reads from the agent's /metrics, and the plain progress line and summary it prints."""
    args = options.build_parser(argparse.ArgumentParser()).parse_args(["--duration", "20", "--broker", "[::1]:1883"])
    assert args.duration == 20.0 and args.broker == ("::1", 1883)
    files = devices.sensor_files(args.data)
    assert {"traffic", "parking"} <= {f.kind for f in files}
    row = next(devices.rows(files[0]))
    assert row and not devices.IDENTIFIERS & set(row) and any(isinstance(v, int | float) for v in row.values())
    assert len(devices.clip(np.random.default_rng(1), 1.5)) == 2 * 24_000  # 16-bit samples at 16 kHz
    link = uplink.Uplink(uplink.load(args.uplink), "http://127.0.0.1:9", "token", speed=2.0)
    try:
        assert link.capacity_mbps(0.0) > 0  # the shipped LTE trace starts with some capacity
    finally:
        link.close()

    metrics = watch.Metrics.parse(METRICS)
    assert metrics.received == 13 and metrics.connected and metrics.queue_depth == 4
    assert metrics.decisions == {("local", "model"): 10, ("cloud", "model"): 2}
    results = watch.ResultSnapshot(
        count=Counter({("sensor.stats", "local"): 10, ("noise.spectrum", "cloud"): 2}),
        total_s={("sensor.stats", "local"): 0.01, ("noise.spectrum", "cloud"): 3.0}, probes=0,
        dead=Counter({"invalid_json": 1}), recent=[], recent_dead=[], unreadable=0)
    sent = {"sensor.stats": 11, "noise.spectrum": 2}
    frame = view.Frame(elapsed_s=12, duration_s=20, header="", metrics=metrics, results=results, in_rate=1.1,
                       out_rate=1.0, trace_mbps=2.5, trace_name="trace", sent=sent, sent_bytes=2_000_000)
    line = view.progress_line(frame)
    assert re.match(r"^\[\s*\d+ s\] in ", line), line  # what the run above looks for
    assert "results: cloud 2, local 10" in line and "agent estimates 3.25" in line and "dead letters 1" in line
    summary = view.summary(12.0, metrics, results, sent, 2_000_000)
    assert re.search(r"^  results +12:", summary, re.MULTILINE), summary  # what .ci/run looks for
    assert "noise.spectrum 2 (cloud 2)" in summary and "cloud/model 2" in summary
    assert "\x1b[" not in line + summary

"""`edge-agent demo` as a user runs it: a real process tree, plain output (stdout is a pipe), clean stops."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("amqtt", reason="the demo extra is not installed")
pytest.importorskip("rich", reason="the demo extra is not installed")


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


def test_sigint_in_the_middle_stops_everything_cleanly() -> None:
    proc, parent = start_demo()  # no duration: only the signal ends it
    children = wait_for_children(parent, 30)
    assert proc.stdout is not None
    for line in proc.stdout:  # the first progress line: devices and agent are running
        if line.startswith("["):
            break
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=45)
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
    assert "edge-agent demo: summary" in out
    assert not survivors(children)

"""What the daemon's process imports: each library an import costs resident memory for the agent's whole life.

Structural, not timed: a fresh interpreter imports the daemon's path and lists what it loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Never on the daemon's path: numpy runs in the worker processes only; the rest belong to the demo, the devcloud
# and `replay --plot` (structlog and httpx import rich when it is installed).
NEVER = ("numpy", "rich", "fastapi", "uvicorn", "starlette", "matplotlib", "amqtt")
# Loaded by the daemon only when used: httpx with a cloud URL, prometheus-client with the metrics port open.
ON_USE = ("httpx", "httpcore", "prometheus_client")


def modules(code: str) -> set[str]:
    """Every module a fresh interpreter holds after ``code``."""
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return set(json.loads(out.splitlines()[-1]))


def loaded(code: str) -> set[str]:
    """Top-level names of the modules (and agent's submodules) a fresh interpreter holds after ``code``."""
    names = modules(code)
    return {name.split(".")[0] for name in names} | {name for name in names if name.startswith("agent.")}


def test_the_daemon_imports_no_demo_devcloud_plot_or_numpy() -> None:
    modules = loaded("import agent.daemon")
    assert not modules & set(NEVER), sorted(modules & set(NEVER))


def test_the_daemon_imports_httpx_and_prometheus_client_only_when_used() -> None:
    modules = loaded("import agent.daemon")
    assert not modules & set(ON_USE), sorted(modules & set(ON_USE))


def test_edge_agent_run_imports_no_other_subcommand() -> None:
    # What `edge-agent run` loads before the daemon starts: its parser, not the other subcommands' modules.
    modules = loaded("import agent.cli, agent.daemon\nagent.cli._parser('run').parse_args(['run'])")
    others = {"agent.devcloud", "agent.demo", "agent.deadletter_admin", "agent.replay", "agent.data"}
    assert not modules & others, sorted(modules & others)
    assert not modules & {*NEVER, *ON_USE}, sorted(modules & {*NEVER, *ON_USE})


def test_the_full_parser_still_offers_every_subcommand() -> None:
    modules = loaded("import agent.cli\nagent.cli._parser().parse_args(['devcloud'])")
    assert {"agent.devcloud", "agent.demo", "agent.deadletter_admin"} <= modules


def test_the_metrics_http_server_is_imported_only_with_the_port_open() -> None:
    # http.server pulls in socketserver, html and mimetypes: about a megabyte an agent with metrics off never uses.
    names = modules("import agent.daemon")
    assert not names & {"http.server", "socketserver", "agent.metrics_server"}, sorted(names)

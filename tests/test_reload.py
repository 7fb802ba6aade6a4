"""What a reload reads (``config.Sources``) and how it reports (``agent.reload``), without processes.

systemd's ``EnvironmentFile=`` copies the env file into the environment at start; the environment wins over the
file, so before ``Sources`` a reload read the copies from the start and applied nothing that changed in the file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.config import ENV_PREFIX, Sources
from agent.errors import ConfigError
from agent.reload import OUTCOME_FILE, Outcome, ReloadError, describe, read_outcome, request, write_outcome

PARKING = [{"topic": "city/+/parking/+/data", "task": "sensor.stats"}]
TRAFFIC = [{"topic": "city/+/traffic/+/data", "task": "sensor.stats"}]


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX) or name in ("CREDENTIALS_DIRECTORY", "STATE_DIRECTORY"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("EDGE_AGENT_STATE_DIR", str(tmp_path / "state"))  # not in the file: the environment's
    return monkeypatch


def write(path: Path, **lines: str) -> Path:
    path.write_text("".join(f"{name}={value}\n" for name, value in lines.items()))
    return path


def as_environment_file(monkeypatch: pytest.MonkeyPatch, **lines: str) -> None:
    """What systemd's EnvironmentFile= does at start: every line of the file into the environment."""
    for name, value in lines.items():
        monkeypatch.setenv(name, value)


def test_a_reload_reads_the_env_file_even_when_systemd_copied_it_into_the_environment(
        tmp_path: Path, env: pytest.MonkeyPatch) -> None:
    start = {"EDGE_AGENT_ROUTES": json.dumps(TRAFFIC), "EDGE_AGENT_MQTT__KEEPALIVE_S": "45",
             "EDGE_AGENT_DECISION__MARGIN_S": "0.01"}
    env_file = write(tmp_path / "agent.env", **start)
    as_environment_file(env, **start)
    sources = Sources(env_file, explicit=True)
    assert [r.topic for r in sources.load().routes] == ["city/+/traffic/+/data"]

    # The route changed, the keepalive line removed (back to its default), the margin unchanged.
    write(env_file, EDGE_AGENT_ROUTES=json.dumps(PARKING), EDGE_AGENT_DECISION__MARGIN_S="0.01")
    reread = sources.reload()
    assert [r.topic for r in reread.settings.routes] == ["city/+/parking/+/data"]
    assert reread.settings.mqtt.keepalive_s == 30
    assert reread.settings.decision.margin_s == 0.01
    assert reread.environment_wins == []


def test_values_really_from_the_environment_keep_winning_and_are_named(
        tmp_path: Path, env: pytest.MonkeyPatch) -> None:
    env_file = write(tmp_path / "agent.env", EDGE_AGENT_ROUTES=json.dumps(TRAFFIC),
                     EDGE_AGENT_DECISION__MARGIN_S="0.01", EDGE_AGENT_MQTT__PORT="1884")
    as_environment_file(env, EDGE_AGENT_ROUTES=json.dumps(TRAFFIC), EDGE_AGENT_DECISION__MARGIN_S="0.01",
                        EDGE_AGENT_MQTT__PORT="1884")
    env.setenv("EDGE_AGENT_DECISION__MARGIN_S", "0.2")  # a unit's Environment= (or a drop-in) over the file
    sources = Sources(env_file, explicit=True)
    assert sources.load().decision.margin_s == 0.2

    write(env_file, EDGE_AGENT_ROUTES=json.dumps(TRAFFIC), EDGE_AGENT_DECISION__MARGIN_S="0.05",
          EDGE_AGENT_MQTT__PORT="1884")
    reread = sources.reload()
    assert reread.settings.decision.margin_s == 0.2
    assert reread.environment_wins == ["EDGE_AGENT_DECISION__MARGIN_S"]
    # An environment variable the file never mentions is no news at a reload.
    assert "EDGE_AGENT_STATE_DIR" not in reread.environment_wins


def test_a_reload_without_copies_in_the_environment_reads_the_file(tmp_path: Path, env: pytest.MonkeyPatch) -> None:
    env_file = write(tmp_path / "agent.env", EDGE_AGENT_ROUTES=json.dumps(TRAFFIC))
    sources = Sources(env_file, explicit=True)
    sources.load()
    write(env_file, EDGE_AGENT_ROUTES=json.dumps(PARKING), EDGE_AGENT_MQTT__KEEPALIVE_S="45")
    reread = sources.reload()
    assert [r.topic for r in reread.settings.routes] == ["city/+/parking/+/data"]
    assert reread.settings.mqtt.keepalive_s == 45 and reread.environment_wins == []


def test_a_reload_keeps_the_strictness_of_a_start(tmp_path: Path, env: pytest.MonkeyPatch) -> None:
    start = {"EDGE_AGENT_ROUTES": json.dumps(TRAFFIC)}
    env_file = write(tmp_path / "agent.env", **start)
    as_environment_file(env, **start)
    sources = Sources(env_file, explicit=True)
    sources.load()
    write(env_file, EDGE_AGENT_ROUTES="[{broken", EDGE_AGENT_MQTT_HOST="broker")
    with pytest.raises(ConfigError) as caught:
        sources.reload()
    assert [variable for variable, _ in caught.value.problems] == ["EDGE_AGENT_MQTT_HOST", "EDGE_AGENT_ROUTES"]


# --- the outcome file and `edge-agent reload` ------------------------------------------------------------------


def test_outcome_round_trip_and_replacement(tmp_path: Path) -> None:
    first = Outcome(pid=7, started_ns=1, result="failed", problems=[("EDGE_AGENT_ROUTES", "not valid JSON")])
    write_outcome(tmp_path, first)
    assert read_outcome(tmp_path) == first
    second = Outcome(pid=7, started_ns=2, result="applied", needs_restart=["EDGE_AGENT_MQTT__HOST"], routes=["a/#"])
    write_outcome(tmp_path, second)
    assert read_outcome(tmp_path) == second
    assert [p.name for p in tmp_path.iterdir()] == [OUTCOME_FILE]  # nothing left aside
    (tmp_path / OUTCOME_FILE).write_text("{half")
    assert read_outcome(tmp_path) is None


def test_describe_names_every_problem_and_fails() -> None:
    lines, ok = describe(Outcome(pid=1, started_ns=0, result="failed", problems=[
        ("EDGE_AGENT_MQTT_HOST", "unknown setting"), ("EDGE_AGENT_ROUTES", "not valid JSON")]))
    assert not ok
    assert lines[:2] == ["configuration error: EDGE_AGENT_MQTT_HOST: unknown setting",
                         "configuration error: EDGE_AGENT_ROUTES: not valid JSON"]
    assert "previous settings" in lines[-1]
    lines, ok = describe(Outcome(pid=1, started_ns=0, result="applied", needs_restart=["EDGE_AGENT_MQTT__HOST"],
                                 environment_wins=["EDGE_AGENT_DECISION__MARGIN_S"], routes=["a/#", "b/+"]))
    assert ok and lines[-1] == "reload applied; routes: a/#, b/+"
    assert lines[0].startswith("EDGE_AGENT_MQTT__HOST: changed; takes effect at the next start")
    assert lines[1].startswith("EDGE_AGENT_DECISION__MARGIN_S: changed in the env file, but also set")
    assert describe(Outcome(pid=1, started_ns=0, result="ignored", detail="leaving"))[1] is False


def test_request_takes_only_an_outcome_of_a_reload_begun_after_the_signal(tmp_path: Path) -> None:
    # A process that answers SIGHUP as the agent does, a moment later; an older outcome is already there.
    write_outcome(tmp_path, Outcome(pid=0, started_ns=0, result="failed"))
    script = (
        "import json, os, signal, sys, time\n"
        "from pathlib import Path\n"
        "from agent.reload import Outcome, write_outcome\n"
        "def hup(*_):\n"
        "    time.sleep(0.3)\n"
        "    write_outcome(Path(sys.argv[1]), Outcome(os.getpid(), time.monotonic_ns(), 'applied', routes=['x/#']))\n"
        "signal.signal(signal.SIGHUP, hup)\n"
        "write_outcome(Path(sys.argv[1]), Outcome(os.getpid(), time.monotonic_ns(), 'failed'))\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        outcome = request(proc.pid, tmp_path, timeout_s=10)
        assert outcome.result == "applied" and outcome.pid == proc.pid
    finally:
        proc.kill()
        proc.communicate()
    with pytest.raises(ReloadError, match="no process"):
        request(proc.pid, tmp_path, timeout_s=1)


def test_request_gives_up_after_the_timeout(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGHUP, "
                             "signal.SIG_IGN); print('ready', flush=True); time.sleep(30)"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        began = time.monotonic()
        with pytest.raises(ReloadError, match=r"did not report the reload within 0\.5 s"):
            request(proc.pid, tmp_path, timeout_s=0.5)
        assert time.monotonic() - began < 5
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()

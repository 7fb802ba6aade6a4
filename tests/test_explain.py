"""``edge-agent explain``: both totals term by term, from the settings' priors and the operator's figures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import main
from agent.decision import CLOUD_TERMS, LOCAL_TERMS
from agent.decision.model import (
    HEDGE_LOCAL_RATIO,
    HEDGE_RATIO,
    HEDGE_SLACK_S,
    UPLOAD_HEDGE_RATIO,
    UPLOAD_HEDGE_SLACK_S,
)


@pytest.fixture
def env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(os.environ):
        if name.startswith("EDGE_AGENT_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)
    path = tmp_path / "agent.env"
    path.write_text(f"EDGE_AGENT_STATE_DIR={tmp_path / 'state'}\nEDGE_AGENT_LOCAL__WORKERS=2\n")
    return path


def explain_json(env_file: Path, capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    assert main(["explain", "--env-file", str(env_file), "--json", *args]) == 0
    out: dict[str, object] = json.loads(capsys.readouterr().out)
    return out


def test_priors_keep_a_clip_local_on_an_idle_gateway(env_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = explain_json(env_file, capsys, "--kind", "noise.spectrum", "--bytes", "160000")
    assert out["target"] == "local" and out["reason"] == "model"
    terms = out["terms"]
    assert isinstance(terms, dict) and set(terms) == set(LOCAL_TERMS) | set(CLOUD_TERMS)
    assert out["t_local_s"] == pytest.approx(sum(terms[k] for k in LOCAL_TERMS))
    assert out["t_cloud_s"] == pytest.approx(sum(terms[k] for k in CLOUD_TERMS))
    assert terms["provisioning_s"] == pytest.approx(3.0)


def test_operator_figures_replace_the_priors(env_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = explain_json(env_file, capsys, "--kind", "noise.spectrum", "--bytes", "160000", "--uplink-mbps", "20",
                       "--rtt-ms", "30", "--warm", "--backlog", "4")
    terms = out["terms"]
    assert isinstance(terms, dict)
    assert terms["upload_s"] == pytest.approx(160_000 * 8 / 20e6)
    assert terms["rtt_s"] == pytest.approx(0.03)
    assert terms["provisioning_s"] == 0.0
    assert terms["local_wait_s"] > 0.0  # 4 tasks ahead, 2 workers (EDGE_AGENT_LOCAL__WORKERS)
    assert out["target"] == "cloud"
    t_cloud, t_local, hedge = out["t_cloud_s"], out["t_local_s"], out["hedge_after_s"]
    assert isinstance(t_cloud, float) and isinstance(t_local, float) and isinstance(hedge, float)
    assert hedge == pytest.approx(max(t_cloud + HEDGE_SLACK_S, HEDGE_RATIO * t_cloud, HEDGE_LOCAL_RATIO * t_local))
    # The upload's own deadline: lease and cloud queue waits, a round trip, twice the uplink time, a slack.
    assert out["upload_by_s"] == pytest.approx(
        terms["provisioning_s"] + terms["cloud_wait_s"] + terms["rtt_s"] + UPLOAD_HEDGE_SLACK_S
        + UPLOAD_HEDGE_RATIO * (terms["uplink_queue_s"] + terms["upload_s"]))
    assert out["upload_by_s"] < hedge
    local = explain_json(env_file, capsys, "--kind", "noise.spectrum", "--bytes", "160000")
    assert local["hedge_after_s"] is None and local["upload_by_s"] is None


def test_settings_from_the_env_file_are_the_priors(env_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env_file.write_text(env_file.read_text() + "EDGE_AGENT_DECISION__RTT_S=0.5\n")
    out = explain_json(env_file, capsys, "--kind", "sensor.stats", "--bytes", "300")
    terms = out["terms"]
    assert isinstance(terms, dict) and terms["rtt_s"] == pytest.approx(0.5)


def test_overrides_are_explained(env_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = explain_json(env_file, capsys, "--kind", "noise.spectrum", "--bytes", "160000", "--placement", "cloud",
                       "--circuit-open")
    assert (out["target"], out["reason"]) == ("local", "circuit_open")
    assert main(["explain", "--env-file", str(env_file), "--kind", "noise.spectrum", "--bytes", "1000",
                 "--placement", "cloud", "--no-cloud"]) == 0
    assert "runs on the gateway (no cloud is configured" in capsys.readouterr().out


def test_text_output_reads_term_by_term(env_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--env-file", str(env_file), "--kind", "noise.spectrum", "--bytes", "160000",
                 "--uplink-mbps", "1", "--warm"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("noise.spectrum, 160,000 bytes → runs on the gateway (the model's choice).")
    for label in ("on the gateway", "wait for a worker", "service time", "in the cloud", "provisioning",
                  "round trip", "uplink queue", "upload", "wait for a cloud slot", "cloud service time",
                  "download the result"):
        assert f"\n{label:<32}" in text or f"\n  {label:<30}" in text, label
    assert "160,000 bytes at 1.00 Mbit/s" in text
    assert "also runs on the gateway" not in text  # no hedge for a task kept local

    assert main(["explain", "--env-file", str(env_file), "--kind", "noise.spectrum", "--bytes", "160000",
                 "--uplink-mbps", "50", "--warm"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("noise.spectrum, 160,000 bytes → runs in the cloud (the model's choice).")
    assert "If the cloud's answer has not come 0.531 s after the decision, the task also runs on the gateway" in text


def test_output_cut_short_by_the_reader_is_not_an_error(env_file: Path) -> None:
    # `edge-agent explain … | head -3`: the reader closes the pipe before the agent writes.
    proc = subprocess.Popen([sys.executable, "-m", "agent", "explain", "--env-file", str(env_file), "--kind",
                             "noise.spectrum", "--bytes", "160000", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    stderr = proc.communicate(timeout=30)[1].decode()
    assert proc.returncode == 128 + signal.SIGPIPE
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


def test_bad_arguments_are_usage_errors(env_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--env-file", str(env_file), "--kind", "noise.spectrum", "--bytes", "-1"])
    assert exc.value.code == 2
    assert "must be >= 0" in capsys.readouterr().err


def test_a_cold_lease_that_alone_keeps_a_task_local_is_started(env_file: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--env-file", str(env_file), "--kind", "noise.spectrum", "--bytes", "160000",
                 "--uplink-mbps", "20", "--backlog", "4"]) == 0
    text = capsys.readouterr().out
    assert "runs on the gateway" in text and "starts a lease now" in text

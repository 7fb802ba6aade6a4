"""``edge-agent explain``: both totals term by term, from the settings' priors and the operator's figures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

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
    # A cloud URL: without one every task stays on the gateway (no_cloud), which is not what most tests ask.
    path.write_text(f"EDGE_AGENT_STATE_DIR={tmp_path / 'state'}\nEDGE_AGENT_LOCAL__WORKERS=2\n"
                    "EDGE_AGENT_CLOUD__URL=http://cloud.example.net\n")
    return path


def explain_json(env_file: Path, capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(["explain", "--env-file", str(env_file), "--json", *args]) == 0
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
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


def write(env_file: Path, *lines: str) -> Path:
    env_file.write_text(env_file.read_text() + "".join(f"{line}\n" for line in lines))
    return env_file


def test_without_a_cloud_url_the_task_stays_on_the_gateway(tmp_path: Path, env_file: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    # What the daemon does with no EDGE_AGENT_CLOUD__URL: no cloud client, so reason no_cloud.
    bare = tmp_path / "bare.env"
    bare.write_text(f"EDGE_AGENT_STATE_DIR={tmp_path / 'state'}\nEDGE_AGENT_LOCAL__WORKERS=2\n")
    figures = ("--kind", "noise.spectrum", "--bytes", "160000", "--uplink-mbps", "50", "--warm")
    assert explain_json(env_file, capsys, *figures)["target"] == "cloud"  # with a URL the model offloads it
    out = explain_json(bare, capsys, *figures)
    assert (out["target"], out["reason"]) == ("local", "no_cloud")
    assert main(["explain", "--env-file", str(bare), *figures]) == 0
    assert "runs on the gateway (no cloud is configured: EDGE_AGENT_CLOUD__URL is unset)" in capsys.readouterr().out


ROUTES = ('EDGE_AGENT_ROUTES=[{"topic": "city/+/noise/+/pcm", "task": "noise.spectrum", "placement": "local"}, '
          '{"topic": "city/#", "task": "sensor.stats"}, {"topic": "city/+/noise/#", "task": "noise.spectrum"}]')


def test_a_topic_takes_the_first_matching_route(env_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(env_file, ROUTES, "EDGE_AGENT_MAX_PAYLOAD_BYTES=500000")
    fast = ("--uplink-mbps", "50", "--warm")
    out = explain_json(env_file, capsys, "--topic", "city/aarhus/noise/3/pcm", "--bytes", "160000", *fast)
    assert out["kind"] == "noise.spectrum" and out["route"]["topic"] == "city/+/noise/+/pcm"
    assert (out["target"], out["reason"]) == ("local", "placement")  # the model alone would offload it
    # The same topic with the route's placement replaced: the model's choice again.
    out = explain_json(env_file, capsys, "--topic", "city/aarhus/noise/3/pcm", "--bytes", "160000", "--placement",
                       "auto", *fast)
    assert (out["target"], out["reason"]) == ("cloud", "model")
    # A deeper topic misses the first route and is taken by the second: sensor.stats, run on the event loop.
    out = explain_json(env_file, capsys, "--topic", "city/aarhus/noise/3/pcm/extra", "--bytes", "300")
    assert out["kind"] == "sensor.stats" and out["route"]["topic"] == "city/#" and out["inline"] is True

    assert main(["explain", "--env-file", str(env_file), "--topic", "city/aarhus/noise/3/pcm", "--bytes",
                 "160000", *fast]) == 0
    text = capsys.readouterr().out
    assert text.startswith("Topic city/aarhus/noise/3/pcm → route city/+/noise/+/pcm: task noise.spectrum, "
                           "placement local.")
    assert "runs on the gateway (the route's placement setting)" in text
    assert main(["explain", "--env-file", str(env_file), "--topic", "city/a/b/c/data", "--bytes", "300",
                 "--backlog", "3"]) == 0
    assert "wait for the event loop" in capsys.readouterr().out


def test_a_topic_no_route_takes_or_a_payload_too_large_is_a_dead_letter(
        env_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(env_file, ROUTES, "EDGE_AGENT_MAX_PAYLOAD_BYTES=500000")
    out = explain_json(env_file, capsys, "--topic", "plant/7/pcm", "--bytes", "300")
    assert out["dead_letter"]["reason"] == "unknown_task" and "target" not in out
    out = explain_json(env_file, capsys, "--topic", "city/aarhus/noise/3/pcm", "--bytes", "600000")
    assert out["dead_letter"]["reason"] == "too_large"
    assert main(["explain", "--env-file", str(env_file), "--kind", "noise.spectrum", "--bytes", "600000"]) == 0
    assert "→ a dead letter (too_large): payload of 600000 bytes exceeds EDGE_AGENT_MAX_PAYLOAD_BYTES=500000" \
        in capsys.readouterr().out


def test_a_kind_that_contradicts_the_route_is_a_usage_error(env_file: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    write(env_file, ROUTES)
    assert main(["explain", "--env-file", str(env_file), "--topic", "city/aarhus/noise/3/pcm", "--kind",
                 "sensor.stats", "--bytes", "300"]) == 2
    assert "is routed to task noise.spectrum" in capsys.readouterr().err
    assert main(["explain", "--env-file", str(env_file), "--bytes", "300"]) == 2
    assert "give --kind, --topic or both" in capsys.readouterr().err


def test_without_a_topic_a_route_that_fixes_the_placement_is_noted(env_file: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    write(env_file, ROUTES)
    assert main(["explain", "--env-file", str(env_file), "--kind", "noise.spectrum", "--bytes", "1000"]) == 0
    assert ("Note: routes that fix where noise.spectrum runs: city/+/noise/+/pcm → local; --topic applies the "
            "route a message would take") in capsys.readouterr().out


def test_an_unknown_kind_is_warned_about(env_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--env-file", str(env_file), "--kind", "noise.spectrm", "--bytes", "1000"]) == 0
    captured = capsys.readouterr()
    assert "edge-agent explain: warning: no installed task is named 'noise.spectrm' (installed: " in captured.err
    assert "noise.spectrum" in captured.err
    assert captured.out.startswith("noise.spectrm, 1,000 bytes → runs")
    out = explain_json(env_file, capsys, "--kind", "noise.spectrum", "--bytes", "1000")
    assert out["warnings"] == [] and out["installed"] is True
    assert capsys.readouterr().err == ""


def test_live_refuses_figures_of_its_own(env_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--env-file", str(env_file), "--live", "--kind", "noise.spectrum", "--bytes", "1000",
                 "--uplink-mbps", "5", "--warm"]) == 2
    assert "leave out --uplink-mbps, --warm" in capsys.readouterr().err


def test_live_without_a_running_agent_says_so(env_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from support import free_port

    write(env_file, f"EDGE_AGENT_METRICS__PORT={free_port()}")
    assert main(["explain", "--env-file", str(env_file), "--live", "--kind", "noise.spectrum", "--bytes", "1"]) == 3
    assert "the agent is not running, or not at http://127.0.0.1:" in capsys.readouterr().err
    write(env_file, "EDGE_AGENT_METRICS__PORT=0")
    assert main(["explain", "--env-file", str(env_file), "--live", "--kind", "noise.spectrum", "--bytes", "1"]) == 4
    assert "metrics are off (EDGE_AGENT_METRICS__PORT=0)" in capsys.readouterr().err


def test_a_task_kept_on_the_gateway_says_it_may_still_move_to_the_cloud() -> None:
    from agent.decision import DecisionParams
    from agent.decision.explain import Scenario, as_json, explain, render
    from agent.decision.model import REBIND_MARGIN_RATIO, REBIND_MARGIN_S

    params = DecisionParams()
    decision, snapshot = explain(params, Scenario("noise.spectrum", 1000, lease_warm=True))
    assert decision.target == "local"
    data = as_json("noise.spectrum", 1000, decision, snapshot, params, inline=False)
    assert data["rebound"] is False
    assert data["rebind_margin_s"] == pytest.approx(max(REBIND_MARGIN_S, REBIND_MARGIN_RATIO * decision.t_local_s))
    assert "late binding" in render(data)
    light = as_json("noise.spectrum", 1000, decision, snapshot, params, inline=True)
    assert light["rebind_margin_s"] is None and "late binding" not in render(light)


def test_a_task_sent_to_the_cloud_says_it_may_still_come_back_before_its_upload() -> None:
    from agent.decision import DecisionParams
    from agent.decision.explain import Scenario, as_json, explain, render
    from agent.decision.model import REBIND_MARGIN_RATIO, REBIND_MARGIN_S

    params = DecisionParams()
    # A backlog of clips on one worker and a fast, warm cloud: the clip goes to the cloud.
    decision, snapshot = explain(params, Scenario("noise.spectrum", 100_000, uplink_mbps=50.0, lease_warm=True,
                                                  local_backlog=20))
    assert decision.target == "cloud" and decision.reason == "model"
    data = as_json("noise.spectrum", 100_000, decision, snapshot, params, inline=False)
    assert data["rebind_margin_s"] is None
    assert data["move_back_margin_s"] == pytest.approx(max(REBIND_MARGIN_S,
                                                           REBIND_MARGIN_RATIO * decision.t_cloud_s))
    assert "comes back to the gateway" in render(data)
    placed = as_json("noise.spectrum", 100_000, explain(params, Scenario("noise.spectrum", 100_000,
                                                                         placement="cloud"))[0],
                     snapshot, params, inline=False)
    assert placed["move_back_margin_s"] is None and "comes back" not in render(placed)

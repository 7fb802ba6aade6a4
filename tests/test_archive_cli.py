"""`edge-agent explain --archive ROUTE` and `edge-agent archive query` from the command line (agent/archive/cli.py):
what they read from the settings and from the archive on disk."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from agent.archive.catalog import Catalog
from agent.archive.cli import when
from agent.archive.intake import Intake, Sealing
from agent.archive.segment import Record
from agent.cli import main

ROUTE = "city/+/noise/+/pcm"


def env_file(tmp_path: Path, **extra: str) -> Path:
    lines = {"EDGE_AGENT_STATE_DIR": str(tmp_path / "state"),
             "EDGE_AGENT_ROUTES": json.dumps([{"topic": ROUTE, "task": "noise.spectrum",
                                               "archive": {"days": 30, "retrievals_per_month": 2}}]), **extra}
    path = tmp_path / "agent.env"
    path.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
    return path


def test_explain_archive_prices_the_routes_next_segment(tmp_path: Path, clean_env: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    env = env_file(tmp_path, EDGE_AGENT_ARCHIVE__UPLINK_PER_GB="5")
    assert main(["explain", "--env-file", str(env), "--archive", ROUTE, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["route"] == ROUTE and data["choice"] == "cloud"  # read twice a month over a dear uplink
    assert data["segment"]["retrievals_per_month"] == 2 and data["prices"]["uplink_per_gb"] == 5
    assert data["gateway"]["total"] > data["cloud"]["total"]
    assert main(["explain", "--env-file", str(env), "--archive", "other/#"]) == 2
    assert "not an archive route" in capsys.readouterr().err


def test_explain_archive_takes_the_archives_disk_use_and_segment_sizes(tmp_path: Path,
                                                                      clean_env: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    env = env_file(tmp_path, EDGE_AGENT_ARCHIVE__DISK_BUDGET_BYTES=str(2 * 1024 * 1024))
    root = tmp_path / "state" / "archive"
    intake = Intake(root, Catalog(root / "catalog.db"), Sealing(3600, 1 << 30))
    intake.open()
    intake.append({ROUTE: [Record(time.time(), "city/a/noise/1/pcm", os.urandom(1_000_000), f"{1:032x}")]})
    [info] = intake.seal_due(force=True)
    intake.close()
    capsys.readouterr()  # the seal's log line
    assert main(["explain", "--env-file", str(env), "--archive", ROUTE, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["segment"]["size_bytes"] == info.size
    assert data["segment"]["disk_used_bytes"] == 2 * info.size  # what is there, and the next one


def test_archive_query_without_an_archive_says_so(tmp_path: Path, clean_env: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["archive", "query", "--env-file", str(env_file(tmp_path)), "--route", "#"]) == 1
    assert "no archive" in capsys.readouterr().err


def test_times_on_the_command_line() -> None:
    assert when("1700000000.5") == 1700000000.5
    assert when("2023-11-14T22:13:20") == 1700000000.0  # UTC unless it says otherwise
    assert when("2023-11-14T23:13:20+01:00") == 1700000000.0

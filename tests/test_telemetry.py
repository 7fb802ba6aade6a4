"""Logging output as operators and journald see it: JSON lines off a terminal, console text on one, secrets
never shown, third-party ``logging`` through the same pipeline."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from pydantic import SecretStr
from structlog.testing import capture_logs

from agent import telemetry
from agent.config import Settings, load_settings

# Unique per run, so a match can only come from a leak. The password carries a quote and a backslash,
# which JSON and repr() escape: the check below looks for those spellings too.
TOKEN = f"tok-{uuid.uuid4().hex}"
PASSWORD = f'pw"{uuid.uuid4().hex[:12]}\\end'

# Created at import, before any configuration, as the agent's modules do.
module_log = telemetry.get_logger("agent.tests.telemetry")


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    agent_level = logging.getLogger("agent").level
    yield
    structlog.reset_defaults()
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.getLogger("agent").setLevel(agent_level)


def settings(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    """Settings as the agent builds them: from the environment, with nothing inherited from the test run."""
    for name in list(os.environ):
        if name.startswith("EDGE_AGENT_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(f"EDGE_AGENT_{name}", value)
    return load_settings(None)


def configured(monkeypatch: pytest.MonkeyPatch, stream: io.StringIO | None = None, **env: str) -> io.StringIO:
    out = stream if stream is not None else io.StringIO()
    telemetry.configure_logging(settings(monkeypatch, **env), stream=out)
    return out


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = text.splitlines()
    assert lines, "nothing was logged"
    return [json.loads(line) for line in lines]


def assert_no_leak(text: str, *secrets: str) -> None:
    for secret in secrets:
        for spelling in {secret, json.dumps(secret)[1:-1], repr(secret)[1:-1]}:
            assert spelling not in text, f"secret leaked as {spelling!r} in:\n{text}"
        # A partial leak (the distinctive middle of the secret) counts too.
        assert secret[3:15] not in text


def test_json_lines_when_not_a_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    out = configured(monkeypatch)
    log = telemetry.get_logger("agent.ingress")
    log.info("message_received", topic="city/a/traffic/1/data", size=200)
    log.warning("store_full_intake_paused", rows=10)
    logging.getLogger("paho").warning("connection lost: %s", "timeout")

    first, second, third = json_lines(out.getvalue())
    assert first["event"] == "message_received"
    assert first["level"] == "info"
    assert first["logger"] == "agent.ingress"
    assert (first["topic"], first["size"]) == ("city/a/traffic/1/data", 200)
    assert second["level"] == "warning"
    assert third == {**third, "event": "connection lost: timeout", "level": "warning", "logger": "paho"}
    for event in (first, second, third):
        stamp = datetime.fromisoformat(event["timestamp"])
        assert stamp.utcoffset() == timedelta(0)
        assert abs(datetime.now(UTC) - stamp) < timedelta(minutes=1)


def test_json_when_stdout_is_a_pipe() -> None:
    """The real default: no stream given, stdout a pipe as under systemd, format "auto"."""
    script = (
        "import logging\n"
        "from agent.config import load_settings\n"
        "from agent.telemetry import configure_logging, get_logger\n"
        "configure_logging(load_settings(None))\n"
        f"get_logger('agent.sub').info('started', value={TOKEN!r})\n"
        "logging.getLogger('httpx').warning('slow response')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    env["EDGE_AGENT_CLOUD__TOKEN"] = TOKEN
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    started, slow = json_lines(done.stdout)
    assert (started["event"], started["logger"], started["value"]) == ("started", "agent.sub", telemetry.MASK)
    assert (slow["event"], slow["logger"], slow["level"]) == ("slow response", "httpx", "warning")
    assert_no_leak(done.stdout + done.stderr, TOKEN)


def test_console_when_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    out = configured(monkeypatch, LOG__FORMAT="console")
    telemetry.get_logger("agent.daemon").info("agent_started", agent_id="gw-1")
    logging.getLogger("paho").error("refused")

    text = out.getvalue()
    lines = text.splitlines()
    assert len(lines) == 2
    for line in lines:
        with pytest.raises(json.JSONDecodeError):
            json.loads(line)
    for part in ("agent_started", "agent_id=gw-1", "[agent.daemon]", "info"):
        assert part in lines[0]
    for part in ("refused", "[paho]", "error"):
        assert part in lines[1]
    assert "\x1b[" not in text, "no colours when the stream is not a terminal"


def test_auto_format_follows_the_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    tty = configured(monkeypatch, FakeTty())
    telemetry.get_logger("agent.x").info("on_a_terminal")
    assert "on_a_terminal" in tty.getvalue()
    assert "\x1b[" in tty.getvalue(), "a terminal gets colours"
    with pytest.raises(json.JSONDecodeError):
        json.loads(tty.getvalue().splitlines()[0])

    forced = configured(monkeypatch, FakeTty(), LOG__FORMAT="json")
    telemetry.get_logger("agent.x").info("json_anyway")
    assert json_lines(forced.getvalue())[0]["event"] == "json_anyway"


def emit_every_kind_of_leak() -> int:
    """Log the token and password every way the agent or a library might. Returns the number of events."""
    log = telemetry.get_logger("agent.cloud")
    log.info("as_value", detail=TOKEN, other=PASSWORD)
    log.info(f"in the message: Bearer {TOKEN} / {PASSWORD}")
    log.info("positional %s and %s", TOKEN, PASSWORD)
    log.info("as_secretstr", value=SecretStr(TOKEN), nested={"list": [SecretStr(PASSWORD)]})
    log.info("nested", data={"a": [TOKEN, {"b": PASSWORD}], "t": (TOKEN,)})
    log.info("as_object", error=ValueError(f"bad {TOKEN}"), path=Path(f"/tmp/{PASSWORD}"))
    try:
        raise RuntimeError(f"resource API refused token {TOKEN} (password {PASSWORD})")
    except RuntimeError:
        log.exception("with_traceback")
    paho = logging.getLogger("paho")
    paho.warning("connect failed for password %s", PASSWORD)
    paho.warning(f"token {TOKEN} in the message")
    try:
        raise ConnectionError(f"broker said no to {PASSWORD}")
    except ConnectionError:
        logging.getLogger("httpx").exception("stdlib traceback with %s", TOKEN)
    return 10


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_secrets_never_reach_the_output(monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    out = configured(
        monkeypatch, LOG__FORMAT=fmt, LOG__LEVEL="debug", CLOUD__TOKEN=TOKEN, MQTT__PASSWORD=PASSWORD
    )
    events = emit_every_kind_of_leak()

    text = out.getvalue()
    assert_no_leak(text, TOKEN, PASSWORD)
    assert text.count(telemetry.MASK) >= 2 * events - 3  # every event kept, with its secrets masked
    for name in ("as_value", "in the message", "positional", "as_secretstr", "nested", "as_object",
                 "with_traceback", "connect failed", "stdlib traceback"):
        assert name in text
    for exc_type in ("RuntimeError", "ConnectionError"):
        assert exc_type in text, "tracebacks are still rendered"
    if fmt == "json":
        assert len(json_lines(text)) == events


def test_structured_traceback_in_json(monkeypatch: pytest.MonkeyPatch) -> None:
    out = configured(monkeypatch, CLOUD__TOKEN=TOKEN)
    try:
        raise KeyError(TOKEN)
    except KeyError:
        telemetry.get_logger("agent.x").exception("lookup_failed")
    (event,) = json_lines(out.getvalue())
    (exc,) = event["exception"]
    assert exc["exc_type"] == "KeyError"
    assert TOKEN not in exc["exc_value"]
    assert telemetry.MASK in exc["exc_value"]
    assert exc["frames"]
    assert all("locals" not in frame for frame in exc["frames"]), "locals are where secrets live"


def test_sensitive_keys_are_masked_at_any_depth(monkeypatch: pytest.MonkeyPatch) -> None:
    out = configured(monkeypatch)
    fields: dict[str, Any] = {
        "authorization": "Bearer abcdef",
        "Password": "hunter22",
        "api_token": "t-1",
        "client_secret": "s-1",
        "credentials": {"user": "u"},
        "headers": {"Authorization": "Bearer xyz", "Accept": "application/json"},
        "attempts": [{"mqtt_password": "p-1", "host": "broker"}],
        "location": "aarhus",
    }
    telemetry.get_logger("agent.cloud").info("request", **fields)
    (event,) = json_lines(out.getvalue())
    for key in ("authorization", "Password", "api_token", "client_secret", "credentials"):
        assert event[key] == telemetry.MASK
    assert event["headers"] == {"Authorization": telemetry.MASK, "Accept": "application/json"}
    assert event["attempts"] == [{"mqtt_password": telemetry.MASK, "host": "broker"}]
    assert event["location"] == "aarhus"
    for plain in ("abcdef", "hunter22", "t-1", "s-1", "xyz", "p-1"):
        assert plain not in out.getvalue()


def test_register_secret_masks_later_output_and_ignores_short_values(monkeypatch: pytest.MonkeyPatch) -> None:
    out = configured(monkeypatch)
    extra = f"lease-{uuid.uuid4().hex}"
    telemetry.register_secret(extra)
    telemetry.register_secret("abc")  # too short to mask safely
    telemetry.get_logger("agent.cloud").info("lease_acquired", detail=f"id={extra}", note="abc stays")
    (event,) = json_lines(out.getvalue())
    assert event["detail"] == f"id={telemetry.MASK}"
    assert event["note"] == "abc stays"


def test_levels_drop_debug_at_info_and_quiet_libraries(monkeypatch: pytest.MonkeyPatch) -> None:
    out = configured(monkeypatch, LOG__LEVEL="info")
    log = telemetry.get_logger("agent.ingress")
    log.debug("duplicate_delivery", mid=1)
    log.info("kept")
    logging.getLogger("httpx").info("HTTP Request: POST /api/v1/resources")
    logging.getLogger("paho").warning("kept_from_paho")
    assert [e["event"] for e in json_lines(out.getvalue())] == ["kept", "kept_from_paho"]

    out = configured(monkeypatch, LOG__LEVEL="debug")
    log.debug("duplicate_delivery", mid=1)
    logging.getLogger("httpx").info("HTTP Request: POST /api/v1/resources")
    assert [e["event"] for e in json_lines(out.getvalue())] == [
        "duplicate_delivery",
        "HTTP Request: POST /api/v1/resources",
    ]

    out = configured(monkeypatch, LOG__LEVEL="error")
    log.warning("dropped")
    logging.getLogger("paho").warning("dropped_too")
    log.error("kept_error")
    assert [e["event"] for e in json_lines(out.getvalue())] == ["kept_error"]


def test_disabled_debug_call_does_no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    class Loud:
        def __repr__(self) -> str:
            raise AssertionError("a disabled debug call must not render its arguments")

    out = configured(monkeypatch, LOG__LEVEL="info")
    log = telemetry.get_logger("agent.hot")
    log.debug("hot_path", value=Loud())
    assert out.getvalue() == ""

    calls = 20_000
    start = time.perf_counter()
    for _ in range(calls):
        log.debug("hot_path", topic="city/a", size=200)
    per_call = (time.perf_counter() - start) / calls
    # About 0.5 µs here; the bound leaves a wide margin for slow CI machines.
    assert per_call < 10e-6, f"a disabled debug call took {per_call * 1e6:.1f} µs"


def test_reconfiguring_replaces_the_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    first = configured(monkeypatch)
    second = configured(monkeypatch, LOG__LEVEL="debug")
    module_log.debug("after_reconfigure")
    logging.getLogger("paho").warning("once")
    assert first.getvalue() == ""
    events = json_lines(second.getvalue())
    assert [e["event"] for e in events] == ["after_reconfigure", "once"]
    assert events[0]["logger"] == "agent.tests.telemetry"
    ours = [h for h in logging.getLogger().handlers if type(h).__name__ == "_LogLineHandler"]
    assert len(ours) == 1


def test_module_loggers_follow_capture_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    configured(monkeypatch)
    module_log.info("before")  # bound to the configured pipeline...
    with capture_logs() as captured:
        module_log.info("captured", n=1)  # ...and still seen by capture_logs
    assert captured == [{"event": "captured", "n": 1, "logger": "agent.tests.telemetry", "log_level": "info"}]


@pytest.mark.parametrize(
    ("mode", "content", "warned"),
    [
        (0o644, "EDGE_AGENT_CLOUD__TOKEN=abcd\n", True),
        (0o604, "EDGE_AGENT_MQTT__PASSWORD=abcd\n", True),
        (0o644, "EDGE_AGENT_AGENT_ID=gw\n# EDGE_AGENT_CLOUD__TOKEN=example\n", False),  # no secret in it
        (0o640, "EDGE_AGENT_CLOUD__TOKEN=abcd\n", False),
        (0o600, "EDGE_AGENT_CLOUD__TOKEN=abcd\n", False),
    ],
)
def test_warn_if_world_readable(tmp_path: Path, mode: int, content: str, warned: bool) -> None:
    env_file = tmp_path / "agent.env"
    env_file.write_text(content)
    env_file.chmod(mode)
    with capture_logs() as captured:
        telemetry.warn_if_world_readable(env_file, module_log)
        telemetry.warn_if_world_readable(tmp_path / "missing.env", module_log)
    if warned:
        (event,) = captured
        assert event["event"] == "env_file_readable_by_others"
        assert event["log_level"] == "warning"
        assert event["path"] == str(env_file)
        assert event["mode"] == f"{mode:04o}"
    else:
        assert captured == []


def test_recent_problems_keep_one_line_per_event_latest_first() -> None:
    problems = telemetry.RecentProblems(size=3)
    for i in range(5):
        problems.record("warning", {"event": "dead_letter", "timestamp": f"t{i}", "reason": "invalid_json"})
    problems.record("error", {"event": "mqtt_subscribe_refused", "timestamp": "t5", "filters": ["a/#"]})
    problems.record("warning", {"event": "x", "timestamp": "t6", "exception": "Traceback (most recent call last):"
                                "\n  File ...\nValueError: boom"})
    problems.record("warning", {"event": "y", "timestamp": "t7"})
    latest = problems.latest()
    assert [(p["event"], p["count"]) for p in latest] == [("y", 1), ("x", 1), ("mqtt_subscribe_refused", 1)]
    assert latest[1]["detail"] == "exception=ValueError: boom"
    assert latest[2]["detail"] == 'filters=["a/#"]'
    problems.record("warning", {"event": "mqtt_subscribe_refused", "timestamp": "t8"})  # another level: its own
    assert [p["event"] for p in problems.latest()][:2] == ["mqtt_subscribe_refused", "y"]


def test_warnings_and_errors_reach_the_recent_problems_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    # What `edge-agent status` shows: agent and library events alike, after redaction, info events not at all.
    configured(monkeypatch, CLOUD__TOKEN=TOKEN)
    telemetry.PROBLEMS.clear()
    module_log.info("agent_stats", received=1)
    module_log.warning("cloud_offload_failed", error=f"401 with {TOKEN}")
    logging.getLogger("httpx").error("connection reset")
    latest = telemetry.PROBLEMS.latest()
    assert [(p["event"], p["level"], p["logger"]) for p in latest] == [
        ("connection reset", "error", "httpx"), ("cloud_offload_failed", "warning", "agent.tests.telemetry")]
    assert latest[1]["detail"] == f"error=401 with {telemetry.MASK}"
    assert latest[1]["time"].startswith(str(datetime.now(UTC).year))

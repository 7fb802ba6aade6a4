"""Settings (docs/design.md#settings): every bad value stops start-up with exit status 78 and one line naming the
variable, checked through ``load_settings`` and through the real ``edge-agent check-config`` in a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from agent.cli import EX_CONFIG
from agent.config import ENV_PREFIX, Settings, load_settings
from agent.errors import ConfigError
from agent.tasks import default_registry

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "deploy" / "agent.env.example"
TOKEN = f"tok-{uuid.uuid4().hex}"
PASSWORD = f"pw-{uuid.uuid4().hex}"
REDACTED = "**********"


def clean_environ() -> dict[str, str]:
    """The test run's environment without anything that would feed the agent settings."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.upper().startswith(ENV_PREFIX) and name != "CREDENTIALS_DIRECTORY"
    }



def check_config(env_file: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "check-config", "--env-file", str(env_file)],
        env={**clean_environ(), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def validate(env_file: Path) -> Settings:
    """What the command line does before anything else: parse, then check the routes against the tasks."""
    settings = load_settings(env_file, explicit=True)
    default_registry().check_routes(settings.routes)
    return settings


def quick_first(values: Iterable[Any]) -> list[Any]:
    """Parameters of a test that runs ``edge-agent check-config`` in a subprocess (about half a second each): the
    first stays in the quick loop, the rest are marked slow. Each such test has an in-process twin, quick for
    every value."""
    return [value if i == 0 else pytest.param(*(value if isinstance(value, tuple) else (value,)),
                                              marks=pytest.mark.slow)
            for i, value in enumerate(values)]


def write_env(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "agent.env"
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


@dataclass(frozen=True)
class Bad:
    lines: tuple[str, ...]
    variable: str  # what the message must start with
    problem: str  # a fragment the message must contain


def route(**fields: Any) -> str:
    return f"{ENV_PREFIX}ROUTES='{json.dumps([{'task': 'sensor.stats', **fields}])}'"


PORT = "EDGE_AGENT_MQTT__PORT"
BAD_VALUES = {
    "port_zero": Bad((f"{PORT}=0",), PORT, "greater than or equal to 1"),
    "port_too_big": Bad((f"{PORT}=70000",), PORT, "less than or equal to 65535"),
    "port_not_a_number": Bad((f"{PORT}=abc",), PORT, "valid integer"),
    "protocol": Bad(("EDGE_AGENT_MQTT__PROTOCOL=4",), "EDGE_AGENT_MQTT__PROTOCOL", "'5' or '3.1.1'"),
    "routes_not_json": Bad(
        ("""EDGE_AGENT_ROUTES='[{"topic": "city/#", "task": "sensor.stats"'""",),
        "EDGE_AGENT_ROUTES",
        "not valid JSON",
    ),
    "topic_hash_inside": Bad((route(topic="a/#/b"),), "EDGE_AGENT_ROUTES[0].topic", "'#' must be a whole"),
    "topic_plus_in_level": Bad((route(topic="a/b+"),), "EDGE_AGENT_ROUTES[0].topic", "'+' must be a whole"),
    "unknown_task": Bad(
        (f"{ENV_PREFIX}ROUTES='{json.dumps([{'topic': 'city/#', 'task': 'traffic.magic'}])}'",),
        "EDGE_AGENT_ROUTES[0].task",
        "unknown task 'traffic.magic'",
    ),
    "tls_file_missing": Bad(
        ("EDGE_AGENT_MQTT__TLS__CA_FILE={tmp}/missing-ca.pem",),
        "EDGE_AGENT_MQTT__TLS__CA_FILE",
        "does not exist",
    ),
    "tls_file_is_a_directory": Bad(
        ("EDGE_AGENT_MQTT__TLS__CA_FILE={tmp}",), "EDGE_AGENT_MQTT__TLS__CA_FILE", "not a file"
    ),
    "tls_file_unreadable": Bad(
        ("EDGE_AGENT_MQTT__TLS__CA_FILE={tmp}/unreadable-ca.pem",),
        "EDGE_AGENT_MQTT__TLS__CA_FILE",
        "cannot be read",
    ),
    "cert_without_key": Bad(
        ("EDGE_AGENT_MQTT__TLS__CERT_FILE={tmp}/cert.pem",), "EDGE_AGENT_MQTT__TLS", "KEY_FILE"
    ),
    "placement": Bad(
        (route(topic="city/#", placement="edge"),),
        "EDGE_AGENT_ROUTES[0].placement",
        "'auto', 'local' or 'cloud'",
    ),
    "negative_workers": Bad(
        ("EDGE_AGENT_LOCAL__WORKERS=-1",), "EDGE_AGENT_LOCAL__WORKERS", "greater than or equal to 1"
    ),
    "cloud_url_scheme": Bad(
        ("EDGE_AGENT_CLOUD__URL=ftp://cloud.example",),
        "EDGE_AGENT_CLOUD__URL",
        "not an http:// or https:// URL",
    ),
    "cloud_url_no_host": Bad(("EDGE_AGENT_CLOUD__URL=https://",), "EDGE_AGENT_CLOUD__URL", "https://"),
    # A crossed backoff pair names the maximum and the minimum it must not undercut.
    "cloud_retry_crossed": Bad(
        ("EDGE_AGENT_CLOUD__RETRY_MIN_S=3", "EDGE_AGENT_CLOUD__RETRY_MAX_S=1"),
        "EDGE_AGENT_CLOUD__RETRY_MAX_S",
        "at least EDGE_AGENT_CLOUD__RETRY_MIN_S (3)",
    ),
    "mqtt_reconnect_crossed": Bad(
        ("EDGE_AGENT_MQTT__RECONNECT_MIN_S=10", "EDGE_AGENT_MQTT__RECONNECT_MAX_S=1"),
        "EDGE_AGENT_MQTT__RECONNECT_MAX_S",
        "at least EDGE_AGENT_MQTT__RECONNECT_MIN_S (10)",
    ),
    "agent_id_empty": Bad(("EDGE_AGENT_AGENT_ID=",), "EDGE_AGENT_AGENT_ID", "must be non-empty"),
    "agent_id_slash": Bad(("EDGE_AGENT_AGENT_ID=gw/1",), "EDGE_AGENT_AGENT_ID", "without '/'"),
}


def bad_env(name: str, tmp_path: Path) -> tuple[Path, Bad]:
    bad = BAD_VALUES[name]
    if name == "tls_file_unreadable":
        if os.geteuid() == 0:
            pytest.skip("root reads a mode-000 file anyway; the directory and missing-file cases still run")
        (tmp_path / "unreadable-ca.pem").write_text("not really a certificate\n")
        (tmp_path / "unreadable-ca.pem").chmod(0)
    (tmp_path / "cert.pem").write_text("not really a certificate\n")
    lines = tuple(line.replace("{tmp}", str(tmp_path)) for line in bad.lines)
    return write_env(tmp_path, *lines), bad


@pytest.fixture(params=sorted(BAD_VALUES))
def bad_env_file(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Bad]:
    return bad_env(request.param, tmp_path)


def test_bad_value_is_a_config_error_naming_the_variable(
    clean_env: pytest.MonkeyPatch, bad_env_file: tuple[Path, Bad]
) -> None:
    env_file, bad = bad_env_file
    with pytest.raises(ConfigError) as caught:
        validate(env_file)
    assert caught.value.variable == bad.variable
    assert bad.problem in caught.value.problem


@pytest.mark.parametrize("name", quick_first(sorted(BAD_VALUES)))
def test_bad_value_stops_check_config_with_status_78_and_one_line(name: str, tmp_path: Path) -> None:
    env_file, bad = bad_env(name, tmp_path)
    done = check_config(env_file)
    assert done.returncode == EX_CONFIG == 78, done.stderr
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"edge-agent: configuration error: {bad.variable}: "), line
    assert bad.problem in line


def test_missing_env_file_named_on_the_command_line(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nowhere.env"
    with pytest.raises(ConfigError) as caught:
        load_settings(missing, explicit=True)
    assert caught.value.variable == "--env-file"

    done = check_config(missing)
    assert done.returncode == EX_CONFIG
    (line,) = done.stderr.splitlines()
    assert line == f"edge-agent: configuration error: --env-file: {missing} does not exist"


def test_bad_value_from_the_environment_is_reported_too(tmp_path: Path) -> None:
    done = check_config(write_env(tmp_path), EDGE_AGENT_MQTT__PORT="abc")
    assert done.returncode == EX_CONFIG
    (line,) = done.stderr.splitlines()
    assert line.startswith("edge-agent: configuration error: EDGE_AGENT_MQTT__PORT: ")


def test_valid_settings_print_as_json_with_secrets_redacted(tmp_path: Path) -> None:
    env_file = write_env(
        tmp_path,
        "EDGE_AGENT_AGENT_ID=gw-7",
        "EDGE_AGENT_MQTT__USERNAME=gw-7",
        f"EDGE_AGENT_MQTT__PASSWORD={PASSWORD}",
        "EDGE_AGENT_CLOUD__URL=https://cloud.example/",
    )
    done = check_config(env_file, EDGE_AGENT_CLOUD__TOKEN=TOKEN)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["agent_id"] == "gw-7"
    assert shown["client_id"] == "edge-agent-gw-7"
    assert shown["mqtt"]["password"] == REDACTED
    assert shown["cloud"]["token"] == REDACTED
    assert shown["cloud"]["url"] == "https://cloud.example"
    for secret in (TOKEN, PASSWORD):
        assert secret not in done.stdout
        assert secret not in done.stderr


def test_environment_overrides_the_env_file(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    env_file = write_env(tmp_path, "EDGE_AGENT_MQTT__PORT=1884", "EDGE_AGENT_MQTT__HOST=from-file")
    clean_env.setenv("EDGE_AGENT_MQTT__PORT", "1885")
    settings = load_settings(env_file, explicit=True)
    assert (settings.mqtt.host, settings.mqtt.port) == ("from-file", 1885)

    done = check_config(env_file, EDGE_AGENT_MQTT__PORT="1885")
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert (shown["mqtt"]["host"], shown["mqtt"]["port"]) == ("from-file", 1885)


def test_secrets_from_systemd_credentials(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    # Written the way operators do (echo adds a newline); the newline is not part of the secret.
    (credentials / "EDGE_AGENT_CLOUD__TOKEN").write_text(f"{TOKEN}\n")
    (credentials / "EDGE_AGENT_MQTT__PASSWORD").write_text(f"{PASSWORD}\n")
    clean_env.setenv("CREDENTIALS_DIRECTORY", str(credentials))

    settings = load_settings(write_env(tmp_path, "EDGE_AGENT_AGENT_ID=gw-1"), explicit=True)
    assert settings.cloud.token is not None
    assert settings.cloud.token.get_secret_value() == TOKEN
    assert settings.mqtt.password is not None
    assert settings.mqtt.password.get_secret_value() == PASSWORD

    done = check_config(tmp_path / "agent.env", CREDENTIALS_DIRECTORY=str(credentials))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["cloud"]["token"] == REDACTED
    assert TOKEN not in done.stdout


def test_route_extra_keys_become_task_options(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    routes = [
        {"topic": "city/+/traffic/+/data", "task": "sensor.stats", "placement": "local", "window": 10},
        {"topic": "city/+/noise/+/pcm", "task": "noise.spectrum", "qos": 0, "sample_rate": 8000},
    ]
    settings = validate(write_env(tmp_path, f"EDGE_AGENT_ROUTES='{json.dumps(routes)}'"))
    stats, noise = settings.routes
    assert (stats.placement, stats.qos, stats.options) == ("local", 1, {"window": 10})
    assert (noise.placement, noise.qos, noise.options) == ("auto", 0, {"sample_rate": 8000})


def test_default_routes_cover_the_built_in_tasks(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    settings = validate(write_env(tmp_path))
    assert {r.task for r in settings.routes} == {"sensor.stats", "noise.spectrum"}
    assert all(r.placement == "auto" and r.qos == 1 and r.options == {} for r in settings.routes)


# --- deploy/agent.env.example ---------------------------------------------------------------------------

DEFAULT_LINE = re.compile(r"^# (EDGE_AGENT_\w+)=(.*)$")
EXAMPLE_LINE = re.compile(r"^# example: (EDGE_AGENT_\w+)=(.*)$")
SET_LINE = re.compile(r"^(EDGE_AGENT_\w+)=(.*)$")


def leaf_variables(model: type[BaseModel], prefix: str = ENV_PREFIX) -> set[str]:
    """Every setting as its variable name: nested models are walked, everything else is a leaf."""
    names: set[str] = set()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names |= leaf_variables(annotation, f"{prefix}{name.upper()}__")
        else:
            names.add(f"{prefix}{name.upper()}")
    return names


def example_variables() -> dict[str, set[str]]:
    kinds: dict[str, set[str]] = {"default": set(), "example": set(), "set": set()}
    for line in EXAMPLE.read_text().splitlines():
        for kind, pattern in (("example", EXAMPLE_LINE), ("default", DEFAULT_LINE), ("set", SET_LINE)):
            if match := pattern.match(line):
                kinds[kind].add(match.group(1))
                break
    return kinds


def test_env_example_documents_every_setting_and_nothing_else() -> None:
    kinds = example_variables()
    documented = kinds["default"] | kinds["example"] | kinds["set"]
    leaves = leaf_variables(Settings)
    assert leaves - documented == set(), "settings missing from deploy/agent.env.example"
    assert documented - leaves == set(), "deploy/agent.env.example names variables that do not exist"
    # Only what an operator must decide is set; everything else stays commented out.
    # (the agent id defaults to the host name, or the instance name with edge-agent@.service)
    assert kinds["set"] == {"EDGE_AGENT_MQTT__HOST"}
    text = EXAMPLE.read_text()
    assert "LoadCredential=EDGE_AGENT_CLOUD__TOKEN:edge-agent.cloud-token" in text
    assert "0640" in text
    assert '"window": 60' in text


def test_env_example_defaults_are_valid_and_are_the_real_defaults(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("EDGE_AGENT_STATE_DIR", str(tmp_path / "state"))
    lines = EXAMPLE.read_text().splitlines()
    as_shipped = write_env(tmp_path, *lines)
    uncommented = tmp_path / "uncommented.env"
    uncommented.write_text("".join(f"{line[2:] if DEFAULT_LINE.match(line) else line}\n" for line in lines))
    assert uncommented.read_text().count("\n# EDGE_AGENT_") == 0

    shipped = validate(as_shipped)
    spelled_out = validate(uncommented)
    assert spelled_out.model_dump(exclude={"routes"}) == shipped.model_dump(exclude={"routes"})
    # The routes line spells out the default options too; the routes themselves are the defaults.
    assert [(r.topic, r.task, r.placement, r.qos) for r in spelled_out.routes] == [
        (r.topic, r.task, r.placement, r.qos) for r in shipped.routes
    ]
    assert spelled_out.routes[0].options == {"window": 60}

    done = check_config(uncommented, EDGE_AGENT_STATE_DIR=str(tmp_path / "state"))
    assert done.returncode == 0, done.stderr

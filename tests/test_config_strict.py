"""Strict settings: an ``EDGE_AGENT_*`` name that is no setting, a route key its task does not take and every
other problem stop start-up together, one line each in the operator's words, through ``load_settings`` and the
real ``edge-agent check-config`` / ``edge-agent run``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from test_config import check_config, clean_environ, quick_first, write_env

from agent.cli import EX_CONFIG
from agent.config import (
    ENV_PREFIX,
    NOT_SETTINGS,
    Settings,
    changed_variables,
    closest,
    leaves,
    load_settings,
    split_reload,
    variable,
)
from agent.errors import ConfigError
from agent.tasks import default_registry

PREFIX = "edge-agent: configuration error: "
SECRET = f"secret-{uuid.uuid4().hex}"



def problems(env_file: Path | None) -> list[tuple[str, str]]:
    """What the command line reports: settings, then the routes against the installed tasks."""
    with pytest.raises(ConfigError) as caught:
        load_settings(env_file, explicit=env_file is not None, check_routes=default_registry().route_problems)
    return caught.value.problems


def routes_line(*routes: dict[str, object]) -> str:
    return f"EDGE_AGENT_ROUTES='{json.dumps(list(routes))}'"


TYPOS = {
    "one_underscore": ("EDGE_AGENT_MQTT_HOST", "EDGE_AGENT_MQTT__HOST"),
    "section_misspelt": ("EDGE_AGENT_MQQT__HOST", "EDGE_AGENT_MQTT__HOST"),
    "singular": ("EDGE_AGENT_ROUTE", "EDGE_AGENT_ROUTES"),
    "underscore_missing": ("EDGE_AGENT_AGENTID", "EDGE_AGENT_AGENT_ID"),
    "deep_single_underscores": ("EDGE_AGENT_MQTT_TLS_CA_FILE", "EDGE_AGENT_MQTT__TLS__CA_FILE"),
    "below_a_setting": ("EDGE_AGENT_MQTT__HOST__NAME", "EDGE_AGENT_MQTT__HOST"),
    "list_index": ("EDGE_AGENT_ROUTES__0__TOPIC", "EDGE_AGENT_ROUTES"),
}


@pytest.mark.parametrize("typo", quick_first(sorted(TYPOS)))
def test_a_misspelt_name_in_the_env_file_stops_check_config(typo: str, tmp_path: Path) -> None:
    name, meant = TYPOS[typo]
    value = "[]" if "ROUTE" in name else "gw9"
    env_file = write_env(tmp_path, f"{name}={value}")
    done = check_config(env_file)
    assert done.returncode == EX_CONFIG == 78, done.stderr
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"{PREFIX}{name}: unknown setting (from {env_file}) — did you mean {meant}?"
    ]


@pytest.mark.parametrize("typo", sorted(TYPOS))
def test_a_misspelt_name_in_the_environment_is_refused_in_process(typo: str, clean_env: pytest.MonkeyPatch) -> None:
    name, meant = TYPOS[typo]
    clean_env.setenv(name, "[]" if "ROUTE" in name else "gw9")
    assert problems(None) == [(name, f"unknown setting (from the environment) — did you mean {meant}?")]


def test_run_stops_before_connecting_on_an_unknown_name(tmp_path: Path) -> None:
    env_file = write_env(tmp_path, f"EDGE_AGENT_STATE_DIR={tmp_path / 'state'}", "EDGE_AGENT_MQTT__PORT=1")
    done = subprocess.run([sys.executable, "-m", "agent", "run", "--env-file", str(env_file)],
                          env={**clean_environ(), "EDGE_AGENT_MQTT_HOST": "broker.example"},
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == EX_CONFIG, done.stderr
    assert done.stderr.splitlines() == [
        f"{PREFIX}EDGE_AGENT_MQTT_HOST: unknown setting (from the environment) — did you mean EDGE_AGENT_MQTT__HOST?"
    ]
    assert not (tmp_path / "state").exists()  # stopped before opening anything


def test_every_problem_at_once_one_line_each(tmp_path: Path) -> None:
    env_file = write_env(
        tmp_path,
        "EDGE_AGENT_MQTT_HOST=broker.example",
        "EDGE_AGENT_MQTT__PORT=abc",
        routes_line({"topic": "city/+/+/+/data", "task": "sensor.stats", "windw": 10},
                    {"topic": "city/+/noise/+/pcm", "task": "noise.spectrum", "sample_rate": "fast"},
                    {"topic": "city/+/air/+/data", "task": "air.quality"}),
        "EDGE_AGENT_STORE__MAX_TASKS=1",
    )
    done = check_config(env_file, EDGE_AGENT_AGENTID="gw9", EDGE_AGENT_LOG='{"levl": "debug"}')
    assert done.returncode == EX_CONFIG, done.stderr
    assert done.stdout == ""
    known = ", ".join(default_registry().names())
    assert done.stderr.splitlines() == [
        f"{PREFIX}EDGE_AGENT_AGENTID: unknown setting (from the environment) — did you mean EDGE_AGENT_AGENT_ID?",
        f"{PREFIX}EDGE_AGENT_MQTT_HOST: unknown setting (from {env_file}) — did you mean EDGE_AGENT_MQTT__HOST?",
        f"{PREFIX}EDGE_AGENT_MQTT__PORT: Input should be a valid integer, unable to parse string as an integer "
        "(got 'abc')",
        f"{PREFIX}EDGE_AGENT_STORE__MAX_TASKS: Input should be greater than or equal to 10 (got '1')",
        f"{PREFIX}EDGE_AGENT_LOG.levl: unknown key — did you mean level?",
        f"{PREFIX}EDGE_AGENT_ROUTES[0].windw: unknown key — did you mean window?",
        f"{PREFIX}EDGE_AGENT_ROUTES[1]: route option 'sample_rate' must be a positive whole number of Hz, "
        "got 'fast'",
        f"{PREFIX}EDGE_AGENT_ROUTES[2].task: unknown task 'air.quality'; known tasks: {known}",
    ]


def test_config_error_keeps_the_first_problem_as_variable_and_problem(
        tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("EDGE_AGENT_MQQT__PORT", "1884")
    env_file = write_env(tmp_path, "EDGE_AGENT_LOCAL__WORKERS=0")
    with pytest.raises(ConfigError) as caught:
        load_settings(env_file, explicit=True)
    error = caught.value
    assert (error.variable, error.problem) == error.problems[0]
    assert error.variable == "EDGE_AGENT_MQQT__PORT"
    assert [variable for variable, _ in error.problems] == ["EDGE_AGENT_MQQT__PORT", "EDGE_AGENT_LOCAL__WORKERS"]
    assert str(error).splitlines() == [f"{variable}: {problem}" for variable, problem in error.problems]


def test_the_same_name_in_the_env_file_and_the_environment_is_one_line(
        tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    # What systemd's EnvironmentFile= does with the env file: its lines are in the environment too.
    env_file = write_env(tmp_path, "EDGE_AGENT_MQTT_HOST=broker.example")
    clean_env.setenv("EDGE_AGENT_MQTT_HOST", "broker.example")
    assert problems(env_file) == [(
        "EDGE_AGENT_MQTT_HOST",
        f"unknown setting (from the environment and {env_file}) — did you mean EDGE_AGENT_MQTT__HOST?",
    )]


def test_names_are_case_insensitive_as_the_settings_are(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    env_file = write_env(tmp_path, "edge_agent_mqtt__host=from-file", "Edge_Agent_Mqtt__Port=1884")
    settings = load_settings(env_file, explicit=True)
    assert (settings.mqtt.host, settings.mqtt.port) == ("from-file", 1884)
    assert check_config(env_file).returncode == 0

    clean_env.setenv("edge_agent_mqtt_host", "x")
    assert problems(env_file) == [(
        "EDGE_AGENT_MQTT_HOST",
        "unknown setting (from the environment) — did you mean EDGE_AGENT_MQTT__HOST?",
    )]
    typo = write_env(tmp_path, "edge_agent_agentid=gw9")
    done = check_config(typo)
    assert done.returncode == EX_CONFIG
    assert done.stderr.splitlines() == [
        f"{PREFIX}EDGE_AGENT_AGENTID: unknown setting (from {typo}) — did you mean EDGE_AGENT_AGENT_ID?"
    ]


def test_sections_as_json_and_kinds_key_by_key_are_settings(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    env_file = write_env(
        tmp_path,
        """EDGE_AGENT_MQTT='{"host": "broker.example", "port": 8883}'""",
        "EDGE_AGENT_MQTT__TLS='{}'",
        "EDGE_AGENT_MQTT__KEEPALIVE_S=60",
        """EDGE_AGENT_DECISION__KINDS__LIGHT='{"local_fixed_s": 0.001, "local_per_byte_s": 0,
        "cloud_fixed_s": 0.001, "cloud_per_byte_s": 0, "out_bytes": 10}'""".replace("\n        ", " "),
        *(f"EDGE_AGENT_DECISION__KINDS__audio.clip__{key}=1" for key in
          ("LOCAL_FIXED_S", "LOCAL_PER_BYTE_S", "CLOUD_FIXED_S", "CLOUD_PER_BYTE_S", "OUT_BYTES")),
    )
    settings = load_settings(env_file, explicit=True)
    assert (settings.mqtt.host, settings.mqtt.port, settings.mqtt.keepalive_s) == ("broker.example", 8883, 60)
    assert settings.decision.kinds["light"].out_bytes == 10  # names given as variables are lower-cased
    assert settings.decision.kinds["audio.clip"].local_fixed_s == 1.0
    assert check_config(env_file).returncode == 0


def test_keys_inside_json_values_are_checked_too(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    env_file = write_env(
        tmp_path,
        """EDGE_AGENT_MQTT='{"hst": "broker.example"}'""",
        """EDGE_AGENT_MQTT__TLS='{"ca_fil": "/etc/ca.pem"}'""",
        "EDGE_AGENT_DECISION__KINDS__LIGHT__LOCAL_FIXD_S=1",
    )
    found = problems(env_file)
    assert found[0] == (
        "EDGE_AGENT_DECISION__KINDS__LIGHT__LOCAL_FIXD_S",
        f"unknown setting (from {env_file}) — did you mean EDGE_AGENT_DECISION__KINDS__LIGHT__LOCAL_FIXED_S?")
    assert sorted(found[1:]) == [
        ("EDGE_AGENT_MQTT.hst", "unknown key — did you mean host?"),
        ("EDGE_AGENT_MQTT__TLS.ca_fil", "unknown key — did you mean ca_file?"),
    ]


def test_bad_json_names_its_variable_and_the_rest_is_still_checked(
        tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    env_file = write_env(tmp_path, "EDGE_AGENT_MQTT__TLS='{\"ca_file\": '", "EDGE_AGENT_ROUTES=[{broken",
                         "EDGE_AGENT_MQTT__PORT=0")
    found = problems(env_file)
    assert [variable for variable, _ in found] == [
        "EDGE_AGENT_MQTT__TLS", "EDGE_AGENT_ROUTES", "EDGE_AGENT_MQTT__PORT"]
    assert all(problem.startswith("not valid JSON (") for _, problem in found[:2])


def test_credentials_named_like_no_setting_are_refused(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "EDGE_AGENT_CLOUD_TOKEN").write_text(f"{SECRET}\n")
    (credentials / "EDGE_AGENT_MQTT__PASSWORD").write_text("fine\n")
    (credentials / "unrelated-credential").write_text("not ours\n")
    clean_env.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    assert problems(None) == [(
        "EDGE_AGENT_CLOUD_TOKEN",
        f"unknown setting (from the credentials in {credentials}) — did you mean EDGE_AGENT_CLOUD__TOKEN?",
    )]


def test_secrets_never_appear_in_the_messages(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "EDGE_AGENT_MQTT_PASSWORD").write_text(SECRET)
    env_file = write_env(tmp_path, f"EDGE_AGENT_CLOUD_TOKEN={SECRET}",
                         f"""EDGE_AGENT_MQTT='{{"password": ["{SECRET}"], "pasword": "{SECRET}"}}'""",
                         """EDGE_AGENT_CLOUD='{"token": 12345}'""")
    done = check_config(env_file, CREDENTIALS_DIRECTORY=str(credentials), EDGE_AGENT_CLOUD__TOKN=SECRET)
    assert done.returncode == EX_CONFIG
    lines = done.stderr.splitlines()
    assert len(lines) == 6, lines
    assert SECRET not in done.stderr
    assert "12345" not in done.stderr
    assert f"{PREFIX}EDGE_AGENT_CLOUD__TOKEN: Input should be a valid string (got '**********')" in lines


def test_the_devcloud_token_is_let_through_unread(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    assert set(NOT_SETTINGS) == {"EDGE_AGENT_DEVCLOUD_TOKEN"}
    clean_env.setenv("EDGE_AGENT_DEVCLOUD_TOKEN", SECRET)
    load_settings(write_env(tmp_path, "EDGE_AGENT_AGENT_ID=gw-1"), explicit=True)
    done = check_config(write_env(tmp_path), EDGE_AGENT_DEVCLOUD_TOKEN=SECRET)
    assert done.returncode == 0, done.stderr
    assert SECRET not in done.stdout


@pytest.mark.parametrize("name", ["EDGE_AGENT_", "EDGE_AGENT_MQTT__", "EDGE_AGENT_MQTT____HOST",
                                  "EDGE_AGENT_DECISION__KINDS__", "EDGE_AGENT_NO_SUCH_THING"])
def test_names_that_set_nothing_are_refused_even_without_a_suggestion(
        name: str, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv(name, "1")
    ((variable, problem),) = problems(None)
    assert variable == name
    assert problem.startswith("unknown setting (from the environment)")


def test_no_setting_of_the_model_is_refused_as_unknown(clean_env: pytest.MonkeyPatch) -> None:
    sections = ["MQTT", "MQTT__TLS", "LOCAL", "CLOUD", "METRICS", "STORE", "LOG", "DECISION"]
    names = [variable(path) for path, _ in leaves(Settings)] + [ENV_PREFIX + section for section in sections]
    for name in names:
        clean_env.setenv(name, "nonsense")  # bad values, every one: reported as such, never as unknown
    found = problems(None)
    assert found, "nonsense everywhere must be refused"
    assert not [problem for _, problem in found if problem.startswith("unknown setting")]


def test_closest_finds_the_underscore_slip_first() -> None:
    names = ["MQTT__HOST", "MQTT__PORT", "MQTT__TLS__CA_FILE", "ROUTES", "AGENT_ID"]
    assert closest("MQTT_HOST", names) == ["MQTT__HOST"]
    assert closest("mqtt___tls_ca_file", names) == ["MQTT__TLS__CA_FILE"]
    assert closest("QUEUE_SIZE", names) == []


# --- Routes and task options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "variable", "problem"),
    quick_first([
        ({"task": "sensor.stats", "windw": 10}, "EDGE_AGENT_ROUTES[0].windw", "unknown key — did you mean window?"),
        ({"task": "sensor.stats", "palcement": "local"}, "EDGE_AGENT_ROUTES[0].palcement",
         "unknown key — did you mean placement?"),
        ({"task": "noise.spectrum", "sample_rat": 8000}, "EDGE_AGENT_ROUTES[0].sample_rat",
         "unknown key — did you mean sample_rate?"),
        ({"task": "noise.spectrum", "gain": 3}, "EDGE_AGENT_ROUTES[0].gain",
         "unknown key; a noise.spectrum route takes topic, task, placement, qos, archive, offset_db, sample_rate"),
    ]),
)
def test_a_route_key_its_task_does_not_take_is_refused(
        route: dict[str, object], variable: str, problem: str, tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    env_file = write_env(tmp_path, routes_line({"topic": "city/#", **route}))
    assert problems(env_file) == [(variable, problem)]
    done = check_config(env_file)
    assert done.returncode == EX_CONFIG
    assert done.stderr.splitlines() == [f"{PREFIX}{variable}: {problem}"]


def test_route_keys_are_checked_while_another_setting_is_bad(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    env_file = write_env(tmp_path, "EDGE_AGENT_METRICS__PORT=-1",
                         routes_line({"topic": "city/#", "task": "sensor.stats", "ignor": ["id"]}))
    assert [variable for variable, _ in problems(env_file)] == [
        "EDGE_AGENT_METRICS__PORT", "EDGE_AGENT_ROUTES[0].ignor"]


PLUGIN_MODULE = "edge_agent_optioned_tasks"


@pytest.fixture
def optioned_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Installed user tasks: one declaring a set of options, one a mapping, one nothing, one a bad declaration."""
    (tmp_path / f"{PLUGIN_MODULE}.py").write_text(textwrap.dedent("""
        def counter(payload, options):
            return {"n": options.get("threshold")}
        counter.options = {"threshold", "unit"}

        def described(payload, options):
            return {}
        described.options = {"limit": "the most to keep"}

        def anything(payload, options):
            return {}

        def misdeclared(payload, options):
            return {}
        misdeclared.options = "threshold"
    """))
    info = tmp_path / "edge_agent_optioned-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: edge-agent-optioned\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(f"""
        [edge_agent.tasks]
        user.counter = {PLUGIN_MODULE}:counter
        user.described = {PLUGIN_MODULE}:described
        user.anything = {PLUGIN_MODULE}:anything
        user.misdeclared = {PLUGIN_MODULE}:misdeclared
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    default_registry.cache_clear()
    yield tmp_path
    default_registry.cache_clear()
    sys.modules.pop(PLUGIN_MODULE, None)


def test_user_tasks_declare_the_options_they_take(optioned_plugins: Path, clean_env: pytest.MonkeyPatch) -> None:
    with structlog.testing.capture_logs() as logs:
        registry = default_registry()
    assert registry.get("user.counter").options == {"threshold", "unit"}
    assert registry.get("user.described").options == {"limit"}
    assert registry.get("user.anything").options is None
    assert "user.misdeclared" not in registry
    (failed,) = [entry for entry in logs if entry["event"] == "task_plugin_failed"]
    assert failed["name"] == "user.misdeclared"
    assert "must be a set of option names or a mapping keyed by them (got str)" in failed["error"]

    env_file = write_env(optioned_plugins, routes_line(
        {"topic": "a/#", "task": "user.counter", "threshold": 3, "unit": "K"},
        {"topic": "b/#", "task": "user.counter", "treshold": 3},
        {"topic": "c/#", "task": "user.described", "limt": 1},
        {"topic": "d/#", "task": "user.anything", "whatever": 1, "windw": 2},
    ))
    assert problems(env_file) == [
        ("EDGE_AGENT_ROUTES[1].treshold", "unknown key — did you mean threshold?"),
        ("EDGE_AGENT_ROUTES[2].limt", "unknown key — did you mean limit?"),
    ]


# --- Reloads ------------------------------------------------------------------------------------------------


def test_changed_variables_names_each_setting(tmp_path: Path) -> None:
    old = Settings(state_dir=tmp_path)  # type: ignore[call-arg]
    new = old.model_copy(update={
        "mqtt": old.mqtt.model_copy(update={"host": "other", "tls": old.mqtt.tls.model_copy(
            update={"ca_file": tmp_path})}),
        "store": old.store.model_copy(update={"max_tasks": 20}),
        "decision": old.decision.model_copy(update={"margin_s": 0.5}),
    })
    assert changed_variables(old, old) == []
    assert changed_variables(old, new) == [
        "EDGE_AGENT_MQTT__HOST", "EDGE_AGENT_MQTT__TLS__CA_FILE", "EDGE_AGENT_STORE__MAX_TASKS",
        "EDGE_AGENT_DECISION__MARGIN_S"]

    running, waiting = split_reload(old, new)
    assert waiting == ["EDGE_AGENT_MQTT__HOST", "EDGE_AGENT_MQTT__TLS__CA_FILE", "EDGE_AGENT_STORE__MAX_TASKS"]
    assert running.mqtt == old.mqtt and running.store == old.store  # these wait for the next start
    assert running.decision == new.decision  # reloadable: in force at once

"""Loading the settings strictly: every problem of every source, each named by its variable, in one ConfigError."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from pydantic_settings import DotEnvSettingsSource, EnvSettingsSource, SecretsSettingsSource, SettingsError

from agent.config._names import (
    ENV_PREFIX,
    UNKNOWN,
    closest,
    did_you_mean,
    entry_model,
    leaves,
    model_of,
    screen,
    sections,
    strip_optional,
    suggestion,
    variable,
)
from agent.config._routes import Route
from agent.config._settings import RoutesOnly, Settings, credentials_source, hide_file_copies
from agent.errors import ConfigError

DEFAULT_ENV_FILE = Path("/etc/edge-agent/agent.env")


# --- Names the agent will not read --------------------------------------------------------------------------------

def _setting_names(given: str) -> list[str]:
    """Every variable name that sets something, as suggestions for ``given``; below a JSON object setting of
    models, the keys of an entry under the entry name given."""
    names = [variable(path) for path in sections(Settings)] + [variable(path) for path, _ in leaves(Settings)]
    upper = given.upper()
    for path, field in leaves(Settings):
        entry = entry_model(field.annotation)
        head = variable(path) + "__"
        if entry is not None and upper.startswith(head):
            key = upper[len(head):].split("__")[0]
            names += [f"{head}{key}__{name.upper()}" for name in entry.model_fields]
    return names


def _unknown_setting(name: str, places: list[str]) -> tuple[str, str]:
    # Compared without the prefix, which every name shares and which would make them all look alike.
    stem = name[len(ENV_PREFIX):]
    choices = [choice[len(ENV_PREFIX):] for choice in _setting_names(name)]
    found = closest(stem, choices)
    if not found:  # below a setting that takes no deeper names (EDGE_AGENT_ROUTES__0__TOPIC): that setting
        found = sorted((choice for choice in choices if stem.upper().startswith(choice + "__")), key=len)[-1:]
    return name, f"{UNKNOWN} (from {' and '.join(places)})" + suggestion([ENV_PREFIX + stem for stem in found])


def _sources_for(env_file: Path | None) -> Iterator[tuple[str, EnvSettingsSource]]:
    """The sources :class:`Settings` reads, each with the words that tell an operator where it is."""
    yield "the environment", hide_file_copies(EnvSettingsSource(Settings))
    if env_file is not None:
        yield str(env_file), DotEnvSettingsSource(Settings, env_file=env_file)
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials and Path(credentials).is_dir():
        try:
            yield f"the credentials in {credentials}", credentials_source(SecretsSettingsSource(Settings), credentials)
        except SettingsError:
            return  # reading the settings fails the same way and says why


def _screened(env_file: Path | None) -> list[tuple[str, str]]:
    """A problem for every variable the sources hold that the agent will not read."""
    unknown: dict[str, list[str]] = {}
    problems: list[tuple[str, str]] = []
    for place, source in _sources_for(env_file):
        # The environment's order means nothing; the env file's is the operator's, and credentials come sorted.
        given = sorted(source.env_vars.items()) if place == "the environment" else source.env_vars.items()
        for name, value in given:
            reason = screen(Settings, name, value)
            if reason == UNKNOWN:
                unknown.setdefault(name.upper(), []).append(place)
            elif reason is not None:
                problems.append((name.upper(), reason))
    return [_unknown_setting(name, places) for name, places in unknown.items()] + problems


# --- Validation errors, each named by its variable ----------------------------------------------------------

RouteCheck = Callable[[Sequence[Route]], list[tuple[str, str]]]


def variable_name(loc: tuple[int | str, ...]) -> str:
    """The environment variable a validation error location belongs to (``('mqtt','port')`` → MQTT__PORT)."""
    parts: list[str] = []
    suffix = ""
    for i, part in enumerate(loc):
        if isinstance(part, int) or (i > 0 and loc[0] == "routes"):
            suffix += f"[{part}]" if isinstance(part, int) else f".{part}"
        else:
            parts.append(str(part).upper())
    return ENV_PREFIX + "__".join(parts) + suffix


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    annotation: Any = Settings
    for part in loc:
        model = model_of(annotation)
        if model is not None:
            field = model.model_fields.get(str(part))
            if field is None:
                return None
            annotation = field.annotation
        else:
            args = get_args(strip_optional(annotation))
            if not args:
                return None
            annotation = args[-1]  # list[X] → X, dict[str, X] → X
    return model_of(annotation)


def _problem(error: ErrorDetails) -> tuple[str, str]:
    loc = tuple(error["loc"])
    if error["type"] == "extra_forbidden" and len(loc) > 1:
        # A key inside a JSON value (EDGE_AGENT_MQTT='{"hst": …}'): a misspelt variable never gets this far.
        model = _model_at(loc[:-1])
        keys = list(model.model_fields) if model is not None else []
        return f"{variable_name(loc[:-1])}.{loc[-1]}", "unknown key" + did_you_mean(str(loc[-1]), keys)
    given = error.get("input")
    shown = "" if isinstance(given, (dict, list)) or given is None else f" (got {_redact_input(loc, given)!r})"
    return variable_name(loc), _plain(error["msg"]) + shown


def _field_of_settings_error(message: str) -> str:
    # pydantic-settings says: error parsing value for field "routes" from source "EnvSettingsSource"
    if 'field "' in message:
        field = message.split('field "', 1)[1].split('"', 1)[0]
        return ENV_PREFIX + field.upper()
    return "configuration"


def _routes_alone(env_file: Path | None) -> list[Route] | None:
    try:
        return RoutesOnly(_env_file=env_file).routes
    except (ValidationError, SettingsError):
        return None


def load_settings(env_file: Path | None = None, *, explicit: bool = False,
                  check_routes: RouteCheck | None = None) -> Settings:
    """Build the settings from the environment, ``env_file`` and the credentials, or raise one ConfigError
    listing every problem: unknown ``EDGE_AGENT_*`` names, bad values and, through ``check_routes`` (the task
    registry's), routes naming tasks or keys that are not installed.

    A missing env file is an error only when the operator named it (``explicit``); the default path is optional
    so the agent also runs from the environment alone.
    """
    if env_file is not None and not env_file.exists():
        if explicit:
            raise ConfigError("--env-file", f"{env_file} does not exist")
        env_file = None
    if env_file is not None:
        try:
            env_file.read_bytes().decode("utf-8")
        except OSError as exc:
            raise ConfigError("--env-file", f"{env_file} cannot be read: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError("--env-file", f"{env_file} is not UTF-8 text (byte {exc.start})") from None
    problems = _screened(env_file)
    settings: Settings | None = None
    routes: list[Route] | None = None
    try:
        settings = Settings(_env_file=env_file)
        routes = settings.routes
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        problems += [_problem(error) for error in errors]
        if check_routes is not None and not any(error["loc"][:1] == ("routes",) for error in errors):
            routes = _routes_alone(env_file)
    except SettingsError as exc:
        cause = exc.__cause__
        detail = f"not valid JSON ({cause})" if isinstance(cause, json.JSONDecodeError) else str(cause or exc)
        problems.append((_field_of_settings_error(str(exc)), detail))
    if routes is not None and check_routes is not None:
        problems += check_routes(routes)
    if settings is not None and not problems:
        return settings
    raise ConfigError.listing(list(dict.fromkeys(problems)))


def _redact_input(loc: tuple[int | str, ...], given: object) -> object:
    return "**********" if loc and str(loc[-1]) in {"password", "token"} else given


def _plain(message: str) -> str:
    # pydantic prefixes custom messages with "Value error, "; operators do not need it.
    return message.removeprefix("Value error, ")


"""One agent's sources, read at start and again at each reload (SIGHUP), and what a reload changes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_settings import DotEnvSettingsSource

from agent.config._loading import RouteCheck, load_settings
from agent.config._names import NOT_SETTINGS, leaves, prefixed, variable
from agent.config._settings import Settings, file_copies, template_instance

# Top-level settings a reload (SIGHUP) applies to the running agent; every other change waits for a restart.
RELOADABLE = frozenset({"routes", "decision"})


def _environment() -> dict[str, str]:
    return {name.lower(): value for name, value in os.environ.items() if prefixed(name)}


def _file_lines(env_file: Path | None) -> dict[str, str]:
    """The env file's ``EDGE_AGENT_*`` lines as the agent reads them (lower-case names); {} without a file."""
    if env_file is None or not env_file.is_file():
        return {}
    lines = DotEnvSettingsSource(Settings, env_file=env_file).env_vars
    return {name.lower(): value for name, value in lines.items() if prefixed(name) and value is not None}


@dataclass(frozen=True)
class Reread:
    """What a reload read: the settings, and the variables whose line in the env file changed since the start
    but which the environment sets, so the environment's value stays (highest priority first)."""

    settings: Settings
    environment_wins: list[str]


class Sources:
    """One agent's sources, read at start and again, the same way, at each reload (SIGHUP).

    ``EnvironmentFile=`` in a unit (or a shell that sourced the file) copies the env file into the process
    environment once, at start, where it would win over the same file read again at a reload. So a variable whose
    environment value equals the file's line at start counts as the file's: a reload takes it from the file as it
    is then, or leaves it at its default once the line is gone. Any other environment value is the environment's
    and keeps winning over the file; a reload names those whose line the operator changed
    (:attr:`Reread.environment_wins`).
    """

    def __init__(self, env_file: Path | None, *, explicit: bool = False,
                 check_routes: RouteCheck | None = None, instance: str | None = None) -> None:
        self.env_file = env_file
        self.explicit = explicit
        self.check_routes = check_routes
        self.instance = instance  # the default agent id (a template unit's %i)
        self._lines_at_start: dict[str, str] = {}
        self._copies: frozenset[str] = frozenset()

    def _load(self) -> Settings:
        token = template_instance.set(self.instance)
        try:
            return load_settings(self.env_file, explicit=self.explicit, check_routes=self.check_routes)
        finally:
            template_instance.reset(token)

    def load(self) -> Settings:
        """The settings at start; remembers which environment values are copies of the env file."""
        settings = self._load()
        self._lines_at_start = _file_lines(self.env_file)
        environment = _environment()
        self._copies = frozenset(name for name, value in self._lines_at_start.items()
                                 if environment.get(name) == value)
        return settings

    def reload(self) -> Reread:
        """The settings now (or a ConfigError listing every problem), the env file's copies read afresh."""
        token = file_copies.set(self._copies)
        try:
            settings = self._load()
        finally:
            file_copies.reset(token)
        lines, environment = _file_lines(self.env_file), _environment()
        wins = [name.upper() for name in sorted(lines.keys() | self._lines_at_start.keys())
                if name in environment and name not in self._copies and name.upper() not in NOT_SETTINGS
                and lines.get(name) != self._lines_at_start.get(name)]
        return Reread(settings, wins)


def _value(settings: BaseModel, path: str) -> Any:
    value: Any = settings
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _changed(old: Settings, new: Settings) -> list[str]:
    return [path for path, _ in leaves(Settings) if _value(old, path) != _value(new, path)]


def changed_variables(old: Settings, new: Settings) -> list[str]:
    """The variables whose values differ, one per setting (``EDGE_AGENT_MQTT__HOST``), in declaration order."""
    return [variable(path) for path in _changed(old, new)]


def split_reload(old: Settings, new: Settings) -> tuple[Settings, list[str]]:
    """What a reload runs with — ``new``, except that the settings outside :data:`RELOADABLE` keep their
    ``old`` values — and the variables changed among those, which take effect at the next start."""
    waiting = [path for path in _changed(old, new) if path.split(".")[0] not in RELOADABLE]
    kept = {path.split(".")[0] for path in waiting}
    return new.model_copy(update={key: getattr(old, key) for key in kept}), [variable(path) for path in waiting]

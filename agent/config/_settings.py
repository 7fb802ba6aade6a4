"""The settings model and where it reads from: the environment, then the env file, then systemd credentials."""

from __future__ import annotations

import os
import socket
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NestedSecretsSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from agent.config._archive import ArchiveSettings
from agent.config._decision import DecisionSettings
from agent.config._mqtt import MqttSettings
from agent.config._names import ENV_PREFIX, screen
from agent.config._routes import Route, default_routes
from agent.config._sections import (
    CloudSettings,
    DeadLetterSettings,
    LocalSettings,
    LogSettings,
    MetricsSettings,
    StoreSettings,
)

# The instance name of a template unit (`edge-agent run --instance %i`), set while Sources reads: the default agent
# id, below every source, so an env file's EDGE_AGENT_AGENT_ID wins over it (Environment= in the unit would not).
template_instance: ContextVar[str | None] = ContextVar("template_instance", default=None)


def _default_agent_id() -> str:
    instance = template_instance.get()
    if instance:
        return instance
    # Host names may carry dots (fine) but never MQTT wildcards; keep the first label only when it is an FQDN.
    return socket.gethostname().split(".")[0] or "edge-agent"


def default_state_dir() -> Path:
    # systemd's StateDirectory= sets $STATE_DIRECTORY (colon-separated when several are configured).
    state = os.environ.get("STATE_DIRECTORY", "")
    return Path(state.split(":")[0]) if state else Path("/var/lib/edge-agent")


# Environment names (lower case) that are copies of the env file's lines, set only while Sources.reload reads: the
# environment source leaves them out, so the file as it is now decides.
file_copies: ContextVar[frozenset[str]] = ContextVar("file_copies", default=frozenset())


def hide_file_copies(source: EnvSettingsSource) -> EnvSettingsSource:
    hidden = file_copies.get()
    if hidden:
        source.env_vars = {name: value for name, value in source.env_vars.items() if name.lower() not in hidden}
    return source


class Sourced(BaseSettings):
    """Where settings come from: the environment, then the env file, then systemd credentials."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        case_sensitive=False,
        extra="ignore",
        frozen=True,
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, dotenv_settings]
        credentials = os.environ.get("CREDENTIALS_DIRECTORY")
        if credentials and Path(credentials).is_dir():
            sources.append(credentials_source(file_secret_settings, credentials))
        for source in sources:
            if isinstance(source, EnvSettingsSource):
                # What load_settings reports is not read: the rest validates as if it were not there, so a typo
                # in a section is one line in the operator's words rather than a second, cryptic one.
                source.env_vars = {name: value for name, value in source.env_vars.items()
                                   if screen(settings_cls, name, value) is None}
        if isinstance(env_settings, EnvSettingsSource):
            hide_file_copies(env_settings)
        return tuple(sources)


def credentials_source(file_secret_settings: PydanticBaseSettingsSource,
                       directory: str) -> NestedSecretsSettingsSource:
    # Credential files are named like the variable: EDGE_AGENT_MQTT__PASSWORD, EDGE_AGENT_CLOUD__TOKEN.
    return NestedSecretsSettingsSource(
        file_secret_settings,
        secrets_dir=directory,
        secrets_prefix=ENV_PREFIX,
        secrets_nested_delimiter="__",
        secrets_dir_missing="ok",
    )


class Settings(Sourced):
    """All settings of one agent. Built by :func:`load_settings`."""

    agent_id: str = Field(
        default_factory=_default_agent_id,
        description="this gateway's id: a level of its result, dead-letter and status topics, and part of the "
        "MQTT client id")
    mqtt: MqttSettings = MqttSettings()
    routes: list[Route] = Field(
        default_factory=default_routes,
        description="JSON list of routes: which topics to subscribe to and the task each becomes "
        "(route keys below)")
    max_payload_bytes: int = Field(
        default=1_048_576, ge=1, le=256 * 1024 * 1024,
        description="larger messages go to the dead-letter topic (`too_large`)")
    state_dir: Path = Field(default_factory=default_state_dir,
                            description="directory of the store (SQLite database and its WAL)")
    local: LocalSettings = LocalSettings()
    cloud: CloudSettings = CloudSettings()
    metrics: MetricsSettings = MetricsSettings()
    store: StoreSettings = StoreSettings()
    dead_letters: DeadLetterSettings = DeadLetterSettings()
    log: LogSettings = LogSettings()
    decision: DecisionSettings = DecisionSettings()
    archive: ArchiveSettings = ArchiveSettings()
    shutdown_timeout_s: float = Field(
        default=10.0, gt=0, le=3600,
        description="how long a stop may spend finishing running tasks before it keeps the rest in the store")

    @field_validator("agent_id")
    @classmethod
    def _agent_id(cls, value: str) -> str:
        if not value or any(c in value for c in "/+#") or any(c.isspace() for c in value):
            raise ValueError("the agent id must be non-empty without '/', '+', '#' or spaces (it is a topic level)")
        return value

    @field_validator("routes")
    @classmethod
    def _routes(cls, value: list[Route]) -> list[Route]:
        if not value:
            raise ValueError("at least one route is needed")
        seen: set[str] = set()
        for route in value:
            if route.topic in seen:
                raise ValueError(f"the topic filter {route.topic!r} appears twice")
            seen.add(route.topic)
        return value

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"edge-agent-{self.agent_id}"


class RoutesOnly(Sourced):
    """The routes alone, read from the same sources: their tasks and options are checked, and reported with
    everything else, even when another setting is bad."""

    routes: list[Route] = Field(default_factory=default_routes)


def redacted(settings: Settings) -> dict[str, Any]:
    """The effective settings as plain data with every secret replaced by ``**********``."""
    data: dict[str, Any] = settings.model_dump(mode="json")
    for section, key in (("mqtt", "password"), ("cloud", "token")):
        if data[section][key] is not None:
            data[section][key] = "**********"
    data["client_id"] = settings.client_id
    return data

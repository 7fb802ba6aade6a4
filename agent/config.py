"""Typed settings from the environment, an env file and systemd credentials (docs/design.md#settings).

Every variable is ``EDGE_AGENT_`` + the field path joined by ``__`` (``EDGE_AGENT_MQTT__PORT``); a section may
also be given whole as JSON (``EDGE_AGENT_MQTT``), and a JSON object setting key by key
(``EDGE_AGENT_DECISION__KINDS__<kind>__<key>``). Secrets are ``SecretStr`` and may also come from files named like
the variable in ``$CREDENTIALS_DIRECTORY`` (systemd's ``LoadCredential=EDGE_AGENT_CLOUD__TOKEN:edge-agent.cloud-token``,
from ``/etc/credstore/``).

:func:`load_settings` is strict: an ``EDGE_AGENT_*`` name that is no setting (a typo would otherwise leave the
default in force unnoticed), a value that is not valid JSON where JSON is expected, and every validation problem
are all collected into one :class:`~agent.errors.ConfigError`, each naming its variable. The names in
:data:`NOT_SETTINGS` belong to the project's other commands and are let through.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import socket
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    EnvSettingsSource,
    NestedSecretsSettingsSource,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from agent.decision import DEFAULT_KINDS, DecisionParams, KindParams, Placement
from agent.errors import ConfigError
from agent.mqtt.topics import validate_shared_group, validate_topic_filter

ENV_PREFIX = "EDGE_AGENT_"
DEFAULT_ENV_FILE = Path("/etc/edge-agent/agent.env")
# Top-level settings a reload (SIGHUP) applies to the running agent; every other change waits for a restart.
RELOADABLE = frozenset({"routes", "decision"})
# Names under the prefix that are not the agent's settings but belong to the project's other commands, which
# operators may export in the same shell or unit as the agent: the agent accepts them and never reads them.
NOT_SETTINGS = {
    "EDGE_AGENT_DEVCLOUD_TOKEN": "the bearer token of `edge-agent devcloud`",
}


# The instance name of a template unit (`edge-agent run --instance %i`), set while Sources reads: the default agent
# id, below every source, so an env file's EDGE_AGENT_AGENT_ID wins over it (Environment= in the unit would not).
_instance: ContextVar[str | None] = ContextVar("_instance", default=None)


def _default_agent_id() -> str:
    instance = _instance.get()
    if instance:
        return instance
    # Host names may carry dots (fine) but never MQTT wildcards; keep the first label only when it is an FQDN.
    return socket.gethostname().split(".")[0] or "edge-agent"


def default_state_dir() -> Path:
    # systemd's StateDirectory= sets $STATE_DIRECTORY (colon-separated when several are configured).
    state = os.environ.get("STATE_DIRECTORY", "")
    return Path(state.split(":")[0]) if state else Path("/var/lib/edge-agent")


def readable_file(value: Path | None) -> Path | None:
    """Check now that a configured file can be read, so start-up fails with the variable's name."""
    if value is None:
        return None
    if not value.is_file():
        raise ValueError(f"{value} does not exist or is not a file")
    try:
        with value.open("rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise ValueError(f"{value} cannot be read: {exc.strerror}") from exc
    return value


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TlsSettings(_Frozen):
    ca_file: Path | None = Field(
        default=None, description="CA certificate(s) to verify the broker by; setting it turns TLS on")
    cert_file: Path | None = Field(
        default=None, description="client certificate for mutual TLS (with KEY_FILE); turns TLS on")
    key_file: Path | None = Field(default=None, description="the client certificate's private key")

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        return readable_file(value)

    @model_validator(mode="after")
    def _pairs(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("CERT_FILE and KEY_FILE go together for mutual TLS")
        return self

    @property
    def enabled(self) -> bool:
        return self.ca_file is not None or self.cert_file is not None


_HOST_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")


class BrokerNode(NamedTuple):
    """One broker of ``EDGE_AGENT_MQTT__HOSTS`` (or the single ``HOST``/``PORT``): the host as it is connected to,
    and, with TLS, sent as SNI and verified against the broker's certificate; an IPv6 address without brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_broker_entry(entry: str, default_port: int) -> BrokerNode:
    """``host``, ``host:port``, ``[ipv6]`` or ``[ipv6]:port``; ValueError in words otherwise."""
    text = entry.strip()
    if not text:
        raise ValueError("an empty entry")
    if "://" in text or "/" in text:
        raise ValueError(f"{entry!r}: give host[:port], without a scheme or path")
    port_text: str | None = None
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError(f"{entry!r}: the IPv6 address has no closing bracket")
        host, rest = text[1:close], text[close + 1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{entry!r}: {host!r} in brackets is not an IPv6 address") from None
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{entry!r}: only :port may follow the bracketed address")
            port_text = rest[1:]
    elif text.count(":") > 1:
        raise ValueError(f"{entry!r}: an IPv6 address goes in brackets, as [{text}] or [address]:port")
    else:
        host, _, rest = text.partition(":")
        port_text = rest if ":" in text else None
        if not _HOST_NAME.match(host):
            raise ValueError(f"{entry!r}: {host!r} is not a host name or IPv4 address")
    port = default_port
    if port_text is not None:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"{entry!r}: the port must be a number from 1 to 65535")
        port = int(port_text)
    return BrokerNode(host, port)


class MqttSettings(_Frozen):
    host: str = Field(
        default="localhost",
        description="the broker's host name or address (shorthand for one broker; see HOSTS for several)")
    port: int = Field(
        default=1883, ge=1, le=65535,
        description="the broker's port (8883 is usual with TLS); also the port of a HOSTS entry without one")
    hosts: list[str] | None = Field(
        default=None,
        description="brokers to fail over between, in order of preference, as a JSON list of `host[:port]` "
        "(`[ipv6]:port`), e.g. `[\"mqtt-a.city.example:8883\", \"mqtt-b.city.example:8883\"]`; the agent "
        "connects to the first that answers and stays while connected; not together with HOST")
    protocol: Literal["5", "3.1.1"] = Field(default="5", description="MQTT version spoken to the broker")
    username: str | None = Field(default=None, description="broker user name")
    password: SecretStr | None = Field(
        default=None, description="broker password (secret; also from the credential EDGE_AGENT_MQTT__PASSWORD)")
    tls: TlsSettings = TlsSettings()
    shared_group: str | None = Field(
        default=None,
        description="subscribe as `$share/<group>/<filter>` so that the agents of one group split the messages")
    client_id: str | None = Field(
        default=None,
        description="MQTT client id; keep it stable, the broker keeps the agent's session under it "
        "(default: `edge-agent-<agent_id>`)")
    keepalive_s: int = Field(default=30, ge=5, le=65535, description="MQTT keepalive in seconds")
    # It bounds the messages held in memory before their commit and sets the size of each group commit.
    receive_maximum: int = Field(
        default=1000, ge=1, le=65535,
        description="unacknowledged QoS 1 messages the broker may send at once (MQTT 5 Receive Maximum); "
        "bounds the messages held in memory before their commit")
    # Our own window: paho's in-flight limit costs O(in-flight) per PUBACK (docs/contributing.md#paho-mqtt-traps).
    publish_window: int = Field(
        default=1000, ge=1, le=20000,
        description="results and dead letters published and not yet acknowledged by the broker "
        "(also capped by the broker's Receive Maximum)")
    session_expiry_s: int = Field(
        default=7 * 24 * 3600, ge=0,
        description="how long the broker keeps the session (and queues messages) while the agent is away (MQTT 5)")
    reconnect_min_s: float = Field(default=0.5, gt=0, description="first reconnect delay (exponential, jittered)")
    reconnect_max_s: float = Field(default=60.0, gt=0, description="longest reconnect delay")

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the broker host must not be empty")
        return value.strip()

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("name at least one broker (or leave HOSTS unset and use HOST)")
        seen: dict[BrokerNode, int] = {}
        out = []
        for i, entry in enumerate(value):
            try:
                node = parse_broker_entry(entry, 0)
            except ValueError as exc:
                raise ValueError(f"entry {i}: {exc}") from None
            if node in seen:
                raise ValueError(f"entry {i}: {entry!r} repeats entry {seen[node]}")
            seen[node] = i
            out.append(entry.strip())
        return out

    @field_validator("shared_group")
    @classmethod
    def _group(cls, value: str | None) -> str | None:
        return None if value is None else validate_shared_group(value)

    @model_validator(mode="after")
    def _backoff(self) -> MqttSettings:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("RECONNECT_MAX_S must be at least RECONNECT_MIN_S")
        if self.hosts is not None and "host" in self.model_fields_set:
            raise ValueError("EDGE_AGENT_MQTT__HOST and EDGE_AGENT_MQTT__HOSTS are both set: list every broker "
                             "in EDGE_AGENT_MQTT__HOSTS and remove EDGE_AGENT_MQTT__HOST (its one-broker shorthand)")
        if self.hosts is not None and len(set(self.nodes)) != len(self.nodes):
            raise ValueError("EDGE_AGENT_MQTT__HOSTS names one broker twice (an entry without a port takes PORT)")
        return self

    @property
    def nodes(self) -> tuple[BrokerNode, ...]:
        """The brokers in order of preference: HOSTS (entries without a port take PORT), or HOST and PORT."""
        if self.hosts is None:
            return (BrokerNode(self.host, self.port),)
        return tuple(parse_broker_entry(entry, self.port) for entry in self.hosts)


class Route(BaseModel):
    """One subscription and the task its messages become. Keys other than these are task options."""

    model_config = ConfigDict(frozen=True, extra="allow")

    topic: str = Field(description="MQTT topic filter to subscribe to (`+` and `#` wildcards); the first "
                       "route whose filter matches a message's topic takes it")
    task: str = Field(description="the task its messages become: a built-in (`sensor.stats`, `noise.spectrum`) "
                      "or a user task's entry-point name")
    placement: Placement = Field(
        default="auto", description="`auto`: the total-time model decides per task; `local` or `cloud` fix it")
    qos: Literal[0, 1] = Field(
        default=1, description="subscription QoS. 1: acknowledged only after the commit, never lost; "
        "0: at most once; a message that arrives while the store is full is dropped (logged as "
        "`qos0_message_dropped_store_full`)")

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        return validate_topic_filter(value)

    @field_validator("task")
    @classmethod
    def _task(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the task name must not be empty")
        return value

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


def _default_routes() -> list[Route]:
    return [
        Route(topic="city/+/+/+/data", task="sensor.stats"),
        Route(topic="city/+/noise/+/pcm", task="noise.spectrum"),
    ]


class LocalSettings(_Frozen):
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=256,
                         description="worker processes for heavy tasks on the gateway")


class CloudSettings(_Frozen):
    url: str | None = Field(
        default=None, description="base URL of the resource API (`http://` or `https://`); unset: never offload")
    token: SecretStr | None = Field(
        default=None, description="bearer token for the resource API (secret; also from the credential "
        "EDGE_AGENT_CLOUD__TOKEN)")
    location: str | None = Field(default=None, description="`location` asked of the resource API for leases")
    ca_file: Path | None = Field(
        default=None, description="CA bundle for an HTTPS resource API signed by a private CA "
        "(default: the system's trust store)")
    # Connecting should be quick on any working uplink; reading includes the cloud's run time.
    connect_timeout_s: float = Field(default=3.0, gt=0, le=600, description="HTTP connect timeout")
    read_timeout_s: float = Field(
        default=60.0, gt=0, le=3600, description="HTTP read timeout (includes the task's run time in the cloud)")
    write_timeout_s: float = Field(default=60.0, gt=0, le=3600, description="HTTP write timeout")
    pool_timeout_s: float = Field(default=5.0, gt=0, le=600, description="wait for a free HTTP connection")
    max_retries: int = Field(
        default=3, ge=0, le=20,
        description="retries of a transient failure (connection error, 429, 502-504), with backoff and jitter")
    retry_min_s: float = Field(default=0.2, gt=0, le=60, description="first retry delay")
    retry_max_s: float = Field(default=5.0, gt=0, le=600, description="longest retry delay")
    circuit_failures: int = Field(
        default=5, ge=1, le=1000,
        description="consecutive failed offloads that open the circuit (no offloading for the cool-down)")
    circuit_cooldown_s: float = Field(
        default=30.0, gt=0, le=86_400, description="how long an open circuit waits before one probe")
    max_quantity: int = Field(default=4, ge=1, le=1024, description="vCPUs asked for one compute lease at most")
    lease_idle_s: float = Field(
        default=60.0, ge=0, le=86_400, description="a lease with no cloud task for this long is released")
    provisioning_timeout_s: float = Field(
        default=120.0, gt=0, le=3600,
        description="give up on a lease still provisioning after this long (its tasks run on the gateway)")
    poll_interval_s: float = Field(
        default=0.5, gt=0, le=60, description="how often a provisioning lease is polled")

    @field_validator("ca_file")
    @classmethod
    def _ca_readable(cls, value: Path | None) -> Path | None:
        return readable_file(value)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(("http://", "https://")) or len(value.split("://", 1)[1]) == 0:
            raise ValueError(f"{value!r} is not an http:// or https:// URL")
        return value.rstrip("/")


class MetricsSettings(_Frozen):
    port: int = Field(
        default=9108, ge=0, le=65535,
        description="port of /metrics (Prometheus), /healthz, /readyz, /status and /explain; 0: off")
    host: str = Field(
        default="127.0.0.1",
        description="IP address that port listens on: `127.0.0.1` (this gateway only), a management "
        "interface's address, or `0.0.0.0` / `::` (every interface: firewall it). /status and /explain answer "
        "clients on this gateway only, whatever the address")

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        # An address, not a name: resolving a name at start-up would make the bind depend on DNS.
        try:
            return str(ipaddress.ip_address(value.strip().strip("[]")))
        except ValueError:
            raise ValueError(f"not an IP address: {value!r} (e.g. 127.0.0.1, 10.0.8.4, 0.0.0.0 or ::)") from None


class StoreSettings(_Frozen):
    max_tasks: int = Field(
        default=100_000, ge=10,
        description="tasks and results the store holds at most; at the bound intake pauses (see the route's `qos`)")
    max_bytes: int = Field(
        default=512 * 1024 * 1024, ge=1024 * 1024, description="bytes of payloads and results the store holds at most")
    synchronous: Literal["full", "normal"] = Field(
        default="full",
        description="`full` fsyncs every group commit (survives power cuts); `normal` survives process crashes only")
    # Fewer commits cost less CPU at moderate rates; a backlog fills its groups at once and never waits.
    commit_interval_ms: float = Field(
        default=4.0, ge=0, le=100,
        description="least spacing of group commits, from the start of the previous one (16 new rows go at "
        "once); 0: commit as soon as the previous one is done")
    state_interval_s: float = Field(
        default=300.0, ge=0, le=86_400,
        description="seconds between saves of what tasks keep between messages (`sensor.stats` windows), "
        "besides the save at a clean stop; a power cut loses at most this much of it; 0: only at a clean stop")


class DeadLetterSettings(_Frozen):
    # Dead letters are rare but a misconfigured device can send nothing else: the bound keeps the newest.
    max_count: int = Field(
        default=10_000, ge=0, le=10_000_000,
        description="dead letters whose payload the store keeps for `edge-agent dead-letters` (show, replay); "
        "beyond it the oldest are dropped; 0: keep none")
    max_bytes: int = Field(
        default=64 * 1024 * 1024, ge=0, le=64 * 1024 * 1024 * 1024,
        description="bytes of dead-letter payloads the store keeps at most, beside `EDGE_AGENT_STORE__MAX_BYTES`; "
        "beyond it the oldest are dropped")


class LogSettings(_Frozen):
    level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="least level logged")
    format: Literal["auto", "json", "console"] = Field(
        default="auto", description="`auto`: JSON lines when stderr is not a terminal (journald), console otherwise")


class KindPrior(_Frozen):
    """What the agent assumes about one task kind before it has measured it (docs/design.md#decision-model).

    Service time is modelled as ``fixed_s + per_byte_s × input bytes`` on each side; measurements replace these
    numbers within a few dozen executions, so they only need to be the right order of magnitude. The settings
    form of ``agent.decision.KindParams``.
    """

    local_fixed_s: float = Field(ge=0, le=3600, description="service time on the gateway, fixed part (s)")
    local_per_byte_s: float = Field(ge=0, le=1, description="service time on the gateway per input byte (s)")
    cloud_fixed_s: float = Field(ge=0, le=3600, description="service time in the cloud, fixed part (s)")
    cloud_per_byte_s: float = Field(ge=0, le=1, description="service time in the cloud per input byte (s)")
    out_bytes: int = Field(ge=0, le=256 * 1024 * 1024, description="size of a result, for the download term")

    @classmethod
    def from_params(cls, params: KindParams) -> KindPrior:
        return cls(local_fixed_s=params.local_fixed_s, local_per_byte_s=params.local_per_byte_s,
                   cloud_fixed_s=params.cloud_fixed_s, cloud_per_byte_s=params.cloud_per_byte_s,
                   out_bytes=params.out_bytes)

    def as_params(self) -> KindParams:
        return KindParams(local_fixed_s=self.local_fixed_s, local_per_byte_s=self.local_per_byte_s,
                          cloud_fixed_s=self.cloud_fixed_s, cloud_per_byte_s=self.cloud_per_byte_s,
                          out_bytes=self.out_bytes)


def _default_kind_priors() -> dict[str, KindPrior]:
    return {name: KindPrior.from_params(params) for name, params in DEFAULT_KINDS.items()}


# The model's own defaults (agent/decision/params.py, where each is explained) are the settings' defaults.
_DEFAULT = DecisionParams()


class DecisionSettings(_Frozen):
    """Priors and tuning of the total-time model (docs/design.md#decision-model), validated and documented as
    settings; :meth:`as_params` turns them into what ``agent.decision.Policy`` reads."""

    kinds: dict[str, KindPrior] = Field(
        default_factory=_default_kind_priors,
        description="service-time and result-size priors per task kind, as JSON (keys below); `*` stands for "
        "every kind not listed and is added when missing")
    uplink_mbps: float = Field(
        default=_DEFAULT.uplink_mbps, gt=0, le=100_000, description="uplink bandwidth before any measurement")
    downlink_mbps: float = Field(
        default=_DEFAULT.downlink_mbps, gt=0, le=100_000, description="downlink bandwidth before any measurement")
    rtt_s: float = Field(
        default=_DEFAULT.rtt_s, ge=0, le=60, description="round trip to the resource API before any measurement")
    provisioning_s: float = Field(
        default=_DEFAULT.provisioning_s, ge=0, le=3600,
        description="time to bring a compute lease to ready, before any measurement")
    cloud_slots: int = Field(
        default=_DEFAULT.cloud_slots, ge=1, le=1024,
        description="tasks a lease runs at once until the lease manager reports its real size: the cloud queue "
        "wait is the queued cloud work over this")
    margin_s: float = Field(
        default=_DEFAULT.margin_s, ge=0, le=60,
        description="offload only when the cloud is expected to be faster by more than this (seconds) ...")
    margin_ratio: float = Field(
        default=_DEFAULT.margin_ratio, ge=0, le=1,
        description="... or by this share of the local total, if larger")
    network_half_life_s: float = Field(
        default=_DEFAULT.network_half_life_s, gt=0, le=86_400,
        description="half-life (s) of the short-term bandwidth and RTT estimates; with no new sample they fall "
        "back to the long-term ones, so a recovered (or slowed) link is noticed")
    baseline_half_life_s: float = Field(
        default=_DEFAULT.baseline_half_life_s, gt=0, le=864_000,
        description="half-life (s) with which the long-term network estimates age toward the priors")
    service_memory: int = Field(
        default=_DEFAULT.service_memory, ge=2, le=100_000,
        description="executions a service-time fit remembers: a gateway that got slower (thermal throttling) is "
        "learned within about this many tasks of the kind")
    service_half_life_s: float = Field(
        default=_DEFAULT.service_half_life_s, gt=0, le=864_000,
        description="half-life (s) with which a kind not run on one side for a while ages back toward its prior")
    probe_interval_s: float = Field(
        default=_DEFAULT.probe_interval_s, ge=0, le=86_400,
        description="with no cloud result for this long, one small task goes to the cloud as a probe to refresh "
        "RTT and bandwidth; doubles (up to 16x) while probes never lead to offloading; 0: no probes")
    probe_budget_s: float = Field(
        default=_DEFAULT.probe_budget_s, ge=0, le=3600,
        description="a probe is a task expected to take at most this much longer in the cloud, provisioning aside")

    @field_validator("kinds")
    @classmethod
    def _fallback_kind(cls, value: dict[str, KindPrior]) -> dict[str, KindPrior]:
        if "*" not in value:
            # Operators list the kinds they know; unknown ones still need a prior.
            value = {**value, "*": KindPrior.from_params(DEFAULT_KINDS["*"])}
        return value

    def as_params(self) -> DecisionParams:
        """The settings as the model's parameters: the one way from the settings to a ``Policy``, whose
        constructor and ``reconfigure`` call it when given these settings (docs/design.md#policy-interface)."""
        return DecisionParams(
            kinds={name: prior.as_params() for name, prior in self.kinds.items()},
            uplink_mbps=self.uplink_mbps,
            downlink_mbps=self.downlink_mbps,
            rtt_s=self.rtt_s,
            provisioning_s=self.provisioning_s,
            cloud_slots=self.cloud_slots,
            margin_s=self.margin_s,
            margin_ratio=self.margin_ratio,
            network_half_life_s=self.network_half_life_s,
            baseline_half_life_s=self.baseline_half_life_s,
            service_memory=self.service_memory,
            service_half_life_s=self.service_half_life_s,
            probe_interval_s=self.probe_interval_s,
            probe_budget_s=self.probe_budget_s,
        )


class _Sourced(BaseSettings):
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
            sources.append(_credentials(file_secret_settings, credentials))
        for source in sources:
            if isinstance(source, EnvSettingsSource):
                # What load_settings reports is not read: the rest validates as if it were not there, so a typo
                # in a section is one line in the operator's words rather than a second, cryptic one.
                source.env_vars = {name: value for name, value in source.env_vars.items()
                                   if _screen(name, value) is None}
        if isinstance(env_settings, EnvSettingsSource):
            _hide_file_copies(env_settings)
        return tuple(sources)


def _credentials(file_secret_settings: PydanticBaseSettingsSource, directory: str) -> NestedSecretsSettingsSource:
    # Credential files are named like the variable: EDGE_AGENT_MQTT__PASSWORD, EDGE_AGENT_CLOUD__TOKEN.
    return NestedSecretsSettingsSource(
        file_secret_settings,
        secrets_dir=directory,
        secrets_prefix=ENV_PREFIX,
        secrets_nested_delimiter="__",
        secrets_dir_missing="ok",
    )


class Settings(_Sourced):
    """All settings of one agent. Built by :func:`load_settings`."""

    agent_id: str = Field(
        default_factory=_default_agent_id,
        description="this gateway's id: a level of its result, dead-letter and status topics, and part of the "
        "MQTT client id")
    mqtt: MqttSettings = MqttSettings()
    routes: list[Route] = Field(
        default_factory=_default_routes,
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



class _RoutesOnly(_Sourced):
    """The routes alone, read from the same sources: their tasks and options are checked, and reported with
    everything else, even when another setting is bad."""

    routes: list[Route] = Field(default_factory=_default_routes)


# --- Names: which variables are settings ------------------------------------------------------------------------


def strip_optional(annotation: Any) -> Any:
    """``X | None`` → ``X``; any other annotation as it is."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _model(annotation: Any) -> type[BaseModel] | None:
    annotation = strip_optional(annotation)
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _entry_model(annotation: Any) -> type[BaseModel] | None:
    """The model of each entry of a JSON object setting (``dict[str, KindPrior]`` → KindPrior)."""
    annotation = strip_optional(annotation)
    return _model(get_args(annotation)[1]) if get_origin(annotation) is dict else None


def leaves(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """Every setting as (dotted path, field), nested models flattened in declaration order."""
    for name, field in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        inner = _model(field.annotation)
        if inner is not None:
            yield from leaves(inner, path)
        else:
            yield path, field


def _sections(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """Every nested model's dotted path (``mqtt``, ``mqtt.tls``): each may also be given whole as JSON."""
    for name, field in model.model_fields.items():
        inner = _model(field.annotation)
        if inner is not None:
            path = f"{prefix}.{name}" if prefix else name
            yield path
            yield from _sections(inner, path)


def variable(path: str) -> str:
    """The variable of a dotted setting path: ``mqtt.tls.ca_file`` → ``EDGE_AGENT_MQTT__TLS__CA_FILE``."""
    return ENV_PREFIX + path.replace(".", "__").upper()


def _prefixed(name: str) -> bool:
    return name[: len(ENV_PREFIX)].upper() == ENV_PREFIX


def _target(name: str) -> Any:
    """What a variable sets (a section's model, a setting's type, an entry of a JSON object setting), or None
    when it sets nothing. Case-insensitive, as the settings are."""
    annotation: Any = Settings
    for part in name[len(ENV_PREFIX):].lower().split("__"):
        model = _model(annotation)
        if model is not None:
            field = model.model_fields.get(part)
            if field is None:
                return None
            annotation = field.annotation
        elif get_origin(strip_optional(annotation)) is dict and part:
            # pydantic-settings fills a JSON object setting key by key: EDGE_AGENT_DECISION__KINDS__<kind>[__<key>]
            annotation = get_args(strip_optional(annotation))[1]
        else:
            return None
    return strip_optional(annotation)


UNKNOWN = "unknown setting"


def _screen(name: str, value: str | None) -> str | None:
    """Why the agent will not read the variable ``name``: it is no setting (:data:`UNKNOWN`), or its value is not
    the JSON it must be. None when it will, and for names outside the prefix or in :data:`NOT_SETTINGS`."""
    if not _prefixed(name) or name.upper() in NOT_SETTINGS:
        return None
    target = _target(name)
    if target is None:
        return UNKNOWN
    if value is not None and (_model(target) is not None or get_origin(target) in (list, dict)):
        try:
            json.loads(value)
        except json.JSONDecodeError as exc:
            return f"not valid JSON ({exc})"
        except (ValueError, RecursionError):
            return "not valid JSON"
    return None


def closest(given: str, choices: Iterable[str]) -> list[str]:
    """The choices ``given`` most likely misspells: one equal to it but for case and the number of underscores
    in a row (``MQTT_HOST`` for ``MQTT__HOST``), else the most similar ones (difflib), at most three."""

    def fold(text: str) -> str:
        return re.sub("_+", "_", text.upper())

    unique = list(dict.fromkeys(choices))
    same = [choice for choice in unique if fold(choice) == fold(given)]
    if same:
        return same[:3]
    scored = sorted(((difflib.SequenceMatcher(None, given.upper(), choice.upper()).ratio(), choice)
                     for choice in unique), key=lambda pair: (-pair[0], pair[1]))
    best = scored[0][0] if scored else 0.0
    return [choice for ratio, choice in scored if ratio >= max(0.6, best - 0.02)][:3]


def suggestion(found: Sequence[str]) -> str:
    """`` — did you mean X?`` (or ``X or Y?``), or nothing when nothing was found."""
    if not found:
        return ""
    listed = found[0] if len(found) == 1 else f"{', '.join(found[:-1])} or {found[-1]}"
    return f" — did you mean {listed}?"


def did_you_mean(given: str, choices: Iterable[str]) -> str:
    """:func:`suggestion` of the :func:`closest` choices."""
    return suggestion(closest(given, choices))


def _setting_names(given: str) -> list[str]:
    """Every variable name that sets something, as suggestions for ``given``; below a JSON object setting of
    models, the keys of an entry under the entry name given."""
    names = [variable(path) for path in _sections(Settings)] + [variable(path) for path, _ in leaves(Settings)]
    upper = given.upper()
    for path, field in leaves(Settings):
        entry = _entry_model(field.annotation)
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
    yield "the environment", _hide_file_copies(EnvSettingsSource(Settings))
    if env_file is not None:
        yield str(env_file), DotEnvSettingsSource(Settings, env_file=env_file)
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials and Path(credentials).is_dir():
        try:
            yield f"the credentials in {credentials}", _credentials(SecretsSettingsSource(Settings), credentials)
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
            reason = _screen(name, value)
            if reason == UNKNOWN:
                unknown.setdefault(name.upper(), []).append(place)
            elif reason is not None:
                problems.append((name.upper(), reason))
    return [_unknown_setting(name, places) for name, places in unknown.items()] + problems


# --- Loading ------------------------------------------------------------------------------------------------------

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
        model = _model(annotation)
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
    return _model(annotation)


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
        return _RoutesOnly(_env_file=env_file).routes
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


# --- Reloading ----------------------------------------------------------------------------------------------------

# Environment names (lower case) that are copies of the env file's lines, set only while Sources.reload reads: the
# environment source leaves them out, so the file as it is now decides.
_file_copies: ContextVar[frozenset[str]] = ContextVar("_file_copies", default=frozenset())


def _hide_file_copies(source: EnvSettingsSource) -> EnvSettingsSource:
    hidden = _file_copies.get()
    if hidden:
        source.env_vars = {name: value for name, value in source.env_vars.items() if name.lower() not in hidden}
    return source


def _environment() -> dict[str, str]:
    return {name.lower(): value for name, value in os.environ.items() if _prefixed(name)}


def _file_lines(env_file: Path | None) -> dict[str, str]:
    """The env file's ``EDGE_AGENT_*`` lines as the agent reads them (lower-case names); {} without a file."""
    if env_file is None or not env_file.is_file():
        return {}
    lines = DotEnvSettingsSource(Settings, env_file=env_file).env_vars
    return {name.lower(): value for name, value in lines.items() if _prefixed(name) and value is not None}


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
        token = _instance.set(self.instance)
        try:
            return load_settings(self.env_file, explicit=self.explicit, check_routes=self.check_routes)
        finally:
            _instance.reset(token)

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
        token = _file_copies.set(self._copies)
        try:
            settings = self._load()
        finally:
            _file_copies.reset(token)
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


def _redact_input(loc: tuple[int | str, ...], given: object) -> object:
    return "**********" if loc and str(loc[-1]) in {"password", "token"} else given


def _plain(message: str) -> str:
    # pydantic prefixes custom messages with "Value error, "; operators do not need it.
    return message.removeprefix("Value error, ")


def redacted(settings: Settings) -> dict[str, Any]:
    """The effective settings as plain data with every secret replaced by ``**********``."""
    data: dict[str, Any] = settings.model_dump(mode="json")
    for section, key in (("mqtt", "password"), ("cloud", "token")):
        if data[section][key] is not None:
            data[section][key] = "**********"
    data["client_id"] = settings.client_id
    return data

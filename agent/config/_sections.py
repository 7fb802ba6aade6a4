"""The sections of the settings that need no more than their own fields: the gateway's workers, the resource API
client, the metrics endpoint, the store, the dead letters and the log; and what every section shares."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator


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


class Frozen(BaseModel):
    """A section: immutable, and a key it does not know is an error rather than silently ignored."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class LocalSettings(Frozen):
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=256,
                         description="worker processes for heavy tasks on the gateway")


class CloudSettings(Frozen):
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
    retry_min_s: float = Field(
        default=0.2, gt=0, le=60,
        description="shortest retry delay: retry n waits between min·2^(n-1) and min·2^n (jittered), up to the longest")
    retry_max_s: float = Field(
        default=5.0, gt=0, le=600,
        description="longest retry delay (at least RETRY_MIN_S); once reached, a retry waits between half of it and it")
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

    # A field validator, not a model one: the error then names EDGE_AGENT_CLOUD__RETRY_MAX_S, not the section.
    @field_validator("retry_max_s")
    @classmethod
    def _retry_bounds(cls, value: float, info: ValidationInfo) -> float:
        low = info.data.get("retry_min_s")  # absent when RETRY_MIN_S itself was refused
        if low is not None and value < low:
            raise ValueError(f"must be at least EDGE_AGENT_CLOUD__RETRY_MIN_S ({low:g})")
        return value


class MetricsSettings(Frozen):
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


class StoreSettings(Frozen):
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


class DeadLetterSettings(Frozen):
    # Dead letters are rare but a misconfigured device can send nothing else: the bound keeps the newest.
    max_count: int = Field(
        default=10_000, ge=0, le=10_000_000,
        description="dead letters whose payload the store keeps for `edge-agent dead-letters` (show, replay); "
        "beyond it the oldest are dropped; 0: keep none")
    max_bytes: int = Field(
        default=64 * 1024 * 1024, ge=0, le=64 * 1024 * 1024 * 1024,
        description="bytes of dead-letter payloads the store keeps at most, beside `EDGE_AGENT_STORE__MAX_BYTES`; "
        "beyond it the oldest are dropped")


class LogSettings(Frozen):
    level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="least level logged")
    format: Literal["auto", "json", "console"] = Field(
        default="auto", description="`auto`: JSON lines when stderr is not a terminal (journald), console otherwise")


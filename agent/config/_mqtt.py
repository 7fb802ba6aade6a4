"""The MQTT section: the brokers (one, or several to fail over between), the session and TLS."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator

from agent.config._sections import Frozen, readable_file
from agent.mqtt.topics import validate_shared_group


class TlsSettings(Frozen):
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


class MqttSettings(Frozen):
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
    # The MQTT standard has a broker re-send an unacknowledged message under its original packet id; RabbitMQ 3.10
    # numbers a session's deliveries afresh on every connection, so its redeliveries come under new ids.
    renumbered_redeliveries: bool = Field(
        default=False,
        description="the broker re-sends unacknowledged messages under new packet ids after a reconnect "
        "(RabbitMQ 3.10 does; the MQTT standard forbids it): recognise such redeliveries by topic and payload, "
        "so a message committed before the reconnect does not run again under a second task id. Then a device "
        "that publishes the very same payload on the same topic again, and has it redelivered, may have that "
        "copy taken for the first (docs/fleets.md)")
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
    reconnect_min_s: float = Field(
        default=0.5, gt=0, description="shortest reconnect delay: reconnect n waits between min·2^(n-1) and "
        "min·2^n (jittered), up to the longest")
    reconnect_max_s: float = Field(
        default=60.0, gt=0, description="longest reconnect delay (at least RECONNECT_MIN_S); once reached, a "
        "reconnect waits between half of it and it")

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

    # A field validator, not the model one below: the error then names EDGE_AGENT_MQTT__RECONNECT_MAX_S.
    @field_validator("reconnect_max_s")
    @classmethod
    def _reconnect_bounds(cls, value: float, info: ValidationInfo) -> float:
        low = info.data.get("reconnect_min_s")  # absent when RECONNECT_MIN_S itself was refused
        if low is not None and value < low:
            raise ValueError(f"must be at least EDGE_AGENT_MQTT__RECONNECT_MIN_S ({low:g})")
        return value

    @model_validator(mode="after")
    def _brokers(self) -> MqttSettings:
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

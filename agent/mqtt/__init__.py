"""The agent's MQTT side (docs/design.md#mqtt-contract): one paho client on the event loop.

- ``topics``: pure topic names and filters (validation, matching, the shared form, the agent's own topics);
- ``tls``: the TLS context and credentials, our certificate's expiry, connect errors in words;
- ``wire``: the lean wire path, the only module that touches paho's private names;
- ``pump``: paho's external-loop interface driven by the asyncio loop;
- ``session``: the subscriptions after every CONNACK, the broker's answers, leaving, ending the session;
- ``inbound``: device messages as paho hands them over, converted at once into ``InboundMessage``;
- ``failover``: which of several brokers to try next, and why each one last failed;
- ``link``: ``MqttLink``: connect, supervise, subscribe, acknowledge, send;
- ``surface``: ``Link``, what the daemon uses of it, and ``LinkFactory`` (Protocols: tests stand in for it).

The names below are re-exported lazily: ``agent.config`` imports ``agent.mqtt.topics`` to validate routes,
and importing the package must then load neither paho nor the settings it is still building.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from agent.mqtt.topics import (
    dead_letter_topic,
    results_topic,
    status_topic,
    subscription_filter,
    topic_matches,
    validate_topic_filter,
)

if TYPE_CHECKING:
    from agent.mqtt.inbound import InboundMessage
    from agent.mqtt.link import MqttLink
    from agent.mqtt.surface import Flag, Link, LinkFactory
    from agent.mqtt.tls import certificate_expiry, explain_connect_error, tls_context
    from agent.mqtt.wire import Outgoing

__all__ = [
    "Flag",
    "InboundMessage",
    "Link",
    "LinkFactory",
    "MqttLink",
    "Outgoing",
    "certificate_expiry",
    "dead_letter_topic",
    "explain_connect_error",
    "results_topic",
    "status_topic",
    "subscription_filter",
    "tls_context",
    "topic_matches",
    "validate_topic_filter",
]

_LAZY = {
    "InboundMessage": "inbound",
    "MqttLink": "link",
    "certificate_expiry": "tls",
    "explain_connect_error": "tls",
    "tls_context": "tls",
    "Outgoing": "wire",
    "Flag": "surface",
    "Link": "surface",
    "LinkFactory": "surface",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'agent.mqtt' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"agent.mqtt.{module}"), name)
    globals()[name] = value
    return value

"""MQTT topic names and filters, pure: validation, matching, the shared form and the agent's own topics.

Every module that builds or matches a topic takes it from here (docs/design.md#mqtt-contract), so the contract's
names are written once. Imports nothing of the agent and nothing of paho: ``agent.config`` validates routes
with it before any I/O is loaded.
"""

from __future__ import annotations

SHARED_PREFIX = "$share/"


def validate_topic_filter(value: str) -> str:
    """Check an MQTT topic filter (``+`` and ``#`` only as whole levels, ``#`` last); the plain form only."""
    if not value:
        raise ValueError("a topic filter must not be empty")
    if value.startswith(SHARED_PREFIX):
        raise ValueError("give the plain filter; EDGE_AGENT_MQTT__SHARED_GROUP adds the $share prefix")
    if "\x00" in value or len(value.encode()) > 65535:
        raise ValueError("a topic filter must be valid UTF-8 without NUL and at most 65535 bytes")
    levels = value.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"'#' must be a whole level and the last one in {value!r}")
        if "+" in level and level != "+":
            raise ValueError(f"'+' must be a whole level in {value!r}")
    return value


def validate_shared_group(value: str) -> str:
    """A shared subscription's group name: one level, no wildcards (MQTT 5 §4.8.2)."""
    if not value or any(c in value for c in "/+#"):
        raise ValueError("a shared group name must be non-empty without '/', '+' or '#'")
    return value


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching (``+`` one level, ``#`` the rest); ``$``-topics never match a leading wildcard.

    ``topic_filter`` is the plain form (a ``$share/<group>/`` prefix is the broker's business, not part of
    what matches)."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for i, level in enumerate(f_levels):
        if level == "#":
            return True
        if i >= len(t_levels):
            return False
        if level != "+" and level != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


def subscription_filter(topic_filter: str, shared_group: str | None) -> str:
    """The filter as subscribed: ``$share/<group>/<filter>`` when the agents of a group split the messages."""
    return f"{SHARED_PREFIX}{shared_group}/{topic_filter}" if shared_group else topic_filter


def results_topic(agent_id: str, topic: str) -> str:
    """Where the result of a message on ``topic`` goes: ``edge/<agent_id>/results/<topic>``."""
    return f"edge/{agent_id}/results/{topic}"


def dead_letter_topic(agent_id: str, topic: str) -> str:
    """Where a dead letter of a message on ``topic`` goes: ``edge/<agent_id>/dead-letter/<topic>``."""
    return f"edge/{agent_id}/dead-letter/{topic}"


def status_topic(agent_id: str) -> str:
    """The retained ``online``/``offline`` status (and last will): ``edge/<agent_id>/status``."""
    return f"edge/{agent_id}/status"


def results_filter(agent_id: str) -> str:
    """Every result of one agent (consumers such as the demo's watcher)."""
    return results_topic(agent_id, "#")


def dead_letters_filter(agent_id: str) -> str:
    """Every dead letter of one agent."""
    return dead_letter_topic(agent_id, "#")

"""agent.mqtt.topics: pure topic names and filters, without a broker (docs/design.md#mqtt-contract)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.mqtt import topics
from agent.mqtt.topics import (
    dead_letter_topic,
    dead_letters_filter,
    results_filter,
    results_topic,
    status_topic,
    subscription_filter,
    topic_matches,
    validate_shared_group,
    validate_topic_filter,
)


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("city/+/traffic/+/data", "city/aarhus/traffic/158324/data", True),
        ("city/+/traffic/+/data", "city/aarhus/traffic/158324/data/x", False),
        ("city/+/traffic/+/data", "city/aarhus/noise/1/data", False),
        ("city/#", "city", True),  # '#' also matches the parent level
        ("city/#", "city/a/b/c", True),
        ("city/#", "cityscape/a", False),
        ("#", "city/a", True),
        ("#", "/leading/slash", True),
        ("+/leading/slash", "/leading/slash", True),  # the empty first level is a level
        ("+", "a/b", False),
        ("+/+", "a/", True),
        ("a/+", "a/", True),  # an empty level matches '+'
        ("a/+", "a", False),
        ("a/+/#", "a/b", True),
        ("a/b", "a/b", True),
        ("a/b", "A/b", False),  # case matters
        ("a/b", "a/b/", False),
        # $-topics (MQTT 3.1.1 §4.7.2, MQTT 5 §4.7.2) never match a filter that starts with a wildcard.
        ("#", "$SYS/broker/load", False),
        ("+/broker/load", "$SYS/broker/load", False),
        ("+/a", "$share/a", False),
        ("$SYS/#", "$SYS/broker/load", True),
        ("$SYS/+/load", "$SYS/broker/load", True),
        ("a/#", "a/$x", True),  # '$' only counts in the first level
    ],
)
def test_topic_matches(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


@given(st.lists(st.text(alphabet="abc$", max_size=3), min_size=1, max_size=5))
def test_a_topic_matches_itself_hash_and_its_own_levels_as_plus(levels: list[str]) -> None:
    topic = "/".join(levels)
    assert topic_matches(topic, topic)
    dollar = topic.startswith("$")
    assert topic_matches("#", topic) is not dollar
    assert topic_matches("/".join("+" for _ in levels), topic) is not dollar
    assert topic_matches(f"{levels[0]}/#", topic)
    assert not topic_matches(topic + "/x", topic)


@pytest.mark.parametrize("good", ["a", "a/b/c", "+", "#", "+/+/#", "city/+/noise/+/pcm", "/", "a//b", "$SYS/#"])
def test_valid_filters_are_returned_unchanged(good: str) -> None:
    assert validate_topic_filter(good) == good


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("", "must not be empty"),
        ("a/#/b", "'#' must be a whole level and the last one"),
        ("a#", "'#' must be a whole level"),
        ("a/b+", "'+' must be a whole level"),
        ("a+/b", "'+' must be a whole level"),
        ("a/\x00", "without NUL"),
        ("x" * 65536, "at most 65535 bytes"),
        ("$share/g/city/#", "EDGE_AGENT_MQTT__SHARED_GROUP adds the $share prefix"),
    ],
)
def test_invalid_filters_are_refused_with_the_reason(bad: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_topic_filter(bad)


def test_shared_subscription_form() -> None:
    assert subscription_filter("city/#", "gateways") == "$share/gateways/city/#"
    assert subscription_filter("city/+/noise/+/pcm", "g") == "$share/g/city/+/noise/+/pcm"
    assert subscription_filter("city/#", None) == "city/#"
    assert subscription_filter("city/#", "") == "city/#"  # no group: the plain filter


@pytest.mark.parametrize("bad", ["", "a/b", "a+", "#"])
def test_shared_group_names_are_one_level_without_wildcards(bad: str) -> None:
    with pytest.raises(ValueError, match="shared group name"):
        validate_shared_group(bad)
    assert validate_shared_group("gateways-1") == "gateways-1"


def test_the_agents_own_topics_are_the_contracts() -> None:
    assert results_topic("gw", "city/a/traffic/1/data") == "edge/gw/results/city/a/traffic/1/data"
    assert dead_letter_topic("gw", "city/a/x") == "edge/gw/dead-letter/city/a/x"
    assert status_topic("gw") == "edge/gw/status"
    assert results_filter("gw") == "edge/gw/results/#"
    assert dead_letters_filter("gw") == "edge/gw/dead-letter/#"
    # A result and a dead letter are told apart by filter, the way a consumer subscribes.
    assert topic_matches(results_filter("gw"), results_topic("gw", "a/b"))
    assert not topic_matches(results_filter("gw"), dead_letter_topic("gw", "a/b"))
    assert topic_matches(dead_letters_filter("gw"), dead_letter_topic("gw", "a/b"))
    assert not topic_matches(results_filter("gw"), status_topic("gw"))


def test_the_package_re_exports_the_topic_names() -> None:
    import agent.mqtt

    for name in ("results_topic", "dead_letter_topic", "status_topic", "subscription_filter", "topic_matches",
                 "validate_topic_filter"):
        assert getattr(agent.mqtt, name) is getattr(topics, name)
    for name in agent.mqtt.__all__:
        assert getattr(agent.mqtt, name) is not None


def test_importing_the_topics_or_the_settings_loads_no_paho() -> None:
    # agent.config validates routes with agent.mqtt.topics: the package must not pull in paho (or the link)
    # on the way, nor import agent.config back while it is half built.
    code = ("import sys, agent.mqtt.topics, agent.config; "
            "print(sorted(m for m in sys.modules if m.startswith(('paho', 'agent.mqtt.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['agent.mqtt.topics']"

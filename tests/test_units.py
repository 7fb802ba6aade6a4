"""Pure pieces: routing, backoff, hand-off between threads, message encoding."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.backoff import compute_backoff
from agent.config import Route
from agent.egress import dead_letter, result_message
from agent.health import health
from agent.ingress import Router


def test_router_first_match_wins_and_caches() -> None:
    router = Router([Route(topic="city/+/noise/+/pcm", task="noise.spectrum"),
                     Route(topic="city/#", task="sensor.stats", window=10)])
    noise = router.match("city/a/noise/1/pcm")
    assert noise is not None and noise.task == "noise.spectrum"
    other = router.match("city/a/traffic/1/data")
    assert other is not None and other.task == "sensor.stats" and other.options == {"window": 10}
    assert router.match("elsewhere/x") is None
    assert router.match("city/a/noise/1/pcm") is noise
    # What a stored row keeps of its route's options: JSON built once per route, None when there are none.
    assert router.stored_options == {"city/+/noise/+/pcm": None, "city/#": '{"window":10}'}


# No deadline: the first examples pay for hypothesis's own start-up, which a loaded machine stretches past 200 ms.
@settings(deadline=None)
@given(st.integers(min_value=1, max_value=200), st.floats(min_value=0.01, max_value=5),
       st.floats(min_value=5, max_value=600), st.floats(min_value=0, max_value=1))
def test_backoff_grows_with_jitter_and_stays_capped(attempt: int, low: float, high: float, jitter: float) -> None:
    delay = compute_backoff(attempt, low, high, jitter)
    step = min(high, low * 2 ** min(attempt, 30))
    assert low <= delay <= high
    assert step / 2 <= delay <= step


def test_backoff_has_jitter() -> None:
    rng = random.Random(1)
    assert len({round(compute_backoff(5, 0.5, 60, rng.random()), 6) for _ in range(20)}) > 10


def test_result_and_dead_letter_shapes() -> None:
    topic, body = result_message(
        "gw1", task_id="abc", kind="sensor.stats", topic="city/a/traffic/1/data", placement="local",
        decision={"t_local_s": None, "t_cloud_s": None, "reason": "no_cloud"},
        timings={"queued_s": 0.1, "exec_s": 0.01, "total_s": 0.2}, result={"fields": {}},
    )
    assert topic == "edge/gw1/results/city/a/traffic/1/data"
    assert set(json.loads(body)) == {"task_id", "kind", "topic", "placement", "decision", "timings", "result"}
    topic, body = dead_letter("gw1", "city/a/x", "invalid_json", "bad", 12, 1.5, 7)
    assert topic == "edge/gw1/dead-letter/city/a/x"
    assert json.loads(body) == {"topic": "city/a/x", "reason": "invalid_json", "detail": "bad", "size": 12,
                                "received_at": 1.5, "id": 7}


def test_results_stay_strict_json() -> None:
    _, body = result_message("gw", task_id="a", kind="k", topic="t", placement="local", decision={},
                             timings={}, result={"x": float("nan"), "y": float("inf")})
    assert json.loads(body, parse_constant=lambda c: pytest.fail(f"{c} in a result"))["result"] == {"x": None,
                                                                                                      "y": None}
    with pytest.raises(TypeError):
        result_message("gw", task_id="a", kind="k", topic="t", placement="local", decision={},
                       timings={}, result={"x": {1, 2}})


def test_health_fails_when_any_loop_is_stuck() -> None:
    assert health(0.5, True, True) == (True, "ok")
    assert health(30.0, True, True) == (False, "event loop stuck")
    assert health(0.5, False, True) == (False, "MQTT link stuck")
    assert health(30.0, False, False) == (False, "event loop stuck; MQTT link stuck; store writer stuck")

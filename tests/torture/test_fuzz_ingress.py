"""Fuzzing through the real ingress: hypothesis writes device messages, a real Mosquitto carries them to the
agent running as a process, and every message must come back as a result or a dead letter with a reason.

Each example publishes on its own topic inside the routes (the device-id level is a unique marker) and the
result or dead letter names the original topic, so each answer is matched to its input. Where the contract
says what a message must give (docs/design.md#mqtt-contract and #tasks), the answer is checked against it; a
``task_failed`` (a task crashing on its input) is never acceptable. At the end the daemon must still be alive,
healthy, have answered each message exactly once, and stop cleanly.

``FUZZ_EXAMPLES`` raises the number of examples for a longer run.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import env_int, http_status
from support import Agent, Collector, Mosquitto, free_port, publisher, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES = env_int("FUZZ_EXAMPLES", 300)
MAX_PAYLOAD = 65_536
MAX_READINGS = 1024  # sensor.stats refuses messages with more numeric readings (README: split it up)
ANSWER_TIMEOUT_S = 20.0

SENSOR_ROUTE = {"topic": "city/+/fuzz/+/data", "task": "sensor.stats", "window": 5}
NOISE_ROUTE = {"topic": "city/+/noise/+/pcm", "task": "noise.spectrum", "placement": "local"}

RESULT = "result"
ANY_SENSOR = frozenset({RESULT, "invalid_json", "invalid_payload"})
INVALID_JSON = frozenset({"invalid_json"})
INVALID_PAYLOAD = frozenset({"invalid_payload"})
OK = frozenset({RESULT})
TOO_LARGE = frozenset({"too_large"})


@dataclass(frozen=True)
class Case:
    """One device message and what the contract allows as its answer."""

    route: str  # "sensor" or "noise"
    payload: bytes
    allowed: frozenset[str]
    fields: frozenset[str] | None = None  # for a sensor.stats result: exactly these field names
    note: str = ""


# ---------------------------------------------------------------------------------------------- strategies

# Topic levels as devices might send them: any Unicode a broker accepts in a topic (no wildcards, no '/',
# no NUL or other control characters, which Mosquitto refuses), empty levels included.
topic_level = st.text(
    st.characters(blacklist_categories=("Cs", "Cc", "Cn"), blacklist_characters="/+#"), max_size=20)


def is_reading(value: Any) -> bool:
    """What sensor.stats takes as a reading from a JSON object (docs/design.md#tasks)."""
    if type(value) is int:
        return True
    if type(value) is float:
        return math.isfinite(value)
    if type(value) is str:
        try:
            number = float(value)
        except ValueError:
            return False
        return math.isfinite(number)
    return False


def has_non_finite(value: Any) -> bool:
    if type(value) is float:
        return not math.isfinite(value)
    if isinstance(value, list):
        return any(has_non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(has_non_finite(v) for v in value.values())
    return False


def has_big_int(value: Any) -> bool:
    if type(value) is int:
        return not -(2**63) <= value < 2**64
    if isinstance(value, list):
        return any(has_big_int(v) for v in value)
    if isinstance(value, dict):
        return any(has_big_int(v) for v in value.values())
    return False


json_scalars = (st.none() | st.booleans() | st.integers() | st.floats()
                | st.sampled_from([2**63, 2**64, -(2**63) - 1, 10**308, 10**400, 1e308, 5e-324])
                | st.text(max_size=12) | st.sampled_from(["74", " 1.5 ", "1e3", "nan", "inf", "-0", "1_000", "0x10"]))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=5), max_leaves=25)


@st.composite
def json_object(draw: st.DrawFn) -> Case:
    """A JSON object of readings and other values, NaN/Infinity and huge integers included."""
    obj = draw(st.dictionaries(st.text(max_size=10), json_values, max_size=12))
    payload = json.dumps(obj, allow_nan=True).encode()
    if has_non_finite(obj):
        return Case("sensor", payload, INVALID_JSON, note="NaN/Infinity literal")
    if has_big_int(obj):
        # Integers beyond 64 bits: orjson reads them as doubles, or refuses those beyond the double range.
        return Case("sensor", payload, ANY_SENSOR, note="huge integer")
    names = frozenset(k for k, v in obj.items() if is_reading(v))
    if not names:
        return Case("sensor", payload, INVALID_PAYLOAD, note="no reading")
    return Case("sensor", payload, OK, fields=names)


@st.composite
def any_json(draw: st.DrawFn) -> Case:
    value = draw(json_values)
    payload = json.dumps(value, allow_nan=True).encode()
    if has_non_finite(value):
        return Case("sensor", payload, INVALID_JSON)
    if has_big_int(value):
        return Case("sensor", payload, ANY_SENSOR, note="huge integer")
    if not isinstance(value, (dict, list)):
        return Case("sensor", payload, INVALID_PAYLOAD, note="a scalar")
    return Case("sensor", payload, ANY_SENSOR)


@st.composite
def random_bytes(draw: st.DrawFn) -> Case:
    route = draw(st.sampled_from(["sensor", "noise"]))
    payload = draw(st.binary(max_size=600))
    if route == "noise":
        allowed = OK if payload and len(payload) % 2 == 0 else INVALID_PAYLOAD
        return Case(route, payload, allowed)
    return Case(route, payload, INVALID_JSON if not payload else ANY_SENSOR)


@st.composite
def invalid_utf8(draw: st.DrawFn) -> Case:
    bad = draw(st.sampled_from([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\xf4\x90\x80\x80", b"\x80"]))
    where = draw(st.sampled_from(["value", "key"]))
    payload = (b'{"v": 1, "s": "a' + bad + b'"}') if where == "value" else (b'{"k' + bad + b'": 1, "v": 2}')
    return Case("sensor", payload, INVALID_JSON, note="invalid UTF-8")


@st.composite
def number_literals(draw: st.DrawFn) -> Case:
    """Numbers at the edges: non-finite literals, overflowing exponents, huge integers, denormals."""
    literal, allowed = draw(st.sampled_from([
        (b"NaN", INVALID_JSON), (b"Infinity", INVALID_JSON), (b"-Infinity", INVALID_JSON), (b"nan", INVALID_JSON),
        (b"1e400", INVALID_JSON), (b"-1e400", INVALID_JSON), (b"1e308", OK), (b"-1.7976931348623157e308", OK),
        (b"5e-324", OK), (b"-0.0", OK), (b"0", OK), (b"01", INVALID_JSON), (b"1.", INVALID_JSON), (b"+1", INVALID_JSON),
        (b'"NaN"', INVALID_PAYLOAD), (b'"1e400"', INVALID_PAYLOAD), (b'"12.5"', OK), (b"true", INVALID_PAYLOAD),
    ]))
    return Case("sensor", b'{"v": ' + literal + b"}", allowed, fields=frozenset({"v"}) if allowed == OK else None)


@st.composite
def huge_integers(draw: st.DrawFn) -> Case:
    digits = draw(st.integers(1, 500))
    sign = draw(st.sampled_from(["", "-"]))
    payload = b'{"v": ' + (sign + "9" * digits).encode() + b"}"
    if digits <= 18:
        return Case("sensor", payload, OK, fields=frozenset({"v"}))
    # Beyond 64 bits the parser reads a double (a result) or, past the double range, refuses the number.
    return Case("sensor", payload, frozenset({RESULT, "invalid_json", "invalid_payload"}))


@st.composite
def deep_nesting(draw: st.DrawFn) -> Case:
    depth = draw(st.integers(1, 3000) | st.integers(1015, 1035))
    opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
    inner = opener * depth + b"1" + closer * depth
    payload = b'{"v": 1, "deep": ' + inner + b"}"
    levels = depth + 1  # the outer object counts
    if levels < 1020:
        return Case("sensor", payload, OK, fields=frozenset({"v"}), note=f"depth {levels}")
    if levels > 1030:
        return Case("sensor", payload, INVALID_JSON, note=f"depth {levels}")
    return Case("sensor", payload, frozenset({RESULT, "invalid_json"}), note=f"depth {levels}")


@st.composite
def many_fields(draw: st.DrawFn) -> Case:
    """Huge JSON: objects with up to thousands of readings, around the per-message limit."""
    n = draw(st.integers(0, 3000) | st.integers(MAX_READINGS - 2, MAX_READINGS + 2))
    obj = {f"f{i}": i for i in range(n)}
    payload = json.dumps(obj).encode()
    if n == 0:
        return Case("sensor", payload, INVALID_PAYLOAD)
    if n > MAX_READINGS:
        return Case("sensor", payload, INVALID_PAYLOAD, note=f"{n} readings")
    return Case("sensor", payload, OK, fields=frozenset(obj), note=f"{n} readings")


@st.composite
def size_limit(draw: st.DrawFn) -> Case:
    """Payloads at, just over and far over EDGE_AGENT_MAX_PAYLOAD_BYTES, on both routes."""
    route = draw(st.sampled_from(["sensor", "noise"]))
    over = draw(st.sampled_from([-2, 0, 1, 2, MAX_PAYLOAD]))
    size = MAX_PAYLOAD + over
    if route == "noise":
        payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
        allowed = TOO_LARGE if over > 0 else OK
        return Case(route, payload, allowed, note=f"{size} bytes")
    head = b'{"v": 42, "pad": "'
    payload = head + b"x" * (size - len(head) - 2) + b'"}'
    assert len(payload) == size
    if over > 0:
        return Case(route, payload, TOO_LARGE, note=f"{size} bytes")
    return Case(route, payload, OK, fields=frozenset({"v"}), note=f"{size} bytes")  # "pad" is a label


finite = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12)
name_text = st.text(st.characters(blacklist_categories=["Cs"]), max_size=6)


@st.composite
def senml_valid(draw: st.DrawFn) -> Case:
    """Well-formed SenML packs (RFC 8428): base fields, relative times out of order, non-numeric records."""
    records: list[dict[str, Any]] = []
    names: set[str] = set()
    base = ""
    for _ in range(draw(st.integers(1, 8))):
        record: dict[str, Any] = {}
        if draw(st.booleans()):
            base = draw(name_text)
            record["bn"] = base
        if draw(st.booleans()):
            record["bt"] = draw(finite)
        if draw(st.booleans()):
            record["bv"] = draw(st.integers(-1000, 1000))
        if draw(st.booleans()):
            record["n"] = draw(name_text)
        if draw(st.booleans()):
            record["t"] = draw(finite)
        if draw(st.booleans()):
            record["u"] = draw(st.sampled_from(["Cel", "%RH", "count", "m/s"]))
        kind = draw(st.sampled_from(["v", "v", "vs", "vb", "vd", "s", "none"]))
        if kind == "v":
            full = base + record.get("n", "")
            if not full:
                record["n"] = full = "x"
            record["v"] = draw(st.integers(-(10**6), 10**6) | finite)
            names.add(full)
        elif kind == "vs":
            record["vs"] = draw(st.text(max_size=5))
        elif kind == "vb":
            record["vb"] = draw(st.booleans())
        elif kind == "vd":
            record["vd"] = "aGVsbG8"
        elif kind == "s":
            record["s"] = draw(st.integers(0, 100))
        records.append(record)
    payload = json.dumps(records).encode()
    if not names:
        return Case("sensor", payload, INVALID_PAYLOAD, note="SenML without a numeric record")
    return Case("sensor", payload, OK, fields=frozenset(names), note="SenML")


@st.composite
def senml_broken(draw: st.DrawFn) -> Case:
    """SenML packs that break the format in one record: each must be a dead letter, invalid_payload."""
    good = {"n": "temp", "v": 21.5}
    broken = draw(st.sampled_from([
        [], [1], ["temp"], [None], [[good]], [{"n": 5, "v": 1}], [{"bn": 7, "n": "a", "v": 1}],
        [{"n": "a", "v": "21"}], [{"n": "a", "v": True}], [{"n": "a", "v": None}], [{"n": "a", "v": [1]}],
        [{"v": 1}], [{"bn": "", "n": "", "v": 1}], [{"n": "a", "t": "now", "v": 1}], [{"bt": "x", "n": "a", "v": 1}],
        [{"bv": "1", "n": "a", "v": 1}], [{"bv": 1e308, "n": "a", "v": 1e308}],
        [good, {"n": "b", "v": "x"}], [good, 3],
    ]))
    return Case("sensor", json.dumps(broken).encode(), INVALID_PAYLOAD, note=f"SenML {broken!r}"[:120])


@st.composite
def empty_and_odd(draw: st.DrawFn) -> Case:
    return draw(st.sampled_from([
        Case("sensor", b"", INVALID_JSON, note="empty"), Case("noise", b"", INVALID_PAYLOAD, note="empty"),
        Case("noise", b"\x01", INVALID_PAYLOAD, note="odd"), Case("noise", b"\x00\x00", OK, note="one sample"),
        Case("sensor", b"   ", INVALID_JSON), Case("sensor", b"{}", INVALID_PAYLOAD),
        Case("sensor", b"[]", INVALID_PAYLOAD), Case("sensor", b"null", INVALID_PAYLOAD),
        Case("sensor", b'{"v": 1} trailing', INVALID_JSON), Case("sensor", b"\xef\xbb\xbf{\"v\": 1}", ANY_SENSOR),
        Case("sensor", b'{"v": 1, "v": 2}', OK, fields=frozenset({"v"})),
    ]))


cases = st.one_of(json_object(), any_json(), random_bytes(), invalid_utf8(), number_literals(), huge_integers(),
                  deep_nesting(), many_fields(), size_limit(), senml_valid(), senml_broken(), empty_and_odd())


# ---------------------------------------------------------------------------------------------- the agent


@dataclass
class Rig:
    broker: Mosquitto
    agent: Agent
    collector: Collector
    device: paho.Client
    metrics_port: int


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    root = tmp_path_factory.mktemp("fuzz")
    broker = Mosquitto(root / "broker")
    broker.start()
    metrics_port = free_port()
    agent = Agent(root / "agent", broker.port, routes=[SENSOR_ROUTE, NOISE_ROUTE],
                  extra_env={"EDGE_AGENT_MAX_PAYLOAD_BYTES": str(MAX_PAYLOAD),
                             "EDGE_AGENT_METRICS__PORT": str(metrics_port)})
    collector = Collector(broker.port, f"edge/{agent.agent_id}/#")
    device: paho.Client | None = None
    try:
        agent.start()
        device = publisher(broker.port)
        yield Rig(broker, agent, collector, device, metrics_port)
    finally:
        if device is not None:
            device.loop_stop()
            device.disconnect()
        collector.close()
        agent.cleanup()
        broker.stop()


def answers(rig: Rig) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Answers by marker (the device-id level of the original topic)."""
    out: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for topic, payload in rig.collector.snapshot():
        if topic.endswith("/status"):
            continue
        body = json.loads(payload)
        out.setdefault(body["topic"].split("/")[3], []).append((topic, body))
    return out


@pytest.mark.timeout(900)
def test_every_fuzzed_message_is_answered_and_the_daemon_lives(rig: Rig) -> None:
    markers = (f"m{i}" for i in itertools.count())
    sent: dict[str, Case] = {}
    started = time.monotonic()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(case=cases, district=topic_level)
    def one_message(case: Case, district: str) -> None:
        assert rig.agent.proc is not None and rig.agent.proc.poll() is None, (
            f"the agent died:\n{rig.agent.log_tail()}")
        marker = next(markers)
        sent[marker] = case
        topic = (f"city/{district}/fuzz/{marker}/data" if case.route == "sensor"
                 else f"city/{district}/noise/{marker}/pcm")
        info = rig.device.publish(topic, case.payload, qos=1)
        info.wait_for_publish(10)
        wait_for(lambda: marker in answers(rig), ANSWER_TIMEOUT_S, f"an answer to {marker} ({case.note})")
        ((out_topic, body),) = answers(rig)[marker]
        assert body["topic"] == topic
        if "/results/" in out_topic:
            got = RESULT
        else:
            assert "/dead-letter/" in out_topic
            assert set(body) == {"topic", "reason", "detail", "size", "received_at", "id"}
            assert body["size"] == len(case.payload)
            got = body["reason"]
        assert got in case.allowed, (
            f"{case.route} message {case.payload[:200]!r} ({case.note}, {len(case.payload)} bytes): "
            f"expected one of {sorted(case.allowed)}, got {got}: {body.get('detail', '')}")
        if got == RESULT:
            assert body["kind"] == ("sensor.stats" if case.route == "sensor" else "noise.spectrum")
            if case.route == "noise":
                assert body["result"]["samples"] == len(case.payload) // 2
            elif case.fields is not None:
                assert set(body["result"]["fields"]) == case.fields
            for field in body["result"].get("fields", {}).values():
                assert set(field) == {"value", "mean", "std", "z", "anomaly"}

    one_message()

    time.sleep(1.0)  # room for a late duplicate to show
    final = answers(rig)
    counts = {marker: len(final.get(marker, [])) for marker in sent}
    assert all(n == 1 for n in counts.values()), {m: n for m, n in counts.items() if n != 1}
    assert set(final) == set(sent)
    reasons: dict[str, int] = {}
    for copies in final.values():
        topic, body = copies[0]
        key = RESULT if "/results/" in topic else body["reason"]
        reasons[key] = reasons.get(key, 0) + 1
    print(f"\nfuzz: {len(sent)} messages in {time.monotonic() - started:.1f} s, answers {json.dumps(reasons)}")
    assert rig.agent.proc is not None and rig.agent.proc.poll() is None, "the agent died"
    assert http_status(f"http://127.0.0.1:{rig.metrics_port}/healthz") == 200
    assert http_status(f"http://127.0.0.1:{rig.metrics_port}/readyz") == 200
    assert rig.agent.terminate() == 0


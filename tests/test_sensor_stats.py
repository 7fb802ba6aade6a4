"""sensor.stats: parsing, rolling windows, anomalies, bounds, and properties over arbitrary readings."""

from __future__ import annotations

import csv
import json
import math
import struct
from collections import deque
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.data import CITYPULSE_DIR
from agent.errors import InvalidJson, InvalidPayload
from agent.tasks.sensor_stats import MAX_READINGS, SensorStats, check_options, readings_of_object

CITYPULSE = CITYPULSE_DIR / "AarhusTrafficData158324.csv"
TOPIC = "city/aarhus/traffic/158324/data"


def run(stats: SensorStats, message: Any, topic: str = TOPIC, **options: Any) -> dict[str, Any]:
    payload = message if isinstance(message, bytes) else json.dumps(message).encode()
    return stats(payload, {"topic": topic, **options})


def feed(stats: SensorStats, values: list[float], field: str = "x", **options: Any) -> dict[str, Any]:
    """Send one single-field message per value; the last result's entry for the field."""
    result: dict[str, Any] = {}
    for value in values:
        result = run(stats, {field: value}, **options)["fields"][field]
    return result


def citypulse_rows() -> list[dict[str, str]]:
    with CITYPULSE.open(newline="") as fh:
        return list(csv.DictReader(fh))


# --- real data ---------------------------------------------------------------------------------------------


def test_citypulse_row_as_published_by_a_device() -> None:
    stats = SensorStats()
    row = citypulse_rows()[0]
    message = {"status": row["status"], "avgMeasuredTime": int(row["avgMeasuredTime"]),
               "avgSpeed": int(row["avgSpeed"]), "extID": row["extID"], "TIMESTAMP": row["TIMESTAMP"],
               "vehicleCount": int(row["vehicleCount"]), "_id": int(row["_id"]),
               "REPORT_ID": int(row["REPORT_ID"]), "seq": 17}

    result = run(stats, message)

    assert list(result) == ["fields"]
    fields = result["fields"]
    # "OK" and the timestamp are labels; "668" is a number sent as a string.
    assert list(fields) == ["avgMeasuredTime", "avgSpeed", "extID", "vehicleCount", "_id", "REPORT_ID", "seq"]
    assert fields["seq"] == {"value": 17, "mean": 17.0, "std": 0.0, "z": 0.0, "anomaly": False}
    assert fields["extID"]["value"] == 668.0
    assert type(fields["avgSpeed"]["value"]) is int


def test_citypulse_series_matches_a_direct_computation() -> None:
    # The CSV's rows forwarded verbatim (every value a string), replayed through a window of 60; every
    # mean/std/z must match numpy on the same previous readings, across thousands of running-sum updates.
    rows = citypulse_rows()
    stats = SensorStats()
    numeric = ["avgMeasuredTime", "avgSpeed", "extID", "medianMeasuredTime", "vehicleCount", "_id",
               "REPORT_ID"]
    history: dict[str, deque[float]] = {name: deque(maxlen=60) for name in numeric}
    anomalies = 0
    for row in rows:
        fields = run(stats, row, window=60)["fields"]
        assert list(fields) == numeric
        for name in numeric:
            got = fields[name]
            value = float(row[name])
            previous = np.array(history[name])
            if previous.size >= 2 and previous.std() > 0:
                mean, std = previous.mean(), previous.std()
                assert got["mean"] == pytest.approx(mean, rel=1e-12, abs=1e-9)
                assert got["std"] == pytest.approx(std, rel=1e-9)
                assert got["z"] == pytest.approx((value - mean) / std, rel=1e-6, abs=1e-9)
            else:
                assert got["std"] == 0.0
                assert got["z"] == 0.0
            assert got["anomaly"] == (abs(got["z"]) > 3)
            anomalies += got["anomaly"]
            history[name].append(value)
    assert anomalies > 0  # rush hours and id jumps do stand out


# --- parsing -----------------------------------------------------------------------------------------------


def test_numeric_strings_count_and_other_values_are_ignored() -> None:
    stats = SensorStats()
    message = {"a": "74", "b": " 3.5 ", "c": "OK", "d": "nan", "e": "1e999", "f": True, "g": None,
               "h": [1, 2], "i": {"nested": 1}, "j": -0.25, "k": "-1e3"}

    fields = run(stats, message)["fields"]

    assert list(fields) == ["a", "b", "j", "k"]
    assert fields["a"]["value"] == 74.0
    assert fields["b"]["value"] == 3.5
    assert fields["k"]["value"] == -1000.0


@given(st.text(max_size=12))
def test_a_string_is_a_reading_exactly_when_float_takes_it(raw: str) -> None:
    # Labels are skipped by their first character before float() is tried: that shortcut must never drop
    # a number (" 7", "٣", "Infinity"… are float()'s business) nor keep a label.
    try:
        number: float | None = float(raw)
    except ValueError:
        number = None
    if number is not None and not math.isfinite(number):
        number = None
    readings = readings_of_object({"f": raw})
    assert readings == ([] if number is None else [("f", number, number)])


def test_senml_pack_with_base_name_and_base_time() -> None:
    # RFC 8428 §5.1.2-style pack: base name/time/unit on the first record, times relative to bt.
    stats = SensorStats()
    pack = [
        {"bn": "urn:dev:ow:10e2073a01080063:", "bt": 1.276020076001e9, "bu": "A", "bver": 5,
         "n": "voltage", "u": "V", "v": 120.1},
        {"n": "current", "t": -5, "v": 1.2},
        {"n": "current", "t": -4, "v": 1.3},
        {"n": "label", "vs": "kitchen"},
        {"n": "open", "vb": True},
        {"n": "current", "t": -3, "v": 1.4},
    ]

    fields = run(stats, pack)["fields"]

    assert list(fields) == ["urn:dev:ow:10e2073a01080063:voltage", "urn:dev:ow:10e2073a01080063:current"]
    current = fields["urn:dev:ow:10e2073a01080063:current"]
    # The last current reading judged against the two before it in the same pack.
    assert current["value"] == 1.4
    assert current["mean"] == pytest.approx(1.25)
    assert current["std"] == pytest.approx(0.05)
    assert current["z"] == pytest.approx(3.0)


def test_senml_readings_enter_the_window_in_time_order() -> None:
    stats = SensorStats()
    pack = [{"bn": "dev:", "bt": 100, "n": "t", "t": 2, "v": 30}, {"n": "t", "t": 0, "v": 10},
            {"n": "u", "t": 1, "v": 5}, {"n": "t", "t": 1, "v": 20}]

    fields = run(stats, pack)["fields"]

    # Pack order of first appearance is kept for the output; the reported reading is the latest (t=102).
    assert list(fields) == ["dev:t", "dev:u"]
    assert fields["dev:t"]["value"] == 30
    assert fields["dev:t"]["mean"] == pytest.approx(15.0)
    later = run(stats, [{"bn": "dev:", "n": "t", "v": 20}], window=2)["fields"]["dev:t"]
    assert later["mean"] == 20.0  # a window of 2 is a separate state: it starts empty


def test_senml_base_value_is_added() -> None:
    stats = SensorStats()
    fields = run(stats, [{"bn": "m:", "bv": 1000, "n": "a", "v": 1}, {"n": "b", "v": 2.5}])["fields"]
    assert fields["m:a"]["value"] == 1001.0
    assert fields["m:b"]["value"] == 1002.5


@pytest.mark.parametrize(
    ("pack", "detail"),
    [
        ([{"n": "a", "v": 1}, 3], "SenML record 1 must be a JSON object, got a number"),
        ([{"n": 5, "v": 1}], "'n' must be a string"),
        ([{"bn": ["x"], "n": "a", "v": 1}], "'bn' must be a string, got an array"),
        ([{"v": 1}], "SenML record 0 has no name"),
        ([{"bn": "", "n": "", "v": 1}], "has no name"),
        ([{"n": "a", "v": "1"}], "'v' must be a number, got a string"),
        ([{"n": "a", "v": True}], "'v' must be a number, got a boolean"),
        ([{"n": "a", "bt": "now", "v": 1}], "'bt' must be a number"),
        ([{"n": "a", "v": 1e308, "bv": 1e308}], "too large"),
        ([{"n": "a", "vs": "text"}], "no numeric reading"),
        ([], "no numeric reading"),
    ],
)
def test_invalid_senml_packs(pack: list[Any], detail: str) -> None:
    with pytest.raises(InvalidPayload, match=detail):
        run(SensorStats(), pack)


@pytest.mark.parametrize(
    ("payload", "detail"),
    [
        (b"42", "expected a JSON object of readings or a SenML array, got a number"),
        (b'"hello"', "got a string"),
        (b"null", "got null"),
        (b"true", "got a boolean"),
        (b'{"status": "OK", "when": "2014-08-01"}', "no numeric reading"),
        (b"{}", "no numeric reading"),
    ],
)
def test_invalid_payloads(payload: bytes, detail: str) -> None:
    with pytest.raises(InvalidPayload, match=detail):
        SensorStats()(payload, {"topic": TOPIC})


@pytest.mark.parametrize(
    ("payload", "detail"),
    [
        (b'{"a": 1, "b": "\xff"}', "not valid UTF-8"),
        (b'{"a": 1,', "not valid JSON: .*line 1 column 9"),
        (b"", "not valid JSON"),
        (b"[" * 100_000, "depth limit"),
        (b'{"a": ' * 100_000, "depth limit"),
        # Strict RFC 8259: no NaN/Infinity literals, no number beyond a double.
        (b'{"a": NaN}', "not valid JSON"),
        (b'{"a": Infinity}', "not valid JSON"),
        (b'{"a": -Infinity}', "not valid JSON"),
        (b'[{"n": "a", "v": NaN}]', "not valid JSON"),
        (b'{"a": 1e400}', "infinity"),
        (b'{"a": ' + b"9" * 400 + b"}", "infinity"),
        (b'{"a": ' + b"9" * 5000 + b"}", "not valid JSON"),
        ('{"a": 1}'.encode("utf-16"), "not valid UTF-8"),
    ],
)
def test_undecodable_payloads_are_invalid_json(payload: bytes, detail: str) -> None:
    with pytest.raises(InvalidJson, match=detail):
        SensorStats()(payload, {"topic": TOPIC})


def test_more_than_the_field_cap_is_refused() -> None:
    stats = SensorStats()
    assert len(run(stats, {f"f{i}": i for i in range(MAX_READINGS)})["fields"]) == MAX_READINGS
    with pytest.raises(InvalidPayload, match=f"more than {MAX_READINGS}"):
        run(stats, {f"f{i}": i for i in range(MAX_READINGS + 1)})


def test_a_refused_message_leaves_the_windows_untouched() -> None:
    stats = SensorStats()
    feed(stats, [1, 2, 3])
    with pytest.raises(InvalidPayload):  # the second record is refused after the first was read
        run(stats, [{"n": "x", "v": 1000}, {"n": 5, "v": 1}])
    assert feed(stats, [4])["mean"] == 2.0


# --- windows and anomalies ---------------------------------------------------------------------------------


def test_window_holds_the_last_n_previous_readings() -> None:
    stats = SensorStats()
    results = [feed(stats, [v], window=3) for v in (1, 2, 3, 4, 5, 6)]
    assert [r["mean"] for r in results] == [1.0, 1.0, 1.5, 2.0, 3.0, 4.0]
    assert results[3]["std"] == pytest.approx(math.sqrt(2 / 3))
    assert results[3]["z"] == pytest.approx((4 - 2) / math.sqrt(2 / 3))


def test_windows_are_per_topic_and_per_field() -> None:
    stats = SensorStats()
    for v in (1, 2, 3):
        run(stats, {"x": v, "y": v * 100}, topic="a")
    run(stats, {"x": 50}, topic="b")
    assert run(stats, {"x": 4}, topic="a")["fields"]["x"]["mean"] == 2.0
    assert run(stats, {"y": 400}, topic="a")["fields"]["y"]["mean"] == 200.0
    assert run(stats, {"x": 51}, topic="b")["fields"]["x"]["mean"] == 50.0


def test_anomaly_after_a_steady_series() -> None:
    stats = SensorStats()
    steady = feed(stats, [20.0, 21.0, 19.5, 20.5, 20.0, 21.0, 19.0, 20.0, 20.5, 19.5] * 3)
    assert steady["anomaly"] is False

    spike = feed(stats, [35.0])

    assert spike["anomaly"] is True
    assert spike["z"] > 3
    assert spike["mean"] == pytest.approx(20.1, abs=0.05)
    assert feed(stats, [20.0])["anomaly"] is False


def test_constant_series_has_zero_std_and_zero_z() -> None:
    stats = SensorStats()
    feed(stats, [5] * 10)
    jump = feed(stats, [7])
    assert jump == {"value": 7, "mean": 5.0, "std": 0.0, "z": 0.0, "anomaly": False}


def test_constant_series_after_variation_returns_to_zero_std() -> None:
    # The running sums were built around an earlier shift; once the window is constant the reported std
    # must still be exactly zero, not float residue that turns every change into an "anomaly".
    stats = SensorStats()
    feed(stats, [0.1, 0.7, 0.3, 1.9, 0.2], window=5)
    settled = feed(stats, [0.3] * 5, window=5)
    assert settled["std"] != 0.0  # the window still holds 1.9... until the fifth 0.3 arrives
    after = feed(stats, [0.3], window=5)
    assert after["std"] == 0.0
    assert after["z"] == 0.0


def test_long_float_series_does_not_drift() -> None:
    rng = np.random.default_rng(7)
    values = (1e6 + rng.normal(0, 1e-3, 5000)).tolist()  # a big offset and a tiny spread: worst case for sums
    stats = SensorStats()
    for i, value in enumerate(values):
        got = feed(stats, [value], window=50)
        previous = np.array(values[max(0, i - 50):i])
        if previous.size >= 2:
            assert got["mean"] == pytest.approx(previous.mean(), rel=1e-15)
            assert got["std"] == pytest.approx(previous.std(), rel=1e-6)


def test_extreme_magnitudes_stay_finite() -> None:
    stats = SensorStats()
    for value in (1.7e308, -1.7e308, 1e300, -1e-300, 5e-324, 1.7e308, 0.0, -1.7e308):
        entry = feed(stats, [value], window=4)
        for key in ("mean", "std", "z"):
            assert math.isfinite(entry[key])
    json.dumps(run(stats, {"x": 1.7e308}, window=4), allow_nan=False)


def test_tiny_spread_and_far_value_gives_a_finite_huge_z() -> None:
    stats = SensorStats()
    entry = feed(stats, [0.0, 1e-160, 0.0, 1e-160, 1e308])
    assert 0.0 < entry["std"] < 1e-159
    assert entry["z"] == 1.7976931348623157e308  # (1e308 - mean) / 5e-161 overflows; reported as the largest
    assert entry["anomaly"] is True


@pytest.mark.parametrize("window", [1, 0, -5, 2.5, "60", True, None, 100_001])
def test_bad_window_option_is_a_value_error(window: Any) -> None:
    with pytest.raises(ValueError, match="route option 'window'"):
        check_options({"window": window})
    with pytest.raises(ValueError, match="route option 'window'"):
        run(SensorStats(), {"x": 1}, window=window)


def test_ignored_fields_are_not_readings() -> None:
    stats = SensorStats()
    options = {"topic": "t", "ignore": ["seq", "REPORT_ID"]}
    for seq in range(5):
        out = stats(f'{{"seq": {seq * 1000}, "REPORT_ID": 158324, "avgSpeed": {50 + seq}}}'.encode(), options)
    assert list(out["fields"]) == ["avgSpeed"]
    pack = b'[{"bn": "dev/", "n": "seq", "v": 9, "t": 2}, {"n": "temp", "v": 21.5, "t": 1}]'
    assert list(stats(pack, {"topic": "s", "ignore": ["dev/seq"]})["fields"]) == ["dev/temp"]
    with pytest.raises(InvalidPayload, match="besides the fields the route ignores"):
        stats(b'{"seq": 1}', options)


@pytest.mark.parametrize("ignore", ["seq", [1], {"seq": True}, ["x"] * 257])
def test_bad_ignore_option_is_a_value_error(ignore: Any) -> None:
    with pytest.raises(ValueError, match="route option 'ignore'"):
        check_options({"ignore": ignore})
    if type(ignore) is not list:
        with pytest.raises(ValueError, match="route option 'ignore'"):
            SensorStats()(b'{"x": 1}', {"ignore": ignore})


def test_topic_option_is_optional() -> None:
    stats = SensorStats()
    stats(b'{"x": 1}', {})
    assert stats(b'{"x": 3}', {})["fields"]["x"]["mean"] == 1.0


# --- memory bounds -----------------------------------------------------------------------------------------


def test_least_recently_used_topics_are_evicted_beyond_the_cap() -> None:
    stats = SensorStats(max_topics=3)
    for topic in ("t0", "t1", "t2"):
        run(stats, {"x": 10}, topic=topic)
    run(stats, {"x": 10}, topic="t0")  # t0 is now the most recently used; t1 the least
    run(stats, {"x": 10}, topic="t3")

    assert stats.topics == 3
    assert run(stats, {"x": 20}, topic="t0")["fields"]["x"]["mean"] == 10.0  # kept
    assert run(stats, {"x": 20}, topic="t1")["fields"]["x"]["mean"] == 20.0  # evicted: starts afresh


def test_stored_readings_stay_within_the_budget() -> None:
    stats = SensorStats(max_stored=600)
    for i in range(100):
        # A device whose field names never repeat, and many topics: both would grow without a budget.
        run(stats, {f"reading_{i}": 1.0, f"other_{i}": 2.0}, topic=f"t{i % 7}", window=60)
        assert stats.stored_capacity <= 600
    wide = run(stats, {f"f{j}": j for j in range(20)}, topic="wide", window=60)
    assert len(wide["fields"]) == 20  # the result is complete even though the topic alone exceeds the budget
    assert stats.stored_capacity <= 600


# --- properties --------------------------------------------------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False)
reading = st.one_of(finite, st.integers(min_value=-(10**300), max_value=10**300), finite.map(repr))
# Lone surrogates are not valid UTF-8 once decoded; strict JSON parsing refuses them (a separate test).
text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=5)
label = st.one_of(st.none(), st.booleans(), text.filter(lambda s: not _numeric(s)),
                  st.lists(finite, max_size=2), st.dictionaries(st.text(max_size=3), finite, max_size=2))


def _numeric(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _check_entry(entry: dict[str, Any], sent: Any) -> None:
    assert set(entry) == {"value", "mean", "std", "z", "anomaly"}
    # Strings and integers beyond 64 bits arrive as floats (the JSON parser reads the latter as doubles).
    as_float = isinstance(sent, str) or (isinstance(sent, int) and not -(2**63) <= sent < 2**64)
    expected = float(sent) if as_float else sent
    assert entry["value"] == expected
    assert type(entry["value"]) is (float if as_float else type(sent))
    for key in ("mean", "std", "z"):
        assert type(entry[key]) is float
        assert math.isfinite(entry[key])
    assert entry["std"] >= 0.0
    assert entry["anomaly"] is (abs(entry["z"]) > 3)
    if entry["std"] == 0.0:
        assert entry["z"] == 0.0


@pytest.mark.slow  # a property over 150 generated series
@settings(max_examples=150, deadline=None)
@given(
    messages=st.lists(
        st.dictionaries(st.sampled_from(["a", "b", "c", "temp", "seq"]), st.one_of(reading, label),
                        min_size=1, max_size=5),
        min_size=1, max_size=25,
    ),
    window=st.integers(min_value=2, max_value=8),
)
def test_any_finite_readings_give_finite_results_of_the_exact_shape(
    messages: list[dict[str, Any]], window: int
) -> None:
    stats = SensorStats()
    for message in messages:
        expected = [name for name, value in message.items()
                    if (type(value) in (int, float)) or (isinstance(value, str) and _numeric(value))]
        payload = json.dumps(message).encode()
        if not expected:
            with pytest.raises(InvalidPayload):
                stats(payload, {"topic": "p", "window": window})
            continue
        result = stats(payload, {"topic": "p", "window": window})
        assert list(result) == ["fields"]
        assert list(result["fields"]) == expected
        for name in expected:
            _check_entry(result["fields"][name], message[name])
        json.dumps(result, allow_nan=False)


@settings(max_examples=100, deadline=None)
@given(st.lists(finite, min_size=3, max_size=40), st.integers(min_value=2, max_value=10))
def test_statistics_match_a_direct_computation(values: list[float], window: int) -> None:
    stats = SensorStats()
    for i, value in enumerate(values):
        got = feed(stats, [value], window=window)
        previous = values[max(0, i - window):i]
        if len(previous) >= 2 and all(abs(v) < 1e150 for v in [*previous, value]):
            mean = math.fsum(previous) / len(previous)
            std = math.sqrt(math.fsum((v - mean) ** 2 for v in previous) / len(previous))
            scale = max(abs(v) for v in previous)
            # (at least a few subnormal steps of absolute slack: below ~1e-308 floats are that coarse)
            assert got["mean"] == pytest.approx(mean, rel=1e-9, abs=max(1e-12 * scale, 2e-323))
            if got["std"] != 0.0 and std > 1e-6 * scale:
                assert got["std"] == pytest.approx(std, rel=1e-6)


@pytest.mark.parametrize(
    "values",
    [
        # readings whose squares underflow: once divided by a zero standard deviation
        [1e-301, -2e-301, 3e-302, 1.7e-304, 1e-301],
        # a large reading leaves the window; the tiny ones after it must not vanish in its rounding error
        [2e-160, -2e-301, -3e-200, -1.7e-304, 1e-304, 3e-304, 1e-301, 1.7e-304, 5.1e-302, 2e-301],
        [1.5e-323, 0.0, 1e-300],
    ],
)
def test_readings_near_the_bottom_of_the_float_range(values: list[float]) -> None:
    stats = SensorStats()
    window = 6
    for i, value in enumerate(values):
        got = feed(stats, [value], window=window)
        assert all(math.isfinite(got[key]) for key in ("mean", "std", "z"))
        previous = values[max(0, i - window):i]
        if len(previous) >= 2:
            assert got["mean"] == pytest.approx(math.fsum(previous) / len(previous), rel=1e-9, abs=2e-323)


# --- saved windows (a restart does not start them from nothing) -------------------------------------------


def _row(x: float) -> bytes:
    return json.dumps({"avgSpeed": x, "vehicleCount": int(x) % 7}).encode()


def test_restored_windows_judge_the_next_readings_as_the_originals_do() -> None:
    rng = np.random.default_rng(3)
    series = [float(x) for x in rng.normal(50.0, 5.0, 260)]
    options = {"topic": "city/a/traffic/1/data", "window": 60}
    short = {"topic": "city/a/traffic/1/data", "window": 7}  # same topic, another window: another key
    original = SensorStats()
    for x in series[:130]:
        original(_row(x), options)
        original(_row(x), short)
    copy = SensorStats()
    assert copy.load_state(original.dump_state()) == (2, 0)
    for x in series[130:]:
        for opts in (options, short):
            a, b = original(_row(x), opts)["fields"], copy(_row(x), opts)["fields"]
            assert a.keys() == b.keys()
            for name in a:
                assert b[name]["mean"] == pytest.approx(a[name]["mean"], rel=1e-12, abs=1e-12)
                assert b[name]["std"] == pytest.approx(a[name]["std"], rel=1e-9, abs=1e-12)
                assert b[name]["z"] == pytest.approx(a[name]["z"], rel=1e-9, abs=1e-9)
                assert b[name]["anomaly"] == a[name]["anomaly"]


def test_only_windows_changed_since_the_last_dump_are_dumped() -> None:
    stats = SensorStats()
    for i in range(3):
        stats(_row(50.0 + i), {"topic": f"t/{i}"})
    assert [json.loads(key)[0] for key, _ in stats.dump_state()] == ["t/0", "t/1", "t/2"]
    assert stats.dump_state() == []
    stats(_row(51.0), {"topic": "t/1"})
    stats(_row(51.0), {"topic": "t/0"})
    # At most ``limit`` at a time, least recently used first; the rest wait for the next call.
    assert [json.loads(key)[0] for key, _ in stats.dump_state(limit=1)] == ["t/1"]
    assert [json.loads(key)[0] for key, _ in stats.dump_state(limit=1)] == ["t/0"]
    assert stats.dump_state() == []
    assert len(stats.dump_state(everything=True)) == 3
    # Each reading takes 8 bytes after the header.
    state = dict(stats.dump_state(everything=True))['["t/1",60]']  # two readings of each field
    head, _, body = state.partition(b"\n")
    assert json.loads(head) == {"seq": 0, "fields": [["avgSpeed", 2], ["vehicleCount", 2]]} and len(body) == 4 * 8


def test_damaged_saved_windows_are_skipped_and_the_caps_hold() -> None:
    source = SensorStats()
    for i in range(3):
        source(_row(50.0 + i), {"topic": f"t/{i}"})
    good = source.dump_state()
    one = struct.pack("<d", 1.0)
    damaged = [
        ("not json", b'[["a",1]]\n' + one),
        ('["t/x", 1]', b'[["a",1]]\n' + one),  # a window of one reading cannot exist
        ('["t/x", 60]', b'[["a",0]]\n'),  # no readings
        ('["t/x", 60]', b'[["a",2]]\n' + one),  # more readings named than saved
        ('["t/x", 60]', b'[["a",1]]\n' + one + one),  # readings left over
        ('["t/x", 60]', b'[["a",1]]\n' + struct.pack("<d", math.inf)),
        ('["t/x", 60]', b'[["a",1]]\n' + one[:7]),  # cut short
        ('["t/x", 60]', b"{" + one),
    ]
    stats = SensorStats(max_topics=2)
    assert stats.load_state(damaged + good) == (3, len(damaged))
    # The cap keeps the most recently used: the entries come oldest first.
    assert stats.topics == 2
    assert [json.loads(key)[0] for key, _ in stats.dump_state(everything=True)] == ["t/1", "t/2"]
    # A restored window holds the readings it was saved with, no more.
    stats(_row(60.0), {"topic": "t/2"})
    assert stats(_row(60.0), {"topic": "t/2"})["fields"]["avgSpeed"]["mean"] == pytest.approx((52 + 60) / 2)


def test_an_evicted_window_is_no_longer_waiting_to_be_saved() -> None:
    stats = SensorStats(max_topics=2)
    for i in range(5):
        stats(_row(50.0), {"topic": f"t/{i}"})
    assert [json.loads(key)[0] for key, _ in stats.dump_state()] == ["t/3", "t/4"]
    assert not stats._changed  # the evicted ones left no trace


# --- a task that runs again after a restart (its result was not confirmed) counts once ---------------------


def _state(stats: SensorStats, key: str = '["t",60]') -> tuple[Any, list[float]]:
    """The saved header and readings of one window, as everything is dumped now."""
    state = dict(stats.dump_state(everything=True))[key]
    head, _, body = state.partition(b"\n")
    return json.loads(head), list(struct.unpack(f"<{len(body) // 8}d", body))


def test_a_rerun_of_a_task_the_restored_window_holds_is_judged_but_not_counted_again() -> None:
    before = SensorStats()
    for seq, x in enumerate([50.0, 52.0, 49.0, 51.0, 70.0], start=1):
        before(json.dumps({"x": x}).encode(), {"topic": "t"}, seq)
    after = SensorStats()  # the restart
    assert after.load_state(before.dump_state()) == (1, 0)

    rerun = after(json.dumps({"x": 70.0}).encode(), {"topic": "t"}, 5)["fields"]["x"]
    window = [50.0, 52.0, 49.0, 51.0, 70.0]  # it holds the reading already: it is judged against it
    assert rerun["value"] == 70.0 and rerun["mean"] == pytest.approx(np.mean(window))
    assert rerun["std"] == pytest.approx(np.std(window)) and rerun["z"] == pytest.approx(
        (70.0 - np.mean(window)) / np.std(window))
    assert rerun["anomaly"] is False
    assert after.dump_state() == []  # nothing changed, nothing to save
    assert _state(after)[1] == window

    # The next task is judged as if the first run alone had happened.
    nxt = json.dumps({"x": 53.0}).encode()
    expected, got = before(nxt, {"topic": "t"}, 6)["fields"]["x"], after(nxt, {"topic": "t"}, 6)["fields"]["x"]
    assert got == pytest.approx(expected)
    assert _state(after) == ({"seq": 6, "fields": [["x", 6]]}, [*window, 53.0])


def test_every_rerun_up_to_the_restored_sequence_is_left_out_and_newer_tasks_count() -> None:
    before = SensorStats()
    for seq in (3, 8, 9):
        before(json.dumps({"x": float(seq)}).encode(), {"topic": "t"}, seq)
    after = SensorStats()
    after.load_state(before.dump_state())
    for seq in (3, 8, 9):  # all three ran before the save and run again, in row order
        after(json.dumps({"x": float(seq)}).encode(), {"topic": "t"}, seq)
    assert _state(after) == ({"seq": 9, "fields": [["x", 3]]}, [3.0, 8.0, 9.0])
    after(json.dumps({"x": 10.0}).encode(), {"topic": "t"}, 10)
    after(json.dumps({"x": 1.0}).encode(), {"topic": "t"})  # no sequence (a direct call): always counted
    assert _state(after) == ({"seq": 10, "fields": [["x", 5]]}, [3.0, 8.0, 9.0, 10.0, 1.0])


def test_a_task_that_comes_back_from_the_cloud_late_still_counts_in_the_same_process() -> None:
    # Task 4 went to the cloud, which failed it: it runs here after tasks 5 and 6. No restart came between,
    # so it was never counted and must be now.
    stats = SensorStats()
    for seq in (5, 6, 4):
        stats(json.dumps({"x": float(seq)}).encode(), {"topic": "t"}, seq)
    assert _state(stats) == ({"seq": 6, "fields": [["x", 3]]}, [5.0, 6.0, 4.0])


def test_the_sequence_is_saved_and_restored_with_the_window_through_restarts() -> None:
    first = SensorStats()
    first(b'{"x": 1}', {"topic": "t"}, 41)
    first(b'{"x": 2}', {"topic": "t", "window": 7}, 42)  # another key: its own sequence
    second = SensorStats()
    assert second.load_state(first.dump_state()) == (2, 0)
    third = SensorStats()  # restored, saved again untouched, restored once more
    assert third.load_state(second.dump_state(everything=True)) == (2, 0)
    assert _state(third)[0] == {"seq": 41, "fields": [["x", 1]]}
    assert _state(third, '["t",7]')[0] == {"seq": 42, "fields": [["x", 1]]}
    third(b'{"x": 1}', {"topic": "t"}, 41)
    third(b'{"x": 1}', {"topic": "t", "window": 7}, 41)  # below 42: already in that window
    assert _state(third)[1] == [1.0] and _state(third, '["t",7]')[1] == [2.0]
    third(b'{"x": 2}', {"topic": "t"}, 42)  # above 41: new to this window
    assert _state(third)[1] == [1.0, 2.0]


def test_windows_saved_before_the_sequence_was_still_load_and_count_every_task() -> None:
    old_format = ('["t",60]', b'[["x",3]]\n' + struct.pack("<3d", 50.0, 52.0, 54.0))
    stats = SensorStats()
    assert stats.load_state([old_format]) == (1, 0)
    got = stats(b'{"x": 60}', {"topic": "t"}, 7)["fields"]["x"]
    assert got["mean"] == pytest.approx(52.0)
    assert _state(stats) == ({"seq": 7, "fields": [["x", 4]]}, [50.0, 52.0, 54.0, 60.0])


def test_saved_windows_with_a_bad_sequence_are_skipped() -> None:
    one = struct.pack("<d", 1.0)
    bad = [('["t",60]', json.dumps(head).encode() + b"\n" + one)
           for head in ({"seq": -1, "fields": [["x", 1]]}, {"seq": "7", "fields": [["x", 1]]},
                        {"fields": [["x", 1]]}, {"seq": 7}, {"seq": 7, "fields": {"x": 1}})]
    assert SensorStats().load_state(bad) == (0, len(bad))

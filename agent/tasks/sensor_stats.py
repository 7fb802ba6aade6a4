"""``sensor.stats``: rolling-window statistics and z-score anomalies per topic and field (docs/design.md#tasks).

A message is a JSON object of readings (a CityPulse row) or a SenML pack (RFC 8428). Each numeric reading is
judged against the previous readings of the same field on the same topic, then joins that window. The task
runs inline on the event loop for every message, so the arithmetic is plain Python on running sums (numpy's
per-call overhead would exceed the whole budget of ~20 µs per row).
"""

from __future__ import annotations

import math
import string
import sys
from array import array
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import orjson

from agent.errors import InvalidJson, InvalidPayload

DEFAULT_WINDOW = 60
MAX_WINDOW = 100_000
MAX_READINGS = 1024  # per message: bounds the work done inline and the windows one message can create
ANOMALY_Z = 3.0
DEFAULT_MAX_TOPICS = 10_000
# Readings all windows may hold together (~15 bytes each with the window's overhead, so ~75 MB at most):
# 10,000 topics of 8 fields at the default window fit. Without it a topic whose field names keep changing,
# or a large window, would grow memory without bound despite the topic cap.
DEFAULT_MAX_STORED = 5_000_000

_FLOAT_MAX = 1.7976931348623157e308
_BIG_ENDIAN = sys.byteorder == "big"  # saved windows are little-endian whatever the gateway's CPU

Reading = tuple[str, int | float, float]  # (field name, value as reported, value as float)


OPTIONS = frozenset({"window", "ignore"})  # route options this task takes; any other key stops start-up


def window_option(options: Mapping[str, Any]) -> int:
    """The route's ``window`` option; a bad one is a configuration mistake, hence ValueError."""
    window = options.get("window", DEFAULT_WINDOW)
    if type(window) is not int or not 2 <= window <= MAX_WINDOW:
        raise ValueError(
            f"route option 'window' must be a whole number of readings from 2 to {MAX_WINDOW}, got {window!r}"
        )
    return window


MAX_IGNORED = 256


def ignore_option(options: Mapping[str, Any]) -> None:
    """Check the route's ``ignore`` option: names of fields that are not readings (ids, sequence numbers)."""
    ignore = options.get("ignore", [])
    if type(ignore) is not list or len(ignore) > MAX_IGNORED or not all(type(name) is str for name in ignore):
        raise ValueError(f"route option 'ignore' must be a list of at most {MAX_IGNORED} field names, "
                         f"got {ignore!r}"[:300])


def check_options(options: Mapping[str, Any]) -> None:
    window_option(options)
    ignore_option(options)


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def decode(payload: bytes) -> Any:
    """Parse a strict RFC 8259 payload or raise InvalidJson.

    orjson refuses what strict JSON refuses: invalid UTF-8, NaN/Infinity literals, numbers that overflow a
    double, nesting beyond 1024 levels; it is also ~6x faster than the standard library on this hot path.
    """
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise InvalidJson(f"the payload is not valid JSON: {exc}") from None


# First characters of strings float() refuses whatever follows: ASCII letters other than those of "nan",
# "inf" and "infinity", and punctuation other than signs and the decimal point ("OK", "ON", "#2").
_LABEL_START = frozenset(string.ascii_letters + string.punctuation) - frozenset("nNiI+-.")


def readings_of_object(obj: dict[str, Any]) -> list[Reading]:
    readings: list[Reading] = []
    append = readings.append
    for name, raw in obj.items():
        kind = type(raw)
        if kind is float:
            if raw - raw != 0.0:  # only ±inf gets here (NaN is refused by the decoder): 1e400 overflows
                raise InvalidPayload(f"field {name!r} is too large for a 64-bit float")
            append((name, raw, raw))
        elif kind is int:  # type() rather than isinstance: JSON true/false are bools, not readings
            try:
                append((name, raw, float(raw)))
            except OverflowError:
                raise InvalidPayload(f"field {name!r} is an integer too large for a 64-bit float") from None
        elif kind is str:
            # Devices that forward CSV send numbers as strings ("74"); other strings are labels. A label that
            # starts with a character no number can start with, or holds a time's or date's separator, is
            # skipped without float()'s exception.
            if raw[:1] in _LABEL_START or ":" in raw or "/" in raw:
                continue
            try:
                number = float(raw)
            except ValueError:
                continue
            if number - number == 0.0:  # "nan" and "inf" are labels here, not readings
                append((name, number, number))
    return readings


def _number(record: dict[str, Any], key: str, index: int) -> float:
    raw = record[key]
    if type(raw) is not int and type(raw) is not float:
        raise InvalidPayload(f"SenML record {index}: {key!r} must be a number, got {_describe(raw)}")
    try:
        number = float(raw)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise InvalidPayload(f"SenML record {index}: {key!r} is too large for a 64-bit float")
    return number


def readings_of_pack(pack: list[Any]) -> tuple[list[Reading], list[str] | None]:
    """Resolve a SenML pack (RFC 8428 §4.6) into readings ordered by time.

    Returns the readings and, when sorting by time changed their order, the field names in pack order (the
    result lists fields in the order the device sent them).
    """
    base_name = ""
    base_time = 0.0
    base_value: float | None = None
    timed: list[tuple[float, Reading]] = []
    in_order = True
    last_time = -math.inf
    for index, record in enumerate(pack):
        if type(record) is not dict:
            raise InvalidPayload(f"SenML record {index} must be a JSON object, got {_describe(record)}")
        if "bn" in record:
            base_name = record["bn"]
            if type(base_name) is not str:
                raise InvalidPayload(
                    f"SenML record {index}: 'bn' must be a string, got {_describe(base_name)}"
                )
        if "bt" in record:
            base_time = _number(record, "bt", index)
        if "bv" in record:
            base_value = _number(record, "bv", index)
        name = record.get("n", "")
        if type(name) is not str:
            raise InvalidPayload(f"SenML record {index}: 'n' must be a string, got {_describe(name)}")
        time = base_time + (_number(record, "t", index) if "t" in record else 0.0)
        if "v" not in record:
            continue  # string, boolean, data and sum records carry no reading for this task
        full_name = base_name + name
        if not full_name:
            raise InvalidPayload(f"SenML record {index} has no name: give 'bn' or 'n'")
        raw = record["v"]
        value = _number(record, "v", index)
        reported: int | float = raw
        if base_value is not None:
            value += base_value
            if not math.isfinite(value):
                raise InvalidPayload(f"SenML record {index}: 'bv' + 'v' is too large for a 64-bit float")
            reported = value
        if time < last_time:
            in_order = False
        last_time = time
        timed.append((time, (full_name, reported, value)))
    if in_order:
        return [reading for _, reading in timed], None
    order = list(dict.fromkeys(reading[0] for _, reading in timed))
    timed.sort(key=lambda item: item[0])  # stable: records with equal times keep pack order
    return [reading for _, reading in timed], order


def parse_readings(payload: bytes) -> tuple[list[Reading], list[str] | None]:
    data = decode(payload)
    if type(data) is dict:
        readings, order = readings_of_object(data), None
    elif type(data) is list:
        readings, order = readings_of_pack(data)
    else:
        raise InvalidPayload(f"expected a JSON object of readings or a SenML array, got {_describe(data)}")
    if not readings:
        raise InvalidPayload("the message has no numeric reading (numbers, or strings such as \"74\")")
    if len(readings) > MAX_READINGS:
        raise InvalidPayload(
            f"the message has {len(readings)} numeric readings, more than {MAX_READINGS}; split it up"
        )
    return readings, order


def _robust(values: array[float], value: float) -> tuple[float, float, float]:
    """Mean, std and z without overflow, for windows whose squares do not fit in a float (|x| > ~1e154).

    The window is scaled by a power of two so its largest magnitude is below 1, which is exact. The judged
    value is left out of the scale: a huge value must not flush a window of tiny readings to zero.
    """
    n = len(values)
    exponent = math.frexp(max(map(abs, values)))[1]
    scaled = [math.ldexp(x, -exponent) for x in values]
    mean_s = math.fsum(scaled) / n
    std_s = math.sqrt(math.fsum((y - mean_s) ** 2 for y in scaled) / n)
    mean = math.ldexp(mean_s, exponent)
    try:
        std = math.ldexp(std_s, exponent)
    except OverflowError:  # rounding can push a std of exactly the largest magnitude past the float range
        std = _FLOAT_MAX
    if std == 0.0:
        return mean, 0.0, 0.0
    try:
        z = (math.ldexp(value, -exponent) - mean_s) / std_s
    except OverflowError:  # the value dwarfs the window, so its sign is the deviation's sign
        z = math.copysign(math.inf, value)
    if not -_FLOAT_MAX <= z <= _FLOAT_MAX:  # beyond measure; the largest float still flags the anomaly
        z = math.copysign(_FLOAT_MAX, z)
    return mean, std, z


# Updates between exact recomputations of a window's sums, at least (see _Window).
RESUM_MIN = 256

# Below this, sums of squares may have lost readings to underflow (|x| < ~1e-140): compute with scaling.
_TINY = 1e-280


class _Window:
    """The last ``capacity`` readings of one field, in a ring buffer, with running sums of ``x - shift``.

    The shift is the window's mean at the last exact recomputation, which keeps the cancellation in
    ``E[d²] - E[d]²`` small for fields with a large offset (ids, timestamps); for a constant window it is the
    constant itself, so the sums are exactly zero. The sums are recomputed with ``math.fsum`` every
    ``period`` updates (the capacity, at least ``RESUM_MIN``; O(1) amortised), and sooner whenever their
    rounding error could matter.
    """

    __slots__ = ("capacity", "constant", "peak", "period", "pos", "s1", "s2", "shift", "tolerance", "until_resum",
                 "values")

    def __init__(self, capacity: int) -> None:
        self.values: array[float] = array("d")  # 8 bytes a reading; a deque of float objects costs ~4× that
        self.capacity = capacity
        self.pos = 0  # next slot to overwrite once full, i.e. the oldest reading
        self.shift = 0.0
        self.s1 = 0.0
        self.s2 = 0.0
        # The largest s2 since the last recomputation. The running sums' rounding error is at most about
        # 6·k·ε·peak after k ≤ period updates (a big reading that has left the window still counts), so
        # they are trusted only while the centred sum n·var is 10⁶ times that: ``tolerance`` · peak.
        # A short window is not recomputed after every ``capacity`` updates: for the default of 60 that cost
        # as much as a tenth of the task, and the tolerance check catches the cases where it matters.
        self.period = max(capacity, RESUM_MIN)
        self.peak = 0.0
        self.tolerance = self.period * 1e-9
        self.until_resum = self.period
        # Every reading stored since the last recomputation equals the shift (ids, flags): exactly, not by
        # a zero sum of squares, which also happens when squares of tiny readings underflow.
        self.constant = True

    def update(self, x: float) -> tuple[float, float, float]:
        """Judge ``x`` against the stored readings (mean, std, z), then store it.

        One method on purpose: it runs for every field of every message, and a call per step costs more
        than the arithmetic.
        """
        values = self.values
        n = len(values)
        if n >= 2:
            s1 = self.s1
            centred = self.s2 - s1 * s1 / n
            # One comparison rejects a centred sum that is negative, NaN, inf or lost in rounding error.
            # Trusted only above the rounding error bound, and above where squares start to underflow.
            if centred > self.tolerance * self.peak and centred > _TINY:
                mean = self.shift + s1 / n
                std = math.sqrt(centred / n)
                z = (x - mean) / std
                if not -_FLOAT_MAX <= z <= _FLOAT_MAX:
                    mean, std, z = self._exact(x)
            elif self.constant:
                mean, std, z = self.shift, 0.0, 0.0
            else:
                mean, std, z = self._exact(x)
        elif n == 1:
            mean, std, z = values[0], 0.0, 0.0
        else:
            mean, std, z = x, 0.0, 0.0
            self.shift = x

        shift = self.shift
        d = x - shift
        if d != 0.0:
            self.constant = False
        if n < self.capacity:
            values.append(x)
            s1 = self.s1 + d
            s2 = self.s2 + d * d
        else:
            pos = self.pos
            old = values[pos] - shift
            values[pos] = x
            self.pos = pos + 1 if pos + 1 < self.capacity else 0
            s1 = self.s1 - old + d
            s2 = self.s2 - old * old + d * d
        self.s1 = s1
        self.s2 = s2
        if s2 > self.peak:
            self.peak = s2
        self.until_resum -= 1
        if not self.until_resum:
            self._resum()
        return mean, std, z

    def judge(self, x: float) -> tuple[float, float, float]:
        """Mean, std and z of ``x`` against the stored readings, without storing it (a task already counted)."""
        n = len(self.values)
        if n >= 2:
            return self._exact(x)
        return (self.values[0] if n else x), 0.0, 0.0

    def _resum(self) -> None:
        values = self.values
        self.until_resum = self.period
        low = min(values)
        self.constant = low == max(values)
        try:
            shift = low if self.constant else math.fsum(values) / len(values)
            diffs = [x - shift for x in values]
            self.s1 = math.fsum(diffs)
            self.s2 = self.peak = math.fsum(d * d for d in diffs)
        except (OverflowError, ValueError):
            # Readings beyond ±1e154 whose squares overflow: every update takes the scaled path until the
            # window holds smaller readings again.
            shift = low
            self.s1 = self.s2 = self.peak = math.inf
        self.shift = shift

    def readings(self) -> list[float]:
        """The stored readings, oldest first."""
        values = self.values
        pos = self.pos
        return values[pos:].tolist() + values[:pos].tolist()

    @classmethod
    def restored(cls, capacity: int, readings: list[float]) -> _Window:
        """A window holding ``readings`` (oldest first; the newest ``capacity`` of them), sums recomputed."""
        window = cls(capacity)
        window.values = array("d", readings[-capacity:])
        if window.values:
            window._resum()
        return window

    def _exact(self, x: float) -> tuple[float, float, float]:
        self._resum()
        n = len(self.values)
        s2 = self.s2
        if self.constant:
            return self.shift, 0.0, 0.0
        if s2 - s2 == 0.0 and s2 > _TINY:  # finite, and no square lost to underflow
            s1 = self.s1
            mean = self.shift + s1 / n
            var = s2 / n - (s1 / n) ** 2
            if var <= 0.0:
                return mean, 0.0, 0.0
            std = math.sqrt(var)
            z = (x - mean) / std
            if -_FLOAT_MAX <= z <= _FLOAT_MAX:
                return mean, std, z
        return _robust(self.values, x)


class _Topic:
    """The windows of one (topic, window size) key, and the sequences that keep a re-run from counting twice.

    ``seq`` is the task's store row id (the dispatcher passes it; 0: not known, always counted). Row ids only
    grow, also across restarts (the store continues from its largest id, which pruning never removes), and the
    saved windows live in the same database, so a saved ``applied`` always refers to the same rows.

    Why "not above ``restored``" is the right test, and not "not above ``applied``": on the gateway a key's
    tasks run in row order (the light queue is first in, first out, and read-backs come in id order), except
    a task that went to the cloud, which runs here later if the cloud fails it or is overdue (fallback,
    hedge), after younger ones. Within one process every row runs here at most once, so nothing needs
    refusing there, and such a late reading must still count. Only a restart repeats work: a row whose result
    was not confirmed runs again, and the saved windows may already hold it. Every reading in a saved window
    has a sequence not above the ``applied`` saved with it (both are taken in one step of the event loop), so
    a re-run at or below it is judged but not added: it never counts twice. The price is that a reading the
    save did not hold, although its sequence is lower (a task that was still with the cloud then), is not
    added after the restart either; the cloud's answer would not have added it to these windows anyway.
    """

    __slots__ = ("applied", "fields", "restored")

    def __init__(self, fields: dict[str, _Window] | None = None, seq: int = 0) -> None:
        self.fields: dict[str, _Window] = {} if fields is None else fields
        self.applied = seq  # the highest sequence these windows hold (saved with them)
        self.restored = seq  # … as restored at start: re-runs up to it were counted before the restart


class SensorStats:
    """The ``sensor.stats`` task: one instance holds every window, keyed by (topic, window size).

    The window size is part of the key so two routes with different ``window`` options that match the same
    topic do not resize each other's windows. Called from the event loop's thread only.
    """

    def __init__(self, *, max_topics: int = DEFAULT_MAX_TOPICS, max_stored: int = DEFAULT_MAX_STORED) -> None:
        if max_topics < 1 or max_stored < 1:
            raise ValueError("max_topics and max_stored must be positive")
        self.max_topics = max_topics
        self.max_stored = max_stored
        # Least recently used first; a topic moves to the end on every message.
        self._topics: OrderedDict[tuple[str, int], _Topic] = OrderedDict()
        self._stored = 0  # readings the existing windows may hold (their capacities)
        self._changed: set[tuple[str, int]] = set()  # windows updated since the last dump_state

    @property
    def state_limit(self) -> int:
        """Saved entries worth keeping: one per topic, as many as may be held at once."""
        return self.max_topics

    @property
    def topics(self) -> int:
        return len(self._topics)

    @property
    def stored_capacity(self) -> int:
        return self._stored

    def __call__(self, payload: bytes, options: Mapping[str, Any], seq: int = 0) -> dict[str, Any]:
        """Judge the message's readings and add them to the windows; ``seq``: the task's sequence (see _Topic),
        which the daemon passes (``TaskSpec.sequenced``) and other callers may leave out."""
        window = options.get("window", DEFAULT_WINDOW)
        if type(window) is not int or not 2 <= window <= MAX_WINDOW:
            window_option(options)  # raises the operator's message
        topic = options.get("topic", "")
        readings, order = parse_readings(payload)  # validates everything before any window changes
        ignore = options.get("ignore")
        if ignore is not None and type(ignore) is not list:
            ignore_option(options)  # raises the operator's message
        if ignore:
            # Ids and counters are numbers too, but their jumps are not anomalies.
            readings = [reading for reading in readings if reading[0] not in ignore]
            if not readings:
                raise InvalidPayload("the message has no numeric reading besides the fields the route ignores")
            if order is not None:
                order = [name for name in order if name not in ignore]
        key = (topic if type(topic) is str else str(topic), window)
        topics = self._topics
        entry = topics.get(key)
        if entry is None:
            if len(topics) >= self.max_topics:
                self._evict_oldest()
            entry = topics[key] = _Topic()
        else:
            topics.move_to_end(key)
        fields = entry.fields
        out: dict[str, dict[str, Any]] = {}
        if seq > entry.restored or not seq:
            if seq > entry.applied:
                entry.applied = seq
            self._changed.add(key)
            for name, reported, value in readings:
                state = fields.get(name)
                if state is None:
                    state = fields[name] = _Window(window)
                    self._stored += window
                mean, std, z = state.update(value)
                out[name] = {"value": reported, "mean": mean, "std": std, "z": z,
                             "anomaly": z > ANOMALY_Z or z < -ANOMALY_Z}
            if self._stored > self.max_stored:
                self._shrink(fields, window)
        else:
            # A re-run after a restart of a task the restored windows already hold: the same judgement, but the
            # reading is not added a second time.
            for name, reported, value in readings:
                state = fields.get(name)
                mean, std, z = state.judge(value) if state is not None else (value, 0.0, 0.0)
                out[name] = {"value": reported, "mean": mean, "std": std, "z": z,
                             "anomaly": z > ANOMALY_Z or z < -ANOMALY_Z}
        if order is not None:
            out = {name: out[name] for name in order}
        return {"fields": out}

    def dump_state(self, everything: bool = False, limit: int | None = None) -> list[tuple[str, bytes]]:
        """The windows updated since they were last dumped (or all of them), least recently used first, at
        most ``limit``, as ``(key, state)`` pairs for the store. The key is JSON ``[topic, window]``; the state
        is a JSON header ``{"seq": applied, "fields": [[field, n], …]}``, a newline, then each field's n
        readings, oldest first, as little-endian float64 (8 bytes a reading: a quarter of the same numbers
        written as JSON)."""
        if everything:
            self._changed.update(self._topics)
        keys = [key for key in self._topics if key in self._changed][:limit]
        self._changed.difference_update(keys)
        out = []
        for key in keys:
            entry = self._topics[key]
            header = []
            body = array("d")
            for name, window in entry.fields.items():
                readings = window.readings()
                header.append((name, len(readings)))
                body.extend(readings)
            if _BIG_ENDIAN:
                body.byteswap()
            head = orjson.dumps({"seq": entry.applied, "fields": header})
            out.append((orjson.dumps(list(key)).decode(), head + b"\n" + body.tobytes()))
        return out

    def load_state(self, entries: list[tuple[str, bytes]]) -> tuple[int, int]:
        """Restore windows saved by :meth:`dump_state`, given least recently used first (the caps apply as
        if their topics had just been seen in that order). Returns (restored, skipped): an entry that does
        not parse is skipped, so a damaged one costs its topic's history, not the start. A header that is
        the list of fields alone (saved before the sequence was) restores with sequence 0."""
        restored = skipped = 0
        for key_text, state in entries:
            try:
                topic, window = orjson.loads(key_text)
                head, _, raw = state.partition(b"\n")
                header = orjson.loads(head)
                seq: Any = 0
                if type(header) is dict:
                    seq, header = header.get("seq"), header.get("fields")
                if (type(topic) is not str or type(window) is not int or not 2 <= window <= MAX_WINDOW
                        or type(header) is not list or type(seq) is not int or seq < 0 or len(raw) % 8):
                    raise ValueError("not a sensor.stats window")
                body = array("d", raw)
                if _BIG_ENDIAN:
                    body.byteswap()
                if not all(-_FLOAT_MAX <= x <= _FLOAT_MAX for x in body):  # readings are finite
                    raise ValueError("a reading is not a finite number")
                fields: dict[str, _Window] = {}
                at = 0
                for name, n in header:
                    if type(name) is not str or type(n) is not int or not 1 <= n <= len(body) - at:
                        raise ValueError(f"field {name!r}: no readings or more than were saved")
                    fields[name] = _Window.restored(window, body[at:at + n].tolist())
                    at += n
                if at != len(body):
                    raise ValueError("readings left over")
            except (ValueError, TypeError, orjson.JSONDecodeError):
                skipped += 1
                continue
            key = (topic, window)
            previous = self._topics.pop(key, None)
            if previous is not None:
                self._stored -= window * len(previous.fields)
            if len(self._topics) >= self.max_topics:
                self._evict_oldest()
            self._topics[key] = _Topic(fields, seq)
            self._stored += window * len(fields)
            if self._stored > self.max_stored:
                self._shrink(fields, window)
            restored += 1
        return restored, skipped

    def _evict_oldest(self) -> None:
        key, entry = self._topics.popitem(last=False)
        self._stored -= key[1] * len(entry.fields)
        self._changed.discard(key)  # nothing left to save; and the set stays as small as the windows

    def _shrink(self, current: dict[str, _Window], window: int) -> None:
        # Other topics go first (least recently used); the current one is last in the order.
        while self._stored > self.max_stored and len(self._topics) > 1:
            self._evict_oldest()
        # One topic alone over the budget: its oldest-created fields go, so state stays bounded.
        while self._stored > self.max_stored and current:
            del current[next(iter(current))]
            self._stored -= window

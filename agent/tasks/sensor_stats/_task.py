"""The task itself: options, the windows of every (topic, window size) key within their caps, and the state
saved between runs."""

from __future__ import annotations

import sys
from array import array
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import orjson

from agent.errors import InvalidPayload
from agent.tasks.sensor_stats._readings import parse_readings
from agent.tasks.sensor_stats._window import FLOAT_MAX, Window

DEFAULT_WINDOW = 60
MAX_WINDOW = 100_000
ANOMALY_Z = 3.0
DEFAULT_MAX_TOPICS = 10_000
# Readings all windows may hold together (~15 bytes each with the window's overhead, so ~75 MB at most):
# 10,000 topics of 8 fields at the default window fit. Without it a topic whose field names keep changing,
# or a large window, would grow memory without bound despite the topic cap.
DEFAULT_MAX_STORED = 5_000_000

_BIG_ENDIAN = sys.byteorder == "big"  # saved windows are little-endian whatever the gateway's CPU

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

    def __init__(self, fields: dict[str, Window] | None = None, seq: int = 0) -> None:
        self.fields: dict[str, Window] = {} if fields is None else fields
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
                    state = fields[name] = Window(window)
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
                if not all(-FLOAT_MAX <= x <= FLOAT_MAX for x in body):  # readings are finite
                    raise ValueError("a reading is not a finite number")
                fields: dict[str, Window] = {}
                at = 0
                for name, n in header:
                    if type(name) is not str or type(n) is not int or not 1 <= n <= len(body) - at:
                        raise ValueError(f"field {name!r}: no readings or more than were saved")
                    fields[name] = Window.restored(window, body[at:at + n].tolist())
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

    def _shrink(self, current: dict[str, Window], window: int) -> None:
        # Other topics go first (least recently used); the current one is last in the order.
        while self._stored > self.max_stored and len(self._topics) > 1:
            self._evict_oldest()
        # One topic alone over the budget: its oldest-created fields go, so state stays bounded.
        while self._stored > self.max_stored and current:
            del current[next(iter(current))]
            self._stored -= window


"""Link capacity traces for the replay: Mahimahi packet timestamps or two columns ``time_s Mbps``.

A trace becomes a cumulative capacity curve C(t) in bytes (piecewise linear, repeated with the trace's period),
so the time a transfer of n bytes started at t ends is the t' with C(t') − C(t) = n: one binary search.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

MAHIMAHI_PACKET_BYTES = 1500  # one delivery opportunity (Mahimahi README: 1500-byte packets)

FloatArray = npt.NDArray[np.float64]


class TraceError(ValueError):
    """The file is not a trace in either format, or it has no capacity at all."""


@dataclass(frozen=True, slots=True)
class Trace:
    """A link's capacity over one period; times in seconds, ``cum_bytes`` non-decreasing from 0."""

    name: str
    format: str  # "mahimahi" | "columns"
    times: FloatArray
    cum_bytes: FloatArray

    @property
    def period_s(self) -> float:
        return float(self.times[-1])

    @property
    def period_bytes(self) -> float:
        return float(self.cum_bytes[-1])

    @property
    def mean_mbps(self) -> float:
        return self.period_bytes * 8.0 / self.period_s / 1e6

    def capacity(self, t: float) -> float:
        """Bytes the link could carry from time 0 to ``t`` (t ≥ 0), the trace repeating."""
        laps, rest = divmod(t, self.period_s)
        return laps * self.period_bytes + float(np.interp(rest, self.times, self.cum_bytes))

    def finish(self, start: float, n_bytes: float) -> float:
        """When a transfer of ``n_bytes`` that has the link to itself from ``start`` ends."""
        if n_bytes <= 0:
            return start
        target = self.capacity(start) + n_bytes
        laps = math.floor(target / self.period_bytes)
        rest = target - laps * self.period_bytes
        if rest <= 0.0 and laps > 0:
            laps, rest = laps - 1, self.period_bytes
        i = int(np.searchsorted(self.cum_bytes, rest, side="left"))
        i = min(max(i, 1), self.cum_bytes.size - 1)
        c0, c1 = float(self.cum_bytes[i - 1]), float(self.cum_bytes[i])
        t0, t1 = float(self.times[i - 1]), float(self.times[i])
        t = t0 if c1 <= c0 else t0 + (t1 - t0) * (rest - c0) / (c1 - c0)
        return max(start, laps * self.period_s + t)

    def mbps(self, t0: float, t1: float) -> float:
        """Mean capacity over [t0, t1] in Mbit/s."""
        if t1 <= t0:
            return 0.0
        return (self.capacity(t1) - self.capacity(t0)) * 8.0 / (t1 - t0) / 1e6


def load_trace(path: Path) -> Trace:
    """Read a trace, detecting the format from the content (not the file name).

    Columns may be separated by whitespace, commas or semicolons; lines starting with ``#`` and a first line
    of column names (``time_s,mbps``) are skipped.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first number
    except OSError as exc:
        raise TraceError(f"{path}: cannot be read: {exc.strerror}") from exc
    except UnicodeDecodeError:
        raise TraceError(f"{path}: not a text file") from None
    trace = _plain_mahimahi(path.name, text)
    if trace is not None:
        return trace
    rows = [[field for field in _FIELDS.split(line) if field] for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    if rows and not any(_is_number(field) for field in rows[0]):
        rows = rows[1:]  # a header of column names
    if not rows:
        raise TraceError(f"{path}: empty")
    widths = {len(r) for r in rows}
    try:
        if widths == {1}:
            trace = _mahimahi(path.name, np.asarray([int(r[0]) for r in rows], dtype=np.int64))
        elif widths == {2}:
            trace = _columns(path.name, [(float(r[0]), float(r[1])) for r in rows])
        else:
            raise TraceError(
                f"{path}: expected one integer per line (Mahimahi) or two columns 'time_s Mbps' on every line"
            )
    except (ValueError, OverflowError) as exc:
        if isinstance(exc, TraceError):
            raise
        raise TraceError(f"{path}: not a number where one was expected ({exc})") from None
    return trace


_FIELDS = re.compile(r"[\s,;]+")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _plain_mahimahi(name: str, text: str) -> Trace | None:
    """A Mahimahi file of digits and newlines only, parsed by numpy in one pass; None for anything else, which
    takes the line-by-line path (and gets its error message there).

    A 5G link's trace holds tens of millions of lines (one per 1500-byte packet): as Python lists of strings
    that is gigabytes and half a minute; this takes a third of the time and a fifth of the memory.
    """
    if text.startswith("\n") or "\n\n" in text or not text.replace("\n", "").isdigit():
        return None  # blank lines, spaces, comments, signs, separators: not one plain integer per line
    try:
        values = np.fromstring(text, dtype=np.float64, sep="\n")
    except ValueError:
        return None
    lines = text.count("\n") + (not text.endswith("\n"))
    if values.size != lines or values.max() >= 2.0**53:
        return None  # a float64 holds every integer below 2^53 exactly
    return _mahimahi(name, values.astype(np.int64))


def _mahimahi(name: str, ms: npt.NDArray[np.int64]) -> Trace:
    if ms.min() < 0 or np.any(np.diff(ms) < 0):
        raise TraceError(f"{name}: Mahimahi timestamps must be non-negative and non-decreasing")
    period_ms = int(ms[-1])
    if period_ms <= 0:
        raise TraceError(f"{name}: the trace lasts 0 ms")
    # Each line is one packet delivered within that millisecond: the capacity rises over [m, m+1) and is flat
    # in the milliseconds without lines (outages stay outages). The trace repeats with period = the last
    # timestamp, so a packet at exactly that time belongs to millisecond 0 of the next lap.
    slots, counts = np.unique(ms % period_ms, return_counts=True)
    after = np.cumsum(counts) * float(MAHIMAHI_PACKET_BYTES)
    before = after - counts * float(MAHIMAHI_PACKET_BYTES)
    times = np.empty(2 * slots.size + 2)
    cum = np.empty_like(times)
    times[0], cum[0] = 0.0, 0.0
    times[1:-1:2], cum[1:-1:2] = slots / 1000.0, before
    times[2:-1:2], cum[2:-1:2] = (slots + 1) / 1000.0, after
    times[-1], cum[-1] = period_ms / 1000.0, after[-1]
    return _checked(Trace(name, "mahimahi", times, cum))


def _columns(name: str, rows: list[tuple[float, float]]) -> Trace:
    data = np.asarray(rows, dtype=np.float64)
    t, mbps = data[:, 0], data[:, 1]
    if not np.all(np.isfinite(data)) or np.any(mbps < 0) or np.any(np.diff(t) <= 0):
        raise TraceError(f"{name}: times must increase and throughputs be finite and non-negative")
    # Row i is the throughput over the interval ending at t_i (Pensieve's cooked format), so the rate of
    # (t_{i-1}, t_i] is mbps[i]; the curve starts at the first row's time, taken as the origin.
    start = t[0]
    times = t - start
    cum = np.concatenate(([0.0], np.cumsum(np.diff(t) * mbps[1:] * 1e6 / 8.0)))
    if times.size < 2:
        raise TraceError(f"{name}: a two-column trace needs at least two rows")
    return _checked(Trace(name, "columns", times, cum))


def _checked(trace: Trace) -> Trace:
    if trace.period_bytes <= 0:
        raise TraceError(f"{trace.name}: the link has no capacity at all over the whole trace")
    return trace

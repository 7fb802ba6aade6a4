"""One field's rolling window: the last readings in a ring buffer, with running sums that give the mean, the
standard deviation and a reading's z-score in O(1), exactly enough whatever the readings' magnitude."""

from __future__ import annotations

import math
from array import array

FLOAT_MAX = 1.7976931348623157e308


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
        std = FLOAT_MAX
    if std == 0.0:
        return mean, 0.0, 0.0
    try:
        z = (math.ldexp(value, -exponent) - mean_s) / std_s
    except OverflowError:  # the value dwarfs the window, so its sign is the deviation's sign
        z = math.copysign(math.inf, value)
    if not -FLOAT_MAX <= z <= FLOAT_MAX:  # beyond measure; the largest float still flags the anomaly
        z = math.copysign(FLOAT_MAX, z)
    return mean, std, z


# Updates between exact recomputations of a window's sums, at least (see Window).
RESUM_MIN = 256

# Below this, sums of squares may have lost readings to underflow (|x| < ~1e-140): compute with scaling.
_TINY = 1e-280


class Window:
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
                if not -FLOAT_MAX <= z <= FLOAT_MAX:
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
    def restored(cls, capacity: int, readings: list[float]) -> Window:
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
            if -FLOAT_MAX <= z <= FLOAT_MAX:
                return mean, std, z
        return _robust(self.values, x)

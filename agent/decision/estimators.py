"""Online estimators behind the total-time model (docs/design.md#decision-model). Pure arithmetic on an injected clock.

Every estimator starts at a prior, learns from measurements and, when measurements stop, drifts back toward
the prior instead of freezing: that drift is what makes the policy try a side again after it stopped using it,
so a recovered uplink (or a slowed one) is noticed. The ageing is exponential in time, computed lazily when an
estimate is read, so an estimate costs a handful of float operations and no timers.
"""

from __future__ import annotations

import math

# Half-lives are in seconds of the injected clock; a reading older than ~50 half-lives carries no weight.
_NEGLIGIBLE = 1e-15
_LN2 = math.log(2.0)
# A bandwidth memory replaces the one in use only once its recent squared prediction errors are this much lower.
_SWITCH_RATIO = 1.0


def decay_factor(half_life_s: float, elapsed_s: float) -> float:
    """Weight left to a sample ``elapsed_s`` old: ``2^(-elapsed/half_life)``; a clock step back counts as 0."""
    if elapsed_s <= 0.0:
        return 1.0
    return math.exp(-_LN2 * elapsed_s / half_life_s)


class DecayingMean:
    """Weighted mean of samples whose weights halve every ``half_life_s``, pulled toward a prior.

    ``estimate(prior, now) = (Σ wᵢ·fᵢ·xᵢ + w₀·prior) / (Σ wᵢ·fᵢ + w₀)`` with ``fᵢ`` the decay since sample i.
    Chosen over a plain EWMA because its memory is in *time*, not in samples: an estimate fed once an hour and
    one fed ten times a second age alike, and with no samples it converges to the prior by itself. The prior
    is passed at read time so a long-term estimate can serve as the prior of a short-term one.
    """

    __slots__ = ("_half_life_s", "_prior_weight", "_sum", "_t", "_weight")

    def __init__(self, half_life_s: float, prior_weight: float) -> None:
        if half_life_s <= 0.0 or prior_weight <= 0.0:
            raise ValueError("half_life_s and prior_weight must be positive")
        self._half_life_s = half_life_s
        self._prior_weight = prior_weight
        self._sum = 0.0
        self._weight = 0.0
        self._t = 0.0

    @property
    def half_life_s(self) -> float:
        return self._half_life_s

    def observe(self, value: float, weight: float, now: float) -> None:
        f = decay_factor(self._half_life_s, now - self._t)
        self._sum = self._sum * f + value * weight
        self._weight = self._weight * f + weight
        self._t = max(self._t, now)

    def estimate(self, prior: float, now: float) -> float:
        f = decay_factor(self._half_life_s, now - self._t)
        w = self._weight * f
        if w < _NEGLIGIBLE:
            return prior
        return (self._sum * f + prior * self._prior_weight) / (w + self._prior_weight)

    def data_weight(self, now: float) -> float:
        """How much measured evidence is left (same unit as the sample weights)."""
        return self._weight * decay_factor(self._half_life_s, now - self._t)


class NetworkEstimate:
    """A quantity of the network path (bandwidth in bytes/s, or RTT in seconds) on two time scales.

    A short-memory :class:`DecayingMean` tracks the current state of a cellular link, whose capacity changes
    within seconds; its prior is a long-memory mean of the same samples, whose prior is the configured value.
    After an idle gap the estimate therefore returns to what this link usually delivers, not to a factory
    default, and only a gateway idle for many long half-lives falls back to the configuration.

    Robustness: each sample is clipped to within ``clip`` × the current estimate before it is averaged (a
    winsorised mean). One transfer stalled by a handover cannot drive the estimate to zero, yet a real change
    moves it by up to that factor per sample, so an outage or a recovery is followed within two or three
    samples. Bandwidth samples are weighted by their duration, which makes the mean of rates equal to
    Σ bytes / Σ seconds: the estimate that predicts transfer *time*, and one in which tiny transfers (dominated
    by latency, not capacity) count for little.

    How short the short memory should be depends on the link. On a steady one a long memory averages noise
    away; on one whose capacity decorrelates within a second or two (LTE while driving) samples a few seconds
    old describe a link that is gone, and duration weighting lets the long, slow transfers of a fade outweigh
    the short, fast ones that show the recovery. ``fast_half_life_s`` adds a second, shorter memory fed the
    same samples. Each sample first scores both memories by the squared log error of their prediction of it
    (scores forgotten with ``selection_half_life_s``), and the estimate comes from the memory that has
    predicted this link better lately: the choice follows the kind of network from its own measurements.
    """

    __slots__ = (
        "_best",
        "_clip",
        "_errors",
        "_errors_t",
        "_long",
        "_memo",
        "_prior",
        "_rate",
        "_selection_half_life_s",
        "_short",
    )

    def __init__(
        self,
        prior: float,
        *,
        half_life_s: float,
        baseline_half_life_s: float,
        prior_weight: float,
        clip: float = 8.0,
        rate: bool = False,
        fast_half_life_s: float | None = None,
        selection_half_life_s: float = 60.0,
    ) -> None:
        """``rate``: samples are rates weighted by duration; a clipped sample then keeps its byte count (its
        weight becomes bytes / clipped rate), so clipping a stall does not inflate its weight.
        ``fast_half_life_s``: a shorter alternative to ``half_life_s``, used while it predicts better."""
        if prior <= 0.0 or not math.isfinite(prior):
            raise ValueError("the prior must be a positive finite number")
        if selection_half_life_s <= 0.0:
            raise ValueError("selection_half_life_s must be positive")
        self._prior = prior
        memories = [half_life_s] if fast_half_life_s is None else [half_life_s, fast_half_life_s]
        self._short = tuple(DecayingMean(h, prior_weight) for h in memories)
        self._errors = [0.0] * len(memories)  # decayed sums of squared log prediction errors
        self._errors_t = 0.0
        self._selection_half_life_s = selection_half_life_s
        self._best = 0  # the memory in use: the configured one until another has predicted better
        self._long = DecayingMean(baseline_half_life_s, prior_weight)
        self._clip = clip
        self._rate = rate
        # The last estimate and its time: the daemon decides a whole commit's tasks at one ``now``.
        self._memo = (math.nan, 0.0)

    def observe(self, value: float, weight: float, now: float) -> None:
        if not (value > 0.0 and math.isfinite(value) and weight > 0.0 and math.isfinite(weight)):
            return  # a zero-length or broken measurement says nothing about the path
        current = self.estimate(now)
        clipped = min(max(value, current / self._clip), current * self._clip)
        if self._rate:
            weight *= value / clipped
        if len(self._short) > 1:
            self._score(clipped, now)
        for memory in self._short:
            memory.observe(clipped, weight, now)
        self._long.observe(clipped, weight, now)
        self._memo = (math.nan, 0.0)

    def estimate(self, now: float) -> float:
        memo_t, value = self._memo
        if now == memo_t:
            return value
        value = self._short[self._best].estimate(self._long.estimate(self._prior, now), now)
        self._memo = (now, value)
        return value

    def memory_s(self) -> float:
        """Half-life of the short-term memory in use: the configured one, or the fast one while it predicts
        better."""
        return self._short[self._best].half_life_s

    def _score(self, sample: float, now: float) -> None:
        # Each memory's prediction of this sample, made before the sample is folded in: the error of a decision
        # taken just before the transfer. Log errors count ×2 and ÷2 alike.
        prior = self._long.estimate(self._prior, now)
        f = decay_factor(self._selection_half_life_s, now - self._errors_t)
        self._errors_t = max(self._errors_t, now)
        errors = self._errors
        for i, memory in enumerate(self._short):
            errors[i] = errors[i] * f + math.log(sample / memory.estimate(prior, now)) ** 2
        # Any lower error switches: requiring a clear margin (0.8–0.9) lost the gain on fast-changing links.
        best = min(range(len(errors)), key=errors.__getitem__)
        if errors[best] < _SWITCH_RATIO * errors[self._best]:
            self._best = best

    def baseline(self, now: float) -> float:
        """The long-term value the short-term estimate returns to when not refreshed."""
        return self._long.estimate(self._prior, now)


class ServiceTimeModel:
    """Service time of one task kind on one side as ``a + b·bytes``, learned online.

    Estimator: exponentially weighted least squares. Each new sample multiplies the old ones' weights by
    ``1 − 1/memory`` (forgetting by count: a gateway that becomes slower, e.g. thermally throttled, is learned
    within about ``memory`` executions), and all data also lose weight with time (``half_life_s``), so a side
    that is not used ages back toward its prior. The prior enters as two pseudo-observations on the prior line,
    at 0 bytes and at ``ref_bytes``, worth ``prior_weight`` samples in all (one by default): until real samples
    exist the prior line is returned exactly, and when all samples have the same size (``sensor.stats`` rows)
    the level is learned from data while the slope stays near the prior. A line is the right family: the
    built-in tasks are linear (``sensor.stats``) or close to it (an FFT is n·log n, linear within a 10× size
    range); more flexible fits need more samples than a gateway gets per kind. ``a`` and ``b`` are kept
    non-negative so that a larger input never looks cheaper.

    The fit is a 2×2 solve; it is cached and redone only after a sample or when the ageing has moved noticeably
    (1/64 of a half-life), which keeps :meth:`predict` at a multiplication and an addition.
    """

    __slots__ = (
        "_a",
        "_b",
        "_fit_t",
        "_forget",
        "_half_life_s",
        "_prior_a",
        "_prior_b",
        "_prior_weight",
        "_ref_bytes",
        "_sw",
        "_sx",
        "_sxx",
        "_sxy",
        "_sy",
        "_t",
    )

    def __init__(
        self,
        prior_fixed_s: float,
        prior_per_byte_s: float,
        *,
        memory: int,
        half_life_s: float,
        prior_weight: float = 1.0,
        ref_bytes: float = 65536.0,
    ) -> None:
        self._prior_a = max(0.0, prior_fixed_s)
        self._prior_b = max(0.0, prior_per_byte_s)
        self._forget = 1.0 - 1.0 / max(2, memory)
        self._half_life_s = half_life_s
        self._prior_weight = prior_weight
        self._ref_bytes = ref_bytes
        self._sw = self._sx = self._sy = self._sxx = self._sxy = 0.0
        self._t = 0.0
        self._a = self._prior_a
        self._b = self._prior_b
        self._fit_t: float | None = None  # None: the cached fit is stale

    def observe(self, n_bytes: int, seconds: float, now: float) -> None:
        if not (seconds >= 0.0 and math.isfinite(seconds)) or n_bytes < 0:
            return
        f = decay_factor(self._half_life_s, now - self._t) * self._forget
        x = float(n_bytes)
        self._sw = self._sw * f + 1.0
        self._sx = self._sx * f + x
        self._sy = self._sy * f + seconds
        self._sxx = self._sxx * f + x * x
        self._sxy = self._sxy * f + x * seconds
        self._t = max(self._t, now)
        self._fit_t = None

    def coefficients(self, now: float) -> tuple[float, float]:
        """``(a, b)``: fixed seconds and seconds per byte."""
        fit_t = self._fit_t
        if fit_t is not None and abs(now - fit_t) < self._half_life_s / 64.0:
            return self._a, self._b
        self._a, self._b = self._fit(now)
        self._fit_t = now
        return self._a, self._b

    def predict(self, n_bytes: int, now: float) -> float:
        a, b = self.coefficients(now)
        return a + b * n_bytes

    def samples(self, now: float) -> float:
        """Effective number of measured samples still weighing in."""
        return self._sw * decay_factor(self._half_life_s, now - self._t)

    def _fit(self, now: float) -> tuple[float, float]:
        f = decay_factor(self._half_life_s, now - self._t)
        half = self._prior_weight / 2.0
        ref = self._ref_bytes
        y_ref = self._prior_a + self._prior_b * ref
        w = self._sw * f + self._prior_weight
        sx = self._sx * f + half * ref
        sy = self._sy * f + half * (self._prior_a + y_ref)
        sxx = self._sxx * f + half * ref * ref
        sxy = self._sxy * f + half * ref * y_ref
        var = sxx - sx * sx / w
        b = (sxy - sx * sy / w) / var if var > 0.0 else self._prior_b
        b = max(0.0, b)
        a = (sy - b * sx) / w
        if a < 0.0:
            # The best line crosses zero below 0 bytes: fit through the origin instead (still b >= 0).
            a, b = 0.0, max(0.0, sxy / sxx) if sxx > 0.0 else self._prior_b
        return a, b

"""Each online estimator of the total-time model on its own: priors, learning, forgetting, ageing, robustness."""

from __future__ import annotations

import math

import pytest

from agent.decision.estimators import DecayingMean, NetworkEstimate, ServiceTimeModel, decay_factor


def test_decay_factor_halves_per_half_life_and_ignores_clock_steps_back() -> None:
    assert decay_factor(10.0, 0.0) == 1.0
    assert decay_factor(10.0, 10.0) == pytest.approx(0.5)
    assert decay_factor(10.0, 30.0) == pytest.approx(0.125)
    assert decay_factor(10.0, -5.0) == 1.0


def test_decaying_mean_starts_at_the_prior_and_returns_to_it() -> None:
    mean = DecayingMean(half_life_s=10.0, prior_weight=1.0)
    assert mean.estimate(5.0, now=0.0) == 5.0
    for i in range(20):
        mean.observe(1.0, 1.0, now=float(i) * 0.01)
    assert mean.estimate(5.0, now=0.2) == pytest.approx(1.0, abs=0.25)
    # Unobserved for 20 half-lives: the data weigh ~1e-6 against the prior's 1.
    assert mean.estimate(5.0, now=200.0) == pytest.approx(5.0, abs=1e-3)


def test_decaying_mean_weights_samples() -> None:
    mean = DecayingMean(half_life_s=1e9, prior_weight=1e-9)
    mean.observe(10.0, 3.0, now=0.0)
    mean.observe(20.0, 1.0, now=0.0)
    assert mean.estimate(0.0, now=0.0) == pytest.approx(12.5)


def _bandwidth(prior_bps: float = 250_000.0) -> NetworkEstimate:
    return NetworkEstimate(prior_bps, half_life_s=5.0, baseline_half_life_s=600.0, prior_weight=0.5, rate=True)


def test_bandwidth_learns_bytes_over_seconds() -> None:
    bw = _bandwidth()
    now = 0.0
    for _ in range(10):
        now += 1.0
        bw.observe(1_000_000 / 1.0, 1.0, now)  # 1 MB/s, every second
    assert bw.estimate(now) == pytest.approx(1_000_000, rel=0.05)


def test_bandwidth_is_duration_weighted_so_tiny_transfers_barely_count() -> None:
    bw = _bandwidth()
    bw.observe(500_000.0, 2.0, now=1.0)  # a real upload: 1 MB in 2 s
    before = bw.estimate(1.0)
    bw.observe(300 / 0.05, 0.05, now=1.0)  # a 300-byte result that took 50 ms (latency, not capacity)
    assert bw.estimate(1.0) > 0.8 * before


def test_bandwidth_clips_a_single_outlier() -> None:
    bw = _bandwidth(prior_bps=1_000_000.0)
    for t in range(1, 6):
        bw.observe(1_000_000.0, 1.0, float(t))
    # One transfer stalled by a handover: 100 kB in 100 s (1 kB/s, 1000x slower).
    bw.observe(1_000.0, 100.0, now=6.0)
    assert bw.estimate(6.0) > 1_000_000.0 / 8 * 0.9  # at most the clip factor down, not to 1 kB/s


def test_bandwidth_follows_a_real_change_within_a_few_transfers() -> None:
    bw = _bandwidth(prior_bps=1_000_000.0)
    now = 0.0
    for _ in range(10):
        now += 1.0
        bw.observe(1_000_000.0, 1.0, now)  # 1 MB uploads taking 1 s
    for _ in range(2):
        now += 10.0
        bw.observe(100_000.0, 10.0, now)  # the link drops tenfold: the same uploads take 10 s
    assert bw.estimate(now) < 200_000.0
    for _ in range(15):
        now += 1.0
        bw.observe(1_000_000.0, 1.0, now)  # and recovers; slow samples weigh more (they took longer), so
    assert bw.estimate(now) > 700_000.0  # recovery shows once they have aged a few half-lives (5 s each)


def test_bandwidth_falls_back_to_the_long_term_value_not_the_prior_after_an_idle_gap() -> None:
    bw = _bandwidth(prior_bps=250_000.0)
    for t in range(1, 61):
        bw.observe(2_000_000.0 if t % 2 else 1_000_000.0, 1.0, float(t))
    idle = 60.0 + 60.0  # 12 short half-lives, 0.1 long ones
    assert bw.estimate(idle) == pytest.approx(bw.baseline(idle), rel=0.01)
    assert bw.baseline(idle) > 1_000_000.0  # what this link usually does, far above the 250 kB/s prior
    # After many long half-lives without a sample, the configuration is all that is left.
    assert bw.estimate(60.0 + 600.0 * 40) == pytest.approx(250_000.0, rel=0.01)


def test_network_estimate_ignores_broken_samples() -> None:
    bw = _bandwidth()
    for value, weight in ((0.0, 1.0), (math.inf, 1.0), (1e6, 0.0), (math.nan, 1.0), (-5.0, 1.0)):
        bw.observe(value, weight, now=1.0)
    assert bw.estimate(1.0) == 250_000.0


def test_rtt_is_a_mean_of_samples() -> None:
    rtt = NetworkEstimate(0.08, half_life_s=5.0, baseline_half_life_s=600.0, prior_weight=1.0)
    for i in range(20):
        rtt.observe(0.05, 1.0, now=float(i) * 0.1)
    assert rtt.estimate(2.0) == pytest.approx(0.05, abs=0.003)


def test_service_model_returns_the_prior_line_before_any_sample() -> None:
    model = ServiceTimeModel(0.02, 3e-6, memory=50, half_life_s=3600.0)
    assert model.coefficients(0.0) == pytest.approx((0.02, 3e-6))
    assert model.predict(100_000, 0.0) == pytest.approx(0.32)


def test_service_model_fits_a_line_from_samples() -> None:
    model = ServiceTimeModel(0.0, 1e-6, memory=200, half_life_s=3600.0)
    for i in range(100):
        size = 10_000 + (i % 10) * 30_000
        model.observe(size, 0.05 + 4e-6 * size, now=float(i))
    # The two prior pseudo-samples still pull a little; predictions within the measured range are what count.
    for size in (10_000, 150_000, 280_000):
        assert model.predict(size, 100.0) == pytest.approx(0.05 + 4e-6 * size, rel=0.07)
    assert model.coefficients(100.0)[1] == pytest.approx(4e-6, rel=0.05)


def test_service_model_forgets_so_a_slower_gateway_is_learned() -> None:
    model = ServiceTimeModel(0.001, 0.0, memory=20, half_life_s=3600.0)
    for i in range(200):
        model.observe(300, 0.001, now=float(i))
    for i in range(200, 260):  # throttled: three times slower from now on
        model.observe(300, 0.003, now=float(i))
    assert model.predict(300, 260.0) == pytest.approx(0.003, rel=0.1)


def test_service_model_with_one_size_keeps_the_prior_slope() -> None:
    model = ServiceTimeModel(0.001, 2e-8, memory=50, half_life_s=3600.0)
    for i in range(50):
        model.observe(250, 0.002, now=float(i))
    a, b = model.coefficients(50.0)
    assert a + b * 250 == pytest.approx(0.002, rel=0.05)
    assert 0.0 <= b < 1e-7


def test_service_model_never_has_negative_coefficients() -> None:
    model = ServiceTimeModel(0.01, 1e-6, memory=50, half_life_s=3600.0)
    # Bigger inputs measured faster (noise): the fit must not make size reduce the time.
    for i in range(50):
        model.observe(1000 + i * 1000, max(0.0, 0.1 - i * 0.002), now=float(i))
    a, b = model.coefficients(50.0)
    assert a >= 0.0 and b >= 0.0


def test_service_model_ages_back_to_the_prior_when_unused() -> None:
    model = ServiceTimeModel(0.5, 0.0, memory=50, half_life_s=100.0)
    for i in range(50):
        model.observe(1000, 0.1, now=float(i))
    assert model.predict(1000, 50.0) == pytest.approx(0.1, rel=0.2)
    assert model.predict(1000, 50.0 + 100.0 * 20) == pytest.approx(0.5, rel=0.01)


def _two_memories() -> NetworkEstimate:
    return NetworkEstimate(1_000_000.0, half_life_s=5.0, baseline_half_life_s=600.0, prior_weight=0.5, rate=True,
                           fast_half_life_s=1.0)


def test_bandwidth_switches_to_the_fast_memory_on_a_link_that_changes_within_seconds() -> None:
    bw, fixed = _two_memories(), _bandwidth(prior_bps=1_000_000.0)
    now = 0.0
    for step in range(61):  # capacity alternates between 4 MB/s and 250 kB/s every 3 s, a transfer a second
        rate = 4_000_000.0 if (step // 3) % 2 == 0 else 250_000.0
        for _ in range(3 if step < 60 else 1):
            now += 1.0
            bw.observe(rate, 0.5, now)
            fixed.observe(rate, 0.5, now)
    assert bw.memory_s() == 1.0
    # One fast transfer after a slow stretch: the fast memory already expects a much faster link.
    assert bw.estimate(now) > 1.25 * fixed.estimate(now)


def test_bandwidth_keeps_the_configured_memory_on_a_noisy_steady_link() -> None:
    bw = _two_memories()
    now = 0.0
    for step in range(200):  # i.i.d. noise around 1 MB/s: averaging over a longer memory predicts better
        now += 1.0
        bw.observe(1_000_000.0 * (2.0 if step % 2 else 0.5), 0.5, now)
    assert bw.memory_s() == 5.0
    assert bw.estimate(now) == pytest.approx(1_250_000.0, rel=0.1)  # equal durations: the mean of the rates


def test_a_single_memory_is_the_default() -> None:
    bw = _bandwidth()
    bw.observe(1_000_000.0, 1.0, 1.0)
    assert bw.memory_s() == 5.0

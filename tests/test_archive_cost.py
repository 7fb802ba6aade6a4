"""The storage cost model (agent/archive/cost.py), the retrieval-rate estimator and explain --archive's forms.

Pure arithmetic: every term against its formula, properties over open-ended inputs, the estimator against read
patterns whose true rate is known, and what importing the model costs the daemon.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.archive.cost import (
    GB,
    KNEE,
    SECONDS_PER_MONTH,
    ArchivePrices,
    RetrievalRate,
    SegmentFacts,
    place_segment,
    shadow_factor,
)
from agent.archive.explain import as_json, render

ROOT = Path(__file__).resolve().parents[1]
DAY = 86_400.0
PRICES = ArchivePrices(uplink_per_gb=0.5, cloud_storage_per_gb_month=0.023, cloud_egress_per_gb=0.09,
                       disk_budget_bytes=200 * 10**9, margin=0.1)


# --- the model, term by term --------------------------------------------------------------------------------


def test_each_term_is_its_formula() -> None:
    facts = SegmentFacts(size_bytes=2 * 10**9, months_left=3.0, retrievals_per_month=0.5,
                         disk_used_bytes=190 * 10**9)
    p = place_segment(facts, PRICES)
    reads = 0.5 * 3.0  # over the rest of its life
    assert p.cloud.storage == pytest.approx(2 * 0.5 + 2 * 3.0 * 0.023)  # upload + GB-months
    assert p.cloud.retrieval == pytest.approx(2 * reads * 0.09)  # egress
    assert p.gateway.retrieval == pytest.approx(2 * reads * 0.5)  # a read from the gateway crosses the uplink
    fill = 190 / 200
    factor = ((fill / (1 - fill)) / (KNEE / (1 - KNEE))) ** 4
    assert p.gateway.storage == pytest.approx(2 * 3.0 * factor * (0.5 + 0.023))
    for terms in (p.gateway, p.cloud):
        assert terms.total == pytest.approx(terms.storage + terms.retrieval)
    # The figures each term came from are in its explanation.
    assert p.gateway.explain["disk_fill"] == pytest.approx(fill)
    assert p.gateway.explain["shadow_factor"] == pytest.approx(factor)
    assert p.cloud.explain["upload"] == pytest.approx(1.0)
    assert p.cloud.explain["expected_reads"] == pytest.approx(reads)


def test_shadow_factor_is_nothing_when_empty_one_at_the_knee_and_unbounded_at_the_budget() -> None:
    assert shadow_factor(0, 100) == 0.0
    assert shadow_factor(int(KNEE * 10**9), 10**9) == pytest.approx(1.0)
    assert shadow_factor(50, 100) < 0.001  # a half-full disk is nearly free
    assert math.isinf(shadow_factor(100, 100)) and math.isinf(shadow_factor(101, 100))


def test_a_read_light_segment_stays_and_a_read_heavy_one_leaves() -> None:
    light = place_segment(SegmentFacts(10**8, 1.0, 0.05, 10**10), PRICES)
    assert (light.choice, light.reason) == ("gateway", "cheaper")
    # Read five times over its month: 5 × 0.5 on the uplink against 0.5 + 0.023 + 5 × 0.09 in the cloud.
    heavy = place_segment(SegmentFacts(10**8, 1.0, 5.0, 10**10), PRICES)
    assert (heavy.choice, heavy.reason) == ("cloud", "cheaper")


def test_within_the_margin_the_segment_stays_where_it_was_sealed() -> None:
    # Reads at which both places cost the same: r × (0.5 - 0.09) = 0.5 + 0.023 (on a nearly empty disk).
    even = (0.5 + 0.023) / (0.5 - 0.09)
    for reads in (even * 0.97, even, even * 1.03):
        p = place_segment(SegmentFacts(10**8, 1.0, reads, 1), PRICES)
        assert (p.choice, p.reason) == ("gateway", "margin"), reads
    assert place_segment(SegmentFacts(10**8, 1.0, even * 1.3, 1), PRICES).choice == "cloud"


def test_over_the_budget_the_segment_must_leave() -> None:
    p = place_segment(SegmentFacts(10**8, 1.0, 0.0, PRICES.disk_budget_bytes + 1), PRICES)
    assert (p.choice, p.reason) == ("cloud", "over_budget")
    assert math.isinf(p.gateway.total) and math.isfinite(p.cloud.total)


def test_a_full_disk_sends_long_kept_segments_first() -> None:
    # One price per GB-month for every route: a segment kept three months holds the disk three times as long
    # as one kept a month, while its cloud cost grows only by two months of storage.
    used = int(0.977 * PRICES.disk_budget_bytes)  # just below the knee
    month = place_segment(SegmentFacts(10**8, 1.0, 0.0, used), PRICES)
    quarter = place_segment(SegmentFacts(10**8, 3.0, 0.0, used), PRICES)
    assert month.choice == "gateway" and quarter.choice == "cloud"


def test_prices_are_checked() -> None:
    PRICES.check()
    for bad in (ArchivePrices(-1, 0, 0, 1, 0), ArchivePrices(1, 1, 1, 0, 0), ArchivePrices(1, 1, 1, 1, 1.0)):
        with pytest.raises(ValueError):  # noqa: PT011 (each message names its field)
            bad.check()


sizes = st.integers(min_value=1, max_value=10**10)
months = st.floats(min_value=0.0, max_value=24.0)
rates = st.floats(min_value=0.0, max_value=50.0)
fills = st.integers(min_value=0, max_value=PRICES.disk_budget_bytes * 2)


@given(size=sizes, left=months, rate=rates, used=fills, more=st.floats(min_value=0.0, max_value=50.0))
def test_more_reads_never_keep_a_segment_on_the_gateway_that_would_leave(size: int, left: float, rate: float,
                                                                         used: int, more: float) -> None:
    # With the uplink dearer than egress, reads favour the cloud.
    before = place_segment(SegmentFacts(size, left, rate, used), PRICES)
    after = place_segment(SegmentFacts(size, left, rate + more, used), PRICES)
    assert not (before.choice == "cloud" and after.choice == "gateway")


@given(size=sizes, left=months, rate=rates, used=fills, more=st.integers(min_value=0, max_value=10**11))
def test_a_fuller_disk_never_brings_a_segment_back(size: int, left: float, rate: float, used: int,
                                                   more: int) -> None:
    before = place_segment(SegmentFacts(size, left, rate, used), PRICES)
    after = place_segment(SegmentFacts(size, left, rate, used + more), PRICES)
    assert not (before.choice == "cloud" and after.choice == "gateway")
    assert after.cloud == before.cloud  # the cloud's price does not depend on the gateway's disk
    assert after.gateway.storage >= before.gateway.storage


@given(size=sizes, left=months, rate=rates, used=fills)
def test_the_choice_is_the_cheaper_total_by_the_margin(size: int, left: float, rate: float, used: int) -> None:
    p = place_segment(SegmentFacts(size, left, rate, used), PRICES)
    assert p.gateway.total >= 0 and p.cloud.total >= 0
    if p.choice == "cloud":
        assert p.cloud.total <= p.gateway.total * (1 - PRICES.margin) or p.reason == "over_budget"
    else:
        assert p.gateway.total <= p.cloud.total / (1 - PRICES.margin) + 1e-12


# --- the retrieval rate -------------------------------------------------------------------------------------


def feed(rate: RetrievalRate, days: int, *, daily_gb: float, reads: list[tuple[float, float]]) -> None:
    """Seal ``daily_gb`` a day in hourly segments and replay ``reads`` (time, GB), in time order."""
    events = [(h * 3600.0, 0, daily_gb / 24) for h in range(1, days * 24 + 1)]
    events += [(t, 1, gb) for t, gb in reads]
    for t, kind, gb in sorted(events):
        if kind == 0:
            rate.sealed(t, int(gb * GB))
        else:
            rate.read(t, int(gb * GB))


def test_the_prior_holds_until_something_is_sealed() -> None:
    rate = RetrievalRate(0.25, 30)
    assert rate.per_month(0.0) == 0.25
    rate.read(10.0, 10**9)  # a read of data sealed before the agent started: nothing to divide by yet
    assert rate.per_month(20.0) == 0.25 and rate.weight(20.0) == 0.0


@pytest.mark.parametrize(("pattern", "lifetime_reads"), [
    ("nightly", 1.0),  # every night the previous day: each segment once
    ("monthly", 1.0),  # once a month the last 30 days: each segment once, all at once
    ("nightly+monthly", 2.0),
])
def test_learns_reads_per_segment_whatever_the_ages_asked(pattern: str, lifetime_reads: float) -> None:
    # A 90-day route sealing 3 GB a day; after two years the estimate is the reads per segment over its life
    # divided by its three months, and the prior (0.01) is all but forgotten.
    rate = RetrievalRate(0.01, 90, start=0.0)
    reads: list[tuple[float, float]] = []
    days = 720
    if "nightly" in pattern:
        reads += [(d * DAY + 60, 3.0) for d in range(1, days + 1)]
    if "monthly" in pattern:
        reads += [(m * 30 * DAY + 60, 90.0) for m in range(1, days // 30 + 1)]
    feed(rate, days, daily_gb=3.0, reads=reads)
    now = days * DAY + 120
    assert rate.weight(now) > 0.95
    # The monthly reads come in one lump: just after one the estimate is at its highest, yet within a fifth.
    assert rate.per_month(now) == pytest.approx(lifetime_reads / 3.0, rel=0.2)


def test_a_monthly_report_swings_the_estimate_little() -> None:
    # Through a month, the estimate of a route read in one lump a month moves by 2^(30 / 60) ≈ 1.41 from top to
    # bottom (the half-life is two months), about ±17 % around the true rate.
    rate = RetrievalRate(0.0, 30, start=0.0)
    feed(rate, 720, daily_gb=1.0, reads=[(m * 30 * DAY + 60, 30.0) for m in range(1, 25)])
    seen = []
    for hour in range(1, 30 * 24):
        t = 720 * DAY + hour * 3600.0
        rate.sealed(t, int(GB / 24))
        seen.append(rate.per_month(t))
    mean = sum(seen) / len(seen)
    assert mean == pytest.approx(1.0, rel=0.1)
    assert max(seen) / min(seen) < 1.45


def test_the_prior_weighs_a_week_at_first() -> None:
    rate = RetrievalRate(1.0, 30, start=0.0)
    feed(rate, 7, daily_gb=1.0, reads=[])
    assert rate.weight(7 * DAY) == pytest.approx(0.5, abs=0.05)
    assert rate.per_month(7 * DAY) == pytest.approx(0.5, abs=0.05)


def test_a_clock_step_backwards_is_not_observation_time() -> None:
    rate = RetrievalRate(1.0, 30, start=0.0)
    rate.sealed(DAY, 10**9)
    weight = rate.weight(DAY)
    rate.read(DAY / 2, 10**9)
    assert rate.weight(DAY / 2) == weight
    assert rate.observed_per_month(DAY) == pytest.approx(1.0 / (30 * DAY / SECONDS_PER_MONTH))


def test_bad_arguments_are_refused() -> None:
    for args in ((-1.0, 30.0), (1.0, 0.0)):
        with pytest.raises(ValueError, match="need"):
            RetrievalRate(*args)
    with pytest.raises(ValueError, match="need"):
        RetrievalRate(1.0, 30.0, half_life_days=0.0)


# --- explain --archive --------------------------------------------------------------------------------------


@pytest.mark.parametrize("used", [10**9, int(0.99 * PRICES.disk_budget_bytes), PRICES.disk_budget_bytes + 1])
def test_explain_is_json_and_its_text_shows_every_term(used: int) -> None:
    rate = RetrievalRate(0.05, 30, start=0.0)
    feed(rate, 20, daily_gb=3.0, reads=[(d * DAY + 60, 0.3) for d in range(1, 21)])
    now = 20 * DAY + 120
    facts = SegmentFacts(125_000_000, 1.0, rate.per_month(now), used)
    data = as_json("city/noise/+/clip", facts, PRICES, estimate=rate.snapshot(now))
    data = json.loads(json.dumps(data, allow_nan=False))  # what --json prints, and what render reads
    text = render(data)
    placement = place_segment(facts, PRICES)
    assert data["choice"] == placement.choice and data["reason"] == placement.reason
    assert "city/noise/+/clip" in text and f"{placement.cloud.total:.4f}" in text
    for terms in (placement.gateway, placement.cloud):
        for value in (terms.storage, terms.retrieval):
            assert (f"{value:.4f}" if math.isfinite(value) else "∞") in text
    assert f"{data['gateway']['explain']['disk_fill']:.1%}" in text
    assert "learned from the route's reads" in text
    if placement.reason == "over_budget":
        assert data["gateway"]["total"] is None and "whatever the price" in text


def test_explain_says_why_a_segment_stays_within_the_margin() -> None:
    even = (0.5 + 0.023) / (0.5 - 0.09)  # reads at which both places cost the same on an empty disk
    data = as_json("r", SegmentFacts(10**8, 1.0, even, 1), PRICES)
    assert data["reason"] == "margin"
    assert "neither place is cheaper by more than 10%" in render(data)


def test_explain_says_when_the_expected_reads_are_the_prior() -> None:
    facts = SegmentFacts(10**8, 1.0, 0.05, 10**9)
    assert "the route's retrievals_per_month" in render(as_json("r", facts, PRICES))
    fresh = RetrievalRate(0.05, 30)
    assert "no segment sealed yet" in render(as_json("r", facts, PRICES, estimate=fresh.snapshot(0.0)))


# --- what it costs the daemon to import ---------------------------------------------------------------------


def test_the_cost_model_imports_nothing_but_the_standard_library() -> None:
    probe = ("import sys\nbefore = set(sys.modules)\nimport agent.archive.cost\n"
             "print(' '.join(sorted(set(sys.modules) - before)))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    third_party = {name.split(".")[0] for name in out} - set(sys.stdlib_module_names) - {"agent"}
    assert not third_party, sorted(third_party)
    assert {name for name in out if name.startswith("agent.")} == {"agent.archive", "agent.archive.cost"}

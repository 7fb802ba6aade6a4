"""The Policy (docs/design.md#decision-model): the contract interface, every term, overrides, queues, probing,
properties."""

from __future__ import annotations

import ast
import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import agent.decision
from agent.config import DecisionSettings
from agent.decision import (
    CLOUD_TERMS,
    DEFAULT_KINDS,
    LOCAL_TERMS,
    Decision,
    DecisionParams,
    KindParams,
    Policy,
    Task,
    model,
)
from agent.decision.model import COLD_RUNS

DECISION_DIR = Path(agent.decision.__file__).resolve().parent
NOISE = "noise.spectrum"
SENSOR = "sensor.stats"


def quiet(**overrides: object) -> DecisionSettings:
    """Default settings without probing, so a decision is the model's alone."""
    return DecisionSettings(**{"probe_interval_s": 0.0, **overrides})  # type: ignore[arg-type]


def totals_match(d: Decision) -> None:
    assert set(d.terms) == set(LOCAL_TERMS) | set(CLOUD_TERMS)
    assert d.t_local_s == pytest.approx(sum(d.terms[k] for k in LOCAL_TERMS))
    assert d.t_cloud_s == pytest.approx(sum(d.terms[k] for k in CLOUD_TERMS))


# What an import of the decision package must not load, directly or through anything it imports: I/O, the event
# loop, and the settings (pydantic): the model is plain arithmetic on plain values (DecisionParams).
NOT_LOADED = ("pydantic", "pydantic_settings", "socket", "asyncio", "sqlite3", "paho", "httpx")


def test_the_decision_package_does_no_io() -> None:
    forbidden = {*NOT_LOADED, "time", "datetime", "threading", "subprocess"}
    for path in sorted(DECISION_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not any(name == f or name.startswith(f + ".") for f in forbidden), (path.name, name)
                # Nothing else of the agent either: not the settings, not an adapter.
                assert name.split(".")[0] != "agent" or name.startswith("agent.decision"), (path.name, name)


def test_importing_the_decision_package_loads_no_io_and_no_settings() -> None:
    # A fresh interpreter: this one has long imported everything. Every module of the package, so that one
    # imported only by a tool (explain) is held to it too.
    modules = ["agent.decision", *(f"agent.decision.{p.stem}" for p in sorted(DECISION_DIR.glob("[!_]*.py")))]
    code = ("import importlib, sys\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {set(NOT_LOADED)!r}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=DECISION_DIR.parents[1], capture_output=True,
                          text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_the_settings_become_the_models_parameters() -> None:
    # The settings' defaults are the model's, and every setting is a parameter (one construction path).
    assert DecisionSettings().as_params() == DecisionParams()
    assert set(DecisionSettings.model_fields) == {f.name for f in dataclasses.fields(DecisionParams)}
    settings = quiet(uplink_mbps=7.0, kinds={NOISE: {"local_fixed_s": 1.0, "local_per_byte_s": 0.0,
                                                     "cloud_fixed_s": 0.5, "cloud_per_byte_s": 0.0,
                                                     "out_bytes": 10}})
    params = settings.as_params()
    assert params.uplink_mbps == 7.0 and params.probe_interval_s == 0.0
    assert params.kinds[NOISE] == KindParams(1.0, 0.0, 0.5, 0.0, 10)
    assert params.kinds["*"] == DEFAULT_KINDS["*"]
    task = Task(NOISE, 100_000)
    assert Policy(settings).decide(task, 0.0) == Policy(params).decide(task, 0.0)


def test_parameters_without_a_fallback_kind_get_the_default_one() -> None:
    params = DecisionParams(kinds={NOISE: KindParams(1.0, 0.0, 0.5, 0.0, 10)})
    assert params.kinds["*"] == DEFAULT_KINDS["*"]
    d = Policy(params).decide(Task("plugin.thing", 10_000), 0.0)
    assert d.terms["local_service_s"] == pytest.approx(0.01 + 1e-6 * 10_000)
    assert Policy().decide(Task(NOISE, 1000), 0.0) == Policy(DecisionSettings()).decide(Task(NOISE, 1000), 0.0)


def test_public_names() -> None:
    for name in agent.decision.__all__:
        assert hasattr(agent.decision, name)


def test_contract_call_with_priors_only() -> None:
    policy = Policy(quiet(), local_workers=2)
    d = policy.decide(Task(NOISE, 160_000), 0.0)
    assert d.target in ("local", "cloud") and d.reason == "model"
    totals_match(d)
    # Priors: 0.02 + 3e-6 * 160000 locally; a cold lease costs the provisioning prior.
    assert d.terms["local_service_s"] == pytest.approx(0.5)
    assert d.terms["provisioning_s"] == pytest.approx(3.0)
    assert d.terms["upload_s"] == pytest.approx(160_000 * 8 / 2e6)
    assert d.terms["rtt_s"] == pytest.approx(0.08)
    assert d.target == "local"


def test_a_fast_measured_uplink_and_a_busy_gateway_send_heavy_tasks_to_the_cloud() -> None:
    policy = Policy(quiet(), local_workers=2)
    task = Task(NOISE, 160_000)
    policy.observe_lease(True)
    for i in range(5):
        policy.observe_transfer("up", 1_000_000, 0.4, now=float(i))  # 20 Mbit/s
        policy.observe_rtt(0.04, now=float(i))
    for _ in range(4):
        policy.task_started("local", task, 5.0)
    d = policy.decide(task, 5.0)
    assert d.target == "cloud" and d.reason == "model"
    assert d.t_cloud_s < d.t_local_s
    totals_match(d)


def test_margin_keeps_near_ties_local() -> None:
    policy = Policy(quiet(margin_s=1.0), local_workers=1)
    policy.observe_lease(True)
    d = policy.decide(Task(NOISE, 160_000), 0.0)
    assert d.t_cloud_s < d.t_local_s + 1.0 and d.target == "local"


@pytest.mark.parametrize(
    ("placement", "available", "circuit", "target", "reason"),
    [
        ("local", True, False, "local", "placement"),
        ("cloud", True, False, "cloud", "placement"),
        ("cloud", False, False, "local", "no_cloud"),
        ("cloud", True, True, "local", "circuit_open"),
        ("auto", True, False, "cloud", "model"),
        ("auto", False, False, "local", "no_cloud"),
        ("auto", True, True, "local", "circuit_open"),
    ],
)
def test_overrides(placement: str, available: bool, circuit: bool, target: str, reason: str) -> None:
    policy = Policy(quiet(), local_workers=1)
    policy.observe_lease(True)
    for _ in range(10):
        policy.task_started("local", Task(NOISE, 300_000), 0.0)  # gateway backed up: the model says cloud
    d = policy.decide(Task(NOISE, 100_000), 0.0, placement=placement,  # type: ignore[arg-type]
                      cloud_available=available, circuit_open=circuit)
    assert (d.target, d.reason) == (target, reason)
    totals_match(d)


def test_model_choosing_local_keeps_reason_model_without_a_cloud() -> None:
    policy = Policy(quiet())
    d = policy.decide(Task(SENSOR, 200), 0.0, cloud_available=False)
    assert (d.target, d.reason) == ("local", "model")


def test_local_queue_bookkeeping() -> None:
    policy = Policy(quiet(), local_workers=2)
    task = Task(NOISE, 100_000)  # prior: 0.32 s
    assert policy.decide(task, 0.0).terms["local_wait_s"] == 0.0
    policy.task_started("local", task)
    assert policy.decide(task, 0.0).terms["local_wait_s"] == 0.0  # a worker is still free
    policy.task_started("local", task)
    policy.task_started("local", task)
    # 3 in the system, 2 workers: the new task waits for 2 completions of 0.32 s spread over 2 workers.
    assert policy.decide(task, 0.0).terms["local_wait_s"] == pytest.approx(0.32 * 3 * 2 / (3 * 2))
    for _ in range(3):
        policy.task_finished("local", task)
    assert policy.decide(task, 0.0).terms["local_wait_s"] == 0.0
    policy.task_finished("local", task)  # one too many is harmless
    assert policy.snapshot(0.0)["local_tasks"] == 0


def test_inline_kinds_do_not_wait_for_the_pool() -> None:
    policy = Policy(quiet(), local_workers=1, inline_kinds={SENSOR})
    for _ in range(5):
        policy.task_started("local", Task(NOISE, 300_000))
    assert policy.decide(Task(SENSOR, 200), 0.0).terms["local_wait_s"] == 0.0
    assert policy.decide(Task(NOISE, 200), 0.0).terms["local_wait_s"] > 1.0


def test_uplink_queue_counts_bytes_until_their_upload_is_observed() -> None:
    policy = Policy(quiet())
    policy.observe_lease(True)
    first, second = Task(NOISE, 100_000), Task(NOISE, 50_000)
    policy.task_started("cloud", first, 0.0)
    policy.task_started("cloud", second, 0.0)
    up = 2e6 / 8
    assert policy.decide(Task(NOISE, 1000), 0.0).terms["uplink_queue_s"] == pytest.approx(150_000 / up)
    policy.observe_transfer("up", 100_000, 0.4, now=0.4)
    assert policy.snapshot(0.4)["uplink_queued_bytes"] == 50_000
    policy.task_finished("cloud", first, 1.0)
    policy.task_finished("cloud", second, 1.0)  # its upload was never reported (a failure): no longer queued
    assert policy.snapshot(1.0)["uplink_queued_bytes"] == 0
    assert policy.snapshot(1.0)["cloud_tasks"] == 0


def test_finishing_a_task_leaves_a_same_size_upload_queued() -> None:
    # Fixed-size inputs (camera frames): the first task's answer must not take the second's upload off the link.
    policy = Policy(quiet())
    policy.observe_lease(True)
    first, second = Task(NOISE, 80_000), Task(NOISE, 80_000)
    policy.task_started("cloud", first, 0.0)
    policy.task_started("cloud", second, 0.0)
    policy.observe_transfer("up", 80_000, 0.3, now=0.3)
    policy.task_finished("cloud", first, 0.5)
    assert policy.snapshot(0.5)["uplink_queued_bytes"] == 80_000
    policy.observe_transfer("up", 80_000, 0.3, now=0.6)
    policy.task_finished("cloud", second, 0.8)
    assert policy.snapshot(0.8)["uplink_queued_bytes"] == 0


def test_uploads_that_end_out_of_order_leave_the_right_bytes_queued() -> None:
    policy = Policy(quiet())
    policy.observe_lease(True)
    policy.task_started("cloud", Task(NOISE, 300_000), 0.0)
    policy.task_started("cloud", Task(NOISE, 20_000), 0.0)
    policy.observe_transfer("up", 20_000, 0.1, now=0.1)  # the small one, sharing the link, ended first
    assert policy.snapshot(0.1)["uplink_queued_bytes"] == 300_000


def test_an_overdue_upload_lowers_the_uplink_estimate_before_it_ends() -> None:
    policy = Policy(quiet(), local_workers=1)
    policy.observe_lease(True)
    policy.task_started("cloud", Task(NOISE, 100_000), 0.0)
    on_time = policy.decide(Task(NOISE, 100_000), 0.1)
    stalled = policy.decide(Task(NOISE, 100_000), 20.0)  # 100 kB pending for 20 s: at most 5 kB/s
    assert stalled.terms["upload_s"] >= 100_000 / 5_000 * 0.99
    assert stalled.terms["upload_s"] > 10 * on_time.terms["upload_s"]


def test_a_pending_upload_bounds_the_uplink_only_once_it_can_have_started() -> None:
    # A probe of a few hundred bytes sent while no lease is warm: provisioning takes longer than expected.
    policy = Policy(quiet(provisioning_s=3.0, rtt_s=0.08))
    big = Task(NOISE, 200_000)
    policy.task_started("cloud", Task(SENSOR, 300), 0.0)
    normal = policy.decide(big, 0.0).terms["upload_s"]
    late = policy.decide(big, 3.1)  # the lease is overdue: the probe has not started uploading
    assert late.terms["upload_s"] == pytest.approx(normal)
    policy.observe_provisioning(4.0, now=4.0)
    # Pending for less than a round trip: its time is latency, not a measure of the link.
    assert policy.decide(big, 4.05).terms["upload_s"] == pytest.approx(normal)
    assert policy.decide(big, 6.0).terms["upload_s"] > 10 * normal  # 2 s for 300 bytes: the link is down


def test_provisioning_is_counted_until_a_lease_is_warm_and_after_it_idles() -> None:
    policy = Policy(quiet(provisioning_s=3.0), lease_idle_s=60.0)
    task = Task(NOISE, 100_000)
    assert policy.decide(task, 0.0).terms["provisioning_s"] == pytest.approx(3.0)
    policy.task_started("cloud", task, 0.0)  # requests a lease
    assert policy.decide(task, 1.0).terms["provisioning_s"] == pytest.approx(2.0)  # counting down
    policy.observe_provisioning(2.0, now=2.0)
    assert policy.decide(task, 2.5).terms["provisioning_s"] == 0.0
    policy.task_finished("cloud", task, 5.0)
    assert policy.decide(task, 60.0).terms["provisioning_s"] == 0.0  # still warm
    assert policy.decide(task, 66.0).terms["provisioning_s"] > 0.0  # released by now
    policy.observe_lease(True)
    assert policy.decide(task, 1000.0).terms["provisioning_s"] == 0.0


def test_learning_from_observations_changes_the_terms() -> None:
    policy = Policy(quiet())
    for i in range(30):
        policy.observe_local(NOISE, 100_000, 1.0, now=float(i))  # a slow gateway
        policy.observe_cloud(NOISE, 100_000, 0.05, now=float(i))
        policy.observe_output(NOISE, 5_000, now=float(i))
        policy.observe_transfer("down", 50_000, 0.1, now=float(i))
    d = policy.decide(Task(NOISE, 100_000), 30.0)
    assert d.terms["local_service_s"] == pytest.approx(1.0, rel=0.1)
    assert d.terms["cloud_service_s"] == pytest.approx(0.05, rel=0.25)
    assert d.terms["download_s"] == pytest.approx(5_000 / 500_000, rel=0.2)
    snap = policy.snapshot(30.0)
    assert snap["kinds"][NOISE]["out_bytes"] == pytest.approx(5_000, rel=0.05)
    assert snap["downlink_mbps"] == pytest.approx(4.0, rel=0.2)


def test_unknown_kinds_use_the_fallback_prior() -> None:
    d = Policy(quiet()).decide(Task("plugin.thing", 10_000), 0.0)
    assert d.terms["local_service_s"] == pytest.approx(0.01 + 1e-6 * 10_000)


def test_a_probe_refreshes_a_side_the_model_has_written_off() -> None:
    policy = Policy(DecisionSettings(probe_interval_s=100.0, probe_budget_s=0.2))
    policy.observe_lease(True)
    small = Task(SENSOR, 200)
    first = policy.decide(small, 0.0)
    assert first.target == "cloud" and first.probe and first.reason == "model"
    assert not policy.decide(small, 1.0).probe  # not again at once
    later = policy.decide(small, 100.0)
    assert later.probe
    # A failed probe doubles the interval: nothing at +100 s, one at +200 s.
    assert not policy.decide(small, 250.0).probe
    assert policy.decide(small, 300.0).probe
    # A big task is never a probe: the budget bounds what a probe may cost.
    assert not Policy(DecisionSettings()).decide(Task(NOISE, 300_000), 0.0).probe


def test_a_due_probe_waits_for_a_warm_lease_instead_of_paying_its_provisioning() -> None:
    policy = Policy(DecisionSettings(probe_interval_s=100.0, probe_budget_s=0.2, provisioning_s=3.0))
    small = Task(SENSOR, 200)
    first = policy.decide(small, 0.0)
    assert first.target == "local" and not first.probe and first.prewarm  # the lease is requested instead
    policy.task_started(first.target, small, 0.0)
    waiting = policy.decide(small, 1.0)
    assert waiting.target == "local" and not waiting.probe and not waiting.prewarm  # requested once
    policy.task_finished("local", small, 1.0)  # (one running 2.6 s would prove the kind slow: cold start)
    policy.observe_provisioning(2.5, 2.5)  # the lease is ready
    probe = policy.decide(small, 2.6)
    assert probe.target == "cloud" and probe.probe and probe.terms["provisioning_s"] == 0.0


def test_no_probe_without_a_cloud_or_with_an_open_circuit() -> None:
    for kwargs in ({"cloud_available": False}, {"circuit_open": True}, {"placement": "local"}):
        d = Policy(DecisionSettings()).decide(Task(SENSOR, 200), 0.0, **kwargs)  # type: ignore[arg-type]
        assert d.target == "local" and not d.probe


# --- properties ---------------------------------------------------------------------------------------------

kinds = st.sampled_from([NOISE, SENSOR, "plugin.x"])
sizes = st.integers(min_value=0, max_value=5_000_000)
times = st.floats(min_value=0.0, max_value=1e5, allow_nan=False)
observation = st.one_of(
    st.tuples(st.just("local"), kinds, sizes, st.floats(0.0, 100.0)),
    st.tuples(st.just("cloud"), kinds, sizes, st.floats(0.0, 100.0)),
    st.tuples(st.just("up"), sizes, st.floats(0.0, 100.0)),
    st.tuples(st.just("down"), sizes, st.floats(0.0, 100.0)),
    st.tuples(st.just("rtt"), st.floats(0.0, 10.0)),
    st.tuples(st.just("prov"), st.floats(0.0, 600.0)),
    st.tuples(st.just("start_local"), kinds, sizes),
    st.tuples(st.just("start_cloud"), kinds, sizes),
    st.tuples(st.just("finish_cloud"), kinds, sizes),
)


def feed(policy: Policy, history: list[tuple[object, ...]]) -> None:
    now = 0.0
    for item in history:
        now += 0.5
        what = item[0]
        if what == "local":
            policy.observe_local(str(item[1]), int(item[2]), float(item[3]), now)  # type: ignore[call-overload]
        elif what == "cloud":
            policy.observe_cloud(str(item[1]), int(item[2]), float(item[3]), now)  # type: ignore[call-overload]
        elif what in ("up", "down"):
            policy.observe_transfer(what, int(item[1]), float(item[2]), now)  # type: ignore[call-overload]
        elif what == "rtt":
            policy.observe_rtt(float(item[1]), now)  # type: ignore[arg-type]
        elif what == "prov":
            policy.observe_provisioning(float(item[1]), now)  # type: ignore[arg-type]
        else:
            task = Task(str(item[1]), int(item[2]))  # type: ignore[call-overload]
            if what == "start_local":
                policy.task_started("local", task, now)
            elif what == "start_cloud":
                policy.task_started("cloud", task, now)
            else:
                policy.task_finished("cloud", task, now)


@settings(max_examples=150, deadline=None)
@given(st.lists(observation, max_size=30), kinds, sizes, times)
def test_every_decision_is_finite_and_non_negative(history: list[tuple[object, ...]], kind: str, size: int,
                                                     dt: float) -> None:
    policy = Policy(DecisionSettings(), local_workers=2)
    feed(policy, history)
    d = policy.decide(Task(kind, size), 0.5 * len(history) + dt)
    for value in (d.t_local_s, d.t_cloud_s, *d.terms.values()):
        assert math.isfinite(value) and value >= 0.0
    totals_match(d)


@settings(max_examples=100, deadline=None)
@given(st.lists(observation, max_size=30), kinds, sizes, times)
def test_the_same_inputs_give_the_same_decision(history: list[tuple[object, ...]], kind: str, size: int,
                                                dt: float) -> None:
    a, b = Policy(DecisionSettings(), local_workers=2), Policy(DecisionSettings(), local_workers=2)
    feed(a, history)
    feed(b, history)
    now = 0.5 * len(history) + dt
    assert a.decide(Task(kind, size), now) == b.decide(Task(kind, size), now)


@settings(max_examples=100, deadline=None)
@given(st.lists(observation, max_size=20), st.floats(0.01, 1000.0), st.floats(1.0, 100.0), kinds, sizes,
       st.lists(st.tuples(sizes, st.floats(0.001, 100.0)), max_size=5))
def test_more_uplink_bandwidth_never_raises_the_cloud_total(
    history: list[tuple[object, ...]], mbps: float, factor: float, kind: str, size: int,
    uploads: list[tuple[int, float]],
) -> None:
    slow, fast = Policy(quiet(uplink_mbps=mbps)), Policy(quiet(uplink_mbps=min(mbps * factor, 100_000.0)))
    feed(slow, history)
    feed(fast, history)
    now = 0.5 * len(history)
    for n_bytes, seconds in uploads:  # the same transfers, faster on the fast link
        now += 0.5
        slow.observe_transfer("up", n_bytes, seconds, now)
        fast.observe_transfer("up", n_bytes, seconds / factor, now)
    t_slow = slow.decide(Task(kind, size), now).t_cloud_s
    t_fast = fast.decide(Task(kind, size), now).t_cloud_s
    assert t_fast <= t_slow * (1 + 1e-9) + 1e-12


@settings(max_examples=100, deadline=None)
@given(st.lists(observation, max_size=20), st.lists(st.tuples(kinds, sizes), max_size=10), kinds, sizes,
       st.integers(1, 8))
def test_more_local_backlog_never_lowers_the_local_total(
    history: list[tuple[object, ...]], extra: list[tuple[str, int]], kind: str, size: int, workers: int
) -> None:
    policy = Policy(quiet(), local_workers=workers)
    feed(policy, history)
    now = 0.5 * len(history)
    before = policy.decide(Task(kind, size), now).t_local_s
    for k, n in extra:
        policy.task_started("local", Task(k, n), now)
        after = policy.decide(Task(kind, size), now).t_local_s
        assert after >= before * (1 - 1e-9)
        before = after


def test_reconfigure_applies_new_margins_and_keeps_what_was_learned() -> None:
    policy = Policy(DecisionSettings())
    for _ in range(20):
        policy.observe_local("noise.spectrum", 100_000, 0.01, 1.0)
    learned = policy.snapshot(2.0)["kinds"]["noise.spectrum"]["local_fixed_s"]
    policy.reconfigure(DecisionSettings(margin_s=30.0, margin_ratio=0.0))
    assert policy.snapshot(2.0)["kinds"]["noise.spectrum"]["local_fixed_s"] == learned
    # With a 30 s margin the cloud can never win by enough.
    decision = policy.decide(Task("noise.spectrum", 10_000_000), 2.0)
    assert decision.target == "local"


@pytest.mark.parametrize("servers", [1, 2, 4])
def test_local_wait_of_a_long_backlog_is_its_work_spread_over_the_workers(servers: int) -> None:
    policy = Policy(DecisionParams(kinds={"*": KindParams(local_fixed_s=0.01, local_per_byte_s=0.0,
                                                            cloud_fixed_s=0.01, cloud_per_byte_s=0.0,
                                                            out_bytes=10)}), local_workers=servers)
    for _ in range(servers + 500):  # far past the exact placement's limit
        policy.task_started("local", Task("k", 100), 0.0)
    wait = policy.decide(Task("k", 100), 0.0).terms["local_wait_s"]
    # 500 waiting tasks of 10 ms on `servers` workers, behind `servers` running ones: 5 s / servers + 10 ms.
    assert wait == pytest.approx(5.0 / servers + 0.01, abs=0.011)
    for _ in range(servers + 500):
        policy.task_finished("local", Task("k", 100), 0.0)
    assert policy.decide(Task("k", 100), 0.0).terms["local_wait_s"] == 0.0
    assert not policy._pool.queued and not policy._pool.waiting


def _prior(local_s: float) -> DecisionParams:
    return DecisionParams(kinds={"*": KindParams(local_fixed_s=local_s, local_per_byte_s=0.0, cloud_fixed_s=0.01,
                                                   cloud_per_byte_s=0.0, out_bytes=10)})


@pytest.mark.parametrize("waiting", [10, 100])  # the exact placement and the per-kind sums
def test_a_changed_estimate_re_prices_the_backlog_queued_on_the_old_one(waiting: int) -> None:
    policy = Policy(_prior(0.03), local_workers=2)
    for _ in range(2 + waiting):
        policy.task_started("local", Task("user.task", 1000), 0.0)
    before = policy.decide(Task("user.task", 1000), 0.0).terms["local_wait_s"]
    assert before == pytest.approx(0.03 * (waiting + 2) / 2, rel=0.05)
    for _ in range(COLD_RUNS + 20):  # other executions measured 0.3 s (elsewhere): the line is now ~10x
        policy.observe_local("user.task", 1000, 0.3, 0.0)
    after = policy.decide(Task("user.task", 1000), 0.0)
    assert after.terms["local_service_s"] == pytest.approx(0.3, rel=0.05)
    assert after.terms["local_wait_s"] == pytest.approx(0.3 * (waiting + 2) / 2, rel=0.05)


def test_per_kind_sums_price_each_kind_with_its_own_line() -> None:
    policy = Policy(DecisionSettings(), local_workers=1)
    policy.task_started("local", Task("a", 0), 0.0)  # running
    for _ in range(100):
        policy.task_started("local", Task("a", 0), 0.0)
        policy.task_started("local", Task("b", 1000), 0.0)
    for _ in range(COLD_RUNS + 30):
        policy.observe_local("a", 0, 0.1, 0.0)
        policy.observe_local("b", 1000, 0.2, 0.0)
    a_s = policy.decide(Task("a", 0), 0.0).terms["local_service_s"]
    b_s = policy.decide(Task("b", 1000), 0.0).terms["local_service_s"]
    wait = policy.decide(Task("a", 0), 0.0).terms["local_wait_s"]
    assert wait == pytest.approx(101 * a_s + 100 * b_s, rel=1e-6)


def test_cold_start_a_task_running_past_its_estimate_raises_the_kind_while_it_runs() -> None:
    policy = Policy(_prior(0.03), local_workers=1)
    for _ in range(20):
        policy.task_started("local", Task("user.task", 1000), 0.0)
    assert policy.decide(Task("user.task", 1000), 0.0).terms["local_service_s"] == pytest.approx(0.03)
    # 0.2 s later the first is still running: it takes at least 0.2 s, and so, for now, does every one queued.
    d = policy.decide(Task("user.task", 1000), 0.2)
    assert d.terms["local_service_s"] == pytest.approx(0.2)
    assert d.terms["local_wait_s"] == pytest.approx(19 * 0.2)
    # Once the kind has a few measured runs, a straggler no longer scales it.
    policy.task_finished("local", Task("user.task", 1000), 0.25)
    for _ in range(COLD_RUNS):
        policy.observe_local("user.task", 1000, 0.25, 0.25)
    warm = policy.decide(Task("user.task", 1000), 5.0)
    assert warm.terms["local_service_s"] < 0.25


# --- hedging ------------------------------------------------------------------------------------------------


def fast_cloud_policy() -> Policy:
    """A warm lease on a measured 20 Mbit/s uplink and a busy gateway: heavy tasks go to the cloud."""
    policy = Policy(quiet(), local_workers=2)
    policy.observe_lease(True)
    for i in range(5):
        policy.observe_transfer("up", 1_000_000, 0.4, now=float(i))
        policy.observe_rtt(0.04, now=float(i))
    for _ in range(4):
        policy.task_started("local", Task(NOISE, 160_000), 5.0)
    return policy


def test_a_cloud_task_the_model_chose_is_hedged_once_well_past_its_prediction() -> None:
    from agent.decision import model

    d = fast_cloud_policy().decide(Task(NOISE, 160_000), 5.0)
    assert d.target == "cloud" and d.reason == "model"
    assert math.isfinite(d.hedge_after_s)
    # Ordinary prediction error is waited out: the slack, twice the prediction, and what the gateway would take.
    assert d.hedge_after_s >= d.t_cloud_s + model.HEDGE_SLACK_S
    assert d.hedge_after_s >= model.HEDGE_RATIO * d.t_cloud_s
    assert d.hedge_after_s >= model.HEDGE_LOCAL_RATIO * d.t_local_s
    # …but a stalled upload is not waited out: the bound is the largest of those three.
    assert d.hedge_after_s == pytest.approx(max(d.t_cloud_s + model.HEDGE_SLACK_S,
                                                model.HEDGE_RATIO * d.t_cloud_s,
                                                model.HEDGE_LOCAL_RATIO * d.t_local_s))


def test_a_hedge_copy_waits_while_the_gateway_now_needs_longer_than_the_task_has_waited() -> None:
    from agent.decision import model

    policy = fast_cloud_policy()
    line = policy.snapshot(5.0)["kinds"][NOISE]
    for _ in range(COLD_RUNS):  # a kind with measured runs: no cold-start scaling of the running clips
        policy.observe_local(NOISE, 160_000, line["local_fixed_s"] + 160_000 * line["local_per_byte_s"], 5.0)
    task = Task(NOISE, 160_000)
    d = policy.decide(task, 5.0)
    assert d.target == "cloud"
    policy.task_started("cloud", task, 5.0)
    at_deadline = 5.0 + d.hedge_after_s
    # The gateway needs no longer than the decision saw: the copy is due at the deadline.
    assert d.hedge_after_s >= model.HEDGE_LOCAL_RATIO * d.t_local_s
    assert policy.hedge_delay(task, 5.0, at_deadline) == 0.0
    # Since then it fell behind (ten more clips queued) and learned it is slower: the copy would run
    # after the cloud's answer, so it waits, for what the gateway would now need, counted from the decision.
    for _ in range(10):
        policy.task_started("local", Task(NOISE, 160_000), at_deadline)
    for i in range(60):
        policy.observe_local(NOISE, 160_000, 3 * d.terms["local_service_s"], at_deadline + i * 1e-3)
    now = at_deadline + 0.1
    delay = policy.hedge_delay(task, 5.0, now)
    later = policy.decide(Task(NOISE, 160_000), now)  # what the gateway would now need: wait + service
    assert delay == pytest.approx(5.0 + model.HEDGE_LOCAL_RATIO * later.t_local_s - now)
    assert delay > 3 * d.t_local_s
    # At the upload's deadline only the gateway's queue counts: a stalled upload is rescued at once on a free
    # worker, but not ahead of a backlog the task has not waited out.
    upload_delay = policy.hedge_delay(task, 5.0, now, upload=True)
    assert upload_delay == pytest.approx(5.0 + model.HEDGE_LOCAL_RATIO * later.terms["local_wait_s"] - now)
    assert 0.0 < upload_delay < delay
    idle = fast_cloud_policy()
    for _ in range(4):
        idle.task_finished("local", Task(NOISE, 160_000), 5.0)
    assert idle.hedge_delay(task, 5.0, 5.01, upload=True) == 0.0


def test_the_upload_has_a_deadline_of_its_own_before_the_tasks() -> None:
    from agent.decision import model

    policy = fast_cloud_policy()
    policy.task_started("cloud", Task(NOISE, 200_000), 5.0)  # an upload ahead of it: Q_up
    d = policy.decide(Task(NOISE, 160_000), 5.0)
    assert d.target == "cloud" and d.reason == "model"
    t = d.terms
    # Lease wait, cloud queue, a round trip, twice the predicted uplink time (queue included), a small slack…
    assert d.upload_by_s == pytest.approx(t["provisioning_s"] + t["cloud_wait_s"] + t["rtt_s"]
                                          + model.UPLOAD_HEDGE_SLACK_S
                                          + model.UPLOAD_HEDGE_RATIO * (t["uplink_queue_s"] + t["upload_s"]))
    assert t["uplink_queue_s"] > 0
    # …which comes before the whole task's deadline: the cloud's own time is not waited for when the upload stalls.
    assert d.upload_by_s < d.hedge_after_s


def test_only_the_models_cloud_tasks_are_hedged() -> None:
    policy = fast_cloud_policy()
    task = Task(NOISE, 160_000)
    for d in (policy.decide(task, 5.0, placement="local"), policy.decide(task, 5.0, circuit_open=True)):
        assert math.isinf(d.hedge_after_s) and math.isinf(d.upload_by_s)
    # The operator placed the route in the cloud: it stays there, however slow.
    forced = policy.decide(task, 5.0, placement="cloud")
    assert forced.target == "cloud" and math.isinf(forced.hedge_after_s) and math.isinf(forced.upload_by_s)
    local = Policy(quiet()).decide(task, 0.0)  # priors only: the gateway wins
    assert local.target == "local" and math.isinf(local.hedge_after_s) and math.isinf(local.upload_by_s)


def test_a_probe_is_hedged_too() -> None:
    policy = Policy(DecisionSettings(probe_interval_s=10.0, probe_budget_s=1.0))
    policy.observe_lease(True)
    d = policy.decide(Task(SENSOR, 300), 0.0)
    assert d.probe and d.target == "cloud"
    assert math.isfinite(d.hedge_after_s)


def test_a_cancelled_stalled_upload_still_teaches_the_uplink_estimate() -> None:
    def after(cancel: bool) -> float:
        policy = Policy(quiet(), local_workers=1)
        policy.observe_lease(True)
        stalled = Task(NOISE, 100_000)
        policy.task_started("cloud", stalled, 0.0)
        if cancel:
            policy.cloud_cancelled(stalled, 20.0)  # 100 kB not uploaded in 20 s: at most 5 kB/s
        else:
            policy.task_finished("cloud", stalled, 20.0)
        snapshot = policy.snapshot(20.0)
        assert snapshot["cloud_tasks"] == 0 and snapshot["uplink_queued_bytes"] == 0
        return policy.decide(Task(NOISE, 100_000), 20.0).terms["upload_s"]

    assert after(cancel=True) > 3 * after(cancel=False)


def test_cancelling_a_task_still_queued_behind_another_upload_learns_nothing() -> None:
    policy = Policy(quiet(), local_workers=1)
    policy.observe_lease(True)
    head, queued = Task(NOISE, 100_000), Task(NOISE, 50_000)
    policy.task_started("cloud", head, 0.0)
    policy.task_started("cloud", queued, 0.0)
    before = policy.snapshot(0.0)["uplink_mbps"]
    policy.cloud_cancelled(queued, 0.5)
    assert policy.snapshot(0.5)["uplink_queued_bytes"] == 100_000
    assert policy.snapshot(0.5)["uplink_mbps"] == pytest.approx(before)


def test_the_uplink_memory_in_use_is_reported() -> None:
    policy = Policy(quiet(network_half_life_s=5.0))
    assert policy.snapshot(0.0)["uplink_memory_s"] == 5.0


# --- late binding -------------------------------------------------------------------------------------------


def _backlog_policy(waiting: int) -> Policy:
    """One worker busy and ``waiting`` tasks queued behind it, decided on a 30 ms prior; a warm lease."""
    policy = Policy(_prior(0.03), local_workers=1)
    policy.observe_lease(True)
    for _ in range(waiting + 1):
        policy.task_started("local", Task("user.task", 1000), 0.0)
    return policy


def test_rebind_moves_the_last_queued_task_once_the_cloud_is_sooner() -> None:
    policy = _backlog_policy(2)
    assert policy.rebind(Task("user.task", 1000), 0.0) is None  # 30 ms each: the gateway is still sooner
    assert policy.snapshot(0.0)["local_tasks"] == 3
    for _ in range(COLD_RUNS):
        policy.observe_local("user.task", 1000, 0.3, 0.3)  # the kind takes 10x its prior
    moved = policy.rebind(Task("user.task", 1000), 0.3)
    assert moved is not None and moved.rebound and moved.target == "cloud" and moved.reason == "model"
    assert moved.t_cloud_s < moved.t_local_s - max(model.REBIND_MARGIN_S, model.REBIND_MARGIN_RATIO * moved.t_local_s)
    assert math.isfinite(moved.hedge_after_s)  # a rebound task is hedged like any the model sent to the cloud
    snapshot = policy.snapshot(0.3)
    assert (snapshot["local_tasks"], snapshot["cloud_tasks"]) == (2, 1)
    assert snapshot["kinds"]["user.task"]["queued_local"] == 2


def test_rebind_within_the_margin_changes_nothing() -> None:
    policy = _backlog_policy(1)  # ~0.1 s on the gateway, ~0.094 s in the cloud: within the rebind margin
    for _ in range(COLD_RUNS):
        policy.observe_local("user.task", 1000, 0.05, 0.0)
    before = policy.decide(Task("user.task", 1000), 0.0)
    assert policy.rebind(Task("user.task", 1000), 0.0) is None
    after = policy.decide(Task("user.task", 1000), 0.0)
    assert (after.t_local_s, after.t_cloud_s, after.target) == (before.t_local_s, before.t_cloud_s, before.target)


def test_rebind_needs_a_cloud_and_a_queued_task() -> None:
    policy = _backlog_policy(20)
    for _ in range(COLD_RUNS):
        policy.observe_local("user.task", 1000, 0.3, 0.0)
    assert policy.rebind(Task("user.task", 1000), 0.0, cloud_available=False) is None
    assert policy.rebind(Task("user.task", 1000), 0.0, circuit_open=True) is None
    assert policy.rebind(Task("other.kind", 1000), 0.0) is None
    assert policy.rebind(Task("user.task", 999), 0.0) is None  # none of that size waits
    assert policy.snapshot(0.0)["local_tasks"] == 21


def test_rebinding_a_burst_balances_the_two_sides() -> None:
    policy = _backlog_policy(100)
    for _ in range(COLD_RUNS + 10):
        policy.observe_local("user.task", 1000, 0.25, 0.0)
        policy.observe_cloud("user.task", 1000, 0.25, 0.0)
        policy.observe_transfer("up", 1_000_000, 0.08, 0.0)  # a LAN: 100 Mbit/s
    moved = 0
    while policy.rebind(Task("user.task", 1000), 0.0) is not None:
        moved += 1
    # 4 cloud slots and 1 worker, the same service time on both: about 4/5 of the burst should move.
    assert 60 <= moved <= 90
    d = policy.decide(Task("user.task", 1000), 0.0)
    assert d.t_cloud_s >= d.t_local_s * (1 - model.REBIND_MARGIN_RATIO) - model.REBIND_MARGIN_S - 0.3


def test_a_move_must_survive_an_uplink_twice_as_slow(monkeypatch: pytest.MonkeyPatch) -> None:
    def backlog() -> Policy:
        policy = Policy(_prior(0.03), local_workers=1)
        policy.observe_lease(True)
        for _ in range(6):
            policy.task_started("local", Task("user.task", 100_000), 0.0)
        for _ in range(COLD_RUNS + 20):
            policy.observe_local("user.task", 100_000, 0.1, 0.0)
        return policy

    # The tail: 0.6 s on the gateway; a 0.4 s upload at the 2 Mbit/s prior, about 0.5 s in the cloud in all.
    policy = backlog()
    assert policy.decide(Task("user.task", 100_000), 0.0).terms["upload_s"] == pytest.approx(0.4)
    assert policy.rebind(Task("user.task", 100_000), 0.0) is None  # wins by 0.1 s, not with the doubt
    assert policy.snapshot(0.0)["local_tasks"] == 6
    monkeypatch.setattr(model, "REBIND_LINK_DOUBT", 0.0)
    moved = backlog().rebind(Task("user.task", 100_000), 0.0)
    assert moved is not None and moved.rebound


def _uplink_backlog(queued: int, *, provisioning: bool = False) -> Policy:
    """``queued`` cloud tasks of 100 kB sent on a measured 2 Mbit/s uplink (0.4 s each), an idle gateway that
    needs 0.1 s for one; a warm lease, or (``provisioning``) one still on its way."""
    policy = Policy(_prior(0.1), local_workers=1)
    if not provisioning:
        policy.observe_lease(True)
    for i in range(10):
        policy.observe_transfer("up", 100_000, 0.4, float(i) - 10.0)
    for _ in range(COLD_RUNS):
        policy.observe_local("user.task", 100_000, 0.1, 0.0)
    for _ in range(queued):
        policy.task_started("cloud", Task("user.task", 100_000), 0.0)
    return policy


def test_move_back_brings_a_cloud_task_not_yet_uploaded_to_the_gateway_once_it_is_sooner() -> None:
    policy = _uplink_backlog(6)
    moved = policy.move_back(Task("user.task", 100_000), 0.0)
    # The last of six uploads: about 2.4 s behind the uplink (even if it were twice as fast: 1.2 s), 0.1 s here.
    assert moved is not None and moved.rebound and moved.target == "local" and moved.reason == "model"
    assert moved.t_local_s == pytest.approx(0.1)
    assert math.isinf(moved.hedge_after_s) and math.isinf(moved.upload_by_s)
    snapshot = policy.snapshot(0.0)
    assert (snapshot["local_tasks"], snapshot["cloud_tasks"]) == (1, 5)
    assert snapshot["uplink_queued_bytes"] == 500_000
    # Moving more fills the gateway, until the uplink is sooner again.
    while policy.move_back(Task("user.task", 100_000), 0.0) is not None:
        pass
    snapshot = policy.snapshot(0.0)
    assert 1 <= snapshot["cloud_tasks"] <= 4 and snapshot["local_tasks"] + snapshot["cloud_tasks"] == 6


def test_move_back_leaves_the_upload_on_the_link_and_a_task_within_the_margin() -> None:
    policy = _uplink_backlog(1)
    assert policy.move_back(Task("user.task", 100_000), 0.1) is None  # its upload is on the link
    policy = _uplink_backlog(2)
    # The second upload: 0.8 s of uplink, 0.4 s if the link were twice as fast; a gateway that has learned it
    # needs 0.5 s gains less than the margin: nothing moves, nothing changes.
    for _ in range(60):
        policy.observe_local("user.task", 100_000, 0.5, 0.0)
    queues = ("local_tasks", "cloud_tasks", "uplink_queued_bytes")
    before = [policy.snapshot(0.0)[k] for k in queues]
    assert policy.move_back(Task("user.task", 100_000), 0.0) is None
    assert [policy.snapshot(0.0)[k] for k in queues] == before == [0, 2, 200_000]
    assert policy.decide(Task("user.task", 100_000), 0.0).terms["uplink_queue_s"] == pytest.approx(0.8)
    assert policy.move_back(Task("user.task", 99_999), 0.0) is None  # none of that size waits
    assert policy.move_back(Task("other.kind", 100_000), 0.0) is None


def test_while_the_lease_is_on_its_way_even_the_first_upload_can_come_back() -> None:
    policy = _uplink_backlog(1, provisioning=True)
    assert policy.decide(Task("user.task", 100_000), 0.0).terms["provisioning_s"] > 1.0
    moved = policy.move_back(Task("user.task", 100_000), 0.0)
    assert moved is not None and moved.target == "local"
    assert policy.snapshot(0.0)["cloud_tasks"] == 0

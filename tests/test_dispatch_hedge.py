"""Hedging in the dispatcher: an overdue cloud task also runs on the gateway, and its row gets one result.

In process, on real SQLite, with a cloud client stand-in whose submission hangs (an upload caught in a fade)
until the test lets it answer, and a pool stand-in that runs heavy tasks when the test opens its gate.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from agent.cloud import CloudClient
from agent.cloud._client import CloudResult, LeaseSnapshot
from agent.config import DecisionSettings
from agent.decision import Policy
from agent.decision.model import HEDGE_SLACK_S, UPLOAD_HEDGE_SLACK_S
from agent.dispatch import Dispatcher
from agent.egress import Publisher, Sent
from agent.executor import LocalExecutor
from agent.store import Committed, NewTask, Store
from agent.tasks import default_registry

NOISE = "noise.spectrum"
SENSOR = "sensor.stats"
# Priors under which the cloud looks far faster than this gateway: the model offloads every task.
FAST_CLOUD = {"local_fixed_s": 0.3, "local_per_byte_s": 1e-6, "cloud_fixed_s": 0.001, "cloud_per_byte_s": 1e-9,
              "out_bytes": 300}


class StalledCloud:
    """Answers a submission only when ``answer`` is set; records submissions and cancellations."""

    def __init__(self) -> None:
        self.answer = asyncio.Event()
        self.submitted: list[str] = []
        self.cancelled: list[str] = []
        self.sees_uploads = False  # as where the kernel's send queue cannot be read
        self.uploaded = asyncio.Event()  # with sees_uploads: the upload ends when this is set

    def circuit_open(self, now: float) -> bool:
        return False

    def prewarm(self) -> None:
        pass

    def lease_status(self) -> LeaseSnapshot:
        return LeaseSnapshot(ready=True, slots=4, provisioning=False)

    async def submit(self, task_id: str, kind: str, payload: bytes,
                     options: Mapping[str, Any] | None = None,
                     on_uploaded: Callable[[], None] | None = None) -> CloudResult:
        self.submitted.append(task_id)
        try:
            if self.sees_uploads:
                await self.uploaded.wait()
                if on_uploaded is not None:
                    on_uploaded()
            await self.answer.wait()
        except asyncio.CancelledError:
            self.cancelled.append(task_id)
            raise
        result, exec_s = LocalExecutor.run_inline(default_registry().get(kind), payload, options or {})
        return CloudResult(task_id, kind, result, exec_s, exec_s + 0.05, 0.01, 1, "lease-1")


class GatedPool:
    """The worker pool, except that a heavy task runs only once ``gate`` is open."""

    workers = 1
    run_inline = staticmethod(LocalExecutor.run_inline)

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.started = 0

    async def run_in_pool(self, kind: str, payload: bytes, options: Mapping[str, Any]) -> tuple[dict[str, Any], float]:
        self.started += 1
        await self.gate.wait()
        return LocalExecutor.run_inline(default_registry().get(kind), payload, options)


def new_task(task_id: str, kind: str) -> NewTask:
    if kind == NOISE:
        body = np.random.default_rng(1).normal(0, 3000, 16_000).astype("<i2").tobytes()
        topic = "city/a/noise/mic1/pcm"
    else:
        body = json.dumps({"speed": 40}).encode()
        topic = "city/a/traffic/1/data"
    return NewTask(task_id, topic, kind, "auto", {"topic": topic}, body, len(body), 1000.0, None, None)


class Rig:
    def __init__(self, tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
        decision = DecisionSettings(kinds={NOISE: FAST_CLOUD, SENSOR: FAST_CLOUD},  # type: ignore[dict-item]
                                    uplink_mbps=1000, provisioning_s=0, probe_interval_s=0)
        self.policy = Policy(decision, local_workers=1, inline_kinds=[SENSOR])
        self.policy.observe_lease(True)
        self.cloud = StalledCloud()
        self.pool = GatedPool()
        self.store = Store(tmp_path, max_tasks=1000, max_bytes=10_000_000)
        self.published: list[dict[str, Any]] = []
        mids = iter(range(1, 1_000_000))

        def send(messages: Sequence[Sent], resend: Sequence[int] | None = None) -> list[int]:
            sent = []
            for i, message in enumerate(messages):
                self.published.append(json.loads(message.payload))
                sent.append(next(mids) if resend is None else resend[i])
            loop.call_soon(self.publisher.acked, sent)  # the broker's PUBACKs
            return sent

        self.dispatcher = Dispatcher(agent_id="gw", registry=default_registry(),
                                     executor=cast(LocalExecutor, self.pool), store=self.store, policy=self.policy,
                                     cloud=cast(CloudClient, self.cloud))
        self.publisher = Publisher(self.store, send, window=7, memory_cap=100)

        def deliver(committed: Committed) -> None:
            self.dispatcher.accept(committed.tasks, committed.number)
            self.publisher.accept(committed.outbox, committed.number)

        self.store.start(lambda c: loop.call_soon_threadsafe(deliver, c))
        self.dispatcher.start(loop)
        self.publisher.start(loop)

    async def until(self, condition: Any, timeout_s: float = 10.0) -> None:
        for _ in range(int(timeout_s / 0.01)):
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("timed out")

    def bookkeeping_settled(self) -> None:
        snapshot = self.policy.snapshot(asyncio.get_running_loop().time())
        assert snapshot["local_tasks"] == snapshot["inline_tasks"] == snapshot["cloud_tasks"] == 0
        assert snapshot["uplink_queued_bytes"] == 0


async def gateway_copy_wins(tmp_path: Path, kind: str) -> tuple[Rig, float]:
    rig = Rig(tmp_path, asyncio.get_running_loop())
    rig.pool.gate.set()
    rig.store.ingest([new_task("t-1", kind)], [])
    await rig.until(lambda: rig.cloud.submitted == ["t-1"])
    started = asyncio.get_running_loop().time()
    await rig.until(lambda: len(rig.published) == 1)
    waited = asyncio.get_running_loop().time() - started
    await rig.until(lambda: rig.cloud.cancelled == ["t-1"])
    rig.cloud.answer.set()  # a late answer would come now: there is no request left to give it
    await asyncio.sleep(0.3)
    rig.bookkeeping_settled()
    return rig, waited


def check_gateway_result(rig: Rig, waited: float) -> None:
    assert len(rig.published) == 1, rig.published
    result = rig.published[0]
    assert result["task_id"] == "t-1"
    assert result["placement"] == "local"
    assert result["decision"]["reason"] == "model" and result["decision"]["hedged"] is True
    assert "fallback" not in result["decision"]
    assert HEDGE_SLACK_S < waited < 5.0  # overdue after the predicted time plus the slack: not at once, not never
    assert rig.dispatcher.hedges == rig.dispatcher.hedges_won == 1
    assert rig.dispatcher.cloud_outcomes == {"cancelled": 1}  # the cloud decision's outcome is accounted for
    rig.store.stop()


def test_a_stalled_heavy_cloud_task_is_hedged_and_the_gateway_result_is_the_only_one(tmp_path: Path) -> None:
    rig, waited = asyncio.run(gateway_copy_wins(tmp_path, NOISE))
    check_gateway_result(rig, waited)


def test_a_stalled_light_cloud_task_is_hedged_too(tmp_path: Path) -> None:
    rig, waited = asyncio.run(gateway_copy_wins(tmp_path, SENSOR))
    check_gateway_result(rig, waited)


def test_when_the_cloud_answers_first_the_running_gateway_copy_is_ignored(tmp_path: Path) -> None:
    async def scenario() -> Rig:
        rig = Rig(tmp_path, asyncio.get_running_loop())
        rig.store.ingest([new_task("t-1", NOISE)], [])
        await rig.until(lambda: rig.pool.started == 1)  # hedged: the gateway copy is in the pool, gated
        rig.cloud.answer.set()
        await rig.until(lambda: len(rig.published) == 1)
        rig.pool.gate.set()  # the gateway copy finishes now: second, so not published
        await asyncio.sleep(0.3)
        rig.bookkeeping_settled()
        return rig

    rig = asyncio.run(scenario())
    assert len(rig.published) == 1
    result = rig.published[0]
    assert result["task_id"] == "t-1" and result["placement"] == "cloud"
    assert result["decision"]["hedged"] is True
    assert rig.cloud.cancelled == []
    assert rig.dispatcher.hedges == 1 and rig.dispatcher.hedges_won == 0
    assert rig.dispatcher.cloud_outcomes == {"ok": 1}
    rig.store.stop()


@pytest.mark.slow
def test_a_cloud_task_answered_in_time_is_not_hedged(tmp_path: Path) -> None:
    async def scenario() -> Rig:
        rig = Rig(tmp_path, asyncio.get_running_loop())
        rig.cloud.answer.set()
        rig.store.ingest([new_task("t-1", NOISE)], [])
        await rig.until(lambda: len(rig.published) == 1)
        await asyncio.sleep(1.5)  # past the time it would have been hedged
        rig.bookkeeping_settled()
        return rig

    rig = asyncio.run(scenario())
    assert [m["placement"] for m in rig.published] == ["cloud"]
    assert "hedged" not in rig.published[0]["decision"]
    assert rig.dispatcher.hedges == 0 and rig.pool.started == 0
    rig.store.stop()


async def upload_watched(tmp_path: Path, upload_ends: bool) -> tuple[Rig, float]:
    """A cloud client that sees uploads end: the gateway copy starts at the upload's deadline when the upload
    has not ended, at the task's when it has."""
    rig = Rig(tmp_path, asyncio.get_running_loop())
    rig.cloud.sees_uploads = True
    if upload_ends:
        rig.cloud.uploaded.set()
    rig.store.ingest([new_task("t-1", NOISE)], [])
    await rig.until(lambda: rig.cloud.submitted == ["t-1"])
    started = asyncio.get_running_loop().time()
    await rig.until(lambda: rig.pool.started == 1)  # the gateway copy is in the pool (gated)
    waited = asyncio.get_running_loop().time() - started
    rig.pool.gate.set()
    await rig.until(lambda: len(rig.published) == 1)
    await asyncio.sleep(0.3)
    rig.bookkeeping_settled()
    rig.store.stop()
    return rig, waited


@pytest.mark.slow
def test_a_stalled_upload_is_hedged_at_its_own_deadline_before_the_tasks(tmp_path: Path) -> None:
    stalled_rig, stalled = asyncio.run(upload_watched(tmp_path / "stalled", upload_ends=False))
    sent_rig, sent = asyncio.run(upload_watched(tmp_path / "sent", upload_ends=True))
    # At 1000 Mbit/s the upload's deadline is about a round trip and the slack; the task's is past its
    # predicted total plus HEDGE_SLACK_S, and past what the gateway needs (0.3 s here).
    assert UPLOAD_HEDGE_SLACK_S <= stalled < HEDGE_SLACK_S
    assert sent > HEDGE_SLACK_S
    for rig in (stalled_rig, sent_rig):
        assert rig.dispatcher.hedges == rig.dispatcher.hedges_won == 1  # one gateway copy, not one per deadline
        assert [m["placement"] for m in rig.published] == ["local"]


# --- late binding -------------------------------------------------------------------------------------------


def test_tasks_queued_on_a_short_estimate_move_to_the_cloud_once_it_is_corrected(tmp_path: Path) -> None:
    """Ten heavy tasks decided for the gateway on a prior 1000x too short; once the gateway's estimate is learned,
    the tail of the queue moves to the cloud: each row published once, the moved ones with "rebound": true."""

    async def scenario() -> tuple[Rig, dict[str, int]]:
        rig = Rig(tmp_path, asyncio.get_running_loop())
        slow_gateway = {"local_fixed_s": 0.001, "local_per_byte_s": 0.0, "cloud_fixed_s": 0.05,
                        "cloud_per_byte_s": 0.0, "out_bytes": 300}
        policy = Policy(DecisionSettings(kinds={NOISE: slow_gateway},  # type: ignore[dict-item]
                                         uplink_mbps=1000, provisioning_s=0, probe_interval_s=0),
                        local_workers=1, inline_kinds=[SENSOR])
        policy.observe_lease(True)
        rig.policy = rig.dispatcher.policy = policy
        rig.store.ingest([new_task(f"t-{i}", NOISE) for i in range(10)], [])
        await rig.until(lambda: rig.pool.started == 2 and rig.dispatcher.backlog == 8)
        assert rig.dispatcher.decisions == {("local", "model"): 10} and rig.dispatcher.rebinds == 0
        now = asyncio.get_running_loop().time()
        for _ in range(5):  # the first executions (elsewhere) take 2 s: the backlog is worth 16 s now
            policy.observe_local(NOISE, 32_000, 2.0, now)
        await rig.until(lambda: rig.dispatcher.rebinds > 0 and len(rig.cloud.submitted) == rig.dispatcher.rebinds)
        moved = rig.dispatcher.rebinds
        # Mid-move, the store still says what it said: every row pending, none added.
        assert rig.store.outstanding_rows == 10
        rig.cloud.answer.set()
        await rig.until(lambda: len(rig.published) == moved)
        rig.pool.gate.set()
        await rig.until(lambda: len(rig.published) == 10)
        await asyncio.sleep(0.3)
        rig.bookkeeping_settled()
        return rig, {"moved": moved}

    rig, seen = asyncio.run(scenario())
    ids = [r["task_id"] for r in rig.published]
    assert sorted(ids) == sorted(f"t-{i}" for i in range(10))  # each once
    rebound = [r for r in rig.published if r["decision"].get("rebound")]
    assert len(rebound) == seen["moved"] == rig.dispatcher.rebinds
    assert 1 <= seen["moved"] <= 8  # only tasks that had not started
    assert all(r["placement"] == "cloud" for r in rebound)
    # The tail moved: the two tasks handed to the pool (one running, one queued in it) stayed.
    assert {"t-0", "t-1"} <= {r["task_id"] for r in rig.published if r["placement"] == "local"}
    assert rig.dispatcher.cloud_outcomes == {"ok": seen["moved"]}
    rig.store.stop()

"""Hedging in the dispatcher: an overdue cloud task also runs on the gateway, and its row gets one result.

The real daemon in-process on real SQLite (tests/fakes.py): a broker stand-in, a cloud client stand-in whose
submission hangs (an upload caught in a fade) until the test lets it answer, and a pool stand-in that runs heavy
tasks when the test opens its gate.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from fakes import FakeBroker, GatedPool, StalledCloud, start

from agent.cloud import CloudObserver
from agent.config import CloudSettings, DecisionSettings, Settings
from agent.daemon import Daemon
from agent.decision import Policy
from agent.decision.model import HEDGE_SLACK_S, UPLOAD_HEDGE_SLACK_S
from agent.executor import LocalExecutor

from support import wait_until

NOISE = "noise.spectrum"
SENSOR = "sensor.stats"
# Priors under which the cloud looks far faster than this gateway: the model offloads every task.
FAST_CLOUD = {"local_fixed_s": 0.3, "local_per_byte_s": 1e-6, "cloud_fixed_s": 0.001, "cloud_per_byte_s": 1e-9,
              "out_bytes": 300}
PCM = np.random.default_rng(1).normal(0, 3000, 16_000).astype("<i2").tobytes()


def message(device: int, kind: str) -> tuple[str, bytes]:
    """A device's message that becomes a task of ``kind``; its result's topic names the device."""
    if kind == NOISE:
        return f"city/a/noise/mic{device}/pcm", PCM
    return f"city/a/traffic/{device}/data", json.dumps({"speed": 40}).encode()


def device(result: dict[str, Any]) -> int:
    return int(result["topic"].split("/")[3].removeprefix("mic"))


class Rig:
    """The daemon with its link, cloud client and pool replaced; ``kinds``: the decision's priors."""

    def __init__(self, tmp_path: Path, kinds: dict[str, dict[str, float]] | None = None) -> None:
        self.broker = FakeBroker()
        self.cloud = StalledCloud()
        self.pool = GatedPool()
        decision = DecisionSettings(kinds=kinds or {NOISE: FAST_CLOUD, SENSOR: FAST_CLOUD},
                                    uplink_mbps=1000, provisioning_s=0, probe_interval_s=0)
        settings = Settings(state_dir=tmp_path, local={"workers": 1}, metrics={"port": 0},
                            cloud={"url": "http://cloud.invalid"}, decision=decision,
                            routes=[{"topic": "city/+/traffic/+/data", "task": SENSOR},
                                    {"topic": "city/+/noise/+/pcm", "task": NOISE}])
        self.daemon = Daemon(settings, link=self.broker.link, cloud=self._cloud,
                             executor=cast(LocalExecutor, self.pool), tune_process=False)

    def _cloud(self, settings: CloudSettings, observer: CloudObserver | None = None) -> StalledCloud:
        assert isinstance(observer, Policy)
        observer.observe_lease(True)  # as a client whose lease is ready
        return self.cloud

    async def start(self) -> None:
        self.running = await start(self.daemon, self.broker)

    async def stop(self) -> None:
        self.daemon.request_stop("test")
        assert await self.running == 0

    def send(self, device: int, kind: str) -> None:
        self.broker.publish(*message(device, kind))

    @property
    def published(self) -> list[dict[str, Any]]:
        return [json.loads(payload) for _, payload in self.broker.published]

    @property
    def dispatcher(self) -> Any:
        return self.daemon.dispatcher

    async def until(self, condition: Any, timeout_s: float = 10.0) -> None:
        await wait_until(condition, timeout_s, "the condition", interval=0.01)

    def bookkeeping_settled(self) -> None:
        snapshot = self.daemon.policy.snapshot(asyncio.get_running_loop().time())
        assert snapshot["local_tasks"] == snapshot["inline_tasks"] == snapshot["cloud_tasks"] == 0
        assert snapshot["uplink_queued_bytes"] == 0


async def gateway_copy_wins(tmp_path: Path, kind: str) -> tuple[Rig, float]:
    rig = Rig(tmp_path)
    await rig.start()
    rig.pool.gate.set()
    rig.send(1, kind)
    await rig.until(lambda: len(rig.cloud.submitted) == 1)
    started = asyncio.get_running_loop().time()
    await rig.until(lambda: len(rig.published) == 1)
    waited = asyncio.get_running_loop().time() - started
    await rig.until(lambda: rig.cloud.cancelled == rig.cloud.submitted)
    rig.cloud.answer.set()  # a late answer would come now: there is no request left to give it
    await asyncio.sleep(0.3)
    rig.bookkeeping_settled()
    await rig.stop()
    return rig, waited


def check_gateway_result(rig: Rig, waited: float) -> None:
    assert len(rig.published) == 1, rig.published
    result = rig.published[0]
    assert result["task_id"] == rig.cloud.submitted[0]
    assert result["placement"] == "local"
    assert result["decision"]["reason"] == "model" and result["decision"]["hedged"] is True
    assert "fallback" not in result["decision"]
    assert HEDGE_SLACK_S < waited < 5.0  # overdue after the predicted time plus the slack: not at once, not never
    assert rig.dispatcher.hedges == rig.dispatcher.hedges_won == 1
    assert rig.dispatcher.cloud_outcomes == {"cancelled": 1}  # the cloud decision's outcome is accounted for


def test_a_stalled_heavy_cloud_task_is_hedged_and_the_gateway_result_is_the_only_one(tmp_path: Path) -> None:
    rig, waited = asyncio.run(gateway_copy_wins(tmp_path, NOISE))
    check_gateway_result(rig, waited)


def test_a_stalled_light_cloud_task_is_hedged_too(tmp_path: Path) -> None:
    rig, waited = asyncio.run(gateway_copy_wins(tmp_path, SENSOR))
    check_gateway_result(rig, waited)


def test_when_the_cloud_answers_first_the_running_gateway_copy_is_ignored(tmp_path: Path) -> None:
    async def scenario() -> Rig:
        rig = Rig(tmp_path)
        await rig.start()
        rig.send(1, NOISE)
        await rig.until(lambda: rig.pool.started == 1)  # hedged: the gateway copy is in the pool, gated
        rig.cloud.answer.set()
        await rig.until(lambda: len(rig.published) == 1)
        rig.pool.gate.set()  # the gateway copy finishes now: second, so not published
        await asyncio.sleep(0.3)
        rig.bookkeeping_settled()
        await rig.stop()
        return rig

    rig = asyncio.run(scenario())
    assert len(rig.published) == 1
    result = rig.published[0]
    assert result["task_id"] == rig.cloud.submitted[0] and result["placement"] == "cloud"
    assert result["decision"]["hedged"] is True
    assert rig.cloud.cancelled == []
    assert rig.dispatcher.hedges == 1 and rig.dispatcher.hedges_won == 0
    assert rig.dispatcher.cloud_outcomes == {"ok": 1}


@pytest.mark.slow
def test_a_cloud_task_answered_in_time_is_not_hedged(tmp_path: Path) -> None:
    async def scenario() -> Rig:
        rig = Rig(tmp_path)
        await rig.start()
        rig.cloud.answer.set()
        rig.send(1, NOISE)
        await rig.until(lambda: len(rig.published) == 1)
        await asyncio.sleep(1.5)  # past the time it would have been hedged
        rig.bookkeeping_settled()
        await rig.stop()
        return rig

    rig = asyncio.run(scenario())
    assert [m["placement"] for m in rig.published] == ["cloud"]
    assert "hedged" not in rig.published[0]["decision"]
    assert rig.dispatcher.hedges == 0 and rig.pool.started == 0


async def upload_watched(tmp_path: Path, upload_ends: bool) -> tuple[Rig, float]:
    """A cloud client that sees uploads end: the gateway copy starts at the upload's deadline when the upload
    has not ended, at the task's when it has."""
    rig = Rig(tmp_path)
    rig.cloud.sees_uploads = True
    if upload_ends:
        rig.cloud.uploaded.set()
    await rig.start()
    rig.send(1, NOISE)
    await rig.until(lambda: len(rig.cloud.submitted) == 1)
    started = asyncio.get_running_loop().time()
    await rig.until(lambda: rig.pool.started == 1)  # the gateway copy is in the pool (gated)
    waited = asyncio.get_running_loop().time() - started
    rig.pool.gate.set()
    await rig.until(lambda: len(rig.published) == 1)
    await asyncio.sleep(0.3)
    rig.bookkeeping_settled()
    await rig.stop()
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
        slow_gateway = {"local_fixed_s": 0.001, "local_per_byte_s": 0.0, "cloud_fixed_s": 0.05,
                        "cloud_per_byte_s": 0.0, "out_bytes": 300}
        rig = Rig(tmp_path, kinds={NOISE: slow_gateway})
        await rig.start()
        for i in range(10):
            rig.send(i, NOISE)
        await rig.until(lambda: rig.pool.started == 2 and rig.dispatcher.backlog == 8)
        assert rig.dispatcher.decisions == {("local", "model"): 10} and rig.dispatcher.rebinds == 0
        now = asyncio.get_running_loop().time()
        for _ in range(5):  # the first executions (elsewhere) take 2 s: the backlog is worth 16 s now
            rig.daemon.policy.observe_local(NOISE, 32_000, 2.0, now)
        await rig.until(lambda: rig.dispatcher.rebinds > 0 and len(rig.cloud.submitted) == rig.dispatcher.rebinds)
        moved: int = rig.dispatcher.rebinds
        # Mid-move, the store still says what it said: every row pending, none added.
        assert rig.daemon.store.outstanding_rows == 10
        rig.cloud.answer.set()
        await rig.until(lambda: len(rig.published) == moved)
        rig.pool.gate.set()
        await rig.until(lambda: len(rig.published) == 10)
        await asyncio.sleep(0.3)
        rig.bookkeeping_settled()
        await rig.stop()
        return rig, {"moved": moved}

    rig, seen = asyncio.run(scenario())
    assert sorted(device(r) for r in rig.published) == list(range(10))  # each once
    rebound = [r for r in rig.published if r["decision"].get("rebound")]
    assert len(rebound) == seen["moved"] == rig.dispatcher.rebinds
    assert 1 <= seen["moved"] <= 8  # only tasks that had not started
    assert all(r["placement"] == "cloud" for r in rebound)
    # The tail moved: the two tasks handed to the pool (one running, one queued in it) stayed.
    assert {0, 1} <= {device(r) for r in rig.published if r["placement"] == "local"}
    assert rig.dispatcher.cloud_outcomes == {"ok": seen["moved"]}

"""Late binding back in the dispatcher: a cloud task whose upload has not started comes to the gateway once the
gateway would finish it sooner, and its row gets one result.

The real daemon in-process on real SQLite (tests/fakes.py): a broker stand-in, a cloud client stand-in whose
lease is still being provisioned (so no submission can have sent anything), and a pool stand-in that runs heavy
tasks when the test opens its gate. No real cloud can be held with a lease on its way at a chosen moment; the
same move against the real devcloud and Mosquitto is in tests/test_burst.py.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, cast

import numpy as np
from fakes import FakeBroker, GatedPool, StalledCloud, start

from agent.cloud import CloudObserver
from agent.cloud._client import LeaseSnapshot
from agent.config import CloudSettings, DecisionSettings, Settings
from agent.daemon import Daemon
from agent.decision import Policy
from agent.decision.model import COLD_RUNS
from agent.executor import LocalExecutor

from support import wait_until

NOISE = "noise.spectrum"
PCM = np.random.default_rng(1).normal(0, 3000, 16_000).astype("<i2").tobytes()
# The gateway looks slow (3 s a clip) and the cloud near: every clip goes to the cloud, hedged only after 3 s.
SLOW_GATEWAY = {"local_fixed_s": 3.0, "local_per_byte_s": 0.0, "cloud_fixed_s": 0.01, "cloud_per_byte_s": 0.0,
                "out_bytes": 300}


class ProvisioningCloud(StalledCloud):
    """A cloud client whose lease is still on its way: every submission waits for it, none has sent a byte."""

    def lease_status(self) -> LeaseSnapshot:
        return LeaseSnapshot(ready=False, slots=0, provisioning=True)


def test_cloud_tasks_waiting_for_their_lease_come_back_once_the_gateway_is_sooner(tmp_path: Path) -> None:
    async def scenario() -> tuple[Any, list[dict[str, Any]], dict[str, int]]:
        broker, cloud, pool = FakeBroker(), ProvisioningCloud(), GatedPool()
        decision = DecisionSettings(kinds={NOISE: SLOW_GATEWAY}, uplink_mbps=1000, provisioning_s=0,
                                    probe_interval_s=0)
        settings = Settings(state_dir=tmp_path, local={"workers": 1}, metrics={"port": 0},
                            cloud={"url": "http://cloud.invalid"}, decision=decision,
                            routes=[{"topic": "city/+/noise/+/pcm", "task": NOISE}])

        def make_cloud(settings: CloudSettings, observer: CloudObserver | None = None) -> ProvisioningCloud:
            assert isinstance(observer, Policy)
            return cloud

        daemon = Daemon(settings, link=broker.link, cloud=make_cloud, executor=cast(LocalExecutor, pool),
                        tune_process=False)
        running = await start(daemon, broker)
        dispatcher = daemon.dispatcher
        for i in range(8):
            broker.publish(f"city/a/noise/mic{i}/pcm", PCM)
        await wait_until(lambda: len(cloud.submitted) == 8, 10.0, "eight submissions", interval=0.01)
        assert dispatcher.decisions == {("cloud", "model"): 8} and dispatcher.moves_back == 0
        # Measured since: the gateway runs a clip in 0.2 s, and the cloud is a second away.
        now = asyncio.get_running_loop().time()
        for _ in range(COLD_RUNS + 60):
            daemon.policy.observe_local(NOISE, len(PCM), 0.2, now)
        for _ in range(20):
            daemon.policy.observe_rtt(1.0, now)
        await wait_until(lambda: dispatcher.moves_back > 0, 5.0, "the moves back", interval=0.01)
        # One pass moves the latest sent until the gateway's queue makes the cloud as good again.
        first = dispatcher.moves_back
        assert daemon.store.outstanding_rows == 8  # mid-move the store says what it said: every row pending
        pool.gate.set()
        await wait_until(lambda: len(broker.published) >= first, 10.0, "the moved tasks' results", interval=0.01)
        cloud.answer.set()
        await wait_until(lambda: len(broker.published) == 8, 10.0, "every result", interval=0.01)
        await asyncio.sleep(0.3)  # time for a second result, which must not come
        snapshot = daemon.policy.snapshot(asyncio.get_running_loop().time())
        daemon.request_stop("test")
        assert await running == 0
        counts = {"first": first, "moved": dispatcher.moves_back, "local_tasks": snapshot["local_tasks"],
                  "cloud_tasks": snapshot["cloud_tasks"], "rebinds": dispatcher.rebinds, "hedges": dispatcher.hedges,
                  "cancelled": len(cloud.cancelled)}
        return dispatcher, [json.loads(payload) for _, payload in broker.published], counts

    dispatcher, published, counts = asyncio.run(scenario())
    # The first pass stopped short of all eight: the gateway's queue of moved clips made the cloud as good again.
    # (Later passes may move more: the measured clips take milliseconds here.)
    assert 1 <= counts["first"] < 8
    moved = counts["moved"]
    # Each row once; those moved ran here with "rebound": true, the last ones sent (the latest in the uplink's
    # queue) first, their submissions cancelled while they waited for the lease.
    assert sorted(int(r["topic"].split("/")[3].removeprefix("mic")) for r in published) == list(range(8))
    back = [r for r in published if r["placement"] == "local"]
    assert len(back) == moved and moved >= counts["first"]
    assert all(r["decision"]["rebound"] is True and r["decision"]["reason"] == "model" for r in back)
    assert all("rebound" not in r["decision"] for r in published if r["placement"] == "cloud")
    assert {int(r["topic"].split("/")[3].removeprefix("mic")) for r in back} == set(range(8 - moved, 8))
    outcomes = {"moved_back": moved, "ok": 8 - moved}
    assert dispatcher.cloud_outcomes == {k: n for k, n in outcomes.items() if n}
    assert counts["cancelled"] == moved
    assert counts["rebinds"] == 0 and counts["hedges"] == 0  # nothing moved twice, nothing copied
    assert counts["local_tasks"] == counts["cloud_tasks"] == 0  # the policy's bookkeeping settled

"""Where the archive meets the store: the tap appends exactly the archive routes' inputs once the real store
has committed them, in order; recovery appends what a crash kept from the archive once, and never twice
(agent/archive/tap.py, agent/archive/recovery.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from agent.archive.catalog import Catalog
from agent.archive.intake import Intake, Sealing
from agent.archive.recovery import reconcile
from agent.archive.segment import file_chunks, read_segment
from agent.archive.tap import Tap
from agent.config import Route
from agent.ingress import Router
from agent.store import Committed, NewTask, Store

from support import wait_for

KEPT = "city/+/noise/+/pcm"
ROUTES = [Route(topic=KEPT, task="noise.spectrum", archive={"days": 7}),
          Route(topic="city/+/traffic/+/data", task="sensor.stats")]
ARCHIVED = frozenset({KEPT})


def row(i: int, topic: str, dead: bool = False) -> NewTask:
    payload = f"reading {i}".encode()
    if dead:
        return NewTask(f"{i:032x}", topic, None, None, None, None, len(payload), time.time(), None, None,
                       "edge/gw/dead", b"{}")
    return NewTask(f"{i:032x}", topic, "noise.spectrum", "auto", {}, payload, len(payload), time.time(), None, None)


def everything(intake: Intake) -> list[str]:
    ids = []
    for entry in intake.catalog.entries(route=KEPT):
        ids += [r.task_id for r in read_segment(file_chunks(intake.directory(KEPT) / f"{entry.segment_id}.seg"))]
    return ids + [r.task_id for _, records in intake.unsealed(KEPT) for r in records]


def new_intake(root: Path) -> Intake:
    intake = Intake(root, Catalog(root / "catalog.db"), Sealing(age_s=3600, max_bytes=1 << 20))
    intake.open()
    return intake


def test_the_tap_appends_archive_routes_inputs_after_their_commit_in_order(tmp_path: Path) -> None:
    router = Router(ROUTES)
    intake = new_intake(tmp_path / "archive")
    tap = Tap(router.match, lambda: ARCHIVED, intake)
    store = Store(tmp_path / "state", max_tasks=10_000, max_bytes=1 << 26)
    done = threading.Event()
    expected: list[str] = []

    def hook(committed: Committed) -> None:  # the daemon's _on_commit: the tap first, then the loop's hand-off
        tap.committed(committed.ingested)
        if len(everything(intake)) == len(expected):
            done.set()

    store.start(hook)
    try:
        n = 0
        for batch in range(30):
            rows = []
            for k in range(batch % 7 + 1):
                n += 1
                topic = ("city/a/noise/1/pcm", "city/a/traffic/2/data", "city/a/noise/3/pcm")[k % 3]
                rows.append(row(n, topic, dead=(n % 11 == 0)))
            expected += [r.task_id for r in rows if r.out_topic is None and "noise" in r.topic]
            tap.submitted(rows)
            store.ingest(rows, [])
        wait_for(done.is_set, 10, "every commit archived")
        assert everything(intake) == expected
    finally:
        store.stop()
        intake.close()


def test_recovery_appends_what_the_crash_kept_from_the_archive_once(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = Store(state, max_tasks=10_000, max_bytes=1 << 26)
    store.start(lambda committed: None)  # committed, and the process dies before the archive hears of it
    rows = [row(i, "city/a/noise/1/pcm" if i % 2 else "city/a/traffic/1/data") for i in range(20)]
    store.ingest(rows, [])
    store.stop()
    match = Router(ROUTES).match
    intake = new_intake(tmp_path / "archive")
    assert reconcile(state / "edge-agent.db", intake, intake.catalog, match, ARCHIVED) == 10
    assert everything(intake) == [r.task_id for r in rows if "noise" in r.topic]
    intake.close()
    # The next start (the journal sealed by recovery): the same pending inputs are not appended again.
    again = new_intake(tmp_path / "archive")
    assert reconcile(state / "edge-agent.db", again, again.catalog, match, ARCHIVED) == 0
    assert len(everything(again)) == 10
    again.close()

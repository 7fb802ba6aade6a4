"""The durable store on real SQLite: group commit, acknowledgements after commit, bounds, resume."""

from __future__ import annotations

import queue
import threading
import time
import zlib
from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.ingress import Ingress
from agent.mqtt import InboundMessage
from agent.store import GATHER_ROWS, Committed, NewTask, OutboxEntry, Store, TaskRef

from support import wait_for


def new_task(i: int, size: int = 10, dead: bool = False) -> NewTask:
    return NewTask(
        task_id=f"t{i}", topic=f"city/a/traffic/{i}/data", kind=None if dead else "sensor.stats",
        placement=None if dead else "auto",
        options=None if dead else {"topic": f"city/a/traffic/{i}/data", "window": 5},
        payload=None if dead else b"x" * size, size=size, received_at=1000.0 + i, mid=i + 1, crc=i,
        out_topic="edge/gw/dead-letter/x" if dead else None, out_payload=b"{}" if dead else None,
        route_options=None if dead else '{"window":5}',
    )


class Hooked:
    """Collects what each group commit hands on, as the daemon's hook would."""

    def __init__(self) -> None:
        self.commits: queue.SimpleQueue[Committed] = queue.SimpleQueue()

    def __call__(self, committed: Committed) -> None:
        self.commits.put(committed)

    def wait_released(self, rows: int, timeout: float = 5) -> None:
        released = 0
        deadline = time.monotonic() + timeout
        while released < rows and time.monotonic() < deadline:
            released += self.commits.get(timeout=1).released

    def gather(self, until: int, attr: str, timeout: float = 5) -> list[object]:
        got: list[object] = []
        deadline = time.monotonic() + timeout
        while len(got) < until and time.monotonic() < deadline:
            try:
                got.extend(getattr(self.commits.get(timeout=0.1), attr))
            except queue.Empty:
                continue
        return got


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = Store(tmp_path, max_tasks=100, max_bytes=10_000_000)
    yield s
    if s.alive():
        s.stop()


def test_ack_only_after_commit_and_rows_survive_reopen(tmp_path: Path) -> None:
    store = Store(tmp_path, max_tasks=100, max_bytes=10_000_000)
    hook = Hooked()
    store.start(hook)
    store.ingest([new_task(i) for i in range(5)], [(i + 1, 1) for i in range(5)])
    acks = hook.gather(5, "acks")
    assert acks == [(i + 1, 1) for i in range(5)]
    store.stop()
    # What was acknowledged is on disk: a new process finds the five pending tasks.
    again = Store(tmp_path, max_tasks=100, max_bytes=10_000_000)
    assert again.counts() == {"pending": 5, "outbox": 0, "published": 0}
    assert again.outstanding_rows == 5
    again.stop()


def test_after_a_restart_each_packet_id_keeps_its_newest_delivery(tmp_path: Path) -> None:
    store = Store(tmp_path, max_tasks=100, max_bytes=10_000_000)
    hook = Hooked()
    store.start(hook)
    # Two deliveries under packet id 7, the second after the id came round again.
    older = new_task(0)._replace(mid=7, payload=b"older", size=5, crc=zlib.crc32(b"older"))
    newer = new_task(1)._replace(mid=7, payload=b"newer", size=5, crc=zlib.crc32(b"newer"))
    store.ingest([older, newer], [(7, 1), (7, 1)])
    assert len(hook.gather(2, "tasks")) == 2
    store.stop()

    again = Store(tmp_path, max_tasks=100, max_bytes=10_000_000)
    acked: list[int] = []
    ingress = Ingress(agent_id="gw", routes=[], max_payload_bytes=1000, store=again,
                      ack=lambda mid, qos: acked.append(mid), request_redelivery=lambda: None)
    ingress.remember(again.recent_deliveries(65_535))
    # The broker redelivers the newer one: recognised as stored, acknowledged again, not a second task.
    ingress.handle(InboundMessage(newer.topic, b"newer", 1, 7, True, time.time()))
    assert ingress.counters.duplicates == 1 and ingress.counters.accepted == 0 and acked == [7]
    again.stop()


def test_group_commit_batches_under_load(store: Store) -> None:
    hook = Hooked()
    store.start(hook)
    for i in range(2000):
        store.ingest([new_task(i)], [(i % 65535 + 1, 1)])
    tasks = hook.gather(2000, "tasks")
    assert len(tasks) == 2000
    assert store.commits < 2000  # several tasks per transaction


def test_task_lifecycle_and_byte_accounting(store: Store) -> None:
    hook = Hooked()
    store.start(hook)
    store.ingest([new_task(0, size=100)], [(1, 1)])
    (ref,) = hook.gather(1, "tasks")
    assert isinstance(ref, TaskRef) and ref.payload == b"x" * 100
    assert ref.options == {"topic": "city/a/traffic/0/data", "window": 5}
    assert store.outstanding_bytes == 100
    store.complete([(ref.id, ref.size, "edge/gw/results/x", b"r" * 30)])
    (entry,) = hook.gather(1, "outbox")
    assert isinstance(entry, OutboxEntry) and entry.payload == b"r" * 30
    assert store.outstanding_bytes == 30
    store.published([(entry.id, 30)])
    hook.wait_released(1)
    assert store.outstanding_rows == 0 and store.outstanding_bytes == 0
    assert store.counts() == {"pending": 0, "outbox": 0, "published": 1}
    # The tombstone remembers the delivery, for redelivery after a crash.
    assert list(store.recent_deliveries(10)) == [(1, "city/a/traffic/0/data", 0)]


def test_a_result_published_without_the_outbox_turns_the_pending_row_into_a_tombstone(store: Store) -> None:
    hook = Hooked()
    store.start(hook)
    store.ingest([new_task(0, size=100)], [(1, 1)])
    (ref,) = hook.gather(1, "tasks")
    assert isinstance(ref, TaskRef)
    store.published([(ref.id, ref.size)])  # the row's bytes are its input: never was there a result in it
    hook.wait_released(1)
    assert store.outstanding_rows == 0 and store.outstanding_bytes == 0
    assert store.counts() == {"pending": 0, "outbox": 0, "published": 1}
    assert store.load_payload(ref.id) is None  # the input is gone with it
    assert list(store.recent_deliveries(10)) == [(1, "city/a/traffic/0/data", 0)]


def test_read_backs_carry_any_bytes_in_order(tmp_path: Path) -> None:
    # Pages are built by SQLite as JSON: inputs and results that are not UTF-8 must come back byte for byte.
    store = Store(tmp_path, max_tasks=1000, max_bytes=10_000_000)
    hook = Hooked()
    store.start(hook)
    blobs = [bytes([i, 0xFF, 0x00, 0xC3, 0x28]) + b'"\\n' * i for i in range(40)]
    store.ingest([new_task(i)._replace(payload=blob, size=len(blob)) for i, blob in enumerate(blobs)], [])
    refs = hook.gather(40, "tasks")
    for ref in reversed(refs[:10]):  # completed out of order: the outbox is read back in completion order
        assert isinstance(ref, TaskRef)
        store.complete([(ref.id, ref.size, "edge/gw/results/x", b"\xfe\x00" + blobs[ref.id - 1])])
    hook.gather(10, "outbox")
    got: queue.SimpleQueue[object] = queue.SimpleQueue()
    store.load_pending(0, 100, got.put)
    store.load_outbox(0, 100, got.put)
    pending = got.get(timeout=5)
    outbox = got.get(timeout=5)
    assert [r.payload for r in pending] == blobs[10:]  # type: ignore[attr-defined]
    # The row keeps the route's options; the topic is the row's own.
    assert [r.options for r in pending] == [{"window": 5, "topic": f"city/a/traffic/{i}/data"} for i in range(10, 40)]  # type: ignore[attr-defined]
    assert [r.received_at for r in pending] == [1000.0 + i for i in range(10, 40)]  # type: ignore[attr-defined]
    assert [e.payload for e in outbox] == [b"\xfe\x00" + blobs[i] for i in reversed(range(10))]  # type: ignore[attr-defined]
    store.stop()


def test_dead_letter_rows_go_straight_to_the_outbox(store: Store) -> None:
    hook = Hooked()
    store.start(hook)
    store.ingest([new_task(0, size=5000, dead=True)], [(1, 1)])
    (entry,) = hook.gather(1, "outbox")
    assert isinstance(entry, OutboxEntry)
    assert store.outstanding_bytes == 2  # the input of a dead letter is not kept


def test_bound_by_rows_and_bytes(tmp_path: Path) -> None:
    store = Store(tmp_path, max_tasks=10, max_bytes=1024 * 1024)
    assert store.has_room(100)
    store.ingest([new_task(i) for i in range(10)], [])
    assert not store.has_room(1)
    big = Store(tmp_path / "b", max_tasks=1000, max_bytes=1024 * 1024)
    big.ingest([new_task(0, size=1024 * 1024 - 10)], [])
    assert big.has_room(10) and not big.has_room(11)
    store.start(Hooked())
    big.start(Hooked())
    store.stop()
    big.stop()


def test_resume_reads_pending_and_outbox_in_order(tmp_path: Path) -> None:
    store = Store(tmp_path, max_tasks=1000, max_bytes=10_000_000)
    hook = Hooked()
    store.start(hook)
    store.ingest([new_task(i) for i in range(10)], [])
    refs = hook.gather(10, "tasks")
    for ref in refs[:4]:
        assert isinstance(ref, TaskRef)
        store.complete([(ref.id, ref.size, "edge/gw/results/x", f"r{ref.id}".encode())])
    hook.gather(4, "outbox")
    store.stop()

    again = Store(tmp_path, max_tasks=1000, max_bytes=10_000_000)
    got: queue.SimpleQueue[object] = queue.SimpleQueue()
    again.start(Hooked())
    again.load_pending(0, 3, got.put)
    again.load_outbox(0, 100, got.put)
    first = got.get(timeout=5)
    outbox = got.get(timeout=5)
    assert [r.task_id for r in first] == ["t4", "t5", "t6"]  # type: ignore[attr-defined]
    # Small inputs come with the read-back; larger ones are read when they run.
    assert all(r.payload == b"x" * 10 for r in first)  # type: ignore[attr-defined]
    assert again.load_payload(first[0].id) == b"x" * 10  # type: ignore[index]
    assert [e.payload for e in outbox] == [b"r1", b"r2", b"r3", b"r4"]  # type: ignore[attr-defined]
    again.load_pending(first[-1].id, 100, got.put)  # type: ignore[index]
    assert [r.task_id for r in got.get(timeout=5)] == ["t7", "t8", "t9"]  # type: ignore[attr-defined]
    again.stop()


def test_hand_offs_pause_while_the_reader_reads_back_and_resume_at_the_read_that_catches_up(store: Store) -> None:
    hook = Hooked()
    store.start(hook)
    got: queue.SimpleQueue[list[TaskRef]] = queue.SimpleQueue()
    store.stop_hand_off("tasks", 0)
    store.ingest([new_task(0), new_task(1)], [(1, 1), (2, 1)])
    store.load_pending(0, 1, got.put)  # a full page: the reader is still behind
    store.ingest([new_task(2)], [(3, 1)])
    commits: list[Committed] = []
    while sum(len(c.acks) for c in commits) < 3:
        commits.append(hook.commits.get(timeout=5))
    assert [a for c in commits for a in c.acks] == [(1, 1), (2, 1), (3, 1)]
    assert not any(c.tasks for c in commits)  # committed, but not handed off: the reader reads them back
    assert [r.task_id for r in got.get(timeout=5)] == ["t0"]
    store.load_pending(1, 10, got.put)  # a short page: caught up, hand-offs resume after it
    store.ingest([new_task(3)], [(4, 1)])
    assert [r.task_id for r in got.get(timeout=5)] == ["t1", "t2"]
    handed = hook.gather(1, "tasks")
    assert [r.task_id for r in handed] == ["t3"]  # type: ignore[attr-defined]


def test_a_stop_sent_before_a_catching_up_read_reached_the_reader_is_ignored(store: Store) -> None:
    hook = Hooked()
    store.start(hook)
    got: queue.SimpleQueue[list[TaskRef]] = queue.SimpleQueue()
    store.ingest([new_task(0)], [])
    first = hook.commits.get(timeout=5)
    store.load_pending(0, 10, got.put)  # catches up after commit 1
    assert [r.task_id for r in got.get(timeout=5)] == ["t0"]
    # The reader had declined commit 1's hand-off before that read's reply reached it: the stop is stale.
    store.stop_hand_off("tasks", first.number)
    store.ingest([new_task(1)], [])
    assert [r.task_id for r in hook.gather(1, "tasks")] == ["t1"]  # type: ignore[attr-defined]


def _spaced_store(tmp_path: Path, interval_s: float) -> tuple[Store, Hooked, list[float]]:
    """A store with a commit interval whose hook also notes when each commit was handed on."""
    store = Store(tmp_path, max_tasks=1000, max_bytes=10_000_000, commit_interval_s=interval_s)
    hook = Hooked()
    times: list[float] = []
    store.start(lambda committed: (times.append(time.monotonic()), hook(committed)))
    return store, hook, times


def test_a_commit_interval_gathers_trickling_rows_into_one_group(tmp_path: Path) -> None:
    store, hook, times = _spaced_store(tmp_path, 0.5)
    store.ingest([new_task(0)], [(1, 1)])
    assert hook.gather(1, "acks") == [(1, 1)]  # the first row after a quiet spell goes at once
    first = times[0]
    for i in range(1, 6):  # fewer than GATHER_ROWS, one at a time: they wait for the interval, together
        store.ingest([new_task(i)], [(i + 1, 1)])
        time.sleep(0.01)  # a trickle, the point of the test: rows arriving apart, not in one burst
    assert hook.gather(5, "acks") == [(i + 1, 1) for i in range(1, 6)]
    assert store.commits == 2
    assert times[1] - first >= 0.4  # not before the interval since the first commit began (less its length)
    store.stop()


def writer_gathering(store: Store) -> None:
    """Until the writer has taken the rows queued so far and waits for the interval with them."""
    wait_for(lambda: store._writer.gathering, 10, "the writer to wait out the commit interval")


def test_enough_rows_a_read_or_a_stop_end_the_wait_at_once(tmp_path: Path) -> None:
    store, hook, _ = _spaced_store(tmp_path, 30.0)
    store.ingest([new_task(0)], [(1, 1)])
    hook.gather(1, "acks")
    started = time.monotonic()
    # The writer is waiting with one row when the rest of GATHER_ROWS arrive: they go without waiting out the
    # interval, or a broker allowing only that many unacknowledged messages would stall for all of it.
    store.ingest([new_task(1)], [(2, 1)])
    writer_gathering(store)
    for i in range(2, 1 + GATHER_ROWS):
        store.ingest([new_task(i)], [(i + 1, 1)])
    assert len(hook.gather(GATHER_ROWS, "acks", timeout=10)) == GATHER_ROWS
    # A read someone waits for is answered, with the row queued before it committed first.
    store.ingest([new_task(100)], [(101, 1)])
    writer_gathering(store)
    pages: queue.SimpleQueue[list[TaskRef]] = queue.SimpleQueue()
    store.load_pending(0, 1000, pages.put)
    assert [ref.id for ref in pages.get(timeout=10)][-1] == 1 + 1 + GATHER_ROWS
    # A stop commits what waits and returns.
    store.ingest([new_task(101)], [(102, 1)])
    writer_gathering(store)
    store.stop(timeout_s=10)
    assert time.monotonic() - started < 10  # each wait would have been 30 s
    assert store.commits == 4
    again = Store(tmp_path, max_tasks=1000, max_bytes=10_000_000)
    assert again.counts()["pending"] == 2 + 1 + GATHER_ROWS
    again.stop()


def test_call_runs_after_everything_queued_before(store: Store) -> None:
    hook = Hooked()
    store.start(hook)
    seen = threading.Event()
    order: list[str] = []
    store.ingest([new_task(0)], [(1, 1)])
    store.call(lambda: (order.append(f"call:{store.counts()['pending']}"), seen.set()))
    assert seen.wait(5)
    assert order == ["call:1"]


def test_unwritable_state_dir_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError) as info:
        Store(blocker / "state", max_tasks=10, max_bytes=1024 * 1024)
    assert info.value.variable == "EDGE_AGENT_STATE_DIR"


def test_a_commit_hanging_too_long_makes_the_writer_unhealthy(store: Store) -> None:
    store.start(Hooked())
    assert store.healthy()
    store.busy_since = time.monotonic() - 120  # as if fsync had hung for two minutes
    assert not store.healthy(stuck_after_s=60)
    store.busy_since = None
    assert store.healthy()


def test_old_tombstones_are_pruned_a_bounded_number_at_a_time(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import agent.store._transitions as store_module

    monkeypatch.setattr(store_module, "TOMBSTONES_KEPT", 100)
    monkeypatch.setattr(store_module, "PRUNE_EVERY", 10)
    store = Store(tmp_path, max_tasks=10_000, max_bytes=10_000_000)
    hook = Hooked()
    store.start(hook)
    published = 0
    for batch in range(50):
        store.ingest([new_task(batch * 10 + i) for i in range(10)], [])
        refs = hook.gather(10, "tasks")
        store.complete([(r.id, r.size, "edge/gw/results/x", b"r") for r in refs])  # type: ignore[attr-defined]
        store.published([(e.id, 1) for e in hook.gather(10, "outbox")])  # type: ignore[attr-defined]
        published += 10
    store.ingest([new_task(999)], [])  # the commits after the last tombstones prune once more
    hook.gather(1, "tasks")
    store.stop()
    counts = Store(tmp_path, max_tasks=10_000, max_bytes=10_000_000).counts()
    # A prune (at most 20 rows) after every 10 ingested rows keeps up: the newest 100 tombstones are left.
    assert counts["published"] == 100 < published
    assert counts["pending"] == 1


def test_task_state_is_saved_by_the_writer_and_only_the_newest_kept(tmp_path: Path) -> None:
    store = Store(tmp_path, max_tasks=100, max_bytes=10_000_000)
    store.start(Hooked())
    store.save_task_state("sensor.stats", [("a", b"1"), ("b", b"2"), ("c", b"3")], keep=2)
    store.save_task_state("sensor.stats", [("a", b"4")], keep=2)
    store.save_task_state("other", [], keep=2)  # nothing to save: no transaction at all
    store.stop()
    again = Store(tmp_path, max_tasks=100, max_bytes=10_000_000)
    try:
        assert again.load_task_state("sensor.stats", 10) == [("c", b"3"), ("a", b"4")]  # oldest first
        assert again.load_task_state("sensor.stats", 1) == [("a", b"4")]
        assert again.load_task_state("other", 10) == []
    finally:
        again.stop()

"""The placement manager against real S3 through the devcloud's storage resources (its S3 server: moto in
server mode, IAM on, checksums verified): segments go to the cloud when cheaper and stay when not, retention
deletes on both sides, a cloud that fails keeps the archive on the gateway within its budget with the operator
warned, and a SIGKILL during an upload loses nothing and leaves no incomplete upload behind
(agent/archive/manager.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from structlog.testing import capture_logs

from agent.archive.catalog import Catalog
from agent.archive.cost import ArchivePrices
from agent.archive.intake import Intake, Sealing
from agent.archive.manager import Manager, RoutePolicy, object_key
from agent.archive.objectstore import ObjectStore
from agent.archive.segment import Record, file_chunks, read_segment

from support import wait_for

if TYPE_CHECKING:
    from agent.cloud._storage import StorageResource

    from support import DevCloud

ROUTE = "city/+/noise/+/pcm"
DAY = 86_400.0
# A dear uplink and cheap egress: a route read often (READ_OFTEN) is cheaper in the cloud, one never read is
# cheaper on the gateway's disk, paid for already while the budget has room.
PRICES = ArchivePrices(uplink_per_gb=0.5, cloud_storage_per_gb_month=0.02, cloud_egress_per_gb=0.01,
                       disk_budget_bytes=200_000, margin=0.1)
READ_OFTEN = 10.0


def make(root: Path, prices: ArchivePrices, objects: ObjectStore | None, *, days: float = 30,
         reads: float = 0.0, clock: list[float] | None = None) -> Manager:
    now = clock or [time.time()]
    catalog = Catalog(root / "catalog.db")
    intake = Intake(root, catalog, Sealing(age_s=3600, max_bytes=20_000), clock=lambda: now[0])
    intake.open()
    return Manager(intake=intake, catalog=catalog, prices=prices, routes={ROUTE: RoutePolicy(days, reads)},
                   objects=objects, clock=lambda: now[0], redecide_s=0, cloud_retry_s=0)


def fill(manager: Manager, segments: int, start: int = 0, size: int = 400, at: float | None = None) -> list[str]:
    """Append and seal ``segments`` segments of 60 random records each; returns the task ids in order."""
    ids = []
    for s in range(segments):
        records = [Record(at or time.time(), f"city/a/noise/{i}/pcm", os.urandom(size), f"{start + s * 60 + i:032x}")
                   for i in range(60)]
        manager.intake.append({ROUTE: records})
        ids += [r.task_id for r in records]
        manager.run_once()  # 60 × ~430 bytes is past the seal size
    return ids


def read_all(manager: Manager, objects: ObjectStore) -> list[str]:
    ids = []
    for entry in manager.catalog.entries(route=ROUTE):
        chunks = (objects.open(entry.object_key or "") if entry.place == "cloud"
                  else file_chunks(manager.local_path(entry)))
        ids += [r.task_id for r in read_segment(chunks)]
    return ids


def test_segments_go_to_the_cloud_when_cheaper_and_local_copies_leave_after_the_upload(
        tmp_path: Path, object_store: ObjectStore) -> None:
    objects = object_store
    manager = make(tmp_path, PRICES, objects, reads=READ_OFTEN)
    ids = fill(manager, 3)
    entries = manager.catalog.entries(route=ROUTE)
    assert [e.place for e in entries] == ["cloud"] * 3
    for entry in entries:
        assert not manager.local_path(entry).exists()
        stored = objects.head(object_key(ROUTE, entry.segment_id))
        assert stored is not None and stored.sha256 == entry.sha256 and stored.size == entry.size
        assert entry.decision is not None and entry.decision["choice"] == "cloud"
        assert entry.decision["cloud"]["total"] < entry.decision["gateway"]["total"]
    assert read_all(manager, objects) == ids
    assert manager.counters.uploads == 3


def test_segments_stay_on_the_gateway_when_it_is_cheaper(tmp_path: Path, object_store: ObjectStore) -> None:
    objects = object_store
    manager = make(tmp_path, PRICES, objects, reads=0.0)
    fill(manager, 2)
    entries = manager.catalog.entries(route=ROUTE)
    assert [e.place for e in entries] == ["gateway"] * 2
    assert all(manager.local_path(e).exists() for e in entries)
    assert all(e.decision is not None and e.decision["reason"] == "cheaper" for e in entries)
    assert objects.list() == []


def test_retention_deletes_on_both_sides(tmp_path: Path, object_store: ObjectStore) -> None:
    clock = [time.time()]
    objects = object_store
    # Room for two segments: the oldest goes to the cloud (over the budget), the others stay on the gateway.
    prices = ArchivePrices(uplink_per_gb=0.5, cloud_storage_per_gb_month=0.02, cloud_egress_per_gb=0.01,
                           disk_budget_bytes=60_000, margin=0.1)
    manager = make(tmp_path, prices, objects, days=1, reads=0.0, clock=clock)
    fill(manager, 3, at=clock[0])
    places = {e.place for e in manager.catalog.entries()}
    assert places == {"cloud", "gateway"}, places
    assert objects.list()
    clock[0] += DAY - 60
    manager.run_once()
    assert len(manager.catalog.entries()) == 3  # not yet
    clock[0] += 61
    manager.run_once()
    assert manager.catalog.entries() == []
    assert objects.list() == []
    assert not list(manager.intake.directory(ROUTE).glob("*.seg"))
    assert manager.counters.deleted_cloud >= 1 and manager.counters.deleted_gateway >= 1


def test_a_failing_cloud_keeps_the_archive_on_the_gateway_within_its_budget_and_warns(
        tmp_path: Path, storage: StorageResource) -> None:
    objects = ObjectStore(lambda: dataclasses.replace(storage.location(), bucket="no-such-bucket"))  # all fail
    clock = [time.time()]
    manager = make(tmp_path, PRICES, objects, reads=READ_OFTEN, clock=clock)
    manager.cloud_retry_s = 60
    with capture_logs() as logs:
        fill(manager, 12, at=clock[0])
    events = [e["event"] for e in logs]
    assert events.count("archive_cloud_unavailable") == 1  # once per outage, not once per segment
    assert "archive_disk_budget_full" in events
    assert {e.place for e in manager.catalog.entries()} == {"gateway"}
    # The budget holds: at most the segment sealed as it filled goes over it, then inputs are refused.
    assert manager.catalog.disk_bytes() <= PRICES.disk_budget_bytes + 30_000
    assert manager.intake.refused > 0
    # The cloud comes back: segments leave, there is room again and archiving resumes.
    manager.objects = ObjectStore(storage.location)
    clock[0] += 61
    with capture_logs() as logs:
        manager.run_once()
    assert "archive_cloud_available" in [e["event"] for e in logs]
    assert manager.catalog.disk_bytes() < PRICES.disk_budget_bytes
    assert not manager.intake.refusing


UPLOADER = textwrap.dedent("""
    import sys, time, json
    from pathlib import Path
    from agent.archive.catalog import Catalog
    from agent.archive.cost import ArchivePrices
    from agent.archive.intake import Intake, Sealing
    from agent.archive.manager import Manager, RoutePolicy
    from agent.archive.objectstore import ObjectStore, StorageLocation
    root, route, loc = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    location = StorageLocation(**loc)
    catalog = Catalog(root / "catalog.db")
    intake = Intake(root, catalog, Sealing(age_s=3600, max_bytes=1 << 30))
    intake.open()
    prices = ArchivePrices(0.5, 0.02, 0.01, 1 << 40, 0.1)
    objects = ObjectStore(lambda: location, multipart_threshold=5 << 20, part_size=5 << 20)
    Manager(intake=intake, catalog=catalog, prices=prices, routes={route: RoutePolicy(30, 10)},
            objects=objects).run_once()
    print("done", flush=True)
""")


@pytest.mark.slow
def test_sigkill_during_an_upload_loses_nothing_and_leaves_no_incomplete_upload(tmp_path: Path,
                                                                                 storage: StorageResource) -> None:
    catalog = Catalog(tmp_path / "catalog.db")
    intake = Intake(tmp_path, catalog, Sealing(age_s=3600, max_bytes=1 << 30))
    intake.open()
    # Random payloads do not compress: a 16 MB segment goes up in four parts of 5 MB.
    records = [Record(time.time(), "city/a/noise/1/pcm", os.urandom(64_000), f"{i:032x}") for i in range(250)]
    intake.append({ROUTE: records})
    intake.seal_due(force=True)
    intake.close()
    location = storage.location()
    loc = {k: getattr(location, k) for k in location.__dataclass_fields__}
    child = subprocess.Popen([sys.executable, "-c", UPLOADER, str(tmp_path), ROUTE, json.dumps(loc)],
                             stdout=subprocess.DEVNULL)
    objects = ObjectStore(storage.location)
    try:
        # Killed once the upload has begun: its first part is in the store, the object is not complete.
        wait_for(lambda: bool(objects.list_incomplete_uploads()), 60, "the upload to start", interval=0.01)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert catalog.entries()[0].place == "uploading"
    manager = make(tmp_path, PRICES, objects, reads=READ_OFTEN)  # the restart
    manager.run_once()
    assert objects.list_incomplete_uploads() == []
    [entry] = manager.catalog.entries()
    assert entry.place == "cloud" and not manager.local_path(entry).exists()
    assert [r.task_id for r in read_segment(objects.open(entry.object_key or ""))] == [r.task_id for r in records]


def test_the_storage_resource_is_kept_across_restarts_and_replaced_when_the_cloud_lost_it(
        tmp_path: Path, storage_devcloud: DevCloud, clean_env: pytest.MonkeyPatch) -> None:
    from agent.archive.service import RESOURCE_KEY, open_object_store
    from agent.cloud._storage import StorageClient
    from agent.config import Settings

    settings = Settings(agent_id="gw-keep", state_dir=tmp_path, cloud=storage_devcloud.settings())
    root = tmp_path / "archive"
    segment = tmp_path / "one.seg"
    segment.write_bytes(b"segment bytes")
    digest = hashlib.sha256(segment.read_bytes()).hexdigest()
    made = []

    def side(request: bool) -> ObjectStore:
        cloud = open_object_store(settings, root, request=request)
        assert cloud is not None
        made.append(cloud)
        return cloud.objects

    side(False)  # made, but nothing asked of the cloud yet
    side(True).put_file("r/one.seg", segment, digest)  # the first call requests the resource
    catalog = Catalog(root / "catalog.db")
    resource = catalog.get_meta(RESOURCE_KEY)
    assert resource is not None
    # A restart (and `edge-agent archive query`, which never requests one) attach to the same objects.
    for request in (True, False):
        assert side(request).head("r/one.seg") is not None
    client = StorageClient(settings.cloud)
    client.release(resource)  # the cloud loses it (released, its objects with it)
    client.close()
    with capture_logs() as logs:
        assert side(True).head("r/one.seg") is None
    assert "archive_storage_resource_gone" in [e["event"] for e in logs]
    assert catalog.get_meta(RESOURCE_KEY) not in (None, resource)
    for cloud in made:
        cloud.close()

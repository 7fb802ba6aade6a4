"""A storage resource whose quota is full, against the devcloud's S3 server (which refuses the write, 403
QuotaExceeded): for the archive it is the cloud being unavailable. Segments stay on the gateway within the
disk budget, the operator is warned once and told when uploads work again, and the manager's report for
`edge-agent status` says why (agent/archive/report.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from structlog.testing import capture_logs

from agent.archive.catalog import Catalog
from agent.archive.cost import ArchivePrices
from agent.archive.intake import Intake, Sealing
from agent.archive.manager import RoutePolicy
from agent.archive.objectstore import ObjectStore
from agent.archive.report import ReportingManager
from agent.archive.segment import Record

if TYPE_CHECKING:
    from agent.cloud._storage import StorageClient

    from support import DevCloud

ROUTE = "city/+/noise/+/pcm"
DAY = 86_400.0
# A dear uplink and cheap egress: a route read this often is cheaper in the cloud.
PRICES = ArchivePrices(uplink_per_gb=0.5, cloud_storage_per_gb_month=0.02, cloud_egress_per_gb=0.01,
                       disk_budget_bytes=400_000, margin=0.1)
QUOTA = 100_000  # three segments of ~31 kB fit, a fourth does not
READS = 1000.0  # a month's reads of a day's retention: cheaper in the cloud


def fill(manager: ReportingManager, segments: int, at: float) -> None:
    """Seal ``segments`` segments of 60 random records (~31 kB each: random bytes do not compress)."""
    for _ in range(segments):
        manager.intake.append({ROUTE: [Record(at, f"city/a/noise/{i}/pcm", os.urandom(450), os.urandom(16).hex())
                                       for i in range(60)]})
        manager.run_once()


def test_a_full_quota_keeps_segments_on_the_gateway_warns_once_and_clears_when_there_is_room(
        tmp_path: Path, storage_devcloud: DevCloud, storage_client: StorageClient) -> None:
    storage_devcloud.knobs(storage_gb_bytes=QUOTA)  # the resource's 1 GB is 100 kB
    resource = storage_client.request(1)
    clock = [time.time()]
    catalog = Catalog(tmp_path / "catalog.db")
    intake = Intake(tmp_path, catalog, Sealing(age_s=3600, max_bytes=20_000), clock=lambda: clock[0])
    intake.open()
    manager = ReportingManager(intake=intake, catalog=catalog, prices=PRICES,
                               routes={ROUTE: RoutePolicy(days=1, retrievals_per_month=READS)},
                               objects=ObjectStore(resource.location), clock=lambda: clock[0], redecide_s=0,
                               cloud_retry_s=0, cloud_quota_bytes=QUOTA)

    with capture_logs() as logs:
        fill(manager, 3, clock[0])
        clock[0] += DAY / 2
        fill(manager, 2, clock[0])
    assert [e.place for e in catalog.entries()] == ["cloud"] * 3 + ["gateway"] * 2
    warnings = [e for e in logs if e["event"] == "archive_cloud_unavailable"]
    assert len(warnings) == 1 and "quota is full" in warnings[0]["error"]  # once, not once per segment
    assert manager.counters.upload_failures >= 2 and not intake.refusing  # within the budget: still archiving
    report = manager.report
    assert report is not None and report["as_of"] == clock[0]
    cloud = report["cloud"]
    assert (cloud["available"], cloud["reason"], cloud["quota_bytes"]) == (False, "quota_exceeded", QUOTA)
    assert "QuotaExceeded" in cloud["error"] and cloud["uploads"] == 3
    assert report["uploads_pending"] == 2  # chosen for the cloud, kept here
    [route] = report["routes"]
    assert route["segments"] == {"gateway": 2, "uploading": 0, "cloud": 3} and route["archived"]
    assert route["bytes"]["cloud"] > QUOTA * 0.8 and route["prior_per_month"] == READS
    # The estimate learned from the seals (no query yet), not the prior.
    assert route["retrievals_per_month"] == round(manager.rate(ROUTE).per_month(clock[0]), 6) < READS

    # Retention deletes the first three in the cloud: there is room, the two go up and the warning clears.
    clock[0] += DAY / 2 + 60
    with capture_logs() as logs:
        manager.run_once()
    assert "archive_cloud_available" in [e["event"] for e in logs]
    assert [e.place for e in catalog.entries()] == ["cloud"] * 2
    report = manager.report
    assert report is not None and report["cloud"]["available"] and report["cloud"]["error"] is None
    assert report["uploads_pending"] == 0
    storage_client.release(resource.id)

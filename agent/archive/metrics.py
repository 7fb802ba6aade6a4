"""The archive's series on /metrics (docs/operations.md#every-metric), read at scrape time from its parts."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from agent.metrics import AgentCollector, Gauge, LabelledCounter

if TYPE_CHECKING:
    from agent.archive.service import ArchiveService


def add_metrics(c: AgentCollector, archive: ArchiveService) -> None:
    intake, manager = archive.intake, archive.manager
    counters = manager.counters

    def queries() -> dict[str, int]:
        responder = archive.responder
        return {} if responder is None else {"answered": responder.answered, "failed": responder.failed}

    c.counters += [
        LabelledCounter("edge_agent_archive_inputs", "Committed inputs of archive routes appended to the archive.",
                        (), lambda: {(): intake.appended}),
        LabelledCounter("edge_agent_archive_inputs_refused", "Committed inputs not archived: the disk budget was "
                        "full and no segment could leave for the cloud, or the journal could not be written.", (),
                        lambda: {(): intake.refused}),
        LabelledCounter("edge_agent_archive_segments_sealed", "Journals sealed into segments.", (),
                        lambda: {(): intake.sealed}),
        LabelledCounter("edge_agent_archive_uploads", "Segments moved to cloud storage (upload confirmed, local "
                        "copy deleted).", (), lambda: {(): counters.uploads}),
        LabelledCounter("edge_agent_archive_uploaded_bytes", "Bytes of the segments moved to cloud storage.", (),
                        lambda: {(): counters.uploaded_bytes}),
        LabelledCounter("edge_agent_archive_upload_failures", "Uploads that failed (the segment stays on the "
                        "gateway and is tried again).", (), lambda: {(): counters.upload_failures}),
        LabelledCounter("edge_agent_archive_forced_uploads", "Segments moved because the disk budget was "
                        "exceeded, whatever the price.", (), lambda: {(): counters.forced_uploads}),
        LabelledCounter("edge_agent_archive_expired", "Segments deleted by retention, by where they were.",
                        ("place",), lambda: {"gateway": counters.deleted_gateway, "cloud": counters.deleted_cloud}),
        LabelledCounter("edge_agent_archive_queries", "MQTT archive queries, by outcome.", ("outcome",), queries),
    ]

    def by_place(field: str) -> dict[str, float]:
        out = {"gateway": 0.0, "uploading": 0.0, "cloud": 0.0}
        for entry in archive.catalog.entries():
            out[entry.place] += 1 if field == "segments" else entry.size
        return out

    c.gauge_maps += [
        ("edge_agent_archive_segments", "Sealed segments by place.", ("place",), lambda: by_place("segments")),
        ("edge_agent_archive_bytes", "Bytes of sealed segments by place.", ("place",), lambda: by_place("bytes")),
        ("edge_agent_archive_cost", "Total expected cost (C_storage + C_retrieval, in the prices' currency) of "
         "the segments placed since the start, by the place chosen.", ("place",),
         lambda: {"gateway": counters.cost_gateway, "cloud": counters.cost_cloud}),
        ("edge_agent_archive_retrievals_per_month", "Each archive route's learned retrieval rate.", ("route",),
         lambda: {route: manager.rate(route).per_month(time.time()) for route in manager.routes}),
    ]
    c.gauges += [
        Gauge("edge_agent_archive_disk_used_bytes", "The archive's bytes on the gateway's disk (segments and "
              "open journals).", manager.disk_used),
        Gauge("edge_agent_archive_disk_budget_bytes", "EDGE_AGENT_ARCHIVE__DISK_BUDGET_BYTES.",
              lambda: float(manager.prices.disk_budget_bytes)),
        Gauge("edge_agent_archive_cloud_available", "1 unless the archive's last cloud call failed (0 also "
              "without a cloud).", lambda: float(manager.objects is not None and manager.cloud_down_since is None)),
    ]

"""The archive's settings (``EDGE_AGENT_ARCHIVE__*``: prices, the disk budget, sealing) and a route's ``archive``
key (its retention and the prior of its retrieval rate). docs/archive.md explains each."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from agent.config._sections import Frozen

if TYPE_CHECKING:
    from agent.archive.cost import ArchivePrices


class RouteArchive(BaseModel):
    """A route's ``"archive": {"days": D, "retrievals_per_month": R}``: keep its raw inputs D days."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    days: float = Field(gt=0, le=36_500, description="retention: each archived input is deleted this many days "
                        "after it was received, wherever it is")
    retrievals_per_month: float = Field(
        default=0.1, ge=0, le=1_000,
        description="the prior of how often this route's archived data is read back per month (queries "
        "refine it)")


class ArchiveSettings(Frozen):
    uplink_per_gb: float = Field(
        default=2.0, ge=0, description="price per GB over the gateway's metered uplink (an upload to cloud "
        "storage, a read of the gateway's archive from elsewhere), in the currency of the other prices")
    cloud_storage_per_gb_month: float = Field(default=0.023, ge=0,
                                              description="cloud storage price per GB-month")
    cloud_egress_per_gb: float = Field(default=0.09, ge=0,
                                       description="price per GB read back out of cloud storage")
    disk_budget_bytes: int = Field(
        default=2 * 1024**3, ge=1024 * 1024,
        description="the archive's hard limit on the gateway's disk (sealed segments and open journals); over "
        "it the oldest segments go to the cloud whatever the price")
    margin: float = Field(default=0.1, ge=0, lt=1,
                          description="the cheaper place must win by this fraction of the other's total; "
                          "otherwise a segment stays on the gateway")
    seal_age_s: float = Field(default=3600.0, gt=0, le=7 * 86_400,
                              description="a route's journal is sealed into a segment once its first input is "
                              "this old")
    seal_bytes: int = Field(default=8 * 1024 * 1024, ge=4096, le=1024**3,
                            description="… or once it holds this many bytes")
    cloud_quota_gb: int = Field(default=100, ge=1, le=1_000_000,
                                description="size of the storage resource the archive requests from the resource "
                                "API (EDGE_AGENT_CLOUD__URL) when it first needs the cloud")
    pass_interval_s: float = Field(default=5.0, gt=0, le=3600,
                                   description="seconds between the placement manager's passes (sealing, "
                                   "placement, retention)")
    redecide_s: float = Field(default=600.0, ge=0, le=30 * 86_400,
                              description="a segment kept on the gateway is priced again at most this often (the "
                              "disk fills, its remaining retention shrinks, the retrieval rate moves)")
    query_chunk_bytes: int = Field(default=256 * 1024, ge=4096, le=16 * 1024 * 1024,
                                   description="largest answer message of an MQTT archive query")

    def prices(self) -> ArchivePrices:
        from agent.archive.cost import ArchivePrices

        return ArchivePrices(uplink_per_gb=self.uplink_per_gb,
                             cloud_storage_per_gb_month=self.cloud_storage_per_gb_month,
                             cloud_egress_per_gb=self.cloud_egress_per_gb,
                             disk_budget_bytes=self.disk_budget_bytes, margin=self.margin)

"""Fault and network injection of the reference server: set on the command line, changed at run time."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Knobs(BaseModel):
    """What the devcloud injects. ``POST /admin/knobs`` with some of these fields changes them while it runs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    provisioning_delay_s: float = Field(default=0.5, ge=0, le=3600,
                                        description="time from a lease request until the lease is ready")
    latency_s: float = Field(default=0.0, ge=0, le=60, description="added before answering every API call")
    bandwidth_bytes_per_s: float = Field(default=0.0, ge=0,
                                         description="cap on task uploads and downloads (shared link); 0 = none")
    error_rate: float = Field(default=0.0, ge=0, le=1,
                              description="share of API calls answered 503 with Retry-After")
    outage: bool = Field(default=False, description="answer every API call 503 with Retry-After")
    retry_after_s: int = Field(default=1, ge=0, le=3600, description="the Retry-After of injected 429/503")
    throttle_next: int = Field(default=0, ge=0, description="answer the next N API calls 429 with Retry-After")
    lease_ttl_s: float = Field(default=3600.0, gt=0, le=7 * 86_400, description="lease lifetime from its request")
    credentials_ttl_s: float = Field(default=900.0, gt=0, le=43_200,
                                     description="lifetime of a storage resource's access keys from their issue")
    storage_gb_bytes: int = Field(default=10**9, ge=1, le=10**12,
                                  description="bytes per GB of a new storage resource's quota (small in tests, to "
                                  "fill one quickly)")

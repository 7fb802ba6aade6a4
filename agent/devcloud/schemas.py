"""The resource API's bodies (docs/design.md#resource-api) as pydantic models: they validate requests and make
the OpenAPI document."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ResourceStatus = Literal["provisioning", "ready", "released"]
ResourceType = Literal["compute", "storage"]
MAX_QUANTITY = 256
MAX_STORAGE_GB = 100_000


class ErrorBody(BaseModel):
    """Every error answer: a short machine-readable ``error`` code and a ``detail`` for people."""

    error: str = Field(examples=["invalid_request"])
    detail: str = Field(examples=["body.quantity: Input should be greater than or equal to 1"])


class ResourceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: ResourceType = Field(description="compute: a lease that runs tasks; storage: S3-compatible object storage")
    quantity: int = Field(ge=1, le=MAX_STORAGE_GB, description=(
        f"compute: vCPUs, how many tasks the lease runs at once (at most {MAX_QUANTITY}); storage: GB"))

    @model_validator(mode="after")
    def _compute_bound(self) -> ResourceRequest:
        if self.type == "compute" and self.quantity > MAX_QUANTITY:
            raise ValueError(f"a compute lease has at most {MAX_QUANTITY} vCPUs")
        return self


class StorageCredentials(BaseModel):
    """Short-lived S3 credentials: refused by the store from ``expires_at`` on; ask for new ones before."""

    access_key_id: str
    secret_access_key: str
    session_token: str | None = Field(description="sent as X-Amz-Security-Token when not null")
    expires_at: datetime = Field(description="UTC; the store refuses these credentials from this time on")


class StorageLocation(BaseModel):
    """Where a storage resource's objects live: keys under ``prefix`` in ``bucket`` at an S3-compatible
    ``endpoint`` (path-style addressing), signed with AWS Signature V4 for ``region``."""

    endpoint: str = Field(examples=["http://127.0.0.1:9000"])
    bucket: str
    prefix: str = Field(description="every object of the resource has a key starting with this")
    region: str
    quota_bytes: int = Field(ge=1, description=(
        "the most the resource holds, its objects and the parts of its incomplete multipart uploads together "
        "(``quantity`` GB). The store refuses a write (PutObject, UploadPart, CopyObject) that would take it "
        "beyond with HTTP 403 and the S3 error code ``QuotaExceeded``; deletes always succeed, and a write "
        "succeeds again once there is room"))
    credentials: StorageCredentials | None = Field(
        description="present when the resource is created; GET leaves them out: POST .../credentials for new ones")


class Resource(BaseModel):
    """A resource. A compute lease runs tasks while ``status`` is ``ready`` and is ``released`` after
    ``expires_at``; a storage resource is ``ready`` at once, has no ``expires_at`` and keeps its objects until
    it is released (its credentials expire and are renewed)."""

    id: str
    type: ResourceType
    quantity: int = Field(ge=1, le=MAX_STORAGE_GB)
    location: str
    status: ResourceStatus
    expires_at: datetime | None = Field(
        description="UTC; a compute lease is released at this time unless released earlier; null for storage")
    storage: StorageLocation | None = Field(default=None, description="storage resources only")


class TaskAnswer(BaseModel):
    task_id: str = Field(description="the request's Idempotency-Key")
    result: dict[str, Any] = Field(description="the task's result, as the gateway would have computed it")
    exec_ms: float = Field(ge=0, description="the task's run time on the worker, without queueing or transfer")

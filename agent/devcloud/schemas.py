"""The resource API's bodies (docs/design.md#resource-api) as pydantic models: they validate requests and make
the OpenAPI document."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ResourceStatus = Literal["provisioning", "ready", "released"]
MAX_QUANTITY = 256


class ErrorBody(BaseModel):
    """Every error answer: a short machine-readable ``error`` code and a ``detail`` for people."""

    error: str = Field(examples=["invalid_request"])
    detail: str = Field(examples=["body.quantity: Input should be greater than or equal to 1"])


class ResourceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["compute"] = Field(description="the kind of resource; only compute exists")
    quantity: int = Field(ge=1, le=MAX_QUANTITY, description="vCPUs: how many tasks the lease runs at once")


class Resource(BaseModel):
    """A lease. Tasks may be submitted while ``status`` is ``ready``; after ``expires_at`` it is ``released``."""

    id: str
    type: Literal["compute"]
    quantity: int = Field(ge=1, le=MAX_QUANTITY)
    location: str
    status: ResourceStatus
    expires_at: datetime = Field(description="UTC; the lease is released at this time unless released earlier")


class TaskAnswer(BaseModel):
    task_id: str = Field(description="the request's Idempotency-Key")
    result: dict[str, Any] = Field(description="the task's result, as the gateway would have computed it")
    exec_ms: float = Field(ge=0, description="the task's run time on the worker, without queueing or transfer")

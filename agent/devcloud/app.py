"""The reference resource API (docs/design.md#resource-api) as a FastAPI app, with fault and network injection.

Decisions the contract leaves open, as implemented here:

- A lease is ``provisioning`` for the provisioning delay, then ``ready``. When it is released (DELETE) or
  reaches ``expires_at`` its GET answers ``status: "released"`` for a while, then 404; task submissions to a
  released or expired lease answer 404 (the lease is gone: the client replaces it). DELETE of a released lease
  is 204 again (releasing is idempotent).
- A task submitted while the lease is still provisioning is answered 503 with ``Retry-After``.
- Each lease runs at most ``quantity`` tasks at once; up to ``queue_per_slot`` × quantity more wait, beyond
  that the answer is 429 with ``Retry-After``.
- ``Idempotency-Key`` is required for tasks and optional for lease requests. The first answer (success or a
  definitive error) is returned for every repeat, also while the first is still running; transient answers
  (429/503) are not remembered. Keys are global, so a task re-sent to a replacement lease runs once too.
- Route options travel as a JSON object in the optional ``X-Task-Options`` header (e.g. ``sample_rate``).
- A task's input refused by the task (bad payload, unknown kind, bad options) is 400 with the gateway's
  dead-letter reason as ``error``; a task that crashes is 500 ``task_failed``.
"""

# No ``from __future__ import annotations``: FastAPI reads the routes' annotations at run time, and they name
# closures' locals (``bearer``) that a string annotation could not resolve.
import asyncio
import hashlib
import hmac
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError

from agent import __version__
from agent.devcloud import storage_api
from agent.devcloud.cloud import ApiError, DevCloud, DevCloudConfig
from agent.devcloud.errors import COMMON_ERRORS, ERROR, NOT_FOUND, ContractApp, answer_errors, json_response
from agent.devcloud.knobs import Knobs
from agent.devcloud.schemas import Resource, ResourceRequest, StorageCredentials, TaskAnswer
from agent.devcloud.state import ServerLease, StoredAnswer, error_answer, retry_after_for
from agent.devcloud.storage import StorageUnavailable
from agent.devcloud.task_api import TASKS_PATH, execute, read_body, task_options
from agent.telemetry import get_logger

__all__ = ["TASKS_PATH", "ApiError", "DevCloud", "DevCloudConfig", "create_app"]

log = get_logger("agent.devcloud")


def create_app(config: DevCloudConfig) -> FastAPI:
    cloud = DevCloud(config)
    bearer = HTTPBearer(auto_error=False, description="the token the devcloud was started with")

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await cloud.start()
        try:
            yield
        finally:
            await cloud.stop()

    app = ContractApp(
        title="edge-agent resource API",
        version=__version__,
        summary="Compute leases and task execution for edge-agent gateways (docs/design.md#resource-api).",
        description=(__doc__ or "").split("\n\n", 1)[1],
        lifespan=lifespan,
    )
    app.state.cloud = cloud

    answer_errors(app, cloud)

    # ------------------------------------------------------------------ the gate every API call passes

    async def gate(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        cloud.counters.requests += 1
        given = credentials.credentials.encode() if credentials is not None else b""
        if not hmac.compare_digest(given, config.token.encode()):
            raise cloud.refuse(StoredAnswer(401, {"error": "unauthorized", "detail": "missing or wrong bearer token"},
                                            (("WWW-Authenticate", "Bearer"),)))
        knobs = cloud.knobs
        if knobs.outage:
            raise cloud.refuse(error_answer(503, "outage", "the cloud is down (injected outage)",
                                            knobs.retry_after_s))
        if knobs.throttle_next > 0:
            cloud.knobs = knobs.model_copy(update={"throttle_next": knobs.throttle_next - 1})
            raise cloud.refuse(error_answer(429, "throttled", "too many requests (injected)", knobs.retry_after_s))
        if knobs.error_rate > 0 and random.random() < knobs.error_rate:
            raise cloud.refuse(error_answer(503, "injected_error", "injected failure", knobs.retry_after_s))
        if knobs.latency_s > 0:
            await asyncio.sleep(knobs.latency_s)

    api = APIRouter(prefix="/api/v1", dependencies=[Depends(gate)], responses=COMMON_ERRORS)

    def lease_or_404(resource_id: str) -> ServerLease:
        lease = cloud.leases.get(resource_id)
        if lease is None:
            if storage_api.find(cloud, resource_id) is not None:
                raise cloud.refuse(error_answer(404, "not_found",
                                                f"resource {resource_id!r} is storage, not a compute lease"))
            raise cloud.refuse(error_answer(404, "not_found", f"no resource {resource_id!r}"))
        return lease

    @api.post("/resources", status_code=201, response_model=Resource, summary="Request a compute lease or storage")
    async def create_resource(
        body: ResourceRequest,
        location: Annotated[str | None, Query(max_length=128, description="where to run")] = None,
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255,
                                                      description="repeat-safe lease requests")] = None,
    ) -> Response:
        async def produce() -> StoredAnswer:
            if body.type == "storage":
                return await storage_api.create(cloud, body.quantity, location or "default")
            lease = cloud.leases.create(body.quantity, location or "default", cloud.knobs)
            log.info("devcloud_lease_created", lease=lease.id, quantity=lease.quantity, location=lease.location)
            return StoredAnswer(201, lease.view(time.monotonic()).model_dump(mode="json"))

        if idempotency_key is None:
            answer = await produce()
        else:
            fingerprint = orjson.dumps([body.model_dump(), location])
            answer, replayed = await cloud.idempotency.run(f"lease:{idempotency_key}", fingerprint, produce,
                                                           lambda: None)
            cloud.counters.replays += replayed
        return json_response(answer)

    @api.get("/resources/{resource_id}", response_model=Resource, responses=NOT_FOUND,
             summary="A resource's state")
    async def get_resource(resource_id: str) -> Resource:
        stored = storage_api.find(cloud, resource_id)
        if stored is not None:
            return storage_api.view(cloud, stored, None)
        return lease_or_404(resource_id).view(time.monotonic())

    @api.delete("/resources/{resource_id}", status_code=204, response_class=Response, responses=NOT_FOUND,
                summary="Release a lease")
    async def delete_resource(resource_id: str) -> Response:
        stored = storage_api.find(cloud, resource_id)
        if stored is not None:
            try:
                await asyncio.to_thread(storage_api.storage_of(cloud).release, stored)
            except StorageUnavailable as exc:
                raise cloud.refuse(storage_api.storage_down(cloud, exc)) from None
            log.info("devcloud_storage_released", resource=stored.id)
            return Response(status_code=204)
        lease = lease_or_404(resource_id)
        cloud.leases.release(lease)
        log.info("devcloud_lease_released", lease=lease.id)
        return Response(status_code=204)

    @api.post("/resources/{resource_id}/credentials", response_model=StorageCredentials,
              responses={**NOT_FOUND, 409: {**ERROR, "description": "not a storage resource"}},
              summary="New credentials for a storage resource")
    async def renew_credentials(resource_id: str) -> StorageCredentials:
        stored = storage_api.find(cloud, resource_id)
        if stored is None:
            if cloud.leases.get(resource_id) is not None:
                raise cloud.refuse(error_answer(409, "not_storage",
                                                f"resource {resource_id!r} is a compute lease, not storage"))
            raise cloud.refuse(error_answer(404, "not_found", f"no resource {resource_id!r}"))
        if stored.released_at is not None:
            raise cloud.refuse(error_answer(404, "released", f"resource {resource_id!r} was released"))
        try:
            credentials = await asyncio.to_thread(storage_api.storage_of(cloud).new_credentials, stored,
                                                  cloud.knobs.credentials_ttl_s)
        except StorageUnavailable as exc:
            raise cloud.refuse(storage_api.storage_down(cloud, exc)) from None
        log.info("devcloud_storage_credentials", resource=stored.id, key=credentials.access_key_id)
        return storage_api.credentials_body(credentials)

    @api.post(
        TASKS_PATH.removeprefix("/api/v1"),
        response_model=None,
        responses={200: {"model": TaskAnswer, "description": "the task's result"}, **NOT_FOUND},
        summary="Run a task on a lease",
        openapi_extra={"requestBody": {
            "required": True,
            "description": "the task's input bytes, exactly as the device sent them",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }},
    )
    async def run_task_on_lease(
        request: Request,
        resource_id: str,
        kind: Annotated[str, Header(alias="X-Task-Kind", min_length=1, max_length=200,
                                    description="the task's registered name, e.g. noise.spectrum")],
        idempotency_key: Annotated[str, Header(alias="Idempotency-Key", min_length=1, max_length=255,
                                               description="the gateway's task id; a repeat gets the first answer")],
        options_header: Annotated[str | None, Header(alias="X-Task-Options",
                                                     description="the route's task options as a JSON object")] = None,
    ) -> Response:
        now = time.monotonic()
        lease = lease_or_404(resource_id)
        status = lease.status(now)
        if status == "released":
            raise cloud.refuse(error_answer(404, "released", f"resource {resource_id!r} was released or expired"))
        if status == "provisioning":
            raise cloud.refuse(error_answer(503, "not_ready", "the resource is still provisioning",
                                            retry_after_for(lease, now)))
        options = task_options(cloud, kind, options_header)
        payload = await read_body(request, cloud)
        fingerprint = hashlib.sha256(orjson.dumps([kind, options], option=orjson.OPT_SORT_KEYS) + b"\0" + payload)

        def admit() -> StoredAnswer | None:
            if lease.waiting >= lease.quantity * (1 + config.queue_per_slot):
                cloud.counters.rejections["over_capacity"] += 1
                return error_answer(429, "over_capacity", f"the resource already has {lease.waiting} tasks",
                                    max(1, cloud.knobs.retry_after_s))
            return None

        async def produce() -> StoredAnswer:
            return await execute(cloud, lease, idempotency_key, kind, options, payload)

        answer, replayed = await cloud.idempotency.run(f"task:{idempotency_key}", fingerprint.digest(), produce,
                                                       admit)
        cloud.counters.replays += replayed
        body = orjson.dumps(answer.body)
        await cloud.downlink.carry(len(body), cloud.knobs.bandwidth_bytes_per_s)
        headers = dict(answer.headers)
        if replayed:
            headers["Idempotent-Replayed"] = "true"
        return Response(body, status_code=answer.status, headers=headers, media_type="application/json")

    app.include_router(api)

    # ------------------------------------------------------------------ operations (not part of the API)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    admin = APIRouter(prefix="/admin", include_in_schema=False)

    async def admin_gate(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        given = credentials.credentials.encode() if credentials is not None else b""
        if not hmac.compare_digest(given, config.token.encode()):
            raise ApiError(StoredAnswer(401, {"error": "unauthorized", "detail": "missing or wrong bearer token"}))

    @admin.get("/knobs", dependencies=[Depends(admin_gate)])
    async def get_knobs() -> dict[str, Any]:
        return cloud.knobs.model_dump()

    @admin.post("/knobs", dependencies=[Depends(admin_gate)])
    async def set_knobs(request: Request) -> Response:
        try:
            change = orjson.loads(await request.body())
            if not isinstance(change, dict):
                raise TypeError("the body must be a JSON object of knobs")
            cloud.knobs = Knobs.model_validate({**cloud.knobs.model_dump(), **change})
        except (orjson.JSONDecodeError, TypeError, ValidationError) as exc:
            return json_response(error_answer(400, "invalid_request", str(exc)))
        log.info("devcloud_knobs", **change)
        return json_response(StoredAnswer(200, cloud.knobs.model_dump()))

    @admin.get("/stats", dependencies=[Depends(admin_gate)])
    async def get_stats() -> dict[str, Any]:
        return cloud.stats()

    @admin.post("/reset", dependencies=[Depends(admin_gate)], status_code=204, response_class=Response)
    async def reset() -> Response:
        cloud.reset()
        return Response(status_code=204)

    app.include_router(admin)
    return app

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
from dataclasses import dataclass, field
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from agent import __version__
from agent.devcloud.knobs import Knobs
from agent.devcloud.pool import WorkerDied, WorkerPool
from agent.devcloud.schemas import (
    ErrorBody,
    Resource,
    ResourceRequest,
    StorageCredentials,
    StorageLocation,
    TaskAnswer,
)
from agent.devcloud.state import (
    Counters,
    IdempotencyStore,
    Leases,
    Link,
    ServerLease,
    StoredAnswer,
    error_answer,
    retry_after_for,
)
from agent.devcloud.storage import (
    BUCKET,
    Credentials,
    S3Process,
    StorageResource,
    StorageResources,
    StorageUnavailable,
    expire_keys,
    utc,
)
from agent.errors import AgentError
from agent.tasks import default_registry
from agent.telemetry import get_logger

log = get_logger("agent.devcloud")

TASKS_PATH = "/api/v1/resources/{resource_id}/tasks"


@dataclass(frozen=True, slots=True)
class DevCloudConfig:
    """Start-up settings of the server (the knobs may change later; these do not)."""

    token: str
    workers: int = 2
    max_body_bytes: int = 32 * 1024 * 1024
    queue_per_slot: int = 4
    knobs: Knobs = field(default_factory=Knobs)
    # Storage resources need the S3 server process (a few seconds to start): only when asked for.
    storage: bool = False


class ApiError(Exception):
    def __init__(self, answer: StoredAnswer) -> None:
        super().__init__(answer.body.get("detail", ""))
        self.answer = answer


class DevCloud:
    """Everything the routes share."""

    def __init__(self, config: DevCloudConfig) -> None:
        self.config = config
        self.knobs = config.knobs
        self.leases = Leases()
        self.idempotency = IdempotencyStore()
        self.counters = Counters()
        self.uplink = Link()
        self.downlink = Link()
        self.pool: WorkerPool | None = None
        self.s3 = S3Process()
        self.storage: StorageResources | None = None
        self._expiry: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # The S3 server (seconds to import moto) starts while the workers warm up.
        storage = asyncio.create_task(self._start_storage()) if self.config.storage else None
        started = time.perf_counter()
        self.pool = WorkerPool(self.config.workers)
        await self.pool.warm_up()
        log.info("devcloud_workers_ready", workers=self.config.workers,
                 seconds=round(time.perf_counter() - started, 3))
        if storage is not None:
            await storage

    async def _start_storage(self) -> None:
        started = time.perf_counter()
        admin = await self.s3.start()
        self.storage = await asyncio.to_thread(StorageResources, self.s3, admin)
        self._expiry = asyncio.create_task(expire_keys(self.storage))
        log.info("devcloud_storage_ready", endpoint=admin.endpoint, bucket=BUCKET,
                 seconds=round(time.perf_counter() - started, 3))

    async def stop(self) -> None:
        await self.idempotency.cancel_all()
        if self._expiry is not None:
            self._expiry.cancel()
        self.s3.stop()
        if self.pool is not None:
            self.pool.shutdown()

    def reset(self) -> None:
        self.knobs = self.config.knobs
        self.leases.clear()
        self.idempotency.clear()
        self.counters = Counters()

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.counters.requests,
            "replays": self.counters.replays,
            "executions": dict(self.counters.executions),
            "executions_total": sum(self.counters.executions.values()),
            "rejections": dict(self.counters.rejections),
            "leases": self.leases.summary(),
            "storage": self.storage.summary() if self.storage is not None else None,
        }

    def refuse(self, answer: StoredAnswer) -> ApiError:
        self.counters.rejections[str(answer.body["error"])] += 1
        return ApiError(answer)


def _json_response(answer: StoredAnswer, extra_headers: dict[str, str] | None = None) -> Response:
    headers = dict(answer.headers)
    headers.update(extra_headers or {})
    return Response(orjson.dumps(answer.body), status_code=answer.status, headers=headers,
                    media_type="application/json")


_ERROR = {"model": ErrorBody}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
_COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {**_ERROR, "description": "invalid request"},
    401: {**_ERROR, "description": "missing or wrong bearer token"},
    429: {**_ERROR, "description": "over capacity; retry after Retry-After", "headers": _RETRY_AFTER},
    503: {**_ERROR, "description": "unavailable; retry after Retry-After", "headers": _RETRY_AFTER},
}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {**_ERROR, "description": "unknown or released resource"}}


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

    app = _ContractApp(
        title="edge-agent resource API",
        version=__version__,
        summary="Compute leases and task execution for edge-agent gateways (docs/design.md#resource-api).",
        description=(__doc__ or "").split("\n\n", 1)[1],
        lifespan=lifespan,
    )
    app.state.cloud = cloud

    # ------------------------------------------------------------------ errors as {"error", "detail"}

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        await _drain_task_body(request)
        return _json_response(exc.answer)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        await _drain_task_body(request)
        cloud.counters.rejections["invalid_request"] += 1
        detail = "; ".join(
            ".".join(str(part) for part in error.get("loc", ())) + f": {error.get('msg', 'invalid')}"
            for error in exc.errors()
        )
        return _json_response(error_answer(400, "invalid_request", detail or "invalid request"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return _json_response(error_answer(exc.status_code, codes.get(exc.status_code, "http_error"),
                                           str(exc.detail)), dict(exc.headers or {}))

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

    api = APIRouter(prefix="/api/v1", dependencies=[Depends(gate)], responses=_COMMON_ERRORS)

    def lease_or_404(resource_id: str) -> ServerLease:
        lease = cloud.leases.get(resource_id)
        if lease is None:
            if _storage_resource(cloud, resource_id) is not None:
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
                return await _create_storage(cloud, body.quantity, location or "default")
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
        return _json_response(answer)

    @api.get("/resources/{resource_id}", response_model=Resource, responses=_NOT_FOUND,
             summary="A resource's state")
    async def get_resource(resource_id: str) -> Resource:
        stored = _storage_resource(cloud, resource_id)
        if stored is not None:
            return _storage_view(cloud, stored, None)
        return lease_or_404(resource_id).view(time.monotonic())

    @api.delete("/resources/{resource_id}", status_code=204, response_class=Response, responses=_NOT_FOUND,
                summary="Release a lease")
    async def delete_resource(resource_id: str) -> Response:
        stored = _storage_resource(cloud, resource_id)
        if stored is not None:
            try:
                await asyncio.to_thread(_storage_of(cloud).release, stored)
            except StorageUnavailable as exc:
                raise cloud.refuse(_storage_down(cloud, exc)) from None
            log.info("devcloud_storage_released", resource=stored.id)
            return Response(status_code=204)
        lease = lease_or_404(resource_id)
        cloud.leases.release(lease)
        log.info("devcloud_lease_released", lease=lease.id)
        return Response(status_code=204)

    @api.post("/resources/{resource_id}/credentials", response_model=StorageCredentials,
              responses={**_NOT_FOUND, 409: {**_ERROR, "description": "not a storage resource"}},
              summary="New credentials for a storage resource")
    async def renew_credentials(resource_id: str) -> StorageCredentials:
        stored = _storage_resource(cloud, resource_id)
        if stored is None:
            if cloud.leases.get(resource_id) is not None:
                raise cloud.refuse(error_answer(409, "not_storage",
                                                f"resource {resource_id!r} is a compute lease, not storage"))
            raise cloud.refuse(error_answer(404, "not_found", f"no resource {resource_id!r}"))
        if stored.released_at is not None:
            raise cloud.refuse(error_answer(404, "released", f"resource {resource_id!r} was released"))
        try:
            credentials = await asyncio.to_thread(_storage_of(cloud).new_credentials, stored,
                                                  cloud.knobs.credentials_ttl_s)
        except StorageUnavailable as exc:
            raise cloud.refuse(_storage_down(cloud, exc)) from None
        log.info("devcloud_storage_credentials", resource=stored.id, key=credentials.access_key_id)
        return _credentials_body(credentials)

    @api.post(
        TASKS_PATH.removeprefix("/api/v1"),
        response_model=None,
        responses={200: {"model": TaskAnswer, "description": "the task's result"}, **_NOT_FOUND},
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
        options = _task_options(cloud, kind, options_header)
        payload = await _read_body(request, cloud)
        fingerprint = hashlib.sha256(orjson.dumps([kind, options], option=orjson.OPT_SORT_KEYS) + b"\0" + payload)

        def admit() -> StoredAnswer | None:
            if lease.waiting >= lease.quantity * (1 + config.queue_per_slot):
                cloud.counters.rejections["over_capacity"] += 1
                return error_answer(429, "over_capacity", f"the resource already has {lease.waiting} tasks",
                                    max(1, cloud.knobs.retry_after_s))
            return None

        async def produce() -> StoredAnswer:
            return await _execute(cloud, lease, idempotency_key, kind, options, payload)

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
            return _json_response(error_answer(400, "invalid_request", str(exc)))
        log.info("devcloud_knobs", **change)
        return _json_response(StoredAnswer(200, cloud.knobs.model_dump()))

    @admin.get("/stats", dependencies=[Depends(admin_gate)])
    async def get_stats() -> dict[str, Any]:
        return cloud.stats()

    @admin.post("/reset", dependencies=[Depends(admin_gate)], status_code=204, response_class=Response)
    async def reset() -> Response:
        cloud.reset()
        return Response(status_code=204)

    app.include_router(admin)
    return app


async def _create_storage(cloud: DevCloud, quantity_gb: int, location: str) -> StoredAnswer:
    if cloud.storage is None:
        return error_answer(400, "unsupported_type",
                            "this resource API offers no storage (the devcloud was started without --storage)")
    try:
        stored, credentials = await asyncio.to_thread(cloud.storage.create, quantity_gb, location,
                                                      cloud.knobs.credentials_ttl_s)
    except StorageUnavailable as exc:
        return _storage_down(cloud, exc)
    log.info("devcloud_storage_created", resource=stored.id, quantity_gb=quantity_gb, location=location)
    return StoredAnswer(201, _storage_view(cloud, stored, credentials).model_dump(mode="json"))


def _storage_of(cloud: DevCloud) -> StorageResources:
    assert cloud.storage is not None  # a storage resource exists only where storage was started
    return cloud.storage


def _storage_resource(cloud: DevCloud, resource_id: str) -> StorageResource | None:
    return cloud.storage.get(resource_id) if cloud.storage is not None else None


def _storage_down(cloud: DevCloud, exc: StorageUnavailable) -> StoredAnswer:
    return error_answer(503, "storage_unavailable", str(exc), max(1, cloud.knobs.retry_after_s))


def _credentials_body(credentials: Credentials) -> StorageCredentials:
    return StorageCredentials(access_key_id=credentials.access_key_id,
                              secret_access_key=credentials.secret_access_key, session_token=None,
                              expires_at=utc(credentials.expires_at))


def _storage_view(cloud: DevCloud, stored: StorageResource, credentials: Credentials | None) -> Resource:
    admin = _storage_of(cloud).admin
    return Resource(
        id=stored.id, type="storage", quantity=stored.quantity_gb, location=stored.location,
        status="released" if stored.released_at is not None else "ready", expires_at=None,
        storage=StorageLocation(endpoint=admin.endpoint, bucket=BUCKET, prefix=stored.prefix, region=admin.region,
                                credentials=_credentials_body(credentials) if credentials is not None else None))


def _task_options(cloud: DevCloud, kind: str, header: str | None) -> dict[str, Any]:
    registry = default_registry()
    if kind not in registry:
        raise cloud.refuse(error_answer(400, "unknown_task",
                                        f"no task {kind!r} here; known tasks: {', '.join(registry.names())}"))
    options: dict[str, Any] = {}
    if header:
        try:
            given = orjson.loads(header)
        except orjson.JSONDecodeError:
            given = None
        if not isinstance(given, dict):
            raise cloud.refuse(error_answer(400, "invalid_options", "X-Task-Options must be a JSON object"))
        options = given
    check = registry.get(kind).check_options
    if check is not None:
        try:
            check(options)
        except ValueError as exc:
            raise cloud.refuse(error_answer(400, "invalid_options", str(exc))) from None
    return options


async def _read_body(request: Request, cloud: DevCloud) -> bytes:
    """The request body, read at the bandwidth cap (the client's upload slows down to it, as on a real link)."""
    request.state.body_read = True
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cloud.config.max_body_bytes:
            raise cloud.refuse(error_answer(400, "too_large",
                                            f"the task input exceeds {cloud.config.max_body_bytes} bytes"))
        chunks.append(chunk)
        await cloud.uplink.carry(len(chunk), cloud.knobs.bandwidth_bytes_per_s)
    return b"".join(chunks)


async def _drain_task_body(request: Request) -> None:
    # An error answered before a task's body was read: read the rest, so a client still sending a large input
    # gets the answer instead of a broken connection. Only the task route: FastAPI has read the others.
    route = request.scope.get("route")
    if getattr(route, "path", None) != TASKS_PATH or getattr(request.state, "body_read", False):
        return
    request.state.body_read = True
    async for _chunk in request.stream():
        pass


async def _execute(cloud: DevCloud, lease: ServerLease, task_id: str, kind: str, options: dict[str, Any],
                   payload: bytes) -> StoredAnswer:
    assert cloud.pool is not None  # started by the lifespan before any request
    lease.waiting += 1
    try:
        async with lease.slots:
            cloud.counters.executions[kind] += 1
            try:
                result, service_s = await cloud.pool.run(kind, payload, options)
            except AgentError as exc:
                return error_answer(400, str(getattr(exc, "reason", "invalid_payload")), str(exc))
            except WorkerDied as exc:
                return error_answer(503, "worker_died", str(exc), 1)
            except Exception as exc:  # noqa: BLE001 - a crashing task is this request's answer, not the server's end
                return error_answer(500, "task_failed", f"{type(exc).__name__}: {exc}")
    finally:
        lease.waiting -= 1
    return StoredAnswer(200, {"task_id": task_id, "result": result, "exec_ms": round(service_s * 1000.0, 3)})


class _ContractApp(FastAPI):
    """FastAPI whose OpenAPI document is the contract's: validation errors are 400 ``ErrorBody``, not 422."""

    def openapi(self) -> dict[str, Any]:
        schema = super().openapi()  # cached by FastAPI; the removals below are idempotent
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        components = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        return schema

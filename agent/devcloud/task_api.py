"""The resource API's task route, apart from its routing: the task's options, its body read at the bandwidth
cap, and its run on a lease's slot in the worker pool.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Request

from agent.devcloud.cloud import DevCloud
from agent.devcloud.pool import WorkerDied
from agent.devcloud.state import ServerLease, StoredAnswer, error_answer
from agent.errors import AgentError
from agent.tasks import default_registry

__all__ = ["TASKS_PATH", "drain_task_body", "execute", "read_body", "task_options"]

TASKS_PATH = "/api/v1/resources/{resource_id}/tasks"


def task_options(cloud: DevCloud, kind: str, header: str | None) -> dict[str, Any]:
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


async def read_body(request: Request, cloud: DevCloud) -> bytes:
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


async def drain_task_body(request: Request) -> None:
    # An error answered before a task's body was read: read the rest, so a client still sending a large input
    # gets the answer instead of a broken connection. Only the task route: FastAPI has read the others.
    route = request.scope.get("route")
    if getattr(route, "path", None) != TASKS_PATH or getattr(request.state, "body_read", False):
        return
    request.state.body_read = True
    async for _chunk in request.stream():
        pass


async def execute(cloud: DevCloud, lease: ServerLease, task_id: str, kind: str, options: dict[str, Any],
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

"""The devcloud's errors as the contract's ``{"error", "detail"}`` bodies, and its OpenAPI document's error
answers (400 ``ErrorBody`` where FastAPI would say 422).
"""

from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from agent.devcloud.cloud import ApiError, DevCloud
from agent.devcloud.schemas import ErrorBody
from agent.devcloud.state import StoredAnswer, error_answer
from agent.devcloud.task_api import drain_task_body

__all__ = ["COMMON_ERRORS", "ERROR", "NOT_FOUND", "ContractApp", "answer_errors", "json_response"]


def json_response(answer: StoredAnswer, extra_headers: dict[str, str] | None = None) -> Response:
    headers = dict(answer.headers)
    headers.update(extra_headers or {})
    return Response(orjson.dumps(answer.body), status_code=answer.status, headers=headers,
                    media_type="application/json")


def answer_errors(app: FastAPI, cloud: DevCloud) -> None:
    """Every refusal, invalid request and unknown path answered as ``{"error", "detail"}``."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        await drain_task_body(request)
        return json_response(exc.answer)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        await drain_task_body(request)
        cloud.counters.rejections["invalid_request"] += 1
        detail = "; ".join(
            ".".join(str(part) for part in error.get("loc", ())) + f": {error.get('msg', 'invalid')}"
            for error in exc.errors()
        )
        return json_response(error_answer(400, "invalid_request", detail or "invalid request"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return json_response(error_answer(exc.status_code, codes.get(exc.status_code, "http_error"),
                                          str(exc.detail)), dict(exc.headers or {}))


ERROR = {"model": ErrorBody}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {**ERROR, "description": "invalid request"},
    401: {**ERROR, "description": "missing or wrong bearer token"},
    429: {**ERROR, "description": "over capacity; retry after Retry-After", "headers": RETRY_AFTER},
    503: {**ERROR, "description": "unavailable; retry after Retry-After", "headers": RETRY_AFTER},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {**ERROR, "description": "unknown or released resource"}}


class ContractApp(FastAPI):
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

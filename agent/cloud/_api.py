"""The resource API over HTTP: one call under the retry policy, answers read and errors classified.

The HTTP contract it speaks is in docs/design.md#resource-api. What the calls are for (leases, tasks) is the
pool's and the client's business; this module knows the routes, the retries and the shape of an answer.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from agent import __version__
from agent.backoff import compute_backoff
from agent.cloud._backoff import parse_retry_after
from agent.cloud._circuit import CircuitBreaker
from agent.cloud._errors import CloudError, PermanentCloudError, TransientCloudError
from agent.cloud._uplink import Upload, UploadWatch, watched_transport
from agent.config import CloudSettings
from agent.telemetry import get_logger

log = get_logger("agent.cloud")

RESOURCES = "/api/v1/resources"
TRANSIENT_STATUS = frozenset({429, 502, 503, 504})
# Upload times are netted of the smallest of the last few RTT samples: queueing and a new connection's
# handshake only ever add to a sample, so the minimum is the closest to the path's own round trip.
RTT_WINDOW = 5
# Releasing is best effort (the lease expires anyway); it must not hold up shutdown.
RELEASE_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Answer:
    response: httpx.Response
    seconds: float  # the last attempt, request sent to answer read
    attempts: int


@dataclass(frozen=True, slots=True)
class Resource:
    id: str
    status: str
    quantity: int
    expires_in_s: float


class LeaseGone(PermanentCloudError):
    """404 for a lease: it expired or the cloud dropped it."""


def describe(exc: httpx.TransportError) -> str:
    # httpx's messages are often empty ("ReadTimeout('')"): say what kind of failure it was in plain words.
    kinds: list[tuple[type[httpx.TransportError], str]] = [
        (httpx.ConnectTimeout, "connecting timed out"),
        (httpx.ReadTimeout, "no answer within the read timeout"),
        (httpx.WriteTimeout, "sending timed out"),
        (httpx.PoolTimeout, "no free connection within the pool timeout"),
        (httpx.ConnectError, "cannot connect"),
        (httpx.RemoteProtocolError, "the connection broke"),
        (httpx.ReadError, "reading the answer failed"),
        (httpx.WriteError, "sending failed"),
    ]
    words = next((text for kind, text in kinds if isinstance(exc, kind)), "transport error")
    detail = str(exc)
    return f"{words} ({detail})" if detail else words


def error_fields(response: httpx.Response) -> tuple[str | None, str]:
    """The ``{"error", "detail"}`` of an error answer; the start of the text when the body is not that."""
    with contextlib.suppress(ValueError):
        data = response.json()
        if isinstance(data, dict):
            code = data.get("error")
            detail = data.get("detail")
            return (code if isinstance(code, str) else None), (detail if isinstance(detail, str) else str(detail))
    return None, response.text[:200]


def classify(response: httpx.Response, what: str) -> CloudError:
    """The error an unsuccessful answer stands for: transient (retried, after Retry-After if given) or not."""
    status = response.status_code
    code, detail = error_fields(response)
    text = f"{what}: the cloud answered {status}" + (f" {code}" if code else "") + (f": {detail}" if detail else "")
    if status in TRANSIENT_STATUS:
        return TransientCloudError(text, status=status, code=code,
                                   retry_after=parse_retry_after(response.headers.get("Retry-After")))
    return PermanentCloudError(text, status=status, code=code)


def server_now(response: httpx.Response) -> datetime:
    # expires_at is on the server's clock; its Date header lets a gateway with a wrong clock still count down.
    with contextlib.suppress(TypeError, ValueError, IndexError):
        date = response.headers.get("Date")
        if date:
            when = parsedate_to_datetime(date)
            return when if when.tzinfo else when.replace(tzinfo=UTC)
    return datetime.now(UTC)


def parse_resource(response: httpx.Response, what: str) -> Resource:
    try:
        data = response.json()
        expires = datetime.fromisoformat(data["expires_at"])
        if expires.tzinfo is None:
            expires = expires.replace(tzinfo=UTC)
        resource = Resource(str(data["id"]), str(data["status"]), int(data["quantity"]),
                            (expires - server_now(response)).total_seconds())
    except (ValueError, KeyError, TypeError) as exc:
        raise PermanentCloudError(f"{what}: the cloud's answer is not a resource ({exc})",
                                  status=response.status_code) from exc
    if not resource.id:
        raise PermanentCloudError(f"{what}: the cloud's resource has an empty id", status=response.status_code)
    return resource


class ResourceApi:
    """The HTTP side of one client: its connections, the retry policy, and the round trips of lease calls.

    Lease calls (request, poll, check) are small requests whose time is a round trip plus the server's
    bookkeeping; each is reported to ``on_rtt`` and kept (the last :data:`RTT_WINDOW`) for :meth:`rtt_floor`.
    Where uploads can be seen on the socket (``agent.cloud._uplink``), their ends go to ``on_upload_end``.
    """

    def __init__(
        self,
        settings: CloudSettings,
        breaker: CircuitBreaker,
        *,
        transport: httpx.AsyncBaseTransport | None,
        clock: Callable[[], float],
        jitter: Callable[[], float],
        on_rtt: Callable[[float, float], None],
        on_upload_end: Callable[[Upload, float, float], None],
    ) -> None:
        assert settings.url is not None  # the client refuses settings without one
        self._settings = settings
        self._breaker = breaker
        self._clock = clock
        self._jitter = jitter
        self._on_rtt = on_rtt
        self.closed = False
        self._rtts: collections.deque[float] = collections.deque(maxlen=RTT_WINDOW)
        self.rtt_at = -math.inf  # when the last lease call was answered
        headers = {"Accept": "application/json", "User-Agent": f"edge-agent/{__version__}"}
        if settings.token is not None:
            headers["Authorization"] = f"Bearer {settings.token.get_secret_value()}"
        verify: ssl.SSLContext | bool = True
        if settings.ca_file is not None:
            verify = ssl.create_default_context(cafile=str(settings.ca_file))
        self.watch: UploadWatch | None = None
        if transport is None:
            transport = watched_transport(settings.url, verify)
            if transport is not None:
                self.watch = UploadWatch(clock, self.rtt_floor, on_upload_end)
        self._http = httpx.AsyncClient(
            base_url=settings.url,
            headers=headers,
            timeout=httpx.Timeout(connect=settings.connect_timeout_s, read=settings.read_timeout_s,
                                  write=settings.write_timeout_s, pool=settings.pool_timeout_s),
            verify=verify,
            transport=transport,
            follow_redirects=False,
        )

    def rtt_floor(self) -> float:
        """The smallest of the last few RTT samples (0 before the first)."""
        return min(self._rtts, default=0.0)

    async def aclose(self) -> None:
        if self.watch is not None:
            await self.watch.aclose()
        await self._http.aclose()

    # ------------------------------------------------------------------ the calls

    async def request_lease(self, quantity: int, key: str) -> Resource:
        params = {"location": self._settings.location} if self._settings.location else None
        answer = await self.call("POST", RESOURCES, what="lease request", params=params,
                                 json={"type": "compute", "quantity": quantity}, headers={"Idempotency-Key": key})
        self._observe_rtt(answer.seconds)
        return parse_resource(answer.response, "lease request")

    async def get_lease(self, lease_id: str, what: str) -> Resource:
        try:
            answer = await self.call("GET", f"{RESOURCES}/{lease_id}", what=what)
        except PermanentCloudError as exc:
            if exc.status == 404:
                raise LeaseGone(str(exc), status=404, code=exc.code) from exc
            raise
        self._observe_rtt(answer.seconds)
        return parse_resource(answer.response, what)

    async def release_lease(self, lease_id: str, reason: str) -> None:
        """Best effort, within :data:`RELEASE_TIMEOUT_S`; the outcome is logged, never raised."""
        try:
            response = await self._http.delete(f"{RESOURCES}/{lease_id}", timeout=RELEASE_TIMEOUT_S)
        except httpx.TransportError as exc:
            log.info("cloud_lease_release_failed", lease=lease_id, cause=describe(exc))
            return
        if response.status_code in (204, 404):
            log.info("cloud_lease_released", lease=lease_id, reason=reason)
        else:
            code, detail = error_fields(response)
            log.info("cloud_lease_release_failed", lease=lease_id, status=response.status_code, error=code,
                     detail=detail)

    async def post_task(self, lease_id: str, task_id: str, payload: bytes, headers: Mapping[str, str],
                        upload: object) -> Answer:
        """A task's input to a lease; ``upload`` is the key the upload watch reports this upload's end under."""
        try:
            return await self.call("POST", f"{RESOURCES}/{lease_id}/tasks", what=f"task {task_id}",
                                   content=payload, headers=headers, upload=upload)
        except PermanentCloudError as exc:
            if exc.status == 404:
                raise LeaseGone(str(exc), status=404, code=exc.code) from exc
            raise

    def _observe_rtt(self, seconds: float) -> None:
        now = self._clock()
        self._rtts.append(seconds)
        self.rtt_at = now
        self._on_rtt(seconds, now)

    # ------------------------------------------------------------------ retries

    async def call(self, method: str, path: str, *, what: str, content: bytes | None = None,
                   json: Any = None, params: Mapping[str, str] | None = None,
                   headers: Mapping[str, str] | None = None, upload: object | None = None) -> Answer:
        """One API call under the retry policy: a 2xx answer, or the classified error once retries are spent.

        Transient failures are retried up to ``max_retries`` times, after the server's ``Retry-After`` when it
        gave one, else after the backoff. A ``Retry-After`` longer than ``retry_max_s`` ends the retries (the
        task is better run locally than parked), and so does a circuit that other calls opened meanwhile.
        ``upload``: the call sends a task's input, whose end the upload watch looks for in each attempt.
        """
        settings = self._settings
        attempt = 0
        while True:
            if self.closed:
                raise PermanentCloudError("the cloud client is closed", cloud_fault=False)
            attempt += 1
            started = self._clock()
            error: CloudError
            watch = self.watch if upload is not None else None
            watched = watch.begin(upload) if watch is not None else None
            answered = False
            try:
                response = await self._http.request(
                    method, path, content=content, json=json, params=params, headers=headers,
                    extensions={"trace": watched[0].trace} if watched is not None else None)
                answered = True
            except httpx.TransportError as exc:
                error = TransientCloudError(f"{what}: {describe(exc)}")
                error.__cause__ = exc
            else:
                if response.is_success:
                    return Answer(response, self._clock() - started, attempt)
                error = classify(response, what)
            finally:
                if watch is not None and watched is not None:
                    watch.end(*watched, answered)
            if not isinstance(error, TransientCloudError) or attempt > settings.max_retries:
                raise error
            if self._breaker.is_open(self._clock()):
                raise error
            delay = error.retry_after
            if delay is None:
                delay = compute_backoff(attempt, settings.retry_min_s, settings.retry_max_s, self._jitter())
            elif delay > settings.retry_max_s:
                raise error
            log.debug("cloud_retry", what=what, attempt=attempt, delay_s=round(delay, 3), cause=str(error))
            await asyncio.sleep(delay)


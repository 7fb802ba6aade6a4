"""The resource API client: leases, task submission, retries, circuit breaker, observations.

The HTTP contract it speaks is in docs/design.md#resource-api.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import random
import ssl
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal, Protocol

import httpx
import orjson

from agent import __version__
from agent.cloud._backoff import compute_backoff, parse_retry_after
from agent.cloud._circuit import CircuitBreaker, CircuitState
from agent.cloud._errors import CircuitOpen, CloudError, PermanentCloudError, TransientCloudError
from agent.cloud._leases import Lease, choose_lease
from agent.cloud._uplink import Upload, UploadWatch, watched_transport
from agent.config import CloudSettings
from agent.errors import ConfigError
from agent.telemetry import get_logger

log = get_logger("agent.cloud")

RESOURCES = "/api/v1/resources"
TRANSIENT_STATUS = frozenset({429, 502, 503, 504})
# An upload measured shorter than this is below what the timing can resolve; reporting 0 s would read as
# "no bandwidth" to the model, so the figure is floored (a huge rate, weighted by this tiny duration).
MIN_TRANSFER_S = 1e-4
# Without a lease call for this long, the maintenance loop measures the RTT again with a lease GET.
RTT_REFRESH_S = 10.0
# Upload times are netted of the smallest of the last few RTT samples: queueing and a new connection's
# handshake only ever add to a sample, so the minimum is the closest to the path's own round trip.
RTT_WINDOW = 5
# Releasing is best effort (the lease expires anyway); it must not hold up shutdown.
RELEASE_TIMEOUT_S = 5.0


class CloudObserver(Protocol):
    """Where measurements go; ``agent.decision.Policy`` has these methods. ``now`` is the client's clock."""

    def observe_transfer(self, direction: Literal["up", "down"], n_bytes: int, seconds: float, now: float) -> None:
        ...

    def observe_rtt(self, seconds: float, now: float) -> None:
        ...

    def observe_cloud(self, kind: str, in_bytes: int, service_s: float, now: float) -> None:
        ...

    def observe_provisioning(self, seconds: float, now: float) -> None:
        ...


@dataclass(frozen=True, slots=True)
class CloudResult:
    """A task's result from the cloud and what its submission measured.

    ``exec_s``: the server's ``exec_ms`` / 1000, its own run time. ``request_s``: the last attempt, from sending
    the request to having the whole answer. ``upload_s``: what was reported as the upload time (see
    :meth:`CloudClient.submit`); ``upload_seen`` is True when it was measured at the upload's end on the socket,
    False when it was estimated from the answer. ``attempts`` counts HTTP attempts on the lease that answered.
    """

    task_id: str
    kind: str
    result: dict[str, Any]
    exec_s: float
    request_s: float
    upload_s: float
    attempts: int
    lease_id: str
    upload_seen: bool = False


@dataclass(frozen=True, slots=True)
class LeaseSnapshot:
    """The client's leases for the decision: whether one is ready and how many vCPUs the ready ones have."""

    ready: bool
    slots: int
    provisioning: bool


@dataclass(frozen=True, slots=True)
class _Answer:
    response: httpx.Response
    seconds: float  # the last attempt, request sent to answer read
    attempts: int


class _Submission:
    """One task's submission across its attempts: its upload is reported once, by the first that measures it."""

    __slots__ = ("n_bytes", "on_uploaded", "reported", "seen", "upload_s")

    def __init__(self, n_bytes: int, on_uploaded: Callable[[], None] | None = None) -> None:
        self.n_bytes = n_bytes
        self.on_uploaded = on_uploaded
        self.reported = False
        self.seen = False  # measured at the upload's end, not estimated from the answer
        self.upload_s = 0.0


class _LeaseGone(PermanentCloudError):
    """404 for a lease: it expired or the cloud dropped it."""


def _describe(exc: httpx.TransportError) -> str:
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


def _error_fields(response: httpx.Response) -> tuple[str | None, str]:
    """The ``{"error", "detail"}`` of an error answer; the start of the text when the body is not that."""
    with contextlib.suppress(ValueError):
        data = response.json()
        if isinstance(data, dict):
            code = data.get("error")
            detail = data.get("detail")
            return (code if isinstance(code, str) else None), (detail if isinstance(detail, str) else str(detail))
    return None, response.text[:200]


def _server_now(response: httpx.Response) -> datetime:
    # expires_at is on the server's clock; its Date header lets a gateway with a wrong clock still count down.
    with contextlib.suppress(TypeError, ValueError, IndexError):
        date = response.headers.get("Date")
        if date:
            when = parsedate_to_datetime(date)
            return when if when.tzinfo else when.replace(tzinfo=UTC)
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class _Resource:
    id: str
    status: str
    quantity: int
    expires_in_s: float


def _parse_resource(response: httpx.Response, what: str) -> _Resource:
    try:
        data = response.json()
        expires = datetime.fromisoformat(data["expires_at"])
        if expires.tzinfo is None:
            expires = expires.replace(tzinfo=UTC)
        resource = _Resource(str(data["id"]), str(data["status"]), int(data["quantity"]),
                             (expires - _server_now(response)).total_seconds())
    except (ValueError, KeyError, TypeError) as exc:
        raise PermanentCloudError(f"{what}: the cloud's answer is not a resource ({exc})",
                                  status=response.status_code) from exc
    if not resource.id:
        raise PermanentCloudError(f"{what}: the cloud's resource has an empty id", status=response.status_code)
    return resource


class CloudClient:
    """Offloads tasks to the resource API. One per daemon; use from one event loop.

    ``submit`` returns the cloud's result or raises a :class:`CloudError`, after which the caller runs the task
    locally: the client never runs a task itself, and a retried submission reuses the task's
    ``Idempotency-Key``, so the cloud runs it at most once. ``aclose`` releases every lease.
    """

    def __init__(
        self,
        settings: CloudSettings,
        observer: CloudObserver | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        if settings.url is None:
            raise ConfigError("EDGE_AGENT_CLOUD__URL", "is not set; the cloud client needs the resource API's URL")
        self._settings = settings
        self._observer = observer
        self._clock = clock
        self._jitter = jitter
        headers = {"Accept": "application/json", "User-Agent": f"edge-agent/{__version__}"}
        if settings.token is not None:
            headers["Authorization"] = f"Bearer {settings.token.get_secret_value()}"
        verify: ssl.SSLContext | bool = True
        if settings.ca_file is not None:
            verify = ssl.create_default_context(cafile=str(settings.ca_file))
        self._rtts: collections.deque[float] = collections.deque(maxlen=RTT_WINDOW)
        self._watch: UploadWatch | None = None
        if transport is None:
            transport = watched_transport(settings.url, verify)
            if transport is not None:
                self._watch = UploadWatch(clock, lambda: min(self._rtts, default=0.0), self._upload_ended)
        self._http = httpx.AsyncClient(
            base_url=settings.url,
            headers=headers,
            timeout=httpx.Timeout(connect=settings.connect_timeout_s, read=settings.read_timeout_s,
                                  write=settings.write_timeout_s, pool=settings.pool_timeout_s),
            verify=verify,
            transport=transport,
            follow_redirects=False,
        )
        self._breaker = CircuitBreaker(settings.circuit_failures, settings.circuit_cooldown_s)
        self._leases: list[Lease] = []
        self._rtt_at = -math.inf
        self._reported: set[str] = set()
        self._maintenance: asyncio.Task[None] | None = None
        self._releases: set[asyncio.Task[None]] = set()
        self._closed = False

    # ------------------------------------------------------------------ public

    def circuit_open(self, now: float) -> bool:
        """True while offloading is paused; false again once a probe may go (the decision then sends one)."""
        return self._breaker.is_open(now)

    @property
    def circuit_state(self) -> CircuitState:
        return self._breaker.state

    def lease_status(self) -> LeaseSnapshot:
        ready = [lease for lease in self._leases if lease.stage == "ready"]
        return LeaseSnapshot(
            ready=bool(ready),
            slots=sum(lease.quantity for lease in ready),
            provisioning=any(lease.stage in ("pending", "provisioning") for lease in self._leases),
        )

    def describe(self) -> dict[str, Any]:
        """The circuit and the leases as plain data (``edge-agent status``); times in seconds from now."""
        now = self._clock()
        retry_in = self._breaker.retry_in(now)
        return {
            "circuit": self._breaker.state.value,
            "circuit_retry_in_s": retry_in if self._breaker.state is CircuitState.OPEN else None,
            "leases": [
                {"id": lease.id, "stage": lease.stage, "vcpus": lease.quantity, "in_use": lease.reserved,
                 "expires_in_s": lease.expires_at - now if math.isfinite(lease.expires_at) else None,
                 "idle_s": now - lease.last_used if lease.last_used and not lease.reserved else None}
                for lease in self._leases if lease.stage != "gone"
            ],
        }

    def prewarm(self) -> None:
        """Request a lease before a task needs it (the policy's ``Decision.prewarm``).

        The tasks that follow then find it ready instead of each waiting out provisioning. Nothing happens
        while a lease is ready or on its way, or while the circuit is open. An unused lease is released after
        ``lease_idle_s`` like any other.
        """
        now = self._clock()
        if self._closed or self._breaker.is_open(now) or any(lease.usable(now) for lease in self._leases):
            return
        self._start_maintenance()
        lease = Lease(created_at=now)
        self._leases.append(lease)
        lease.task = asyncio.create_task(self._acquire(lease), name="cloud-lease-prewarm")

    @property
    def sees_uploads(self) -> bool:
        """True when each upload's end is seen on the socket (Linux), not only inferred from the answer."""
        return self._watch is not None

    async def submit(self, task_id: str, kind: str, payload: bytes,
                     options: Mapping[str, Any] | None = None,
                     on_uploaded: Callable[[], None] | None = None) -> CloudResult:
        """Run one task in the cloud; raises :class:`CloudError` when it did not (the caller runs it locally).

        ``options`` (the route's task options) travel as JSON in ``X-Task-Options`` when not empty.
        ``on_uploaded`` is called once, when the upload is reported (below): at its end where
        :attr:`sees_uploads`, otherwise with the answer.

        What is measured and reported to the observer, honestly:

        - ``observe_cloud``: the server's ``exec_ms`` — its own run time of the task, without its queueing.
        - ``observe_transfer("up", len(payload), s, now)``, once per task, when the upload ends: the cloud
          answers only after running the task, so the client watches the connection's kernel send queue once
          the body is handed to it, and the upload has ended when the cloud has acknowledged every byte (see
          ``agent.cloud._uplink``; within about 5 ms). ``s`` runs from the later of the moment the body started
          to be sent (after any wait for a lease or a slot) and the previous upload's end: concurrent uploads
          share the link, and these inter-completion times add up to the time the link was busy, as the
          replay's FIFO uplink reports them. When the link was idle before, the round trip that the last
          acknowledgement takes is netted out (the smallest of the last five RTT samples). Reported by the first
          attempt whose end is seen; a retry's upload is not reported again. Floored at 0.1 ms.
          Where the end cannot be seen (not Linux, a proxy, a custom transport), it is reported when the answer
          comes, with ``s`` = the last attempt's request time less ``exec_ms`` and that RTT: this also contains
          the server's request parsing and any wait for a worker there, and the small answer's download.
          No download rate is reported: answers are a few hundred bytes, whose time is all RTT.
        - ``observe_rtt``: the time of each lease call (request, polls, and a GET every ~10 s while offloading),
          small requests whose time is a round trip plus the server's bookkeeping (and a TCP/TLS handshake
          when a new connection was needed).
        - ``observe_provisioning``: from sending the lease request to seeing it ``ready``: includes up to one
          poll interval and the round trips of the polls.
        """
        if self._closed:
            raise PermanentCloudError("the cloud client is closed", cloud_fault=False)
        now = self._clock()
        if not self._breaker.allow(now):
            raise CircuitOpen(self._breaker.retry_in(now))
        self._start_maintenance()
        try:
            result = await self._submit(task_id, kind, payload, options, on_uploaded)
        except CloudError as exc:
            self._failed(exc)
            raise
        except BaseException:
            self._breaker.record_abandoned()
            raise
        if self._breaker.state is not CircuitState.CLOSED:
            log.info("cloud_circuit_closed")
        self._breaker.record_success()
        self._reported.discard("auth")
        return result

    async def aclose(self) -> None:
        """Stop the background work, release every lease (best effort) and close the connections.

        Call it after the submissions in flight have ended. A lease request still unanswered is abandoned;
        the cloud expires that lease at its ``expires_at``.
        """
        if self._closed:
            return
        self._closed = True
        leases = list(self._leases)  # before cancelling: a cancelled lease request drops its lease from the list
        tasks = [task for task in (self._maintenance, *(lease.task for lease in leases)) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._leases = []
        await asyncio.gather(*(self._release(lease, "shutdown") for lease in leases if lease.id is not None),
                             *self._releases, return_exceptions=True)
        if self._watch is not None:
            await self._watch.aclose()
        await self._http.aclose()

    # ------------------------------------------------------------------ submission

    async def _submit(self, task_id: str, kind: str, payload: bytes,
                      options: Mapping[str, Any] | None, on_uploaded: Callable[[], None] | None) -> CloudResult:
        headers = {"X-Task-Kind": kind, "Idempotency-Key": task_id, "Content-Type": "application/octet-stream"}
        if options:
            headers["X-Task-Options"] = orjson.dumps(dict(options)).decode()
        submission = _Submission(len(payload), on_uploaded)
        for replacing in (False, True):
            lease = await self._reserve()
            try:
                assert lease.slots is not None and lease.id is not None  # set before the lease is ready
                async with lease.slots:
                    return await self._send(lease.id, task_id, kind, payload, headers, submission)
            except _LeaseGone as exc:
                self._forget(lease)
                self._report_once(f"gone:{lease.id}", "cloud_lease_gone", level="info", lease=lease.id,
                                  cause="the lease is gone (expired or dropped by the cloud); using a new one")
                if replacing:
                    raise PermanentCloudError("the cloud lost two leases in a row for this task",
                                              status=exc.status, code=exc.code) from exc
            finally:
                lease.reserved -= 1
                lease.last_used = self._clock()
        raise AssertionError("unreachable: the loop returns or raises")

    async def _send(self, lease_id: str, task_id: str, kind: str, payload: bytes,
                    headers: Mapping[str, str], submission: _Submission) -> CloudResult:
        what = f"task {task_id}"
        try:
            answer = await self._call("POST", f"{RESOURCES}/{lease_id}/tasks", what=what, content=payload,
                                      headers=headers, upload=submission)
        except PermanentCloudError as exc:
            if exc.status == 404:
                raise _LeaseGone(str(exc), status=404, code=exc.code) from exc
            if exc.status == 400:
                # The cloud refused this task's input: the cloud itself works, so the circuit stays as it is.
                raise PermanentCloudError(str(exc), status=400, code=exc.code, cloud_fault=False) from exc
            raise
        try:
            data = answer.response.json()
            result, exec_ms = data["result"], data["exec_ms"]
            answered_for = data.get("task_id", task_id)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PermanentCloudError(f"{what}: the cloud's answer is not a task result ({exc})",
                                      status=answer.response.status_code) from exc
        valid_time = isinstance(exec_ms, int | float) and not isinstance(exec_ms, bool) and exec_ms >= 0
        if not isinstance(result, dict) or not valid_time or not math.isfinite(exec_ms):
            raise PermanentCloudError(f"{what}: the cloud's answer lacks a result object or a valid exec_ms",
                                      status=answer.response.status_code)
        if answered_for != task_id:
            raise PermanentCloudError(f"{what}: the cloud answered for task {answered_for!r}",
                                      status=answer.response.status_code)
        now = self._clock()
        exec_s = float(exec_ms) / 1000.0
        self._observe("observe_cloud", kind, len(payload), exec_s, now)
        if not submission.reported:  # its end was not seen: estimated from the answer
            self._report_upload(submission, answer.seconds - exec_s - min(self._rtts, default=0.0), now)
        return CloudResult(task_id, kind, result, exec_s, answer.seconds, submission.upload_s, answer.attempts,
                           lease_id, submission.seen)

    def _upload_ended(self, upload: Upload, seconds: float, now: float) -> None:
        submission = upload.key
        if isinstance(submission, _Submission) and not submission.reported:
            submission.seen = True
            self._report_upload(submission, seconds, now)

    def _report_upload(self, submission: _Submission, seconds: float, now: float) -> None:
        submission.reported = True
        submission.upload_s = max(MIN_TRANSFER_S, seconds)
        self._observe("observe_transfer", "up", submission.n_bytes, submission.upload_s, now)
        if submission.on_uploaded is not None:
            try:
                submission.on_uploaded()
            except Exception:  # the submission goes on whatever the caller's hook does
                log.exception("cloud_upload_hook_failed")

    # ------------------------------------------------------------------ HTTP with retries

    async def _call(self, method: str, path: str, *, what: str, content: bytes | None = None,
                    json: Any = None, params: Mapping[str, str] | None = None,
                    headers: Mapping[str, str] | None = None, upload: _Submission | None = None) -> _Answer:
        """One API call under the retry policy: a 2xx answer, or the classified error once retries are spent.

        Transient failures are retried up to ``max_retries`` times, after the server's ``Retry-After`` when it
        gave one, else after the backoff. A ``Retry-After`` longer than ``retry_max_s`` ends the retries (the
        task is better run locally than parked), and so does a circuit that other calls opened meanwhile.
        ``upload``: the call sends a task's input, whose end the upload watch looks for in each attempt.
        """
        settings = self._settings
        attempt = 0
        while True:
            if self._closed:
                raise PermanentCloudError("the cloud client is closed", cloud_fault=False)
            attempt += 1
            started = self._clock()
            error: CloudError
            watch = self._watch if upload is not None else None
            watched = watch.begin(upload) if watch is not None else None
            answered = False
            try:
                response = await self._http.request(
                    method, path, content=content, json=json, params=params, headers=headers,
                    extensions={"trace": watched[0].trace} if watched is not None else None)
                answered = True
            except httpx.TransportError as exc:
                error = TransientCloudError(f"{what}: {_describe(exc)}")
                error.__cause__ = exc
            else:
                if response.is_success:
                    return _Answer(response, self._clock() - started, attempt)
                error = self._classify(response, what)
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

    @staticmethod
    def _classify(response: httpx.Response, what: str) -> CloudError:
        status = response.status_code
        code, detail = _error_fields(response)
        text = f"{what}: the cloud answered {status}" + (f" {code}" if code else "") + (f": {detail}" if detail else "")
        if status in TRANSIENT_STATUS:
            return TransientCloudError(text, status=status, code=code,
                                       retry_after=parse_retry_after(response.headers.get("Retry-After")))
        return PermanentCloudError(text, status=status, code=code)

    # ------------------------------------------------------------------ leases

    async def _reserve(self) -> Lease:
        lease = choose_lease(self._leases, self._settings.max_quantity, self._clock())
        if lease is None:
            lease = Lease(created_at=self._clock())
            self._leases.append(lease)
            lease.task = asyncio.create_task(self._acquire(lease), name="cloud-lease-acquire")
        lease.reserved += 1
        try:
            await lease.settled.wait()
        except BaseException:
            lease.reserved -= 1
            raise
        if lease.error is not None:
            lease.reserved -= 1
            raise lease.error
        return lease

    async def _acquire(self, lease: Lease) -> None:
        settings = self._settings
        try:
            # One loop turn, so the tasks of a burst that arrived together join before the size is fixed.
            await asyncio.sleep(0)
            now = self._clock()
            others = sum(other.quantity for other in self._leases if other is not lease and other.usable(now))
            lease.quantity = max(1, min(lease.reserved, settings.max_quantity - others))
            lease.slots = asyncio.Semaphore(lease.quantity)
            lease.stage = "provisioning"
            params = {"location": settings.location} if settings.location else None
            requested = self._clock()
            # The key makes a retried lease request (after a timeout) return the first lease, not a second one.
            answer = await self._call("POST", RESOURCES, what="lease request", params=params,
                                      json={"type": "compute", "quantity": lease.quantity},
                                      headers={"Idempotency-Key": f"lease-{uuid.uuid4()}"})
            self._observe_rtt(answer.seconds)
            resource = _parse_resource(answer.response, "lease request")
            lease.id = resource.id
            while resource.status == "provisioning":
                if self._clock() - requested > settings.provisioning_timeout_s:
                    raise TransientCloudError(
                        f"the lease was not ready {settings.provisioning_timeout_s:g} s after it was requested")
                await asyncio.sleep(settings.poll_interval_s)
                resource = await self._get_lease(lease.id, "lease poll")
            if resource.status != "ready":
                raise TransientCloudError(f"the lease became {resource.status!r} before it was ready")
            now = self._clock()
            self._observe("observe_provisioning", now - requested, now)
            lease.stage = "ready"
            lease.last_used = now
            lease.expires_at = now + resource.expires_in_s
            lease.margin_s = min(settings.read_timeout_s, 0.25 * max(0.0, resource.expires_in_s))
            log.info("cloud_lease_ready", lease=lease.id, quantity=lease.quantity,
                     provisioning_s=round(now - requested, 3))
        except asyncio.CancelledError:
            self._abandon(lease, PermanentCloudError("the cloud client is closing", cloud_fault=False))
            raise
        except CloudError as exc:
            self._abandon(lease, exc)
        except Exception as exc:  # a bug here must fail the waiting tasks over to local, not hang them
            log.exception("cloud_lease_failed")
            self._abandon(lease, TransientCloudError(f"the lease request failed: {exc!r}"))
        else:
            lease.settled.set()

    async def _get_lease(self, lease_id: str, what: str) -> _Resource:
        try:
            answer = await self._call("GET", f"{RESOURCES}/{lease_id}", what=what)
        except PermanentCloudError as exc:
            if exc.status == 404:
                raise _LeaseGone(str(exc), status=404, code=exc.code) from exc
            raise
        self._observe_rtt(answer.seconds)
        return _parse_resource(answer.response, what)

    def _abandon(self, lease: Lease, error: CloudError) -> None:
        lease.error = error
        lease.settled.set()
        # A lease that failed after the cloud created it is released, so it does not run up a bill.
        self._forget(lease)
        if lease.id is not None and not self._closed:
            task = asyncio.create_task(self._release(lease, "not_ready"), name="cloud-lease-release")
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)

    def _forget(self, lease: Lease) -> None:
        lease.stage = "gone"
        with contextlib.suppress(ValueError):
            self._leases.remove(lease)

    async def _release(self, lease: Lease, reason: str) -> None:
        try:
            response = await self._http.delete(f"{RESOURCES}/{lease.id}", timeout=RELEASE_TIMEOUT_S)
        except httpx.TransportError as exc:
            log.info("cloud_lease_release_failed", lease=lease.id, cause=_describe(exc))
            return
        if response.status_code in (204, 404):
            log.info("cloud_lease_released", lease=lease.id, reason=reason)
        else:
            code, detail = _error_fields(response)
            log.info("cloud_lease_release_failed", lease=lease.id, status=response.status_code, error=code,
                     detail=detail)

    # ------------------------------------------------------------------ background upkeep

    def _start_maintenance(self) -> None:
        if self._maintenance is None or self._maintenance.done():
            self._maintenance = asyncio.create_task(self._maintain(), name="cloud-lease-upkeep")

    async def _maintain(self) -> None:
        """Release idle or expiring leases; refresh the RTT with a lease GET while offloading."""
        interval = min(5.0, max(0.05, self._settings.lease_idle_s / 4))
        while True:
            await asyncio.sleep(interval)
            now = self._clock()
            for lease in list(self._leases):
                if lease.stage != "ready" or lease.reserved:
                    continue
                expiring = not lease.usable(now)
                if expiring or now - lease.last_used >= self._settings.lease_idle_s:
                    self._forget(lease)
                    await self._release(lease, "expiring" if expiring else "idle")
            busy = [lease for lease in self._leases if lease.stage == "ready" and lease.reserved]
            if busy and now - self._rtt_at >= RTT_REFRESH_S and not self._breaker.is_open(now):
                lease = busy[0]
                assert lease.id is not None
                try:
                    await self._get_lease(lease.id, "lease check")
                except _LeaseGone:
                    self._forget(lease)
                except CloudError as exc:
                    log.debug("cloud_lease_check_failed", lease=lease.id, cause=str(exc))

    # ------------------------------------------------------------------ bookkeeping

    def _failed(self, exc: CloudError) -> None:
        now = self._clock()
        was_open = self._breaker.state is CircuitState.OPEN
        if exc.status == 401:
            configured = self._settings.token is not None
            self._report_once("auth", "cloud_auth_rejected", level="error",
                              cause="the cloud rejected the token" if configured else
                              "the cloud requires a token and none is configured",
                              hint="check EDGE_AGENT_CLOUD__TOKEN")
            self._breaker.trip(now)
        elif exc.cloud_fault:
            if exc.status == 400:
                code, detail = exc.code or "bad_request", str(exc)
                self._report_once(f"400:{code}", "cloud_rejected_request", level="error", error=code, cause=detail)
            elif isinstance(exc, PermanentCloudError):
                self._report_once(f"status:{exc.status}", "cloud_unexpected_answer", level="error",
                                  cause=str(exc))
            self._breaker.record_failure(now)
        else:
            if exc.status == 400:
                self._report_once(f"task400:{exc.code}", "cloud_rejected_task", level="warning",
                                  error=exc.code, cause=str(exc))
            self._breaker.record_success()
        if not was_open and self._breaker.state is CircuitState.OPEN:
            log.warning("cloud_circuit_open", cause=str(exc),
                        cooldown_s=self._settings.circuit_cooldown_s)
        else:
            log.debug("cloud_offload_failed", cause=str(exc))

    def _report_once(self, key: str, event: str, *, level: str, **fields: Any) -> None:
        if key in self._reported:
            return
        self._reported.add(key)
        getattr(log, level)(event, **fields)

    def _observe_rtt(self, seconds: float) -> None:
        now = self._clock()
        self._rtts.append(seconds)
        self._rtt_at = now
        self._observe("observe_rtt", seconds, now)

    def _observe(self, method: str, *args: Any) -> None:
        if self._observer is None:
            return
        try:
            getattr(self._observer, method)(*args)
        except Exception:  # noqa: BLE001 - a broken estimator must not turn a cloud result into a local rerun
            self._report_once(f"observer:{method}", "cloud_observer_failed", level="exception", method=method)


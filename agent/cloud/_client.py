"""The resource API client: task submission, what it measures, and the circuit breaker over its outcomes.

The HTTP calls and their retries are in ``_api``, the leases in ``_pool``; the HTTP contract is in
docs/design.md#resource-api.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, Protocol

import httpx
import orjson

from agent.cloud._api import LeaseGone, ResourceApi
from agent.cloud._circuit import CircuitBreaker, CircuitState
from agent.cloud._errors import CircuitOpen, CloudError, PermanentCloudError
from agent.cloud._pool import LeasePool
from agent.cloud._uplink import Upload
from agent.config import CloudSettings
from agent.errors import ConfigError
from agent.telemetry import get_logger

log = get_logger("agent.cloud")

# An upload measured shorter than this is below what the timing can resolve; reporting 0 s would read as
# "no bandwidth" to the model, so the figure is floored (a huge rate, weighted by this tiny duration).
MIN_TRANSFER_S = 1e-4


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


class _Submission:
    """One task's submission across its attempts: its upload is reported once, by the first that measures it."""

    __slots__ = ("n_bytes", "on_uploaded", "reported", "seen", "upload_s")

    def __init__(self, n_bytes: int, on_uploaded: Callable[[], None] | None = None) -> None:
        self.n_bytes = n_bytes
        self.on_uploaded = on_uploaded
        self.reported = False
        self.seen = False  # measured at the upload's end, not estimated from the answer
        self.upload_s = 0.0


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
        self._breaker = CircuitBreaker(settings.circuit_failures, settings.circuit_cooldown_s)
        self._api = ResourceApi(settings, self._breaker, transport=transport, clock=clock, jitter=jitter,
                                on_rtt=partial(self._observe, "observe_rtt"), on_upload_end=self._upload_ended)
        self._pool = LeasePool(self._api, settings, self._breaker, clock=clock,
                               on_provisioned=partial(self._observe, "observe_provisioning"))
        self._reported: set[str] = set()

    # ------------------------------------------------------------------ public

    def circuit_open(self, now: float) -> bool:
        """True while offloading is paused; false again once a probe may go (the decision then sends one)."""
        return self._breaker.is_open(now)

    @property
    def circuit_state(self) -> CircuitState:
        return self._breaker.state

    def lease_status(self) -> LeaseSnapshot:
        leases = self._pool.leases
        ready = [lease for lease in leases if lease.stage == "ready"]
        return LeaseSnapshot(
            ready=bool(ready),
            slots=sum(lease.quantity for lease in ready),
            provisioning=any(lease.stage in ("pending", "provisioning") for lease in leases),
        )

    def describe(self) -> dict[str, Any]:
        """The circuit and the leases as plain data (``edge-agent status``); times in seconds from now."""
        now = self._clock()
        retry_in = self._breaker.retry_in(now)
        return {
            "circuit": self._breaker.state.value,
            "circuit_retry_in_s": retry_in if self._breaker.state is CircuitState.OPEN else None,
            "leases": self._pool.describe(now),
        }

    def prewarm(self) -> None:
        """Request a lease before a task needs it (the policy's ``Decision.prewarm``).

        The tasks that follow then find it ready instead of each waiting out provisioning. Nothing happens
        while a lease is ready or on its way, or while the circuit is open. An unused lease is released after
        ``lease_idle_s`` like any other.
        """
        self._pool.prewarm()

    @property
    def sees_uploads(self) -> bool:
        """True when each upload's end is seen on the socket (Linux), not only inferred from the answer."""
        return self._api.watch is not None

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
        if self._api.closed:
            raise PermanentCloudError("the cloud client is closed", cloud_fault=False)
        now = self._clock()
        if not self._breaker.allow(now):
            raise CircuitOpen(self._breaker.retry_in(now))
        self._pool.start_upkeep()
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
        if self._api.closed:
            return
        self._api.closed = True
        await self._pool.aclose()
        await self._api.aclose()

    # ------------------------------------------------------------------ submission

    async def _submit(self, task_id: str, kind: str, payload: bytes,
                      options: Mapping[str, Any] | None, on_uploaded: Callable[[], None] | None) -> CloudResult:
        headers = {"X-Task-Kind": kind, "Idempotency-Key": task_id, "Content-Type": "application/octet-stream"}
        if options:
            headers["X-Task-Options"] = orjson.dumps(dict(options)).decode()
        submission = _Submission(len(payload), on_uploaded)
        for replacing in (False, True):
            lease = await self._pool.reserve()
            try:
                assert lease.slots is not None and lease.id is not None  # set before the lease is ready
                async with lease.slots:
                    return await self._send(lease.id, task_id, kind, payload, headers, submission)
            except LeaseGone as exc:
                self._pool.forget(lease)
                self._report_once(f"gone:{lease.id}", "cloud_lease_gone", level="info", lease=lease.id,
                                  cause="the lease is gone (expired or dropped by the cloud); using a new one")
                if replacing:
                    raise PermanentCloudError("the cloud lost two leases in a row for this task",
                                              status=exc.status, code=exc.code) from exc
            finally:
                self._pool.unreserve(lease)
        raise AssertionError("unreachable: the loop returns or raises")

    async def _send(self, lease_id: str, task_id: str, kind: str, payload: bytes,
                    headers: Mapping[str, str], submission: _Submission) -> CloudResult:
        what = f"task {task_id}"
        try:
            answer = await self._api.post_task(lease_id, task_id, payload, headers, submission)
        except PermanentCloudError as exc:
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
            self._report_upload(submission, answer.seconds - exec_s - self._api.rtt_floor(), now)
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

    def _observe(self, method: str, *args: Any) -> None:
        if self._observer is None:
            return
        try:
            getattr(self._observer, method)(*args)
        except Exception:  # noqa: BLE001 - a broken estimator must not turn a cloud result into a local rerun
            self._report_once(f"observer:{method}", "cloud_observer_failed", level="exception", method=method)


"""The cloud client's arithmetic and the error paths a real server cannot produce on demand (httpx.MockTransport).

Everything the devcloud can do for real (leases, 401, 429, outages, bandwidth) is in test_devcloud.py.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr
from structlog.testing import capture_logs

from agent.cloud import (
    CircuitBreaker,
    CircuitOpen,
    CircuitState,
    CloudClient,
    Lease,
    PermanentCloudError,
    TransientCloudError,
    choose_lease,
    compute_backoff,
    parse_retry_after,
)
from agent.cloud import _uplink as uplink
from agent.config import CloudSettings

# ---------------------------------------------------------------------------------------------- backoff


def test_backoff_doubles_from_the_minimum_and_stops_at_the_maximum() -> None:
    # Retry n waits between min·2^(n-1) and min·2^n: spread from the first retry on, capped by the maximum.
    top = [compute_backoff(n, 0.2, 5.0, jitter=1.0) for n in range(1, 8)]
    assert top == [0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]
    bottom = [compute_backoff(n, 0.2, 5.0, jitter=0.0) for n in range(1, 8)]
    assert bottom == [0.2, 0.4, 0.8, 1.6, 2.5, 2.5, 2.5]


def test_backoff_jitter_spreads_over_the_upper_half_within_the_bounds() -> None:
    assert compute_backoff(3, 0.2, 5.0, jitter=0.0) == pytest.approx(0.8)  # half of 1.6
    assert compute_backoff(3, 0.2, 5.0, jitter=0.5) == pytest.approx(1.2)
    # The first retry never goes below the minimum, the later ones never above the maximum.
    assert compute_backoff(1, 0.2, 5.0, jitter=0.0) == 0.2
    assert compute_backoff(1000, 0.2, 5.0, jitter=0.0) == 2.5
    for attempt in range(1, 40):
        for jitter in (0.0, 0.3, 0.999, 1.0):
            assert 0.2 <= compute_backoff(attempt, 0.2, 5.0, jitter) <= 5.0
    assert compute_backoff(3, 2.0, 1.0, jitter=0.5) == 1.0  # crossed bounds: the maximum wins


@settings(deadline=None)  # pure arithmetic: a slow example is a loaded machine, not a slow backoff
@given(attempt=st.integers(min_value=1, max_value=10_000), min_s=st.floats(min_value=1e-3, max_value=600),
       ratio=st.floats(min_value=1, max_value=1e4), jitter=st.floats(min_value=0, max_value=1))
def test_backoff_never_leaves_its_bounds_and_always_spreads(attempt: int, min_s: float, ratio: float,
                                                            jitter: float) -> None:
    max_s = min_s * ratio
    delay = compute_backoff(attempt, min_s, max_s, jitter)
    assert min_s <= delay <= max_s
    earliest, latest = compute_backoff(attempt, min_s, max_s, 0.0), compute_backoff(attempt, min_s, max_s, 1.0)
    assert earliest <= delay <= latest
    # A fleet that failed together spreads over at least this much at every retry, the first included.
    assert latest - earliest >= min(min_s, max_s / 2, max_s - min_s) * (1 - 1e-9)
    assert earliest >= latest / 2  # equal jitter: no retry sooner than half the longest wait of its step
    assert compute_backoff(attempt + 1, min_s, max_s, jitter) >= delay * (1 - 1e-12)  # it never shrinks


@pytest.mark.parametrize(("attempt", "jitter"), [(0, 0.5), (1, -0.1), (1, 1.5)])
def test_backoff_rejects_nonsense(attempt: int, jitter: float) -> None:
    with pytest.raises(ValueError, match=r"attempt|jitter"):
        compute_backoff(attempt, 0.2, 5.0, jitter)


# ---------------------------------------------------------------------------------------------- Retry-After

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("3", 3.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        (format_datetime(NOW + timedelta(seconds=7), usegmt=True), 7.0),
        ("Sun, 01 Mar 2026 12:00:30 GMT", 30.0),
        (format_datetime(NOW - timedelta(seconds=7), usegmt=True), 0.0),  # a date in the past: retry now
        (None, None),
        ("", None),
        ("soon", None),
        ("-5", None),
        ("1.5", None),  # delay-seconds are whole
        ("٣", None),  # a non-ASCII digit is not delay-seconds
    ],
)
def test_retry_after_is_seconds_or_an_http_date(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header, NOW) == seconds


# ---------------------------------------------------------------------------------------------- circuit breaker


def test_circuit_opens_after_consecutive_failures_and_lets_one_probe_through() -> None:
    breaker = CircuitBreaker(failures=3, cooldown_s=10.0)
    for now in (0.0, 1.0):
        assert breaker.allow(now)
        breaker.record_failure(now)
    breaker.record_success()  # a success in between resets the count
    for now in (2.0, 3.0, 4.0):
        assert breaker.allow(now)
        breaker.record_failure(now)
    assert breaker.state is CircuitState.OPEN and breaker.is_open(5.0)
    assert not breaker.allow(13.9) and breaker.retry_in(13.9) == pytest.approx(0.1)
    assert not breaker.is_open(14.0)  # the decision may now send one task
    assert breaker.allow(14.0)  # that one is the probe...
    assert not breaker.allow(14.0) and breaker.is_open(14.0)  # ...and nobody else goes meanwhile
    breaker.record_failure(15.0)  # the probe failed: another full cool-down
    assert breaker.state is CircuitState.OPEN and not breaker.allow(24.9)
    assert breaker.allow(25.0)
    breaker.record_success()
    assert breaker.state is CircuitState.CLOSED and breaker.allow(25.0) and breaker.allow(25.0)


def test_circuit_late_failures_do_not_extend_the_cooldown() -> None:
    breaker = CircuitBreaker(failures=1, cooldown_s=10.0)
    breaker.record_failure(0.0)
    breaker.record_failure(9.0)  # a call that was already out when the circuit opened
    assert breaker.allow(10.0)


def test_circuit_trip_opens_at_once_and_an_abandoned_probe_frees_the_slot() -> None:
    breaker = CircuitBreaker(failures=5, cooldown_s=1.0)
    breaker.trip(0.0)
    assert breaker.is_open(0.5)
    assert breaker.allow(1.0)
    breaker.record_abandoned()  # the probe was cancelled: it proved nothing
    assert breaker.allow(1.0)


# ---------------------------------------------------------------------------------------------- lease choice


def _lease(stage: str, quantity: int, reserved: int, expires_at: float = float("inf")) -> Lease:
    lease = Lease(created_at=0.0, quantity=quantity, reserved=reserved, expires_at=expires_at)
    lease.stage = stage  # type: ignore[assignment]
    return lease


def test_choose_lease_joins_a_pending_request_then_free_slots_then_grows_then_queues() -> None:
    pending = _lease("pending", 0, 5)
    assert choose_lease([pending], 4, 0.0) is pending
    busy, free = _lease("ready", 2, 2), _lease("provisioning", 2, 1)
    assert choose_lease([busy, free], 8, 0.0) is free
    ready_free = _lease("ready", 4, 3)
    assert choose_lease([free, ready_free], 8, 0.0) is ready_free  # ready first, even if fuller
    assert choose_lease([busy], 4, 0.0) is None  # room for 2 more vCPUs: ask for another lease
    fuller, emptier = _lease("ready", 2, 6), _lease("ready", 2, 3)
    assert choose_lease([fuller, emptier], 4, 0.0) is emptier  # at the maximum: wait on the least loaded
    assert choose_lease([], 4, 0.0) is None


def test_choose_lease_skips_leases_about_to_expire() -> None:
    old = _lease("ready", 4, 0, expires_at=100.0)
    old.margin_s = 10.0
    assert choose_lease([old], 4, 89.0) is old
    assert choose_lease([old], 4, 90.0) is None


# ---------------------------------------------------------------------------------------------- the client on a mock


Handler = Callable[[httpx.Request], httpx.Response]


def _settings(**overrides: Any) -> CloudSettings:
    values: dict[str, Any] = {
        "url": "http://cloud.test", "token": SecretStr("secret-token"), "location": "aarhus",
        "retry_min_s": 0.01, "retry_max_s": 2.0, "max_retries": 3, "circuit_failures": 3,
        "circuit_cooldown_s": 30.0, "poll_interval_s": 0.01, "lease_idle_s": 60.0,
    }
    values.update(overrides)
    return CloudSettings(**values)


def _resource(lease_id: str, status: str = "ready", ttl_s: float = 3600.0) -> dict[str, Any]:
    expires = (datetime.now(UTC) + timedelta(seconds=ttl_s)).isoformat()
    return {"id": lease_id, "type": "compute", "quantity": 1, "location": "aarhus", "status": status,
            "expires_at": expires}


class FakeCloud:
    """A scripted resource API. ``tasks`` answers task submissions; calls are recorded."""

    def __init__(self, tasks: Callable[[int, httpx.Request], httpx.Response]) -> None:
        self.tasks = tasks
        self.calls: list[httpx.Request] = []
        self.task_calls: list[httpx.Request] = []
        self.leases = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(request)
        path = request.url.path
        if request.method == "POST" and path == "/api/v1/resources":
            self.leases += 1
            return httpx.Response(201, json=_resource(f"lease-{self.leases}"))
        if request.method == "DELETE":
            return httpx.Response(204)
        if request.method == "GET":
            return httpx.Response(200, json=_resource(path.rsplit("/", 1)[1]))
        self.task_calls.append(request)
        return self.tasks(len(self.task_calls), request)

    def count(self, method: str) -> int:
        return sum(1 for call in self.calls if call.method == method)


def _ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"task_id": request.headers["Idempotency-Key"], "result": {"n": 1},
                                     "exec_ms": 12.5})


def _run(cloud: FakeCloud, body: Callable[[CloudClient], Any], **overrides: Any) -> Any:
    async def main() -> Any:
        client = CloudClient(_settings(**overrides), transport=httpx.MockTransport(cloud))
        try:
            return await body(client)
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_read_timeout_on_the_third_call_is_retried_with_the_same_idempotency_key() -> None:
    def tasks(n: int, request: httpx.Request) -> httpx.Response:
        if n == 3:
            raise httpx.ReadTimeout("no answer", request=request)
        return _ok(request)

    cloud = FakeCloud(tasks)

    async def body(client: CloudClient) -> list[Any]:
        return [await client.submit(task_id, "noise.spectrum", b"\0\0" * 100) for task_id in ("a", "b", "c")]

    results = _run(cloud, body)
    keys = [call.headers["Idempotency-Key"] for call in cloud.task_calls]
    assert keys == ["a", "b", "c", "c"]
    assert [r.attempts for r in results] == [1, 1, 2]
    assert results[2].result == {"n": 1} and results[2].exec_s == pytest.approx(0.0125)
    first = cloud.task_calls[0]
    assert first.headers["X-Task-Kind"] == "noise.spectrum"
    assert first.headers["Authorization"] == "Bearer secret-token"
    assert first.headers["Content-Type"] == "application/octet-stream"
    assert first.content == b"\0\0" * 100
    assert cloud.leases == 1  # one lease reused for all three
    lease_request = cloud.calls[0]
    assert lease_request.url.params["location"] == "aarhus"
    assert orjson.loads(lease_request.content) == {"type": "compute", "quantity": 1}


def test_retry_after_is_waited_for_and_a_longer_one_ends_the_retries() -> None:
    answers = iter([httpx.Response(503, headers={"Retry-After": "1"}, json={"error": "busy", "detail": "later"}),
                    None,
                    httpx.Response(429, headers={"Retry-After": "30"}, json={"error": "busy", "detail": "later"})])

    def tasks(_n: int, request: httpx.Request) -> httpx.Response:
        return next(answers) or _ok(request)

    cloud = FakeCloud(tasks)

    async def body(client: CloudClient) -> tuple[float, TransientCloudError]:
        started = time.monotonic()
        await client.submit("a", "k", b"x")
        waited = time.monotonic() - started
        with pytest.raises(TransientCloudError) as caught:
            await client.submit("b", "k", b"x")
        return waited, caught.value

    waited, error = _run(cloud, body, retry_max_s=5.0)
    assert 1.0 <= waited < 1.5
    # 30 s is beyond retry_max_s: the task is better run locally now than parked for half a minute.
    assert error.status == 429 and error.retry_after == 30.0
    assert len(cloud.task_calls) == 3


def test_transient_failures_are_retried_max_retries_times_then_reported() -> None:
    def tasks(n: int, request: httpx.Request) -> httpx.Response:
        if n <= 2:
            return httpx.Response(502, text="<html>bad gateway</html>")
        raise httpx.ConnectError("refused", request=request)

    cloud = FakeCloud(tasks)

    async def body(client: CloudClient) -> TransientCloudError:
        with pytest.raises(TransientCloudError) as caught:
            await client.submit("a", "k", b"x")
        return caught.value

    error = _run(cloud, body, max_retries=3)
    assert len(cloud.task_calls) == 4  # the first try and three retries
    assert "cannot connect" in str(error)


@pytest.mark.parametrize("status", [400, 401, 404])
def test_permanent_answers_are_never_retried(status: int) -> None:
    cloud = FakeCloud(lambda _n, _r: httpx.Response(status, json={"error": "nope", "detail": "said the server"}))

    async def body(client: CloudClient) -> PermanentCloudError:
        with pytest.raises(PermanentCloudError) as caught:
            await client.submit("a", "k", b"x")
        return caught.value

    error = _run(cloud, body)
    assert error.status == status
    # 404 means the lease is gone: it is replaced once, so the task goes out twice, on two leases.
    assert len(cloud.task_calls) == (2 if status == 404 else 1)
    assert cloud.leases == (2 if status == 404 else 1)


def test_a_rejected_input_is_logged_once_and_does_not_open_the_circuit() -> None:
    cloud = FakeCloud(lambda _n, _r: httpx.Response(400, json={"error": "invalid_payload", "detail": "odd bytes"}))

    async def body(client: CloudClient) -> None:
        for i in range(5):
            with pytest.raises(PermanentCloudError) as caught:
                await client.submit(f"t{i}", "noise.spectrum", b"x")
            assert not caught.value.cloud_fault
        assert client.circuit_state is CircuitState.CLOSED

    with capture_logs() as logs:
        _run(cloud, body, circuit_failures=2)
    rejected = [e for e in logs if e["event"] == "cloud_rejected_task"]
    assert len(rejected) == 1 and rejected[0]["error"] == "invalid_payload" and "odd bytes" in rejected[0]["cause"]


def test_a_gone_lease_is_replaced_once() -> None:
    def tasks(n: int, request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": "released", "detail": "expired"}) if n == 2 else _ok(request)

    cloud = FakeCloud(tasks)

    async def body(client: CloudClient) -> list[str]:
        return [(await client.submit(t, "k", b"x")).lease_id for t in ("a", "b", "c")]

    with capture_logs() as logs:
        leases = _run(cloud, body)
    assert leases == ["lease-1", "lease-2", "lease-2"]
    assert [call.headers["Idempotency-Key"] for call in cloud.task_calls] == ["a", "b", "b", "c"]
    gone = [e for e in logs if e["event"] == "cloud_lease_gone"]
    assert len(gone) == 1 and gone[0]["lease"] == "lease-1"


@pytest.mark.parametrize(
    "answer",
    [
        {"task_id": "a", "result": [1, 2], "exec_ms": 1},
        {"task_id": "a", "result": {}, "exec_ms": -1},
        {"task_id": "a", "result": {}, "exec_ms": True},
        {"task_id": "other", "result": {}, "exec_ms": 1},
        {"result": {}},
        "not an object",
    ],
)
def test_a_malformed_answer_is_a_permanent_cloud_fault(answer: Any) -> None:
    cloud = FakeCloud(lambda _n, _r: httpx.Response(200, json=answer))

    async def body(client: CloudClient) -> PermanentCloudError:
        with pytest.raises(PermanentCloudError) as caught:
            await client.submit("a", "k", b"x")
        return caught.value

    assert _run(cloud, body).cloud_fault


def test_a_lease_stuck_in_provisioning_is_given_up_and_released() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        if request.method == "DELETE":
            return httpx.Response(204)
        return httpx.Response(201 if request.method == "POST" else 200, json=_resource("slow", "provisioning"))

    async def main() -> None:
        client = CloudClient(_settings(provisioning_timeout_s=0.2, poll_interval_s=0.05),
                             transport=httpx.MockTransport(handler))
        with pytest.raises(TransientCloudError, match="not ready"):
            await client.submit("a", "k", b"x")
        await client.aclose()

    asyncio.run(main())
    assert calls[0] == "POST" and calls.count("GET") >= 3 and calls[-1] == "DELETE"


def test_the_circuit_opens_on_connection_failures_and_refuses_without_a_request() -> None:
    calls: list[httpx.Request] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectError("refused", request=request)

    async def main() -> tuple[int, bool]:
        client = CloudClient(_settings(max_retries=0, circuit_failures=2), transport=httpx.MockTransport(refuse))
        for task in ("a", "b"):
            with pytest.raises(TransientCloudError):
                await client.submit(task, "k", b"x")
        before = len(calls)
        with pytest.raises(CircuitOpen):
            await client.submit("c", "k", b"x")
        opened = client.circuit_open(time.monotonic())
        await client.aclose()
        return len(calls) - before, opened

    extra, opened = asyncio.run(main())
    assert extra == 0 and opened


def test_observations_are_reported_and_a_broken_observer_costs_no_result() -> None:
    seen: list[tuple[str, tuple[Any, ...]]] = []

    class Observer:
        def observe_transfer(self, direction: Any, n_bytes: int, seconds: float, now: float) -> None:
            seen.append(("transfer", (direction, n_bytes, seconds)))
            raise RuntimeError("estimator bug")

        def observe_rtt(self, seconds: float, now: float) -> None:
            seen.append(("rtt", (seconds,)))

        def observe_cloud(self, kind: str, in_bytes: int, service_s: float, now: float) -> None:
            seen.append(("cloud", (kind, in_bytes, service_s)))

        def observe_provisioning(self, seconds: float, now: float) -> None:
            seen.append(("provisioning", (seconds,)))

    ticks = iter(range(1000))

    async def main() -> Any:
        # A clock that advances one second per reading makes every duration a known whole number.
        client = CloudClient(_settings(), Observer(), transport=httpx.MockTransport(FakeCloud(lambda _n, r: _ok(r))),
                             clock=lambda: float(next(ticks)))
        try:
            return await client.submit("a", "noise.spectrum", b"\0" * 5000)
        finally:
            await client.aclose()

    with capture_logs() as logs:
        result = asyncio.run(main())
    kinds = [name for name, _ in seen]
    assert kinds == ["rtt", "provisioning", "cloud", "transfer"]
    assert seen[2][1] == ("noise.spectrum", 5000, 0.0125)
    direction, n_bytes, seconds = seen[3][1]
    assert direction == "up" and n_bytes == 5000
    # request 1 s (one clock tick) − exec 0.0125 s − RTT 1 s (the lease request's tick): floored at 0.1 ms
    assert seconds == pytest.approx(1e-4) and result.upload_s == seconds
    assert result.result == {"n": 1}
    assert [e["method"] for e in logs if e["event"] == "cloud_observer_failed"] == ["observe_transfer"]


def test_options_travel_as_json_and_the_client_needs_a_url() -> None:
    cloud = FakeCloud(lambda _n, r: _ok(r))

    async def body(client: CloudClient) -> None:
        await client.submit("a", "noise.spectrum", b"x", {"sample_rate": 8000})
        await client.submit("b", "noise.spectrum", b"x", {})

    _run(cloud, body)
    assert orjson.loads(cloud.task_calls[0].headers["X-Task-Options"]) == {"sample_rate": 8000}
    assert "X-Task-Options" not in cloud.task_calls[1].headers
    with pytest.raises(Exception, match="EDGE_AGENT_CLOUD__URL"):
        CloudClient(CloudSettings())


def test_aclose_releases_the_leases_and_refuses_later_submissions() -> None:
    cloud = FakeCloud(lambda _n, r: _ok(r))

    async def main() -> None:
        client = CloudClient(_settings(), transport=httpx.MockTransport(cloud))
        await client.submit("a", "k", b"x")
        await client.aclose()
        await client.aclose()  # idempotent
        with pytest.raises(PermanentCloudError, match="closed"):
            await client.submit("b", "k", b"x")

    asyncio.run(main())
    assert cloud.count("DELETE") == 1
    assert cloud.calls[-1].url.path == "/api/v1/resources/lease-1"


# ---------------------------------------------------------------------------------------------- upload ends


@pytest.mark.skipif(not uplink.supported(), reason="the kernel send queue is read with Linux's SIOCOUTQ")
def test_upload_watch_charges_concurrent_uploads_their_inter_completion_times() -> None:
    """Two uploads sharing the link from t=0 and t=1, ending at t=3 and t=5: charged 3 − RTT (its busy period
    began idle) and 2 (from the previous end), which add up to the link's busy time less the last ACK's RTT."""
    clock = [0.0]
    ended: list[tuple[str, float, float]] = []
    # AF_UNIX: the sender's queue holds what the peer has not read, so reading "ends" an upload on cue.
    pairs = [socket.socketpair() for _ in range(2)]

    async def main() -> None:
        watch = uplink.UploadWatch(lambda: clock[0], lambda: 0.1,
                                   lambda upload, s, now: ended.append((str(upload.key), s, now)))
        uploads = []
        for i, (mine, _) in enumerate(pairs):
            clock[0] = float(i)
            upload, token = watch.begin(f"u{i}")
            uplink._CURRENT.reset(token)  # as after the request, which here does not run
            upload.sock = mine
            await upload.trace("http11.send_request_body.started", {})
            mine.send(b"x" * 1000)
            await upload.trace("http11.send_request_body.complete", {})
            uploads.append(upload)
        assert not ended  # both still queued in the kernel
        for end, (_, peer) in ((3.0, pairs[0]), (5.0, pairs[1])):
            clock[0] = end
            peer.recv(4096)
            for _ in range(200):
                if len(ended) == int(end) // 2:
                    break
                await asyncio.sleep(uplink.POLL_S)
        await watch.aclose()

    try:
        asyncio.run(main())
    finally:
        for a, b in pairs:
            a.close()
            b.close()
    assert ended == [("u0", pytest.approx(2.9), 3.0), ("u1", pytest.approx(2.0), 5.0)]


def test_without_a_watched_connection_the_upload_is_estimated_from_the_answer() -> None:
    """A transport of its own (here a mock) gives no socket: the upload is reported with the answer, as request
    time − exec_ms − RTT."""
    seen: list[tuple[Any, ...]] = []

    class Observer:
        def observe_transfer(self, direction: str, n_bytes: int, seconds: float, now: float) -> None:
            seen.append(("up", n_bytes))

        def observe_rtt(self, seconds: float, now: float) -> None:
            pass

        def observe_cloud(self, kind: str, in_bytes: int, service_s: float, now: float) -> None:
            seen.append(("cloud", in_bytes))

        def observe_provisioning(self, seconds: float, now: float) -> None:
            pass

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/tasks"):
            return httpx.Response(200, json={"task_id": "t", "result": {}, "exec_ms": 1})
        return httpx.Response(201, json={"id": "r1", "type": "compute", "quantity": 1, "location": "x",
                                         "status": "ready",
                                         "expires_at": (datetime.now(UTC) + timedelta(hours=1)).isoformat()})

    async def main() -> Any:
        client = CloudClient(CloudSettings(url="http://cloud.test"), Observer(),
                             transport=httpx.MockTransport(handler))
        try:
            return await client.submit("t", "noise.spectrum", b"\0" * 100)
        finally:
            await client.aclose()

    result = asyncio.run(main())
    assert not result.upload_seen
    assert seen == [("cloud", 100), ("up", 100)]

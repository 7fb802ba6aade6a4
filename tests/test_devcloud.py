"""The devcloud as a real process, and the cloud client against it: leases, idempotency, auth, throttling,
outages, bandwidth, validation, the exported OpenAPI and a bounded schemathesis run."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydantic import SecretStr
from structlog.testing import capture_logs

import agent.cloud._uplink
from agent.cloud import CircuitOpen, CircuitState, CloudClient, CloudResult, PermanentCloudError, TransientCloudError
from agent.decision import Policy, Task
from agent.devcloud.cli import OPENAPI_PATH, openapi_text

from support import PROVISIONING_S, ROOT, DevCloud, pcm_noise, wait_for, wait_until

# 20 s of 16 kHz mono PCM, as in the end-to-end check: 640,000 bytes.
CLIP = pcm_noise(20.0, seed=7, level=0.06)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevCloud]:
    devcloud = DevCloud(tmp_path_factory.mktemp("devcloud") / "devcloud.log")
    yield devcloud
    devcloud.stop()


@pytest.fixture
def devcloud(server: DevCloud) -> DevCloud:
    server.reset()  # knobs back to the command line's, no leases, no remembered answers, counters at 0
    return server


class Clock:
    """``time.monotonic`` plus what the test moved it on by: the client's cool-downs pass without being waited
    out. (Leases are unaffected by a few seconds: they idle for a minute and live for an hour.)"""

    def __init__(self) -> None:
        self.skew = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.skew

    def advance(self, seconds: float) -> None:
        self.skew += seconds


class Recorder:
    """A CloudObserver that keeps every observation."""

    def __init__(self) -> None:
        self.seen: dict[str, list[tuple[Any, ...]]] = {}

    def _add(self, name: str, *values: Any) -> None:
        self.seen.setdefault(name, []).append(values)

    def observe_transfer(self, direction: Any, n_bytes: int, seconds: float, now: float) -> None:
        self._add("transfer", direction, n_bytes, seconds)

    def observe_rtt(self, seconds: float, now: float) -> None:
        self._add("rtt", seconds)

    def observe_cloud(self, kind: str, in_bytes: int, service_s: float, now: float) -> None:
        self._add("cloud", kind, in_bytes, service_s)

    def observe_provisioning(self, seconds: float, now: float) -> None:
        self._add("provisioning", seconds)


# ---------------------------------------------------------------------------------------------- the API itself


def test_lease_lifecycle_over_raw_http(devcloud: DevCloud) -> None:
    with httpx.Client(base_url=devcloud.url, headers=devcloud.auth) as http:
        created = http.post("/api/v1/resources", params={"location": "aarhus"}, json={"type": "compute", "quantity": 2})
        assert created.status_code == 201
        lease = created.json()
        assert lease["status"] == "provisioning" and lease["quantity"] == 2 and lease["location"] == "aarhus"
        early = http.post(f"/api/v1/resources/{lease['id']}/tasks", content=b"\0\0",
                          headers={"X-Task-Kind": "noise.spectrum", "Idempotency-Key": "early"})
        assert early.status_code == 503 and early.json()["error"] == "not_ready" and early.headers["Retry-After"]
        wait_for(lambda: http.get(f"/api/v1/resources/{lease['id']}").json()["status"] == "ready", 5, "ready")
        answer = http.post(f"/api/v1/resources/{lease['id']}/tasks", content=CLIP,
                           headers={"X-Task-Kind": "noise.spectrum", "Idempotency-Key": "t1",
                                    "X-Task-Options": '{"sample_rate": 16000}'})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["task_id"] == "t1" and body["exec_ms"] > 0 and "leq_db" in str(body["result"]).lower()
        assert http.delete(f"/api/v1/resources/{lease['id']}").status_code == 204
        assert http.get(f"/api/v1/resources/{lease['id']}").json()["status"] == "released"
        gone = http.post(f"/api/v1/resources/{lease['id']}/tasks", content=b"\0\0",
                         headers={"X-Task-Kind": "noise.spectrum", "Idempotency-Key": "t2"})
        assert gone.status_code == 404 and gone.json()["error"] == "released"
        assert http.delete(f"/api/v1/resources/{lease['id']}").status_code == 204  # releasing again is fine
        unknown = http.get("/api/v1/resources/nope")
        assert unknown.status_code == 404 and set(unknown.json()) == {"error", "detail"}


def _ready_lease(http: httpx.Client, quantity: int = 1) -> str:
    lease_id = str(http.post("/api/v1/resources", json={"type": "compute", "quantity": quantity}).json()["id"])
    wait_for(lambda: http.get(f"/api/v1/resources/{lease_id}").json()["status"] == "ready", 5, "ready")
    return lease_id


def test_the_same_idempotency_key_runs_once_even_while_the_first_is_running(devcloud: DevCloud) -> None:
    headers = {"X-Task-Kind": "noise.spectrum", "Idempotency-Key": "same"}
    big = CLIP * 12  # ~4 minutes of audio: its FFT keeps the lease's only slot busy for a while
    with httpx.Client(base_url=devcloud.url, headers=devcloud.auth) as http:
        lease_id = _ready_lease(http, quantity=1)

    async def overlapping() -> tuple[httpx.Response, list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=devcloud.url, headers=devcloud.auth, timeout=30) as http:
            url = f"/api/v1/resources/{lease_id}/tasks"
            blocker = asyncio.create_task(
                http.post(url, content=big, headers={"X-Task-Kind": "noise.spectrum", "Idempotency-Key": "big"}))
            await asyncio.sleep(0.15)  # the big task holds the slot: "same" is still running when repeated
            repeats = await asyncio.gather(*(http.post(url, content=CLIP, headers=headers) for _ in range(3)))
            return await blocker, list(repeats)

    blocker, answers = asyncio.run(overlapping())
    assert blocker.status_code == 200
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert answers[0].json() == answers[1].json() == answers[2].json()
    assert sorted(a.headers.get("Idempotent-Replayed", "") for a in answers) == ["", "true", "true"]
    with httpx.Client(base_url=devcloud.url, headers=devcloud.auth) as http:
        later = http.post(f"/api/v1/resources/{lease_id}/tasks", content=CLIP, headers=headers)
        assert later.json() == answers[0].json() and later.headers["Idempotent-Replayed"] == "true"
        other = http.post(f"/api/v1/resources/{lease_id}/tasks", content=CLIP[:-2], headers=headers)
        assert other.status_code == 400 and other.json()["error"] == "idempotency_key_reused"
    stats = devcloud.stats()
    assert stats["executions"] == {"noise.spectrum": 2}  # "big" and "same", once each
    assert stats["replays"] == 3


@pytest.mark.parametrize(
    ("request_args", "code"),
    [
        ({"json": {"type": "compute", "quantity": 0}}, "invalid_request"),
        ({"json": {"type": "gpu", "quantity": 1}}, "invalid_request"),
        ({"json": {"type": "compute", "quantity": 1, "colour": "red"}}, "invalid_request"),
        ({"json": {"type": "compute"}}, "invalid_request"),
        ({"content": b"{not json", "headers": {"Content-Type": "application/json"}}, "invalid_request"),
    ],
)
def test_bad_lease_requests_are_400_with_the_error_body(devcloud: DevCloud, request_args: dict[str, Any],
                                                        code: str) -> None:
    response = httpx.post(f"{devcloud.url}/api/v1/resources", **{"headers": devcloud.auth, **request_args}
                          | {"headers": {**devcloud.auth, **request_args.get("headers", {})}})
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == code and isinstance(body["detail"], str) and body["detail"]


@pytest.mark.parametrize(
    ("headers", "content", "code"),
    [
        ({"Idempotency-Key": "k"}, b"\0\0", "invalid_request"),  # no X-Task-Kind
        ({"X-Task-Kind": "noise.spectrum"}, b"\0\0", "invalid_request"),  # no Idempotency-Key
        ({"X-Task-Kind": "no.such.task", "Idempotency-Key": "k"}, b"\0\0", "unknown_task"),
        ({"X-Task-Kind": "noise.spectrum", "Idempotency-Key": "k", "X-Task-Options": "[1]"}, b"\0\0",
         "invalid_options"),
        ({"X-Task-Kind": "noise.spectrum", "Idempotency-Key": "k", "X-Task-Options": '{"sample_rate": -1}'},
         b"\0\0", "invalid_options"),
        ({"X-Task-Kind": "noise.spectrum", "Idempotency-Key": "odd"}, b"\0\0\0", "invalid_payload"),
        ({"X-Task-Kind": "sensor.stats", "Idempotency-Key": "json"}, b"{oops", "invalid_json"),
    ],
)
def test_bad_task_submissions_are_400_with_the_error_body(devcloud: DevCloud, headers: dict[str, str],
                                                          content: bytes, code: str) -> None:
    with httpx.Client(base_url=devcloud.url, headers=devcloud.auth) as http:
        lease_id = _ready_lease(http)
        response = http.post(f"/api/v1/resources/{lease_id}/tasks", content=content, headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == code and response.json()["detail"]


def test_a_wrong_token_is_401_even_with_a_large_body(devcloud: DevCloud) -> None:
    with httpx.Client(base_url=devcloud.url) as http:
        missing = http.post("/api/v1/resources", json={"type": "compute", "quantity": 1})
        wrong = http.post("/api/v1/resources/x/tasks", content=CLIP * 4,
                          headers={"Authorization": "Bearer wrong", "X-Task-Kind": "noise.spectrum",
                                   "Idempotency-Key": "k"})
    for response in (missing, wrong):
        assert response.status_code == 401 and response.json()["error"] == "unauthorized"
        assert response.headers["WWW-Authenticate"] == "Bearer"


def test_the_exported_openapi_document_is_current() -> None:
    exported = (ROOT / OPENAPI_PATH).read_text(encoding="utf-8")
    assert exported == openapi_text(), (
        f"{OPENAPI_PATH} is stale; regenerate it with: python -m agent.devcloud --export-openapi {OPENAPI_PATH}")


@pytest.mark.slow  # fuzzing
def test_schemathesis_finds_no_server_error_and_no_schema_violation(devcloud: DevCloud) -> None:
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis.specs.openapi import checks

    schema = schemathesis.openapi.from_path(ROOT / OPENAPI_PATH)
    assert len([result.ok() for result in schema.get_all_operations()]) == 5
    # Valid requests and invalid ones: neither may cause a 5xx or an answer the document does not describe.
    # (Schemathesis' negative_data_rejection is left out: it counts tolerating an unknown query parameter, as
    # HTTP APIs customarily do, as accepting invalid data.)
    strategy = st.one_of(schema.as_strategy(), schema.as_strategy(schemathesis.GenerationMode.NEGATIVE))
    chosen = [schemathesis.checks.not_a_server_error, checks.status_code_conformance,
              checks.content_type_conformance, checks.response_schema_conformance,
              checks.response_headers_conformance]
    with httpx.Client(base_url=devcloud.url, headers=devcloud.auth) as http:
        lease_id = _ready_lease(http, 2)
    calls: list[int] = []

    @given(case=strategy, real_lease=st.booleans())
    @settings(max_examples=80, deadline=None, derandomize=True, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    def run(case: Any, real_lease: bool) -> None:
        if real_lease and "resource_id" in (case.path_parameters or {}):
            case.path_parameters["resource_id"] = lease_id  # not only 404s: also the paths behind a real lease
        response = case.call_and_validate(base_url=devcloud.url, headers=devcloud.auth, checks=chosen)
        calls.append(response.status_code)

    started = time.monotonic()
    run()
    assert time.monotonic() - started < 60
    assert any(200 <= status < 300 for status in calls) and any(status == 400 for status in calls)


# ---------------------------------------------------------------------------------------------- the client against it


def test_client_leases_submits_reuses_and_releases(devcloud: DevCloud) -> None:
    recorder = Recorder()

    async def main() -> tuple[list[CloudResult], Any, Any]:
        client = CloudClient(devcloud.settings(max_quantity=2, lease_idle_s=0.4), recorder)
        try:
            first = await asyncio.gather(*(client.submit(f"a{i}", "noise.spectrum", CLIP) for i in range(3)))
            status = client.lease_status()
            second = await client.submit("b", "noise.spectrum", CLIP)
            # Idle longer than lease_idle_s: the client's upkeep releases it.
            await wait_until(lambda: devcloud.stats()["leases"]["released"] == 1, 10, "the idle lease's release")
            idle = devcloud.stats()["leases"]
            return [*first, second], status, idle
        finally:
            await client.aclose()

    results, status, idle = asyncio.run(main())
    assert len({r.lease_id for r in results}) == 1  # one lease, sized to the burst within max_quantity
    assert status.ready and status.slots == 2
    assert idle == {"provisioning": 0, "ready": 0, "released": 1}
    assert devcloud.stats()["executions_total"] == 4
    (provisioning,) = recorder.seen["provisioning"]
    assert PROVISIONING_S <= provisioning[0] < PROVISIONING_S + 1.0
    assert len(recorder.seen["cloud"]) == 4 and all(s[2] > 0 for s in recorder.seen["cloud"])
    assert all(t[:2] == ("up", len(CLIP)) and t[2] > 0 for t in recorder.seen["transfer"])
    assert recorder.seen["rtt"] and all(0 < r[0] < 1 for r in recorder.seen["rtt"])
    assert [r.result for r in results[:3]] == [results[3].result] * 3  # the same clip, the same spectrum


def test_prewarm_readies_one_lease_that_the_next_task_uses_without_waiting(devcloud: DevCloud) -> None:
    recorder = Recorder()

    async def main() -> tuple[Any, float, str, Any]:
        client = CloudClient(devcloud.settings(lease_idle_s=30.0), recorder)
        try:
            client.prewarm()
            client.prewarm()  # already on its way: no second request
            await wait_until(lambda: client.lease_status().ready, 10, "the prewarmed lease")
            status = client.lease_status()
            started = time.monotonic()
            result = await client.submit("a", "noise.spectrum", CLIP[:3200])
            return status, time.monotonic() - started, result.lease_id, devcloud.stats()["leases"]
        finally:
            await client.aclose()

    status, waited, lease_id, leases = asyncio.run(main())
    assert status.ready and status.slots == 1
    assert waited < PROVISIONING_S  # the task found the lease ready
    assert leases["ready"] == 1 and leases["provisioning"] == 0 and lease_id
    assert len(recorder.seen["provisioning"]) == 1


def test_client_replaces_a_lease_the_cloud_dropped(devcloud: DevCloud) -> None:
    async def main() -> tuple[str, str]:
        client = CloudClient(devcloud.settings())
        try:
            first = await client.submit("a", "noise.spectrum", CLIP[:3200])
            httpx.delete(f"{devcloud.url}/api/v1/resources/{first.lease_id}", headers=devcloud.auth)
            second = await client.submit("b", "noise.spectrum", CLIP[:3200])
            return first.lease_id, second.lease_id
        finally:
            await client.aclose()

    with capture_logs() as logs:
        first, second = asyncio.run(main())
    assert first != second
    assert [e["lease"] for e in logs if e["event"] == "cloud_lease_gone"] == [first]


def test_bad_token_is_logged_once_in_plain_words_and_opens_the_circuit(devcloud: DevCloud) -> None:
    async def main() -> list[type[Exception]]:
        clock = Clock()
        client = CloudClient(devcloud.settings(token=SecretStr("not-the-token")), clock=clock)
        raised: list[type[Exception]] = []
        try:
            for i in range(4):
                try:
                    await client.submit(f"t{i}", "noise.spectrum", CLIP)
                except (PermanentCloudError, CircuitOpen) as exc:
                    raised.append(type(exc))
            assert client.circuit_open(clock())
            clock.advance(1.1)  # the cool-down: one probe goes, is rejected again, no second log line
            with pytest.raises(PermanentCloudError):
                await client.submit("probe", "noise.spectrum", CLIP)
        finally:
            await client.aclose()
        return raised

    with capture_logs() as logs:
        raised = asyncio.run(main())
    assert raised == [PermanentCloudError, CircuitOpen, CircuitOpen, CircuitOpen]
    auth = [e for e in logs if e["event"] == "cloud_auth_rejected"]
    assert len(auth) == 1 and auth[0]["cause"] == "the cloud rejected the token"
    assert "not-the-token" not in repr(logs)
    assert devcloud.stats()["rejections"] == {"unauthorized": 2}


@pytest.mark.slow
def test_429_retry_after_is_honoured(devcloud: DevCloud) -> None:
    async def main() -> tuple[float, CloudResult]:
        client = CloudClient(devcloud.settings())
        try:
            await client.submit("warm", "noise.spectrum", CLIP[:3200])  # the lease is ready
            devcloud.knobs(throttle_next=1, retry_after_s=1)
            started = time.monotonic()
            result = await client.submit("t", "noise.spectrum", CLIP[:3200])
            return time.monotonic() - started, result
        finally:
            await client.aclose()

    waited, result = asyncio.run(main())
    assert result.attempts == 2
    assert 1.0 <= waited < 1.8
    assert devcloud.stats()["rejections"] == {"throttled": 1}


@pytest.mark.slow
def test_retry_after_a_read_timeout_does_not_run_the_task_twice(devcloud: DevCloud) -> None:
    async def main() -> CloudResult:
        client = CloudClient(devcloud.settings(read_timeout_s=0.3, retry_min_s=0.5, retry_max_s=1.0))
        try:
            await client.submit("warm", "noise.spectrum", CLIP[:3200])
            devcloud.knobs(latency_s=1.0)  # the first attempt waits 1 s on the server: longer than the timeout

            async def recover() -> None:
                await asyncio.sleep(0.4)
                await asyncio.to_thread(devcloud.knobs, latency_s=0.0)

            result, _ = await asyncio.gather(client.submit("once", "noise.spectrum", CLIP), recover())
            # The first attempt reaches the task too (after its 1 s of latency), and must find it done or running.
            await wait_until(lambda: devcloud.stats()["replays"] >= 1, 10, "the first attempt to reach the server")
            return result
        finally:
            await client.aclose()

    result = asyncio.run(main())
    assert result.attempts == 2
    stats = devcloud.stats()
    assert stats["executions"] == {"noise.spectrum": 2}  # "warm" and "once", each once
    assert stats["replays"] == 1


def test_outage_opens_the_circuit_then_one_probe_after_the_cooldown_closes_it(devcloud: DevCloud) -> None:
    async def main() -> None:
        clock = Clock()
        client = CloudClient(devcloud.settings(circuit_failures=2, circuit_cooldown_s=1.0, max_retries=1),
                             clock=clock)
        try:
            await client.submit("warm", "noise.spectrum", CLIP[:3200])
            devcloud.knobs(outage=True, retry_after_s=0)
            for task in ("a", "b"):
                with pytest.raises(TransientCloudError) as caught:
                    await client.submit(task, "noise.spectrum", CLIP)
                assert caught.value.status == 503
            assert client.circuit_open(clock())
            requests = devcloud.stats()["requests"]
            with pytest.raises(CircuitOpen):
                await client.submit("c", "noise.spectrum", CLIP)
            assert devcloud.stats()["requests"] == requests  # refused without a request
            clock.advance(1.05)  # the cool-down
            assert not client.circuit_open(clock())
            # The probe fails (still down): the circuit opens again for a full cool-down.
            with pytest.raises(TransientCloudError):
                await client.submit("probe1", "noise.spectrum", CLIP)
            assert client.circuit_open(clock())
            devcloud.knobs(outage=False)
            clock.advance(1.05)
            # Exactly one probe: of two tasks arriving together, one goes and the other stays local.
            outcomes = await asyncio.gather(client.submit("probe2", "noise.spectrum", CLIP[:3200]),
                                            client.submit("other", "noise.spectrum", CLIP[:3200]),
                                            return_exceptions=True)
            assert isinstance(outcomes[0], CloudResult) and isinstance(outcomes[1], CircuitOpen)
            assert client.circuit_state is CircuitState.CLOSED
            await client.submit("after", "noise.spectrum", CLIP[:3200])
        finally:
            await client.aclose()

    with capture_logs() as logs:
        asyncio.run(main())
    events = [e["event"] for e in logs if e["event"].startswith("cloud_circuit")]
    assert events == ["cloud_circuit_open", "cloud_circuit_open", "cloud_circuit_closed"]


@pytest.mark.slow
def test_the_bandwidth_cap_slows_an_upload_measurably(devcloud: DevCloud) -> None:
    async def main() -> tuple[CloudResult, CloudResult]:
        client = CloudClient(devcloud.settings())
        try:
            await client.submit("warm", "noise.spectrum", CLIP)
            free = await client.submit("free", "noise.spectrum", CLIP)
            devcloud.knobs(bandwidth_bytes_per_s=1_000_000)
            capped = await client.submit("capped", "noise.spectrum", CLIP)
            return free, capped
        finally:
            await client.aclose()

    free, capped = asyncio.run(main())
    # 640 kB at 1 MB/s is 0.64 s; uncapped on loopback it is a few milliseconds.
    assert free.upload_s < 0.2
    assert 0.5 < capped.upload_s < 1.5
    assert capped.request_s - free.request_s > 0.4


class TimedPolicy(Policy):
    """A Policy that also keeps when each upload and each cloud result were reported, and what the policy
    counted as still waiting for the uplink right after the upload was reported."""

    def __init__(self) -> None:
        super().__init__()
        self.uploads: list[tuple[int, float, float, int]] = []  # bytes, seconds, when, queued bytes after
        self.results: list[tuple[float, float]] = []  # exec seconds, when

    def observe_transfer(self, direction: Any, n_bytes: int, seconds: float, now: float) -> None:
        super().observe_transfer(direction, n_bytes, seconds, now)
        if direction == "up":
            self.uploads.append((n_bytes, seconds, now, self.snapshot(now)["uplink_queued_bytes"]))

    def observe_cloud(self, kind: str, in_bytes: int, service_s: float, now: float) -> None:
        super().observe_cloud(kind, in_bytes, service_s, now)
        self.results.append((service_s, now))


# 4 MB of PCM at 2 MB/s: a 2 s upload, and a noise spectrum the cloud takes 0.1-0.3 s to compute.
BIG = np.resize(np.frombuffer(CLIP, dtype="<i2"), 2_000_000).tobytes()
CAP = 2_000_000


class Hooked:
    """What ``submit``'s ``on_uploaded`` hook saw: when it was called, and whether the client sees uploads end."""

    def __init__(self) -> None:
        self.calls: list[float] = []
        self.sees_uploads = False


def _capped_submit(devcloud: DevCloud, hooked: Hooked | None = None) -> tuple[TimedPolicy, CloudResult, float]:
    policy = TimedPolicy()
    hook = hooked if hooked is not None else Hooked()

    async def main() -> tuple[CloudResult, float]:
        client = CloudClient(devcloud.settings(read_timeout_s=30.0), policy)
        hook.sees_uploads = client.sees_uploads
        try:
            await client.submit("warm", "noise.spectrum", CLIP[:3200])
            policy.uploads.clear()
            policy.results.clear()
            devcloud.knobs(bandwidth_bytes_per_s=CAP)
            policy.task_started("cloud", Task("noise.spectrum", len(BIG)), time.monotonic())
            result = await client.submit("big", "noise.spectrum", BIG,
                                         on_uploaded=lambda: hook.calls.append(time.monotonic()))
            return result, time.monotonic()
        finally:
            await client.aclose()

    result, answered = asyncio.run(main())
    return policy, result, answered


@pytest.mark.slow
def test_an_upload_is_reported_when_it_ends_not_when_the_answer_comes(devcloud: DevCloud) -> None:
    hooked = Hooked()
    policy, result, answered = _capped_submit(devcloud, hooked)
    expected = len(BIG) / CAP
    [(n_bytes, seconds, reported_at, queued_after)] = policy.uploads
    [(exec_s, result_at)] = policy.results
    assert n_bytes == len(BIG) and result.upload_seen and result.upload_s == seconds
    # The cloud's execution and the answer came after the upload: it was reported before them, and from then on
    # the policy no longer counted the task as waiting for the uplink.
    assert exec_s > 0.02
    assert reported_at < result_at <= answered
    assert queued_after == 0
    # The caller's hook (the dispatcher's upload deadline) heard of it at the same moment, once.
    assert hooked.sees_uploads
    [hook_at] = hooked.calls
    assert reported_at <= hook_at < result_at
    # The bytes over the cap, give or take what the server's buffers took in ahead of the cap (~100 kB here).
    assert 0.75 * expected < seconds < 1.6 * expected, (seconds, expected)
    print(f"upload {seconds:.3f} s for {expected:.3f} s expected, reported {result_at - reported_at:.3f} s "
          f"before the answer (exec {exec_s:.3f} s)")


@pytest.mark.slow
def test_without_the_kernel_queue_the_upload_is_reported_with_the_answer(devcloud: DevCloud,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent.cloud._uplink, "_TIOCOUTQ", None)  # as on a system without SIOCOUTQ
    hooked = Hooked()
    policy, result, answered = _capped_submit(devcloud, hooked)
    expected = len(BIG) / CAP
    [(_, seconds, reported_at, _)] = policy.uploads
    [(exec_s, result_at)] = policy.results
    assert not result.upload_seen and result.upload_s == seconds
    assert result_at <= reported_at <= answered  # with the answer
    # The dispatcher then keeps to the task's own hedge deadline: every upload would look overdue.
    assert not hooked.sees_uploads
    [hook_at] = hooked.calls
    assert reported_at <= hook_at <= answered
    # Estimated from the answer: the request time less exec_ms and the RTT.
    assert seconds == pytest.approx(result.request_s - exec_s, abs=0.05)
    assert 0.75 * expected < seconds < 1.6 * expected, (seconds, expected)


@pytest.mark.slow
def test_a_killed_devcloud_fails_fast_and_opens_the_circuit(tmp_path: Path) -> None:
    doomed = DevCloud(tmp_path / "devcloud.log")

    async def main() -> tuple[list[float], bool]:
        client = CloudClient(doomed.settings(circuit_failures=3, max_retries=2, retry_min_s=0.05,
                                             retry_max_s=0.2, circuit_cooldown_s=30))
        try:
            await client.submit("warm", "noise.spectrum", CLIP[:3200])
            doomed.kill()
            took = []
            for i in range(5):
                started = time.monotonic()
                with pytest.raises((TransientCloudError, CircuitOpen)):
                    await client.submit(f"t{i}", "noise.spectrum", CLIP)
                took.append(time.monotonic() - started)
            return took, client.circuit_open(time.monotonic())
        finally:
            await client.aclose()

    try:
        took, opened = asyncio.run(main())
    finally:
        doomed.stop()
    assert opened
    assert max(took) < 1.0  # connection refused, three tries with ≤ 0.2 s between them
    assert max(took[3:]) < 0.01  # the circuit is open: refused without trying

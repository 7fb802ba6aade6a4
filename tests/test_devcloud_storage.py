"""The resource API's storage resources on the devcloud (``--storage``) and the agent's client for them: what
the API answers and refuses, prefixes that keep resources apart, the quota the store holds each to, release,
and the S3 server process's life."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import signal
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime, parsedate_to_datetime
from pathlib import Path
from typing import Any

import boto3
import httpx
import psutil
import pytest
from botocore.exceptions import ClientError

from agent.archive.objectstore import QUOTA_EXCEEDED, ObjectStore, ObjectStoreError, StorageLocation
from agent.cloud import PermanentCloudError
from agent.cloud._storage import StorageClient

from support import DevCloud, wait_for

RESOURCES = "/api/v1/resources"


@pytest.fixture
def api(storage_devcloud: DevCloud) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=storage_devcloud.url, headers=storage_devcloud.auth) as client:
        yield client
    storage_devcloud.reset()


def s3(location: StorageLocation) -> Any:
    return boto3.client("s3", endpoint_url=location.endpoint, region_name=location.region,
                        aws_access_key_id=location.access_key_id, aws_secret_access_key=location.secret_access_key)


def put(location: StorageLocation, key: str, data: bytes) -> None:
    s3(location).put_object(Bucket=location.bucket, Key=location.prefix + key, Body=data)


def test_a_storage_resource_answers_its_location_and_short_lived_credentials(api: httpx.Client) -> None:
    api.post("/admin/knobs", json={"credentials_ttl_s": 600})
    created = api.post(RESOURCES, json={"type": "storage", "quantity": 20})

    assert created.status_code == 201, created.text
    body = created.json()
    assert body["type"] == "storage" and body["quantity"] == 20 and body["status"] == "ready"
    assert body["expires_at"] is None  # storage stays until released; its credentials expire
    storage = body["storage"]
    assert storage["endpoint"].startswith("http://127.0.0.1:") and storage["prefix"] == f"{body['id']}/"
    credentials = storage["credentials"]
    lifetime = datetime.fromisoformat(credentials["expires_at"]) - parsedate_to_datetime(created.headers["Date"])
    assert 598 <= lifetime.total_seconds() <= 602 and credentials["session_token"] is None

    described = api.get(f"{RESOURCES}/{body['id']}").json()
    assert described["storage"]["credentials"] is None  # secrets only where they are issued
    assert {**described["storage"], "credentials": None} == {**storage, "credentials": None}
    renewed = api.post(f"{RESOURCES}/{body['id']}/credentials")
    assert renewed.status_code == 200 and renewed.json()["access_key_id"] != credentials["access_key_id"]
    assert api.delete(f"{RESOURCES}/{body['id']}").status_code == 204


@pytest.mark.parametrize(("body", "detail"), [
    ({"type": "storage", "quantity": 0}, "body.quantity: Input should be greater than or equal to 1"),
    ({"type": "storage", "quantity": 100_001}, "body.quantity: Input should be less than or equal to 100000"),
    ({"type": "storage"}, "body.quantity: Field required"),
    ({"type": "disk", "quantity": 5}, "body.type: Input should be 'compute' or 'storage'"),
    ({"type": "storage", "quantity": 5, "bucket": "mine"}, "body.bucket: Extra inputs are not permitted"),
    ({"type": "compute", "quantity": 300}, "a compute lease has at most 256 vCPUs"),
])
def test_bad_storage_requests_are_refused_with_a_clear_error(api: httpx.Client, body: dict[str, Any],
                                                             detail: str) -> None:
    answer = api.post(RESOURCES, json=body)
    assert answer.status_code == 400
    assert answer.json()["error"] == "invalid_request" and detail in answer.json()["detail"]


def test_credentials_only_for_a_live_storage_resource(api: httpx.Client) -> None:
    lease = api.post(RESOURCES, json={"type": "compute", "quantity": 1}).json()
    not_storage = api.post(f"{RESOURCES}/{lease['id']}/credentials")
    assert not_storage.status_code == 409 and not_storage.json()["error"] == "not_storage"
    unknown = api.post(f"{RESOURCES}/s-unknown/credentials")
    assert unknown.status_code == 404 and unknown.json()["error"] == "not_found"
    storage = api.post(RESOURCES, json={"type": "storage", "quantity": 1}).json()
    assert api.delete(f"{RESOURCES}/{storage['id']}").status_code == 204
    released = api.post(f"{RESOURCES}/{storage['id']}/credentials")
    assert released.status_code == 404 and released.json()["error"] == "released"
    assert api.get(f"{RESOURCES}/{storage['id']}").json()["status"] == "released"
    assert api.delete(f"{RESOURCES}/{storage['id']}").status_code == 204  # idempotent
    assert api.post(f"{RESOURCES}/{storage['id']}/credentials", headers={"Authorization": "Bearer no"}
                    ).status_code == 401


def test_a_devcloud_without_storage_refuses_storage_requests() -> None:
    # The app in process, without its lifespan: the refusal needs neither workers nor a server process.
    from agent.devcloud.app import DevCloudConfig, create_app

    async def ask() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(DevCloudConfig(token="t")))  # noqa: S106
        async with httpx.AsyncClient(transport=transport, base_url="http://devcloud") as client:
            return await client.post(RESOURCES, json={"type": "storage", "quantity": 1},
                                     headers={"Authorization": "Bearer t"})

    answer = asyncio.run(ask())
    assert answer.status_code == 400 and answer.json()["error"] == "unsupported_type"
    assert "--storage" in answer.json()["detail"]


@pytest.mark.slow  # two resources and four S3 calls; the policy is the devcloud's, not the agent's
def test_each_resource_reaches_its_own_prefix_only(storage_client: StorageClient) -> None:
    first, second = storage_client.request(1), storage_client.request(1)
    mine, theirs = first.location(), second.location()
    put(mine, "traffic/0001.seg", b"first's data")

    with pytest.raises(ClientError) as denied:
        s3(theirs).get_object(Bucket=mine.bucket, Key=mine.prefix + "traffic/0001.seg")
    assert denied.value.response["Error"]["Code"] == "AccessDenied"
    with pytest.raises(ClientError) as denied:
        s3(theirs).put_object(Bucket=mine.bucket, Key=mine.prefix + "traffic/0002.seg", Body=b"intruder")
    assert denied.value.response["Error"]["Code"] == "AccessDenied"
    for resource in (first, second):
        storage_client.release(resource.id)


def test_release_deletes_the_objects_the_incomplete_uploads_and_the_keys(storage_client: StorageClient,
                                                                          tmp_path: Path) -> None:
    resource, witness = storage_client.request(1), storage_client.request(1)
    location = resource.location()
    put(location, "traffic/0001.seg", b"kept until released")
    s3(location).create_multipart_upload(Bucket=location.bucket, Key=location.prefix + "traffic/0002.seg")

    storage_client.release(resource.id)
    storage_client.release(resource.id)  # twice is fine

    # Another resource's credentials may list the bucket (moto cannot restrict a listing to a prefix).
    seen = s3(witness.location())
    assert seen.list_objects_v2(Bucket=location.bucket, Prefix=location.prefix).get("Contents", []) == []
    assert seen.list_multipart_uploads(Bucket=location.bucket, Prefix=location.prefix).get("Uploads", []) == []
    with pytest.raises(ClientError) as refused:
        s3(location).head_bucket(Bucket=location.bucket)
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    with pytest.raises(PermanentCloudError) as gone:
        storage_client.attach(resource.id)
    assert gone.value.code == "released"
    storage_client.release(witness.id)


def test_the_store_holds_a_storage_resource_to_its_quota(storage_devcloud: DevCloud, api: httpx.Client,
                                                         storage_client: StorageClient, tmp_path: Path) -> None:
    api.post("/admin/knobs", json={"storage_gb_bytes": 100_000})  # a "GB" of 100 kB: a quota quick to fill
    resource, neighbour = storage_client.request(1), storage_client.request(1)
    assert api.get(f"{RESOURCES}/{resource.id}").json()["storage"]["quota_bytes"] == 100_000
    location = resource.location()
    client, bucket = s3(location), location.bucket

    def refused(call: Any, **args: Any) -> None:
        with pytest.raises(ClientError) as refusal:
            call(Bucket=bucket, **args)
        error = refusal.value.response
        assert (error["Error"]["Code"], error["ResponseMetadata"]["HTTPStatusCode"]) == ("QuotaExceeded", 403)

    def key(name: str) -> str:
        return location.prefix + name

    client.put_object(Bucket=bucket, Key=key("a"), Body=b"a" * 60_000)
    refused(client.put_object, Key=key("b"), Body=b"b" * 50_000)
    assert client.list_objects_v2(Bucket=bucket, Prefix=location.prefix)["KeyCount"] == 1  # nothing of it stored
    client.put_object(Bucket=bucket, Key=key("a"), Body=b"a" * 90_000)  # a replacement counts what it adds
    # The parts of an incomplete upload count: the room left is 10 kB.
    upload = client.create_multipart_upload(Bucket=bucket, Key=key("m"))["UploadId"]
    refused(client.upload_part, Key=key("m"), UploadId=upload, PartNumber=1, Body=b"m" * 20_000)
    client.upload_part(Bucket=bucket, Key=key("m"), UploadId=upload, PartNumber=1, Body=b"m" * 10_000)
    refused(client.put_object, Key=key("c"), Body=b"c")
    # Full, a write that adds nothing still goes through; the neighbour's room is its own.
    client.copy_object(Bucket=bucket, Key=key("a"), CopySource={"Bucket": bucket, "Key": key("a")},
                       Metadata={"sha256": "x"}, MetadataDirective="REPLACE")
    put(neighbour.location(), "n", b"n" * 90_000)
    # The agent's object store names it, as an error a later call may not meet.
    segment = tmp_path / "one.seg"
    segment.write_bytes(b"s" * 40_000)
    objects = ObjectStore(resource.location)
    with pytest.raises(ObjectStoreError) as full:
        objects.put_file("one.seg", segment, hashlib.sha256(segment.read_bytes()).hexdigest())
    assert full.value.code == QUOTA_EXCEEDED and full.value.retryable and "quota is full" in str(full.value)
    assert objects.last_error is full.value
    # Deleting makes room again.
    client.abort_multipart_upload(Bucket=bucket, Key=key("m"), UploadId=upload)
    client.delete_object(Bucket=bucket, Key=key("a"))
    assert objects.put_file("one.seg", segment, hashlib.sha256(segment.read_bytes()).hexdigest()).size == 40_000
    assert objects.last_error is None


def test_a_chunked_upload_that_states_no_length_is_counted_too(storage_devcloud: DevCloud,
                                                              storage_client: StorageClient) -> None:
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    storage_devcloud.knobs(storage_gb_bytes=1000)
    location = storage_client.request(1).location()

    def put_chunked(name: str, size: int) -> int:
        url = f"{location.endpoint}/{location.bucket}/{location.prefix}{name}"
        signed = AWSRequest(method="PUT", url=url, headers={"x-amz-content-sha256": "UNSIGNED-PAYLOAD",
                                                            "Transfer-Encoding": "chunked"})
        SigV4Auth(Credentials(location.access_key_id, location.secret_access_key), "s3",
                  location.region).add_auth(signed)
        body = iter([b"x" * (size // 2), b"x" * (size - size // 2)])  # no Content-Length: chunked
        return httpx.put(url, content=body, headers=dict(signed.headers.items())).status_code

    assert put_chunked("a", 800) == 200
    assert put_chunked("b", 800) == 403
    assert s3(location).head_object(Bucket=location.bucket, Key=location.prefix + "a")["ContentLength"] == 800


def test_an_agent_attaches_to_its_resource_after_a_restart(storage_devcloud: DevCloud, tmp_path: Path) -> None:
    segment = tmp_path / "0001.seg"
    segment.write_bytes(b"segment bytes" * 1000)
    sealed = hashlib.sha256(segment.read_bytes()).hexdigest()
    with StorageClient(storage_devcloud.settings()) as before:
        resource = before.request(1, idempotency_key="gateway-7-archive")
        assert before.request(1, idempotency_key="gateway-7-archive").id == resource.id  # a lost answer repeated
        ObjectStore(resource.location).put_file("traffic/0001.seg", segment, sealed)

    with StorageClient(storage_devcloud.settings()) as after:  # the restarted agent, with the id it kept
        again = after.attach(resource.id)
        store = ObjectStore(again.location)
        assert b"".join(store.open("traffic/0001.seg")) == segment.read_bytes()
        after.release(resource.id)
        with pytest.raises(PermanentCloudError):
            after.attach("s-never-existed")


@pytest.mark.slow  # a devcloud of its own, whose S3 server is killed
def test_storage_unavailable_when_the_s3_server_is_gone(tmp_path: Path) -> None:
    cloud = DevCloud(tmp_path / "devcloud.log", "--storage", workers=1)
    try:
        with httpx.Client(base_url=cloud.url, headers=cloud.auth) as api:
            made = api.post(RESOURCES, json={"type": "storage", "quantity": 1}).json()
            [s3_server] = [child for child in psutil.Process(cloud.proc.pid).children()  # type: ignore[union-attr]
                           if "agent.devcloud.s3server" in " ".join(child.cmdline())]
            s3_server.kill()
            wait_for(lambda: _gone(s3_server), 10, "the S3 server to die")

            answer = api.post(RESOURCES, json={"type": "storage", "quantity": 1})
            assert answer.status_code == 503 and answer.json()["error"] == "storage_unavailable"
            assert int(answer.headers["Retry-After"]) >= 1
            renew = api.post(f"{RESOURCES}/{made['id']}/credentials")
            assert renew.status_code == 503 and renew.json()["error"] == "storage_unavailable"
            assert api.get("/healthz").status_code == 200  # compute goes on
    finally:
        cloud.stop()


@pytest.mark.slow  # a devcloud of its own, killed
def test_the_s3_server_does_not_outlive_a_killed_devcloud(tmp_path: Path) -> None:
    cloud = DevCloud(tmp_path / "devcloud.log", "--storage", workers=1)
    assert cloud.proc is not None
    try:
        [s3_server] = [child for child in psutil.Process(cloud.proc.pid).children()
                       if "agent.devcloud.s3server" in " ".join(child.cmdline())]
        cloud.proc.send_signal(signal.SIGKILL)  # the devcloud alone, not its process group
        cloud.proc.wait(10)
        wait_for(lambda: _gone(s3_server), 10, "the S3 server to exit")
    finally:
        with contextlib.suppress(ProcessLookupError):
            cloud.stop()


def _gone(process: psutil.Process) -> bool:
    # A dead child its parent has not reaped yet is a zombie: gone for every purpose here.
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow  # fuzzing
def test_schemathesis_finds_no_server_error_and_no_schema_violation_with_storage(
        storage_devcloud: DevCloud, api: httpx.Client) -> None:
    # tests/test_devcloud.py fuzzes a devcloud without storage; this one has it, and real storage ids.
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis.specs.openapi import checks

    from agent.devcloud.cli import OPENAPI_PATH

    from support import ROOT

    schema = schemathesis.openapi.from_path(ROOT / OPENAPI_PATH)
    strategy = st.one_of(schema.as_strategy(), schema.as_strategy(schemathesis.GenerationMode.NEGATIVE))
    chosen = [schemathesis.checks.not_a_server_error, checks.status_code_conformance,
              checks.content_type_conformance, checks.response_schema_conformance,
              checks.response_headers_conformance]
    resource_ids = [api.post(RESOURCES, json={"type": "storage", "quantity": 1}).json()["id"] for _ in range(3)]
    calls: list[tuple[str, int]] = []

    @given(case=strategy, real=st.sampled_from([None, *resource_ids]),
           storage_body=st.booleans())
    @settings(max_examples=60, deadline=None, derandomize=True, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    def run(case: Any, real: str | None, storage_body: bool) -> None:
        if real is not None and "resource_id" in (case.path_parameters or {}):
            case.path_parameters["resource_id"] = real
        if storage_body and case.path == RESOURCES and isinstance(case.body, dict) and "type" in case.body:
            case.body["type"] = "storage"
        response = case.call_and_validate(base_url=storage_devcloud.url, headers=storage_devcloud.auth,
                                          checks=chosen)
        calls.append((f"{case.method} {case.path}", response.status_code))

    run()
    assert ("POST /api/v1/resources", 201) in calls
    assert any("{resource_id}" in path and 200 <= status < 300 for path, status in calls)  # real storage ids


def _answering(server_now: datetime, expires_in_s: float) -> httpx.MockTransport:
    # A stand-in for a server whose clock or Date header is off, which the devcloud cannot be made to have.
    def handle(_request: httpx.Request) -> httpx.Response:
        expires = (server_now + timedelta(seconds=expires_in_s)).isoformat()
        body = {"id": "s-1", "type": "storage", "quantity": 1, "location": "default", "status": "ready",
                "expires_at": None, "storage": {
                    "endpoint": "http://127.0.0.1:9", "bucket": "b", "prefix": "s-1/", "region": "us-east-1",
                    "credentials": {"access_key_id": "AKIA1", "secret_access_key": "secret", "session_token": None,
                                    "expires_at": expires}}}
        return httpx.Response(201, json=body, headers={"Date": format_datetime(server_now, usegmt=True)})

    return httpx.MockTransport(handle)


@pytest.mark.parametrize(("server_offset_s", "date_lag_s", "expected_left_s"), [
    (-3600.0, 0.0, 599.0),   # the gateway's clock is an hour ahead: the server's Date counts, less its resolution
    (3600.0, 0.0, 599.0),    # an hour behind: the same
    (0.0, 5.0, 600.0),       # clocks agree, the Date header lags a busy server: the earlier estimate counts
])
def test_the_credentials_expiry_is_counted_on_the_gateways_clock(server_offset_s: float, date_lag_s: float,
                                                                 expected_left_s: float) -> None:
    from pydantic import SecretStr

    from agent.config import CloudSettings

    now = datetime.now(UTC).replace(microsecond=0)
    server_now = now + timedelta(seconds=server_offset_s)
    settings = CloudSettings(url="http://cloud.invalid", token=SecretStr("t"))
    transport = _answering(server_now - timedelta(seconds=date_lag_s), 600.0 + date_lag_s)
    with StorageClient(settings, transport=transport, clock=lambda: 1000.0) as client:
        location = client.request(1).location()
    assert location.expires_at - 1000.0 == pytest.approx(expected_left_s, abs=1.0)

"""The archive's object store against the devcloud's real S3 server (moto in server mode, IAM auth on):
round trips, checksums the server verifies, a SIGKILL during a multipart upload, credentials that expire, a
quota that is full."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError

from agent.archive.objectstore import QUOTA_EXCEEDED, ObjectStore, ObjectStoreError, StorageLocation
from agent.cloud._storage import StorageClient, StorageResource

from support import ROOT, DevCloud, wait_for

MiB = 1024 * 1024


def make_file(path: Path, size: int) -> str:
    path.write_bytes(os.urandom(size))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def raw_client(location: StorageLocation):  # type: ignore[no-untyped-def]
    """A plain boto3 client with exactly these credentials (no refresh): what the server says of them."""
    return boto3.client("s3", endpoint_url=location.endpoint, region_name=location.region,
                        aws_access_key_id=location.access_key_id, aws_secret_access_key=location.secret_access_key)


def test_round_trip_single_and_multipart(object_store: ObjectStore, tmp_path: Path) -> None:
    small, large = tmp_path / "small.seg", tmp_path / "large.seg"
    small_sum, large_sum = make_file(small, 100_000), make_file(large, 11 * MiB)  # one PUT; three parts
    parts: list[tuple[int, int]] = []

    assert object_store.put_file("traffic/0001.seg", small, small_sum).sha256 == small_sum
    stored = object_store.put_file("traffic/0002.seg", large, large_sum, on_part=lambda n, b: parts.append((n, b)))

    assert stored.size == 11 * MiB and parts == [(1, 5 * MiB), (2, 10 * MiB), (3, 11 * MiB)]
    assert object_store.head("traffic/0002.seg") == stored
    assert object_store.head("traffic/0003.seg") is None
    assert b"".join(object_store.open("traffic/0001.seg")) == small.read_bytes()
    assert b"".join(object_store.open("traffic/0002.seg")) == large.read_bytes()
    assert [(o.key, o.size, o.sha256) for o in object_store.list("traffic/")] == [
        ("traffic/0001.seg", 100_000, ""), ("traffic/0002.seg", 11 * MiB, "")]
    assert [o.sha256 for o in object_store.list(checksums=True)] == [small_sum, large_sum]
    assert object_store.list("noise/") == []

    object_store.delete("traffic/0001.seg")
    object_store.delete("traffic/0001.seg")  # idempotent
    assert [o.key for o in object_store.list()] == ["traffic/0002.seg"]
    with pytest.raises(ObjectStoreError) as missing:
        b"".join(object_store.open("traffic/0001.seg"))
    assert missing.value.code == "not_found" and not missing.value.retryable


def test_the_server_refuses_a_checksum_that_does_not_match(object_store: ObjectStore, tmp_path: Path) -> None:
    segment = tmp_path / "0001.seg"
    sealed = make_file(segment, 50_000)
    with segment.open("r+b") as file:  # a bit flipped on disk after sealing
        file.seek(1000)
        byte = file.read(1)
        file.seek(1000)
        file.write(bytes([byte[0] ^ 1]))

    with pytest.raises(ObjectStoreError) as refused:
        object_store.put_file("traffic/0001.seg", segment, sealed)

    assert refused.value.code == "checksum_mismatch" and not refused.value.retryable
    assert "BadDigest" in str(refused.value)  # the server's verdict, not ours
    assert object_store.head("traffic/0001.seg") is None


def test_a_multipart_upload_of_the_wrong_bytes_is_aborted(object_store: ObjectStore, tmp_path: Path) -> None:
    segment = tmp_path / "big.seg"
    make_file(segment, 7 * MiB)

    with pytest.raises(ObjectStoreError) as refused:
        object_store.put_file("traffic/big.seg", segment, "0" * 64)

    assert refused.value.code == "checksum_mismatch"
    assert object_store.head("traffic/big.seg") is None
    assert object_store.list_incomplete_uploads() == []  # the parts went with the abort


@pytest.mark.parametrize("resume", [False, True])  # a resumable upload is not kept either: it holds the room
def test_a_multipart_upload_past_the_quota_is_refused_and_aborted(storage_devcloud: DevCloud,
                                                                   storage_client: StorageClient,
                                                                   tmp_path: Path, resume: bool) -> None:
    storage_devcloud.knobs(storage_gb_bytes=8 * MiB)  # room for one part of 5 MiB, not two
    resource = storage_client.request(1)
    objects = ObjectStore(resource.location, multipart_threshold=6 * MiB, part_size=5 * MiB)
    large = tmp_path / "large.seg"
    digest = make_file(large, 11 * MiB)
    with pytest.raises(ObjectStoreError) as full:
        objects.put_file("traffic/0001.seg", large, digest, resume=resume)
    assert full.value.code == QUOTA_EXCEEDED and full.value.retryable
    # The first part went in and was freed with the upload: nothing left holds the quota or shows.
    assert objects.list_incomplete_uploads() == [] and objects.list() == []
    small = tmp_path / "small.seg"
    assert objects.put_file("traffic/0002.seg", small, make_file(small, 4 * MiB)).size == 4 * MiB
    storage_client.release(resource.id)


@pytest.mark.slow  # the server's part check; put_file's own parts are quick-tested
def test_a_part_whose_checksum_does_not_match_is_refused_by_the_server(storage: StorageResource) -> None:
    location = storage.location()
    client = raw_client(location)
    key = f"{location.prefix}traffic/part.seg"
    upload = client.create_multipart_upload(Bucket=location.bucket, Key=key, ChecksumAlgorithm="SHA256")
    wrong = hashlib.sha256(b"other bytes").digest()
    with pytest.raises(ClientError) as refused:
        client.upload_part(Bucket=location.bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1,
                           Body=b"x" * 1000, ChecksumSHA256=base64.b64encode(wrong).decode())
    assert refused.value.response["Error"]["Code"] == "BadDigest"
    client.abort_multipart_upload(Bucket=location.bucket, Key=key, UploadId=upload["UploadId"])


UPLOADER = """
import json, sys
from pathlib import Path
from agent.archive.objectstore import ObjectStore, StorageLocation

location = StorageLocation(**json.loads(sys.argv[1]))
store = ObjectStore(lambda: location, multipart_threshold=6 * 2**20, part_size=5 * 2**20)

def on_part(number, sent):
    print(f"part {number}", flush=True)
    if number == 2:
        sys.stdin.read()  # hold the upload open until the test kills this process

store.put_file("traffic/0009.seg", Path(sys.argv[2]), sys.argv[3], on_part=on_part)
"""


@pytest.mark.slow  # a second process and 16 MiB through the S3 server
def test_sigkill_during_an_upload_leaves_nothing_visible_and_the_restart_aborts_it(
        storage: StorageResource, object_store: ObjectStore, tmp_path: Path) -> None:
    segment = tmp_path / "0009.seg"
    sealed = make_file(segment, 16 * MiB)
    location = storage.location()
    with subprocess.Popen([sys.executable, "-c", UPLOADER, json.dumps(asdict(location)), str(segment), sealed],
                          cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as uploader:
        try:
            assert uploader.stdout is not None
            assert uploader.stdout.readline().strip() == "part 1"
            assert uploader.stdout.readline().strip() == "part 2"  # the store holds two parts of four
            uploader.send_signal(signal.SIGKILL)  # the power cut
            assert uploader.wait(10) == -signal.SIGKILL
        finally:
            if uploader.poll() is None:
                uploader.kill()

    assert object_store.head("traffic/0009.seg") is None
    assert object_store.list() == []
    [orphan] = object_store.list_incomplete_uploads()  # what the restarted agent finds
    assert orphan.key == "traffic/0009.seg" and orphan.initiated <= time.time()
    assert object_store.abort_incomplete_uploads() == [orphan]
    assert object_store.list_incomplete_uploads() == []
    object_store.abort_incomplete_upload(orphan)  # twice is fine

    # The upload starts over and completes.
    assert object_store.put_file("traffic/0009.seg", segment, sealed).sha256 == sealed
    assert object_store.list_incomplete_uploads() == []


def _killed_after_two_parts(location: StorageLocation, segment: Path, sealed: str) -> None:
    with subprocess.Popen([sys.executable, "-c", UPLOADER, json.dumps(asdict(location)), str(segment), sealed],
                          cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as uploader:
        try:
            assert uploader.stdout is not None
            assert [uploader.stdout.readline().strip() for _ in range(2)] == ["part 1", "part 2"]
            uploader.send_signal(signal.SIGKILL)
            assert uploader.wait(10) == -signal.SIGKILL
        finally:
            if uploader.poll() is None:
                uploader.kill()


@pytest.mark.slow  # a second process and 16 MiB through the S3 server
def test_an_upload_a_sigkill_cut_short_resumes_with_the_parts_it_lacks(
        storage: StorageResource, object_store: ObjectStore, tmp_path: Path) -> None:
    segment = tmp_path / "0009.seg"
    sealed = make_file(segment, 16 * MiB)
    _killed_after_two_parts(storage.location(), segment, sealed)
    sent: list[int] = []

    stored = object_store.put_file("traffic/0009.seg", segment, sealed, resume=True,
                                   on_part=lambda number, _bytes: sent.append(number))

    assert sent == [3, 4]  # parts 1 and 2 were already in the store, with the same bytes
    assert stored.sha256 == sealed and object_store.head("traffic/0009.seg") == stored
    assert b"".join(object_store.open("traffic/0009.seg")) == segment.read_bytes()
    assert object_store.list_incomplete_uploads() == []


@pytest.mark.slow  # a second process and 16 MiB through the S3 server
def test_a_resumed_upload_sends_again_the_parts_whose_bytes_differ(
        storage: StorageResource, object_store: ObjectStore, tmp_path: Path) -> None:
    segment = tmp_path / "0009.seg"
    _killed_after_two_parts(storage.location(), segment, make_file(segment, 16 * MiB))
    with segment.open("r+b") as file:  # the file under that key is another one now (re-sealed)
        file.seek(MiB)
        file.write(b"different")
    resealed = hashlib.sha256(segment.read_bytes()).hexdigest()
    sent: list[int] = []

    object_store.put_file("traffic/0009.seg", segment, resealed, resume=True,
                          on_part=lambda number, _bytes: sent.append(number))

    assert sent == [1, 3, 4]  # part 2 still matched
    assert b"".join(object_store.open("traffic/0009.seg")) == segment.read_bytes()


@pytest.mark.slow  # waits out the credentials' lifetime (8 s)
def test_credentials_are_refreshed_before_they_expire_and_the_server_refuses_expired_ones(
        storage_devcloud: DevCloud, storage_client: StorageClient, tmp_path: Path) -> None:
    storage_devcloud.knobs(credentials_ttl_s=8.0)
    resource = storage_client.request(1)
    handed_out: list[StorageLocation] = []

    def location() -> StorageLocation:
        handed_out.append(resource.location())
        return handed_out[-1]

    store = ObjectStore(location, refresh_before_s=5.0)
    segment = tmp_path / "0001.seg"
    sealed = make_file(segment, 10_000)
    store.put_file("traffic/0001.seg", segment, sealed)
    first = handed_out[0]
    assert first.expires_at - time.time() < 8.0  # counted on our clock, less the Date header's resolution

    wait_for(lambda: time.time() >= first.expires_at - 5.0, 10, "the refresh margin to start")
    assert store.head("traffic/0001.seg") is not None
    assert time.time() < first.expires_at  # replaced before they expired, not after a refusal
    assert store.location.access_key_id != first.access_key_id == handed_out[0].access_key_id

    # The devcloud deletes the first key once its time is up; from then on the server refuses it.
    old = raw_client(first)

    def refused() -> bool:
        try:
            old.head_bucket(Bucket=first.bucket)
        except ClientError as exc:
            return exc.response["ResponseMetadata"]["HTTPStatusCode"] == 403
        return False

    wait_for(refused, 10, "the server to refuse the expired key")
    with pytest.raises(ClientError) as denied:
        old.list_objects_v2(Bucket=first.bucket, Prefix=first.prefix)
    assert denied.value.response["Error"]["Code"] == "InvalidAccessKeyId"
    assert b"".join(store.open("traffic/0001.seg")) == segment.read_bytes()  # the new key still works
    storage_client.release(resource.id)


def test_credentials_the_server_refuses_early_are_replaced_once(storage: StorageResource, tmp_path: Path) -> None:
    # A key revoked before its stated expiry: the store asks for new credentials and repeats the call once.
    revoked = storage.location()
    for _ in range(2):  # IAM keeps two keys per user: two more requests delete the first
        storage.location()
    sources = iter([replace(revoked, expires_at=time.time() + 3600), storage.location()])
    store = ObjectStore(lambda: next(sources))
    segment = tmp_path / "0001.seg"
    sealed = make_file(segment, 1000)

    assert store.put_file("traffic/0001.seg", segment, sealed).sha256 == sealed
    assert store.location.access_key_id != revoked.access_key_id


def test_a_location_that_cannot_be_had_is_a_retryable_error(tmp_path: Path) -> None:
    def unavailable() -> StorageLocation:
        raise ConnectionError("the resource API is down")

    with pytest.raises(ObjectStoreError) as error:
        ObjectStore(unavailable).head("traffic/0001.seg")
    assert error.value.retryable and error.value.code == "location_unavailable"


@pytest.mark.slow  # botocore's own retries with backoff first
def test_an_unreachable_store_is_a_retryable_error(storage: StorageResource, tmp_path: Path) -> None:
    from support import free_port

    location = replace(storage.location(), endpoint=f"http://127.0.0.1:{free_port()}")
    store = ObjectStore(lambda: location, connect_timeout_s=1.0)
    segment = tmp_path / "0001.seg"
    with pytest.raises(ObjectStoreError) as error:
        store.put_file("traffic/0001.seg", segment, make_file(segment, 100))
    assert error.value.retryable and error.value.code == "unavailable"


def test_the_secret_is_not_in_the_locations_repr(storage: StorageResource) -> None:
    location = storage.location()
    assert location.secret_access_key not in repr(location)

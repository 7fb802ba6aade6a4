"""The devcloud's storage resources: a prefix of one bucket on the S3 server process, reached with short-lived keys.

Each storage resource is an IAM user on the S3 server (agent/devcloud/s3server.py) whose policy allows objects
under its own prefix only, and whose access keys live ``credentials_ttl_s``: when a key's time is up the
devcloud deletes it, and the S3 server refuses it from then on (``InvalidAccessKeyId``), as a real cloud's
temporary credentials stop working. A client asks for new keys before its expire
(``POST /api/v1/resources/{id}/credentials``). IAM allows two keys per user: a third request replaces the oldest.
Releasing a resource deletes its objects, its incomplete uploads, its keys and its user.

A resource holds at most its ``quantity`` GB (of ``gb_bytes`` bytes each: the devcloud's ``storage_gb_bytes``
knob, a billion unless a test makes a quota quick to fill): the S3 server refuses a write beyond it with 403
``QuotaExceeded`` (agent/devcloud/s3server.py says why the store, not the credentials, enforces it).

Everything here blocks on HTTP calls to the S3 server: the app calls it with ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from agent.devcloud.s3server import QUOTA_PATH
from agent.telemetry import get_logger

if TYPE_CHECKING:
    from types_boto3_iam.client import IAMClient
    from types_boto3_s3.client import S3Client

log = get_logger("agent.devcloud.storage")

BUCKET = "edge-archive"
START_TIMEOUT_S = 60.0
KEYS_PER_USER = 2  # IAM's limit, which moto enforces too
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # a server on loopback: never a proxy


class StorageUnavailable(Exception):
    """The S3 server is not running (it exited or never started)."""


@dataclass(frozen=True, slots=True)
class S3Admin:
    """The S3 server's endpoint and its administrator's key, from its readiness line."""

    endpoint: str
    region: str
    access_key_id: str
    secret_access_key: str
    quota_token: str  # for the S3 server's /_devcloud/quotas


@dataclass(frozen=True, slots=True)
class Credentials:
    access_key_id: str
    secret_access_key: str
    expires_at: float  # Unix time


@dataclass(slots=True, eq=False)
class StorageResource:
    id: str
    quantity_gb: int
    location: str
    prefix: str
    user: str
    quota_bytes: int
    keys: list[Credentials] = field(default_factory=list)
    released_at: float | None = None  # monotonic


class S3Process:
    """``python -m agent.devcloud.s3server`` as a child process. Its stdin stays open while the devcloud lives:
    a devcloud killed outright closes it, and the S3 server exits instead of outliving it."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.admin: S3Admin | None = None

    async def start(self) -> S3Admin:
        self.proc = subprocess.Popen([sys.executable, "-m", "agent.devcloud.s3server", "--host", "127.0.0.1"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=environ_without_aws())
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), START_TIMEOUT_S)
            ready = json.loads(line)
        except (TimeoutError, ValueError) as exc:
            self.stop()
            raise StorageUnavailable(f"the S3 server did not start: {exc!r}") from exc
        self.admin = S3Admin(ready["endpoint"], ready["region"], ready["access_key_id"], ready["secret_access_key"],
                             ready["quota_token"])
        return self.admin

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
        finally:
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()


class StorageResources:
    """Storage resources on one S3 server, with the administrator's clients."""

    def __init__(self, server: S3Process, admin: S3Admin, *, clock: Callable[[], float] = time.time) -> None:
        import boto3

        self._server = server
        self.admin = admin
        self.clock = clock
        self._lock = threading.Lock()
        self._by_id: dict[str, StorageResource] = {}
        session = boto3.session.Session(aws_access_key_id=admin.access_key_id,
                                        aws_secret_access_key=admin.secret_access_key, region_name=admin.region)
        self._iam: IAMClient = session.client("iam", endpoint_url=admin.endpoint)
        self._s3: S3Client = session.client("s3", endpoint_url=admin.endpoint)
        self._s3.create_bucket(Bucket=BUCKET)

    @property
    def running(self) -> bool:
        return self._server.running

    def get(self, resource_id: str) -> StorageResource | None:
        return self._by_id.get(resource_id)

    def create(self, quantity_gb: int, location: str, ttl_s: float,
               gb_bytes: int = 10**9) -> tuple[StorageResource, Credentials]:
        with self._reaching():
            return self._create(quantity_gb, location, ttl_s, gb_bytes)

    def _create(self, quantity_gb: int, location: str, ttl_s: float,
                gb_bytes: int) -> tuple[StorageResource, Credentials]:
        resource_id = f"s-{uuid.uuid4().hex}"
        resource = StorageResource(resource_id, quantity_gb, location, prefix=f"{resource_id}/",
                                   user=f"edge-{resource_id}", quota_bytes=quantity_gb * gb_bytes)
        self._quota(resource.prefix, resource.quota_bytes)  # before any key exists: no write escapes it
        self._iam.create_user(UserName=resource.user)
        self._iam.put_user_policy(UserName=resource.user, PolicyName="own-prefix",
                                  PolicyDocument=json.dumps(_policy(resource.prefix)))
        with self._lock:
            self._by_id[resource_id] = resource
        return resource, self.new_credentials(resource, ttl_s)

    def new_credentials(self, resource: StorageResource, ttl_s: float) -> Credentials:
        with self._reaching(), self._lock:
            while len(resource.keys) >= KEYS_PER_USER:
                self._delete_key(resource, resource.keys[0])
            key = self._iam.create_access_key(UserName=resource.user)["AccessKey"]
            credentials = Credentials(key["AccessKeyId"], key["SecretAccessKey"], self.clock() + ttl_s)
            resource.keys.append(credentials)
            return credentials

    def next_expiry(self) -> float | None:
        with self._lock:
            return min((key.expires_at for res in self._by_id.values() for key in res.keys), default=None)

    def expire(self) -> int:
        """Delete every key whose time is up; the number deleted."""
        now = self.clock()
        deleted = 0
        with self._lock:
            for resource in self._by_id.values():
                for key in [key for key in resource.keys if key.expires_at <= now]:
                    self._delete_key(resource, key)
                    deleted += 1
        return deleted

    def release(self, resource: StorageResource) -> None:
        """Delete the resource's objects, incomplete uploads, keys and user (idempotent)."""
        if resource.released_at is not None:
            return
        with self._reaching():
            self._release(resource)

    def _release(self, resource: StorageResource) -> None:
        paginator = self._s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=BUCKET, Prefix=resource.prefix):
            items = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if items:
                self._s3.delete_objects(Bucket=BUCKET, Delete={"Objects": items})  # type: ignore[typeddict-item]
        uploads = self._s3.list_multipart_uploads(Bucket=BUCKET, Prefix=resource.prefix).get("Uploads", [])
        for upload in uploads:
            self._s3.abort_multipart_upload(Bucket=BUCKET, Key=upload["Key"], UploadId=upload["UploadId"])
        with self._lock:
            for key in list(resource.keys):
                self._delete_key(resource, key)
            self._iam.delete_user_policy(UserName=resource.user, PolicyName="own-prefix")
            self._iam.delete_user(UserName=resource.user)
            resource.released_at = time.monotonic()
        self._quota(resource.prefix, None)

    def used_bytes(self, resource: StorageResource) -> int:
        """What the resource's objects and incomplete uploads hold now, as its quota counts them."""
        with self._reaching():
            query = urllib.parse.urlencode({"bucket": BUCKET, "prefix": resource.prefix})
            return int(self._quota_call("GET", f"?{query}", None)["used_bytes"])

    def _quota(self, prefix: str, limit: int | None) -> None:
        self._quota_call("PUT", "", {"bucket": BUCKET, "prefix": prefix, "bytes": limit})

    def _quota_call(self, method: str, query: str, body: dict[str, Any] | None) -> dict[str, Any]:
        request = urllib.request.Request(  # noqa: S310 - the devcloud's own S3 server
            f"{self.admin.endpoint}{QUOTA_PATH}{query}", method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.admin.quota_token}", "Content-Type": "application/json"})
        try:
            with _DIRECT.open(request, timeout=10) as answer:
                result: dict[str, Any] = json.loads(answer.read())
        except OSError as exc:  # refused, reset, timed out, or an HTTP error (urllib's are OSErrors too)
            raise StorageUnavailable(f"the S3 server's quotas cannot be reached: {exc}") from exc
        return result

    def summary(self) -> dict[str, int]:
        with self._lock:
            live = [res for res in self._by_id.values() if res.released_at is None]
            return {"resources": len(live), "keys": sum(len(res.keys) for res in live)}

    def _delete_key(self, resource: StorageResource, key: Credentials) -> None:
        self._iam.delete_access_key(UserName=resource.user, AccessKeyId=key.access_key_id)
        resource.keys.remove(key)
        log.info("devcloud_storage_key_deleted", resource=resource.id, key=key.access_key_id,
                 expired=key.expires_at <= self.clock())

    def _check_running(self) -> None:
        if not self._server.running:
            raise StorageUnavailable("the S3 server is not running")

    @contextlib.contextmanager
    def _reaching(self) -> Iterator[None]:
        """The S3 server checked before a call, and a connection it breaks mapped to :class:`StorageUnavailable`
        (it may die between the check and the call)."""
        from botocore.exceptions import BotoCoreError

        self._check_running()
        try:
            yield
        except BotoCoreError as exc:
            raise StorageUnavailable(f"the S3 server cannot be reached: {exc}") from exc


def _policy(prefix: str) -> dict[str, Any]:
    # Objects under the resource's own prefix only. Bucket-level calls (the listings) are allowed on the
    # bucket: moto does not evaluate the s3:prefix condition a real cloud would add to them.
    return {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "s3:*", "Resource": [f"arn:aws:s3:::{BUCKET}/{prefix}*"]},
        {"Effect": "Allow", "Action": "s3:*", "Resource": [f"arn:aws:s3:::{BUCKET}"]},
    ]}


async def expire_keys(storage: StorageResources) -> None:
    """Delete keys as their time comes (the app runs this while it serves); wakes at the next expiry."""
    while True:
        next_at = storage.next_expiry()
        wait = 1.0 if next_at is None else min(1.0, max(0.0, next_at - storage.clock()))
        await asyncio.sleep(wait)
        try:
            await asyncio.to_thread(storage.expire)
        except Exception as exc:  # noqa: BLE001 - the S3 server may be gone; the next round tries again
            log.warning("devcloud_storage_expiry_failed", error=f"{type(exc).__name__}: {exc}")


def utc(unix: float) -> datetime:
    return datetime.fromtimestamp(unix, UTC)


def environ_without_aws() -> dict[str, str]:
    """The S3 server's environment: none of the caller's AWS settings (a profile or region would leak in)."""
    return {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}

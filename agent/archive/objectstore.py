"""The archive's cloud side: an S3-compatible object store reached with short-lived credentials.

    AgentError
    └── ObjectStoreError     an object-store call failed; ``retryable`` says whether the same call may succeed
                             later (network, 5xx, credentials being replaced) or never will (a checksum the store
                             refused, a missing bucket, a refused request); ``code`` is the store's error code

Every upload carries the caller's SHA-256 of the file and the store verifies it: a small file goes in one
``PutObject`` with ``x-amz-checksum-sha256`` (the store refuses a body whose hash differs, and a single PUT is
never visible half-written); a large one in a multipart upload whose parts each carry their own verified
SHA-256, completed only once the whole file hashed to the caller's value, and aborted on any failure. An upload
cut short by a crash leaves an incomplete multipart upload, invisible to readers, which
:meth:`ObjectStore.list_incomplete_uploads` finds and :meth:`ObjectStore.abort_incomplete_upload` removes after a
restart, or which ``put_file(..., resume=True)`` continues, sending only the parts the crash cut short. The
file's SHA-256 is also kept as the object's metadata (``sha256``), so :meth:`ObjectStore.head` and
:meth:`ObjectStore.open` can check what comes back.

The client is boto3: it speaks every S3 call used here, including the ones crash cleanup needs
(ListMultipartUploads, AbortMultipartUpload), session tokens and caller-supplied checksums. It is the heaviest
of the candidates in memory (about 40 MB once a client exists), so it is imported on first use only: an agent
whose archive never goes to the cloud never loads it.

Synchronous and thread-safe: the archive calls it from a worker thread.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from agent.errors import AgentError

if TYPE_CHECKING:
    from types_boto3_s3.client import S3Client

T = TypeVar("T")

# Single PUT up to this size: atomic and verified as a whole. S3 allows 5 GiB, but a failed PUT starts over,
# so above this the upload goes in parts. Parts must be ≥ 5 MiB except the last (S3's rule).
MULTIPART_THRESHOLD = 16 * 1024 * 1024
PART_SIZE = 8 * 1024 * 1024
MIN_PART_SIZE = 5 * 1024 * 1024
READ_CHUNK = 64 * 1024
SHA256_METADATA = "sha256"

# Error codes of S3 and S3-compatible stores, by what they mean for a retry.
_CHECKSUM_CODES = frozenset({"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"})
_CREDENTIAL_CODES = frozenset({"InvalidAccessKeyId", "ExpiredToken", "InvalidToken", "SignatureDoesNotMatch",
                               "TokenRefreshRequired", "AccessDenied", "403"})
_RETRYABLE_CODES = frozenset({"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout",
                              "RequestTimeTooSkewed", "500", "502", "503", "504"})
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


@dataclass(frozen=True, slots=True)
class StorageLocation:
    """Where a storage resource lives and the credentials to reach it, as the resource API answers them."""

    resource_id: str
    endpoint: str          # e.g. "http://127.0.0.1:PORT"
    bucket: str
    prefix: str            # every key below is relative to this
    region: str
    access_key_id: str
    secret_access_key: str
    session_token: str | None
    expires_at: float      # Unix time the credentials stop working

    def __repr__(self) -> str:  # the secret must never reach a log line
        return (f"StorageLocation(resource_id={self.resource_id!r}, endpoint={self.endpoint!r}, "
                f"bucket={self.bucket!r}, prefix={self.prefix!r}, expires_at={self.expires_at!r})")


@dataclass(frozen=True, slots=True)
class StoredObject:
    """An object as the store holds it; ``sha256`` (hex) is ``""`` when a listing did not fetch it."""

    key: str
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class IncompleteUpload:
    """A multipart upload that was started and neither completed nor aborted (a crash during an upload)."""

    key: str
    upload_id: str
    initiated: float  # Unix time


class ObjectStoreError(AgentError):
    """An object-store call failed. ``retryable``: the same call may succeed later; ``code``: the store's code."""

    def __init__(self, message: str, *, retryable: bool, code: str | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.code = code


class ObjectStore:
    """Objects under one storage location's bucket and prefix.

    ``location()`` is called at first use and again once the credentials are within ``refresh_before_s`` of
    their ``expires_at`` (and once more if the store refuses them anyway); it may block (an HTTP call to the
    resource API) and may raise, which surfaces as a retryable :class:`ObjectStoreError`.
    """

    def __init__(self, location: Callable[[], StorageLocation], *, refresh_before_s: float = 60.0,
                 clock: Callable[[], float] = time.time, multipart_threshold: int = MULTIPART_THRESHOLD,
                 part_size: int = PART_SIZE, connect_timeout_s: float = 10.0, read_timeout_s: float = 60.0) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3's smallest part)")
        self._location_source = location
        self._refresh_before_s = refresh_before_s
        self._clock = clock
        self._multipart_threshold = multipart_threshold
        self._part_size = part_size
        self._timeouts = (connect_timeout_s, read_timeout_s)
        self._lock = threading.Lock()
        self._location: StorageLocation | None = None
        self._client: S3Client | None = None

    # ------------------------------------------------------------------ credentials and the client

    @property
    def location(self) -> StorageLocation:
        """The current location (fetching it if none yet)."""
        return self._current()[0]

    def refresh(self) -> StorageLocation:
        """Fetch the location again now (new credentials), whatever their expiry."""
        with self._lock:
            self._replace_locked()
            assert self._location is not None
            return self._location

    def _current(self) -> tuple[StorageLocation, S3Client]:
        with self._lock:
            if (self._location is None
                    or self._clock() >= self._location.expires_at - self._refresh_before_s):
                self._replace_locked()
            elif self._client is None:  # closed: the credentials are still good
                self._client = _make_client(self._location, self._timeouts)
            assert self._location is not None and self._client is not None
            return self._location, self._client

    def _replace_locked(self) -> None:
        try:
            location = self._location_source()
        except ObjectStoreError:
            raise
        except Exception as exc:  # the resource API's own errors: whatever failed, a later call may succeed
            raise ObjectStoreError(f"cannot get the storage location: {exc}", retryable=True,
                                   code="location_unavailable") from exc
        self._client = _make_client(location, self._timeouts)
        self._location = location

    def _call(self, what: str, action: Callable[[StorageLocation, S3Client], T]) -> T:
        """Run one store call; refused credentials are replaced once and the call tried again."""
        location, client = self._current()
        try:
            return action(location, client)
        except Exception as exc:
            error = _map_error(what, exc)
            if error.code not in _CREDENTIAL_CODES:
                raise error from exc
        # The store refused the credentials before their stated expiry (revoked, or clocks disagree).
        location, client = self.refresh(), self._current()[1]
        try:
            return action(location, client)
        except Exception as exc:
            raise _map_error(what, exc) from exc

    def close(self) -> None:
        """Close the client's connections (the store can still be used: a call opens new ones)."""
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    # ------------------------------------------------------------------ the calls

    def put_file(self, key: str, path: Path, sha256_hex: str, *,
                 on_part: Callable[[int, int], None] | None = None, resume: bool = False) -> StoredObject:
        """Upload ``path`` as ``key``; the store verifies ``sha256_hex``. Nothing partial stays visible.

        ``on_part(number, bytes_so_far)`` is called after each part this call sent (multipart uploads), for
        progress. With ``resume``, a multipart upload of ``key`` that an earlier process left incomplete (a
        crash) is continued: its parts whose bytes match the file's (by their SHA-256, else their MD5 ETag) are
        kept, the rest sent, so a crash costs the uplink only the parts it cut short; and a retryable failure
        leaves this upload for the next call to continue instead of aborting it.
        """
        size = path.stat().st_size
        if size <= self._multipart_threshold:
            return self._call(f"upload {key}", lambda loc, client: self._put_single(loc, client, key, path,
                                                                                    sha256_hex))
        return self._call(f"upload {key}", lambda loc, client: self._put_multipart(loc, client, key, path,
                                                                                   sha256_hex, on_part, resume))

    def head(self, key: str) -> StoredObject | None:
        """The object's size and SHA-256, or None if there is no such object."""
        def action(loc: StorageLocation, client: S3Client) -> StoredObject | None:
            try:
                answer = client.head_object(Bucket=loc.bucket, Key=_full_key(loc, key))
            except Exception as exc:
                if _code_of(exc) in _NOT_FOUND_CODES:
                    return None
                raise
            return StoredObject(key, int(answer["ContentLength"]), answer.get("Metadata", {}).get(SHA256_METADATA, ""))

        return self._call(f"head {key}", action)

    def open(self, key: str, *, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        """Stream the object. Raises :class:`ObjectStoreError` (not retryable, code ``checksum_mismatch``) at the
        end if the bytes do not hash to the SHA-256 stored with it; ``code`` ``not_found`` if it is missing."""
        answer = self._call(f"download {key}", lambda loc, client: client.get_object(Bucket=loc.bucket,
                                                                                   Key=_full_key(loc, key)))
        expected = answer.get("Metadata", {}).get(SHA256_METADATA, "")
        body = answer["Body"]
        digest = hashlib.sha256()
        try:
            for chunk in body.iter_chunks(chunk_size):
                digest.update(chunk)
                yield chunk
        except ObjectStoreError:
            raise
        except Exception as exc:
            raise _map_error(f"download {key}", exc) from exc
        finally:
            body.close()
        if expected and digest.hexdigest() != expected:
            raise ObjectStoreError(f"download {key}: the object's bytes do not match its sha256 {expected}",
                                   retryable=False, code="checksum_mismatch")

    def delete(self, key: str) -> None:
        """Delete the object; deleting a missing object succeeds (S3's DeleteObject is idempotent)."""
        self._call(f"delete {key}", lambda loc, client: client.delete_object(Bucket=loc.bucket,
                                                                             Key=_full_key(loc, key)))

    def list(self, prefix: str = "", *, checksums: bool = False) -> list[StoredObject]:
        """Objects whose key starts with ``prefix``, by key. A listing carries no SHA-256: with
        ``checksums=True`` each object is asked for it (one HEAD each), else ``sha256`` is ``""``."""
        def action(loc: StorageLocation, client: S3Client) -> list[StoredObject]:
            found: list[StoredObject] = []
            base = _full_key(loc, "")
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket,
                                                                          Prefix=base + prefix):
                for item in page.get("Contents", []):
                    found.append(StoredObject(item["Key"][len(base):], int(item["Size"]), ""))
            return found

        objects = self._call(f"list {prefix!r}", action)
        if not checksums:
            return objects
        with_sums = []
        for item in objects:
            head = self.head(item.key)
            if head is not None:  # deleted since the listing
                with_sums.append(head)
        return with_sums

    def list_incomplete_uploads(self) -> builtins.list[IncompleteUpload]:
        """Multipart uploads under this location that were neither completed nor aborted, oldest first."""
        def action(loc: StorageLocation, client: S3Client) -> builtins.list[IncompleteUpload]:
            base = _full_key(loc, "")
            found: builtins.list[IncompleteUpload] = []
            for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=loc.bucket, Prefix=base):
                for upload in page.get("Uploads", []):
                    found.append(IncompleteUpload(upload["Key"][len(base):], upload["UploadId"],
                                                  upload["Initiated"].timestamp()))
            return sorted(found, key=lambda upload: upload.initiated)

        return self._call("list incomplete uploads", action)

    def abort_incomplete_upload(self, upload: IncompleteUpload) -> None:
        """Abort one incomplete upload, freeing its parts; an upload already gone is not an error."""
        def action(loc: StorageLocation, client: S3Client) -> None:
            try:
                client.abort_multipart_upload(Bucket=loc.bucket, Key=_full_key(loc, upload.key),
                                              UploadId=upload.upload_id)
            except Exception as exc:
                if _code_of(exc) not in {"NoSuchUpload", *_NOT_FOUND_CODES}:
                    raise

        self._call(f"abort upload of {upload.key}", action)

    def abort_incomplete_uploads(self) -> builtins.list[IncompleteUpload]:
        """Abort every incomplete upload (call at start-up, before this process starts uploads of its own)."""
        uploads = self.list_incomplete_uploads()
        for upload in uploads:
            self.abort_incomplete_upload(upload)
        return uploads

    # ------------------------------------------------------------------ uploads

    def _put_single(self, loc: StorageLocation, client: S3Client, key: str, path: Path,
                    sha256_hex: str) -> StoredObject:
        # From the file, not from memory: botocore reads it to sign it, then again to send it.
        with path.open("rb") as file:
            size = os.fstat(file.fileno()).st_size
            answer = client.put_object(Bucket=loc.bucket, Key=_full_key(loc, key), Body=file,
                                       ChecksumSHA256=_b64(bytes.fromhex(sha256_hex)),
                                       Metadata={SHA256_METADATA: sha256_hex})
        echoed = answer.get("ChecksumSHA256")
        if echoed is not None and echoed != _b64(bytes.fromhex(sha256_hex)):
            raise ObjectStoreError(f"upload {key}: the store stored a different checksum ({echoed})",
                                   retryable=False, code="checksum_mismatch")
        return StoredObject(key, size, sha256_hex)

    def _put_multipart(self, loc: StorageLocation, client: S3Client, key: str, path: Path, sha256_hex: str,
                       on_part: Callable[[int, int], None] | None, resume: bool) -> StoredObject:
        full_key = _full_key(loc, key)
        upload_id, stored = self._unfinished(loc, client, full_key) if resume else (None, {})
        resumed = upload_id is not None
        if upload_id is None:
            upload_id = client.create_multipart_upload(Bucket=loc.bucket, Key=full_key, ChecksumAlgorithm="SHA256",
                                                       Metadata={SHA256_METADATA: sha256_hex})["UploadId"]
        try:
            whole = hashlib.sha256()
            parts: list[dict[str, Any]] = []
            size = 0
            with path.open("rb") as file:
                for number, data in enumerate(_read_parts(file, self._part_size), start=1):
                    whole.update(data)
                    size += len(data)
                    part_sum = _b64(hashlib.sha256(data).digest())
                    kept = stored.get(number)
                    if kept is not None and _same_part(kept, data, part_sum):
                        parts.append({"PartNumber": number, "ETag": kept["ETag"], "ChecksumSHA256": part_sum})
                        continue
                    answer = client.upload_part(Bucket=loc.bucket, Key=full_key, UploadId=upload_id,
                                                PartNumber=number, Body=data, ChecksumSHA256=part_sum)
                    parts.append({"PartNumber": number, "ETag": answer["ETag"], "ChecksumSHA256": part_sum})
                    if on_part is not None:
                        on_part(number, size)
            if whole.hexdigest() != sha256_hex:
                # Each part was verified by the store; the file itself is not what the caller sealed.
                raise ObjectStoreError(f"upload {key}: the file's sha256 is {whole.hexdigest()}, not {sha256_hex}",
                                       retryable=False, code="checksum_mismatch")
            client.complete_multipart_upload(Bucket=loc.bucket, Key=full_key, UploadId=upload_id,
                                             MultipartUpload={"Parts": parts})  # type: ignore[typeddict-item]
            if resumed:
                self._fix_metadata(loc, client, full_key, sha256_hex)
        except BaseException as exc:
            if resume and isinstance(exc, Exception) and _map_error(key, exc).retryable:
                raise  # kept for the next call to continue
            # Never leave the parts behind; if this fails too, the crash cleanup finds the upload later.
            with contextlib.suppress(Exception):  # the original failure is the one to report
                client.abort_multipart_upload(Bucket=loc.bucket, Key=full_key, UploadId=upload_id)
            raise
        return StoredObject(key, size, sha256_hex)

    @staticmethod
    def _fix_metadata(loc: StorageLocation, client: S3Client, full_key: str, sha256_hex: str) -> None:
        # An incomplete upload's metadata cannot be read: the one continued may have been started for other
        # bytes under the same key. The bytes are right (every part matched or was sent, the whole hashed to
        # sha256_hex); the stored SHA-256 is put right in place. A crash before this leaves a mismatch that
        # head() shows, which the caller reads as "not uploaded".
        found = client.head_object(Bucket=loc.bucket, Key=full_key).get("Metadata", {}).get(SHA256_METADATA)
        if found != sha256_hex:
            client.copy_object(Bucket=loc.bucket, Key=full_key, CopySource={"Bucket": loc.bucket, "Key": full_key},
                               Metadata={SHA256_METADATA: sha256_hex}, MetadataDirective="REPLACE")

    def _unfinished(self, loc: StorageLocation, client: S3Client,
                    full_key: str) -> tuple[str | None, dict[int, dict[str, Any]]]:
        """The newest incomplete upload of exactly ``full_key`` and its parts by number; older ones aborted."""
        uploads = [upload for upload in client.list_multipart_uploads(Bucket=loc.bucket, Prefix=full_key)
                   .get("Uploads", []) if upload["Key"] == full_key]
        if not uploads:
            return None, {}
        uploads.sort(key=lambda upload: upload["Initiated"])
        for older in uploads[:-1]:
            with contextlib.suppress(Exception):  # the crash cleanup's job, if this fails
                client.abort_multipart_upload(Bucket=loc.bucket, Key=full_key, UploadId=older["UploadId"])
        upload_id = uploads[-1]["UploadId"]
        parts: dict[int, dict[str, Any]] = {}
        for page in client.get_paginator("list_parts").paginate(Bucket=loc.bucket, Key=full_key,
                                                                 UploadId=upload_id):
            for part in page.get("Parts", []):
                parts[int(part["PartNumber"])] = dict(part)
        return upload_id, parts


# ---------------------------------------------------------------------- helpers


def _make_client(location: StorageLocation, timeouts: tuple[float, float]) -> S3Client:
    # Imported here: boto3 costs tens of megabytes, paid only by an agent that archives to the cloud.
    import boto3
    from botocore.config import Config

    config = Config(
        region_name=location.region,
        connect_timeout=timeouts[0],
        read_timeout=timeouts[1],
        retries={"mode": "standard", "max_attempts": 3},
        s3={"addressing_style": "path"},  # S3-compatible servers on an IP address have no virtual hosts
        # Checksums are the caller's (the sealed segment's SHA-256), not ones the SDK computes on the fly.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    session = boto3.session.Session(aws_access_key_id=location.access_key_id,
                                    aws_secret_access_key=location.secret_access_key,
                                    aws_session_token=location.session_token, region_name=location.region)
    return session.client("s3", endpoint_url=location.endpoint, config=config)


def _full_key(location: StorageLocation, key: str) -> str:
    prefix = location.prefix
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return prefix + key


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def _read_parts(file: BinaryIO, part_size: int) -> Iterator[bytes]:
    while data := file.read(part_size):
        yield data


def _same_part(stored: dict[str, Any], data: bytes, sha256_b64: str) -> bool:
    """Whether a part the store holds has these bytes: by its SHA-256 where the listing gives it, else by its
    ETag, which S3 makes the MD5 of the part's bytes (without server-side encryption by KMS)."""
    if int(stored.get("Size", -1)) != len(data):
        return False
    if stored.get("ChecksumSHA256"):
        return bool(stored["ChecksumSHA256"] == sha256_b64)
    md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
    return str(stored.get("ETag", "")).strip('"') == md5


def _code_of(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error", {})
        code = error.get("Code") if isinstance(error, dict) else None
        if code:
            return str(code)
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status:
            return str(status)
    return None


def _map_error(what: str, exc: BaseException) -> ObjectStoreError:
    """botocore's exceptions as the archive's one error, with whether a retry may help."""
    if isinstance(exc, ObjectStoreError):
        return exc
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(exc, ClientError):
        code = _code_of(exc) or "unknown"
        message = exc.response.get("Error", {}).get("Message", "") or str(exc)
        if code in _CHECKSUM_CODES:
            return ObjectStoreError(f"{what}: the store refused the checksum ({code}: {message})", retryable=False,
                                    code="checksum_mismatch")
        if code in _NOT_FOUND_CODES:
            return ObjectStoreError(f"{what}: not found", retryable=False, code="not_found")
        retryable = code in _RETRYABLE_CODES or code in _CREDENTIAL_CODES
        return ObjectStoreError(f"{what}: {code}: {message}", retryable=retryable, code=code)
    if isinstance(exc, BotoCoreError | OSError):
        # Connection refused or reset, timeouts, a body cut short: the network, not the request.
        return ObjectStoreError(f"{what}: {type(exc).__name__}: {exc}", retryable=True, code="unavailable")
    return ObjectStoreError(f"{what}: {type(exc).__name__}: {exc}", retryable=False, code="unexpected")

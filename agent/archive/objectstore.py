"""The archive's cloud side: an S3-compatible object store reached with short-lived credentials.

Its one error is :class:`ObjectStoreError` (the tree is drawn in :mod:`agent.archive.s3`, where it is defined).

Every upload carries the caller's SHA-256 of the file and the store verifies it: a small file goes in one
``PutObject`` with ``x-amz-checksum-sha256`` (the store refuses a body whose hash differs, and a single PUT is
never visible half-written); a large one in a multipart upload whose parts each carry their own verified
SHA-256, completed only once the whole file hashed to the caller's value, and aborted on any failure. An upload
cut short by a crash leaves an incomplete multipart upload, invisible to readers, which
:meth:`ObjectStore.list_incomplete_uploads` finds and :meth:`ObjectStore.abort_incomplete_upload` removes after a
restart, or which ``put_file(..., resume=True)`` continues, sending only the parts the crash cut short. The
file's SHA-256 is also kept as the object's metadata (``sha256``), so :meth:`ObjectStore.head` and
:meth:`ObjectStore.open` can check what comes back.

A storage resource holds at most its quota: a write beyond it is refused (``code`` ``quota_exceeded``,
retryable: it fits again once objects are deleted). For the archive that is the cloud being unavailable: the
segment stays on the gateway, within the disk budget, and the operator is warned (agent/archive/manager.py).

The client is boto3: it speaks every S3 call used here, including the ones crash cleanup needs
(ListMultipartUploads, AbortMultipartUpload), session tokens and caller-supplied checksums. It is the heaviest
of the candidates in memory (about 40 MB once a client exists), so it is imported on first use only: an agent
whose archive never goes to the cloud never loads it.

Synchronous and thread-safe: the archive calls it from a worker thread.
"""

from __future__ import annotations

import builtins
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from agent.archive import multipart
from agent.archive.s3 import (
    CREDENTIAL_CODES,
    NOT_FOUND_CODES,
    QUOTA_EXCEEDED,
    SHA256_METADATA,
    IncompleteUpload,
    ObjectStoreError,
    StorageLocation,
    StoredObject,
    b64,
    code_of,
    full_key,
    make_client,
    map_error,
)

if TYPE_CHECKING:
    from types_boto3_s3.client import S3Client

__all__ = [
    "MIN_PART_SIZE",
    "MULTIPART_THRESHOLD",
    "PART_SIZE",
    "QUOTA_EXCEEDED",
    "READ_CHUNK",
    "SHA256_METADATA",
    "IncompleteUpload",
    "ObjectStore",
    "ObjectStoreError",
    "StorageLocation",
    "StoredObject",
]

T = TypeVar("T")

# Single PUT up to this size: atomic and verified as a whole. S3 allows 5 GiB, but a failed PUT starts over,
# so above this the upload goes in parts (agent.archive.multipart). Parts must be ≥ 5 MiB except the last
# (S3's rule).
MULTIPART_THRESHOLD = 16 * 1024 * 1024
PART_SIZE = 8 * 1024 * 1024
MIN_PART_SIZE = 5 * 1024 * 1024
READ_CHUNK = 64 * 1024


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
        # What the last call that failed said, until a call succeeds (`edge-agent status` shows it).
        self.last_error: ObjectStoreError | None = None

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
                self._client = make_client(self._location, self._timeouts)
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
        self._client = make_client(location, self._timeouts)
        self._location = location

    def _call(self, what: str, action: Callable[[StorageLocation, S3Client], T]) -> T:
        """Run one store call; refused credentials are replaced once and the call tried again."""
        try:
            result = self._attempt(what, action)
        except ObjectStoreError as exc:
            self.last_error = exc
            raise
        self.last_error = None
        return result

    def _attempt(self, what: str, action: Callable[[StorageLocation, S3Client], T]) -> T:
        location, client = self._current()
        try:
            return action(location, client)
        except Exception as exc:
            error = map_error(what, exc)
            if error.code not in CREDENTIAL_CODES:
                raise error from exc
        # The store refused the credentials before their stated expiry (revoked, or clocks disagree).
        location, client = self.refresh(), self._current()[1]
        try:
            return action(location, client)
        except Exception as exc:
            raise map_error(what, exc) from exc

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
        return self._call(f"upload {key}", lambda loc, client: StoredObject(key, multipart.put(
            client, loc.bucket, full_key(loc, key), key, path, sha256_hex, part_size=self._part_size,
            on_part=on_part, resume=resume), sha256_hex))

    def head(self, key: str) -> StoredObject | None:
        """The object's size and SHA-256, or None if there is no such object."""
        def action(loc: StorageLocation, client: S3Client) -> StoredObject | None:
            try:
                answer = client.head_object(Bucket=loc.bucket, Key=full_key(loc, key))
            except Exception as exc:
                if code_of(exc) in NOT_FOUND_CODES:
                    return None
                raise
            return StoredObject(key, int(answer["ContentLength"]), answer.get("Metadata", {}).get(SHA256_METADATA, ""))

        return self._call(f"head {key}", action)

    def open(self, key: str, *, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        """Stream the object. Raises :class:`ObjectStoreError` (not retryable, code ``checksum_mismatch``) at the
        end if the bytes do not hash to the SHA-256 stored with it; ``code`` ``not_found`` if it is missing."""
        answer = self._call(f"download {key}", lambda loc, client: client.get_object(Bucket=loc.bucket,
                                                                                   Key=full_key(loc, key)))
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
            raise map_error(f"download {key}", exc) from exc
        finally:
            body.close()
        if expected and digest.hexdigest() != expected:
            raise ObjectStoreError(f"download {key}: the object's bytes do not match its sha256 {expected}",
                                   retryable=False, code="checksum_mismatch")

    def delete(self, key: str) -> None:
        """Delete the object; deleting a missing object succeeds (S3's DeleteObject is idempotent)."""
        self._call(f"delete {key}", lambda loc, client: client.delete_object(Bucket=loc.bucket,
                                                                             Key=full_key(loc, key)))

    def list(self, prefix: str = "", *, checksums: bool = False) -> list[StoredObject]:
        """Objects whose key starts with ``prefix``, by key. A listing carries no SHA-256: with
        ``checksums=True`` each object is asked for it (one HEAD each), else ``sha256`` is ``""``."""
        def action(loc: StorageLocation, client: S3Client) -> list[StoredObject]:
            found: list[StoredObject] = []
            base = full_key(loc, "")
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
            base = full_key(loc, "")
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
                client.abort_multipart_upload(Bucket=loc.bucket, Key=full_key(loc, upload.key),
                                              UploadId=upload.upload_id)
            except Exception as exc:
                if code_of(exc) not in {"NoSuchUpload", *NOT_FOUND_CODES}:
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
            answer = client.put_object(Bucket=loc.bucket, Key=full_key(loc, key), Body=file,
                                       ChecksumSHA256=b64(bytes.fromhex(sha256_hex)),
                                       Metadata={SHA256_METADATA: sha256_hex})
        echoed = answer.get("ChecksumSHA256")
        if echoed is not None and echoed != b64(bytes.fromhex(sha256_hex)):
            raise ObjectStoreError(f"upload {key}: the store stored a different checksum ({echoed})",
                                   retryable=False, code="checksum_mismatch")
        return StoredObject(key, size, sha256_hex)

"""A large file's upload in parts, each verified by the store, and its resumption after a crash.

Completed only once the whole file hashed to the caller's SHA-256, and aborted on any failure; with ``resume``,
an incomplete upload of the same key that an earlier process left is continued, its parts whose bytes match the
file's kept. :meth:`agent.archive.objectstore.ObjectStore.put_file` calls :func:`put` above its multipart
threshold.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from agent.archive.s3 import QUOTA_EXCEEDED, SHA256_METADATA, ObjectStoreError, b64, map_error

if TYPE_CHECKING:
    from types_boto3_s3.client import S3Client

__all__ = ["put"]


def put(client: S3Client, bucket: str, full_key: str, key: str, path: Path, sha256_hex: str, *, part_size: int,
        on_part: Callable[[int, int], None] | None, resume: bool) -> int:
    """Upload ``path`` in parts of ``part_size`` as ``full_key`` (``key`` names it in errors); its size."""
    upload_id, stored = _unfinished(client, bucket, full_key) if resume else (None, {})
    resumed = upload_id is not None
    if upload_id is None:
        upload_id = client.create_multipart_upload(Bucket=bucket, Key=full_key, ChecksumAlgorithm="SHA256",
                                                   Metadata={SHA256_METADATA: sha256_hex})["UploadId"]
    try:
        whole = hashlib.sha256()
        parts: list[dict[str, Any]] = []
        size = 0
        with path.open("rb") as file:
            for number, data in enumerate(_read_parts(file, part_size), start=1):
                whole.update(data)
                size += len(data)
                part_sum = b64(hashlib.sha256(data).digest())
                kept = stored.get(number)
                if kept is not None and _same_part(kept, data, part_sum):
                    parts.append({"PartNumber": number, "ETag": kept["ETag"], "ChecksumSHA256": part_sum})
                    continue
                answer = client.upload_part(Bucket=bucket, Key=full_key, UploadId=upload_id,
                                            PartNumber=number, Body=data, ChecksumSHA256=part_sum)
                parts.append({"PartNumber": number, "ETag": answer["ETag"], "ChecksumSHA256": part_sum})
                if on_part is not None:
                    on_part(number, size)
        if whole.hexdigest() != sha256_hex:
            # Each part was verified by the store; the file itself is not what the caller sealed.
            raise ObjectStoreError(f"upload {key}: the file's sha256 is {whole.hexdigest()}, not {sha256_hex}",
                                   retryable=False, code="checksum_mismatch")
        client.complete_multipart_upload(Bucket=bucket, Key=full_key, UploadId=upload_id,
                                         MultipartUpload={"Parts": parts})  # type: ignore[typeddict-item]
        if resumed:
            _fix_metadata(client, bucket, full_key, sha256_hex)
    except BaseException as exc:
        error = map_error(key, exc) if isinstance(exc, Exception) else None
        # Kept for the next call to continue, unless the quota is full: its parts would hold the room it lacks.
        if resume and error is not None and error.retryable and error.code != QUOTA_EXCEEDED:
            raise
        # Never leave the parts behind; if this fails too, the crash cleanup finds the upload later.
        with contextlib.suppress(Exception):  # the original failure is the one to report
            client.abort_multipart_upload(Bucket=bucket, Key=full_key, UploadId=upload_id)
        raise
    return size


def _fix_metadata(client: S3Client, bucket: str, full_key: str, sha256_hex: str) -> None:
    # An incomplete upload's metadata cannot be read: the one continued may have been started for other
    # bytes under the same key. The bytes are right (every part matched or was sent, the whole hashed to
    # sha256_hex); the stored SHA-256 is put right in place. A crash before this leaves a mismatch that
    # head() shows, which the caller reads as "not uploaded".
    found = client.head_object(Bucket=bucket, Key=full_key).get("Metadata", {}).get(SHA256_METADATA)
    if found != sha256_hex:
        client.copy_object(Bucket=bucket, Key=full_key, CopySource={"Bucket": bucket, "Key": full_key},
                           Metadata={SHA256_METADATA: sha256_hex}, MetadataDirective="REPLACE")


def _unfinished(client: S3Client, bucket: str, full_key: str) -> tuple[str | None, dict[int, dict[str, Any]]]:
    """The newest incomplete upload of exactly ``full_key`` and its parts by number; older ones aborted."""
    uploads = [upload for upload in client.list_multipart_uploads(Bucket=bucket, Prefix=full_key)
               .get("Uploads", []) if upload["Key"] == full_key]
    if not uploads:
        return None, {}
    uploads.sort(key=lambda upload: upload["Initiated"])
    for older in uploads[:-1]:
        with contextlib.suppress(Exception):  # the crash cleanup's job, if this fails
            client.abort_multipart_upload(Bucket=bucket, Key=full_key, UploadId=older["UploadId"])
    upload_id = uploads[-1]["UploadId"]
    parts: dict[int, dict[str, Any]] = {}
    for page in client.get_paginator("list_parts").paginate(Bucket=bucket, Key=full_key, UploadId=upload_id):
        for part in page.get("Parts", []):
            parts[int(part["PartNumber"])] = dict(part)
    return upload_id, parts


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

"""What the object store says over S3: where a storage resource is, what it holds, its one error (by the
store's error codes), keys and checksums, and the boto3 client behind it.

    AgentError
    └── ObjectStoreError     an object-store call failed; ``retryable`` says whether the same call may succeed
                             later (network, 5xx, credentials being replaced) or never will (a checksum the store
                             refused, a missing bucket, a refused request); ``code`` is the store's error code,
                             or one of the archive's: ``quota_exceeded`` (the storage resource is full: retryable,
                             a write fits again once retention deletes objects), ``checksum_mismatch``,
                             ``not_found``, ``unavailable`` (the network), ``location_unavailable`` (the
                             resource API)

boto3 is imported on first use only (see :mod:`agent.archive.objectstore`, which exports these names and where
callers import them).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.errors import AgentError

if TYPE_CHECKING:
    from types_boto3_s3.client import S3Client

__all__ = [
    "CREDENTIAL_CODES",
    "NOT_FOUND_CODES",
    "QUOTA_EXCEEDED",
    "SHA256_METADATA",
    "IncompleteUpload",
    "ObjectStoreError",
    "StorageLocation",
    "StoredObject",
    "b64",
    "code_of",
    "full_key",
    "make_client",
    "map_error",
]

SHA256_METADATA = "sha256"

# Error codes of S3 and S3-compatible stores, by what they mean for a retry.
_CHECKSUM_CODES = frozenset({"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"})
CREDENTIAL_CODES = frozenset({"InvalidAccessKeyId", "ExpiredToken", "InvalidToken", "SignatureDoesNotMatch",
                              "TokenRefreshRequired", "AccessDenied", "403"})
_RETRYABLE_CODES = frozenset({"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout",
                              "RequestTimeTooSkewed", "500", "502", "503", "504"})
NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
# A full quota: Ceph's RGW (and the devcloud's S3 server) answer 403 QuotaExceeded, MinIO a code of its own.
# Checked before the credential codes: a 403 that is a full quota is not a key to replace.
_QUOTA_CODES = frozenset({"QuotaExceeded", "XMinioAdminBucketQuotaExceeded"})
QUOTA_EXCEEDED = "quota_exceeded"



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


def make_client(location: StorageLocation, timeouts: tuple[float, float]) -> S3Client:
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


def full_key(location: StorageLocation, key: str) -> str:
    prefix = location.prefix
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return prefix + key


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def code_of(exc: BaseException) -> str | None:
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


def map_error(what: str, exc: BaseException) -> ObjectStoreError:
    """botocore's exceptions as the archive's one error, with whether a retry may help."""
    if isinstance(exc, ObjectStoreError):
        return exc
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(exc, ClientError):
        code = code_of(exc) or "unknown"
        message = exc.response.get("Error", {}).get("Message", "") or str(exc)
        if code in _CHECKSUM_CODES:
            return ObjectStoreError(f"{what}: the store refused the checksum ({code}: {message})", retryable=False,
                                    code="checksum_mismatch")
        if code in NOT_FOUND_CODES:
            return ObjectStoreError(f"{what}: not found", retryable=False, code="not_found")
        if code in _QUOTA_CODES:
            return ObjectStoreError(f"{what}: the storage resource's quota is full ({code}: {message})",
                                    retryable=True, code=QUOTA_EXCEEDED)
        retryable = code in _RETRYABLE_CODES or code in CREDENTIAL_CODES
        return ObjectStoreError(f"{what}: {code}: {message}", retryable=retryable, code=code)
    if isinstance(exc, BotoCoreError | OSError):
        # Connection refused or reset, timeouts, a body cut short: the network, not the request.
        return ObjectStoreError(f"{what}: {type(exc).__name__}: {exc}", retryable=True, code="unavailable")
    return ObjectStoreError(f"{what}: {type(exc).__name__}: {exc}", retryable=False, code="unexpected")

"""The resource API's answers about storage resources: create one, its view with the S3 location, new
credentials, and the 503 while the S3 server is unavailable.
"""

from __future__ import annotations

import asyncio

from agent.devcloud.cloud import DevCloud
from agent.devcloud.schemas import Resource, StorageCredentials, StorageLocation
from agent.devcloud.state import StoredAnswer, error_answer
from agent.devcloud.storage import BUCKET, Credentials, StorageResource, StorageResources, StorageUnavailable, utc
from agent.telemetry import get_logger

__all__ = ["create", "credentials_body", "find", "storage_down", "storage_of", "view"]

log = get_logger("agent.devcloud")


async def create(cloud: DevCloud, quantity_gb: int, location: str) -> StoredAnswer:
    if cloud.storage is None:
        return error_answer(400, "unsupported_type",
                            "this resource API offers no storage (the devcloud was started without --storage)")
    try:
        stored, credentials = await asyncio.to_thread(cloud.storage.create, quantity_gb, location,
                                                      cloud.knobs.credentials_ttl_s, cloud.knobs.storage_gb_bytes)
    except StorageUnavailable as exc:
        return storage_down(cloud, exc)
    log.info("devcloud_storage_created", resource=stored.id, quantity_gb=quantity_gb, location=location)
    return StoredAnswer(201, view(cloud, stored, credentials).model_dump(mode="json"))


def storage_of(cloud: DevCloud) -> StorageResources:
    assert cloud.storage is not None  # a storage resource exists only where storage was started
    return cloud.storage


def find(cloud: DevCloud, resource_id: str) -> StorageResource | None:
    return cloud.storage.get(resource_id) if cloud.storage is not None else None


def storage_down(cloud: DevCloud, exc: StorageUnavailable) -> StoredAnswer:
    return error_answer(503, "storage_unavailable", str(exc), max(1, cloud.knobs.retry_after_s))


def credentials_body(credentials: Credentials) -> StorageCredentials:
    return StorageCredentials(access_key_id=credentials.access_key_id,
                              secret_access_key=credentials.secret_access_key, session_token=None,
                              expires_at=utc(credentials.expires_at))


def view(cloud: DevCloud, stored: StorageResource, credentials: Credentials | None) -> Resource:
    admin = storage_of(cloud).admin
    return Resource(
        id=stored.id, type="storage", quantity=stored.quantity_gb, location=stored.location,
        status="released" if stored.released_at is not None else "ready", expires_at=None,
        storage=StorageLocation(endpoint=admin.endpoint, bucket=BUCKET, prefix=stored.prefix, region=admin.region,
                                quota_bytes=stored.quota_bytes,
                                credentials=credentials_body(credentials) if credentials is not None else None))

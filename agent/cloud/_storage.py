"""Storage resources of the resource API (docs/design.md#resource-api): request one, keep its credentials fresh,
release it.

Usage by the archive (from a worker thread: this client is synchronous, like the object store)::

    storage = StorageClient(settings.cloud)
    resource = storage.request(quantity_gb=50)        # or storage.attach(saved_id) after a restart
    store = ObjectStore(resource.location)            # new credentials whenever the store asks
    ...
    storage.release(resource.id)                      # deletes the objects with it
    storage.close()

The resource's id must be kept (the state directory) so that a restarted agent attaches to the same objects.
Errors are the cloud client's: :class:`TransientCloudError` (connection, timeouts, 429, 502-504: try later) and
:class:`PermanentCloudError` (the request is refused: a bad quantity, a cloud without storage, an unknown id).
"""

from __future__ import annotations

import contextlib
import ssl
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx

from agent import __version__
from agent.archive.objectstore import StorageLocation
from agent.cloud._api import classify, describe, server_now
from agent.cloud._errors import CloudError, PermanentCloudError, TransientCloudError
from agent.config import CloudSettings
from agent.errors import ConfigError

RESOURCES = "/api/v1/resources"
# The Date header has whole seconds: the server's "now" may be up to a second later than it says.
DATE_RESOLUTION_S = 1.0
# Clocks this close are taken to agree: then the earlier of the two expiry estimates is used (a busy server's
# Date header lags, uvicorn renews it once a second at best); beyond it the gateway's clock is taken to be wrong.
CLOCK_AGREEMENT_S = 30.0


class StorageResource:
    """One storage resource: where its objects are, and :meth:`location`, which hands out fresh credentials."""

    def __init__(self, client: StorageClient, resource_id: str, location: StorageLocation | None) -> None:
        self.id = resource_id
        self._client = client
        self._lock = threading.Lock()
        self._unused = location  # the credentials that came with the resource, not yet handed out

    def location(self) -> StorageLocation:
        """The location with credentials nobody has used yet: the ones that came with the resource the first
        time, new ones from the resource API after that. Pass this method to :class:`ObjectStore`."""
        with self._lock:
            if self._unused is not None:
                location, self._unused = self._unused, None
                return location
        return self._client.location(self.id)


class StorageClient:
    """The resource API's storage calls, with the compute client's settings (``EDGE_AGENT_CLOUD__*``)."""

    def __init__(self, settings: CloudSettings, *, transport: httpx.BaseTransport | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if settings.url is None:
            raise ConfigError("EDGE_AGENT_CLOUD__URL", "is not set; storage resources need the resource API's URL")
        self._settings = settings
        self._clock = clock
        self._described: dict[str, dict[str, Any]] = {}  # per resource: its answer, less the credentials
        headers = {"Accept": "application/json", "User-Agent": f"edge-agent/{__version__}"}
        if settings.token is not None:
            headers["Authorization"] = f"Bearer {settings.token.get_secret_value()}"
        verify: ssl.SSLContext | bool = True
        if settings.ca_file is not None:
            verify = ssl.create_default_context(cafile=str(settings.ca_file))
        self._http = httpx.Client(
            base_url=settings.url, headers=headers, verify=verify, transport=transport, follow_redirects=False,
            timeout=httpx.Timeout(connect=settings.connect_timeout_s, read=settings.read_timeout_s,
                                  write=settings.write_timeout_s, pool=settings.pool_timeout_s))

    def request(self, quantity_gb: int, *, idempotency_key: str | None = None) -> StorageResource:
        """A new storage resource of ``quantity_gb`` GB. With ``idempotency_key``, a repeat (after a lost answer)
        gets the same resource instead of a second one."""
        body: dict[str, Any] = {"type": "storage", "quantity": quantity_gb}
        params = {"location": self._settings.location} if self._settings.location else None
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        response = self._send("request storage", "POST", RESOURCES, json=body, params=params, headers=headers)
        data = _json(response, "request storage")
        location = self._parse_location(response, data, "request storage")
        self._described[location.resource_id] = data
        return StorageResource(self, location.resource_id, location)

    def attach(self, resource_id: str) -> StorageResource:
        """A resource requested earlier (its id kept across a restart); its credentials are fetched on first use.
        Raises :class:`PermanentCloudError` (status 404) when the cloud no longer has it."""
        response = self._send("look up storage", "GET", f"{RESOURCES}/{resource_id}")
        data = _json(response, "look up storage")
        if data.get("type") != "storage" or data.get("status") == "released":
            raise PermanentCloudError(f"look up storage: resource {resource_id!r} is not a live storage resource",
                                      status=404, code="released" if data.get("status") == "released" else None)
        self._described[resource_id] = data
        return StorageResource(self, resource_id, None)

    def location(self, resource_id: str) -> StorageLocation:
        """The resource's location with new credentials (``POST .../credentials``)."""
        what = "renew storage credentials"
        described = self._described.get(resource_id)
        if described is None:
            described = self._described[resource_id] = _json(self._send(what, "GET", f"{RESOURCES}/{resource_id}"),
                                                             what)
        response = self._send(what, "POST", f"{RESOURCES}/{resource_id}/credentials")
        storage = described.get("storage")
        if not isinstance(storage, dict):
            raise PermanentCloudError(f"{what}: resource {resource_id!r} has no storage location", status=200)
        return self._parse_location(response, {**described, "storage": {**storage,
                                                                        "credentials": _json(response, what)}}, what)

    def release(self, resource_id: str) -> None:
        """Release the resource and with it every object it holds; releasing twice is not an error."""
        with contextlib.suppress(PermanentCloudError):
            self._send("release storage", "DELETE", f"{RESOURCES}/{resource_id}", not_found_ok=True)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> StorageClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ HTTP

    def _send(self, what: str, method: str, path: str, *, not_found_ok: bool = False,
              **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise TransientCloudError(f"{what}: {describe(exc)}") from exc
        if response.is_success or (not_found_ok and response.status_code == 404):
            return response
        raise classify(response, what)

    def _parse_location(self, response: httpx.Response, data: dict[str, Any], what: str) -> StorageLocation:
        try:
            storage = data["storage"]
            credentials = storage["credentials"]
            server_expiry = datetime.fromisoformat(credentials["expires_at"])
            if server_expiry.tzinfo is None:
                server_expiry = server_expiry.replace(tzinfo=UTC)
            # Count down on our own clock: the gateway's clock may be wrong, the remaining time is not.
            by_date = (server_expiry - server_now(response)).total_seconds() - DATE_RESOLUTION_S
            by_clock = (server_expiry - datetime.now(UTC)).total_seconds()
            remaining = min(by_date, by_clock) if abs(by_date - by_clock) < CLOCK_AGREEMENT_S else by_date
            token = credentials.get("session_token")
            return StorageLocation(
                resource_id=str(data["id"]), endpoint=str(storage["endpoint"]), bucket=str(storage["bucket"]),
                prefix=str(storage["prefix"]), region=str(storage["region"]),
                access_key_id=str(credentials["access_key_id"]),
                secret_access_key=str(credentials["secret_access_key"]),
                session_token=str(token) if token else None, expires_at=self._clock() + remaining)
        except (KeyError, TypeError, ValueError) as exc:
            raise PermanentCloudError(f"{what}: malformed storage answer ({type(exc).__name__}: {exc})",
                                      status=response.status_code) from exc


def _json(response: httpx.Response, what: str) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError as exc:
        raise PermanentCloudError(f"{what}: the answer is not JSON", status=response.status_code) from exc
    if not isinstance(data, dict):
        raise PermanentCloudError(f"{what}: the answer is not a JSON object", status=response.status_code)
    return data


__all__ = ["CloudError", "StorageClient", "StorageResource"]

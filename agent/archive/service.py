"""The archive in the agent: its parts built from the settings, started, stopped and reported.

Built by the daemon only when a route has an ``archive`` key, so an agent without one imports none of it. The
parts: the intake (journals and seals, appended from the store's post-commit hook through the tap), the
placement manager on its thread, the reader for queries, and the MQTT query responder on a connection of its
own. The object store is reached through a storage resource of the resource API, requested the first time the
archive needs the cloud; its id is kept in the catalog so a restarted agent (and `edge-agent archive query`)
finds the same objects.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.archive.catalog import Catalog
from agent.archive.intake import Intake, Sealing
from agent.archive.manager import RoutePolicy
from agent.archive.query import Reader
from agent.archive.recovery import reconcile
from agent.archive.report import ReportingManager
from agent.archive.tap import Tap
from agent.telemetry import get_logger

if TYPE_CHECKING:
    from agent.archive.objectstore import ObjectStore
    from agent.archive.responder import Responder
    from agent.cloud._storage import StorageClient
    from agent.config import Route, Settings

log = get_logger(__name__)

RESOURCE_KEY = "storage_resource_id"
REQUEST_KEY = "storage_request_key"  # the Idempotency-Key of the storage request


def archive_root(settings: Settings) -> Path:
    return settings.state_dir / "archive"


def archived_routes(routes: Sequence[Route]) -> dict[str, RoutePolicy]:
    return {r.topic: RoutePolicy(r.archive.days, r.archive.retrievals_per_month)
            for r in routes if r.archive is not None}


class CloudSide:
    """The archive's object store and the resource API client behind its credentials (closed with it)."""

    def __init__(self, objects: ObjectStore, clients: list[StorageClient]) -> None:
        self.objects = objects
        self._clients = clients

    def close(self) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()


def open_object_store(settings: Settings, root: Path, *, request: bool = False) -> CloudSide | None:
    """The archive's object store, or None without a resource API. Its storage resource is attached (or, with
    ``request``, requested if there is none yet) on the store's first call, from the calling thread."""
    if settings.cloud.url is None:
        return None
    from agent.archive.objectstore import ObjectStore
    from agent.cloud import PermanentCloudError
    from agent.cloud._storage import StorageClient, StorageResource

    catalog = Catalog(root / "catalog.db")
    held: list[StorageResource] = []
    clients: list[StorageClient] = []

    def location() -> Any:
        if not held:
            if not clients:
                clients.append(StorageClient(settings.cloud))
            client = clients[0]
            known = catalog.get_meta(RESOURCE_KEY)
            if known is not None:
                try:
                    held.append(client.attach(known))
                except PermanentCloudError as exc:
                    if not request or exc.status != 404:
                        raise
                    # Released or forgotten by the cloud: what it held is gone; the archive goes on with a new one.
                    lost = len(catalog.entries(place="cloud"))
                    log.error("archive_storage_resource_gone", resource=known, segments_lost=lost, error=str(exc))
                    catalog.set_meta(REQUEST_KEY, f"archive-{settings.agent_id}-{os.urandom(6).hex()}")
            if not held and not request:
                raise LookupError("the archive has no storage resource yet (nothing was moved to the cloud)")
            if not held:
                # One key per resource, kept before asking: a request repeated after a lost answer gets the same one.
                key = catalog.get_meta(REQUEST_KEY)
                if key is None:
                    key = f"archive-{settings.agent_id}-{os.urandom(6).hex()}"
                    catalog.set_meta(REQUEST_KEY, key)
                resource = client.request(settings.archive.cloud_quota_gb, idempotency_key=key)
                catalog.set_meta(RESOURCE_KEY, resource.id)
                log.info("archive_storage_requested", resource=resource.id, quota_gb=settings.archive.cloud_quota_gb)
                held.append(resource)
        return held[0].location()

    return CloudSide(ObjectStore(location), clients)


class ArchiveService:
    def __init__(self, settings: Settings, *, match: Callable[[str], Route | None],
                 clock: Callable[[], float] = time.time) -> None:
        """``match``: a topic's route as ingress routes it (the first that matches)."""
        s = settings.archive
        self.settings = settings
        self.root = archive_root(settings)
        self.catalog = Catalog(self.root / "catalog.db")
        self.policies = archived_routes(settings.routes)
        self._archived = frozenset(self.policies)
        self.intake = Intake(self.root, self.catalog, Sealing(s.seal_age_s, s.seal_bytes),
                             clock=clock)
        self.cloud = open_object_store(settings, self.root, request=True)
        self.objects = self.cloud.objects if self.cloud is not None else None
        self._match = match
        self.tap = Tap(match, lambda: self._archived, self.intake)
        # It leaves a report for `edge-agent status` after each pass, on its own thread (agent/archive/report.py).
        self.manager = ReportingManager(
            intake=self.intake, catalog=self.catalog, prices=s.prices(), routes=self.policies, objects=self.objects,
            clock=clock, tick_s=s.pass_interval_s, redecide_s=s.redecide_s,
            cloud_quota_bytes=None if self.objects is None else s.cloud_quota_gb * 10**9)
        self.reader = Reader(self.root, self.catalog, lambda: self.objects, unsealed=self.intake.unsealed,
                             clock=clock)
        self.responder: Responder | None = None

    def open(self, store_path: Path) -> None:
        """Before the store's writer starts: recover the archive, then append what a crash kept from it."""
        self.intake.open()
        reconcile(store_path, self.intake, self.catalog, self._match, self._archived)

    def start(self) -> None:
        from agent.archive.responder import Responder

        self.manager.start()
        if self.settings.mqtt.protocol != "5":
            # Request/response (response topic, correlation data) is MQTT 5's; `edge-agent archive query` works.
            log.info("archive_mqtt_query_off", reason="EDGE_AGENT_MQTT__PROTOCOL is not 5")
            return
        self.responder = Responder(self.settings, self.reader)
        self.responder.start()

    def set_routes(self, routes: Sequence[Route]) -> None:
        """A reload: the new routes' archive keys apply to what is committed from now on."""
        self.policies = archived_routes(routes)
        self._archived = frozenset(self.policies)
        self.manager.routes = dict(self.policies)

    def committed(self, rows: int) -> None:  # the store's writer thread, before the commit's hand-off
        try:
            self.tap.committed(rows)
        except Exception:  # the hand-off to the loop (acknowledgements, tasks) must follow whatever happens here
            log.exception("archive_append_failed")

    def stop(self) -> None:
        if self.responder is not None:
            self.responder.stop()
        self.manager.stop()
        self.intake.close()
        if self.cloud is not None:
            self.cloud.close()

    def alive(self) -> bool:
        return self.manager.alive()

    def report(self) -> dict[str, Any]:
        """The manager's report of its last pass (any thread may ask: it is never changed once made)."""
        return self.manager.report or {"as_of": None}

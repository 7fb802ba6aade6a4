"""The archive as `edge-agent status` shows it: a report the manager's own thread rebuilds after each pass.

/status is gathered on the event loop and served from the metrics server's threads, while the catalog's SQLite
connections belong to the thread that opened them and the manager's state moves during a pass. So the
manager's thread leaves a finished report (a new dict, never changed after) at the end of each pass, and /status
hands out the latest one (agent/introspect.py); nothing of the archive is touched from another thread.
"""

from __future__ import annotations

from typing import Any

from agent.archive.manager import Manager

__all__ = ["PLACES", "ReportingManager", "build_report"]

PLACES = ("gateway", "uploading", "cloud")


class ReportingManager(Manager):
    """The placement manager, leaving :attr:`report` after each pass (on the thread that ran it)."""

    def __init__(self, *, cloud_quota_bytes: int | None = None, **manager: Any) -> None:
        super().__init__(**manager)
        self.cloud_quota_bytes = cloud_quota_bytes
        self.report: dict[str, Any] | None = None  # None until the first pass

    def run_once(self) -> None:
        try:
            super().run_once()
        finally:  # a pass that failed still leaves what the archive holds now
            self.report = build_report(self, self.last_pass_at, self.cloud_quota_bytes)


def build_report(manager: Manager, now: float | None, cloud_quota_bytes: int | None = None) -> dict[str, Any]:
    """What the archive holds and where, per route; its disk budget; the cloud's state and why it failed last.

    ``uploads_pending`` are the segments whose last placement chose the cloud and that are not there yet (an
    upload under way, or one the cloud refused). JSON-ready: `edge-agent status --json` prints it as it is.
    """
    routes: dict[str, dict[str, Any]] = {}

    def row(route: str) -> dict[str, Any]:
        found = routes.get(route)
        if found is None:
            policy = manager.routes.get(route)
            found = routes[route] = {
                "route": route, "archived": policy is not None,
                "days": None if policy is None else policy.days,
                "segments": dict.fromkeys(PLACES, 0), "bytes": dict.fromkeys(PLACES, 0),
                # Rates are learned by this thread only: read here, never from /status's threads.
                "retrievals_per_month": (None if policy is None or now is None
                                         else round(manager.rate(route).per_month(now), 6)),
                "prior_per_month": None if policy is None else policy.retrievals_per_month,
            }
        return found

    for route in manager.routes:
        row(route)
    pending = pending_bytes = 0
    for entry in manager.catalog.entries():
        place = row(entry.route)
        place["segments"][entry.place] += 1
        place["bytes"][entry.place] += entry.size
        chosen = entry.decision.get("choice") if entry.decision is not None else None
        # Without a cloud, a segment over the budget is placed "cloud" all the same: no upload will come.
        waiting = entry.place == "gateway" and chosen == "cloud" and manager.objects is not None
        if entry.place == "uploading" or waiting:
            pending += 1
            pending_bytes += entry.size

    counters, intake, objects = manager.counters, manager.intake, manager.objects
    cloud: dict[str, Any] | None = None
    if objects is not None:
        down = manager.cloud_down_since is not None
        error = objects.last_error if down else None
        cloud = {
            "available": not down, "down_since": manager.cloud_down_since,
            "error": None if error is None else str(error), "reason": None if error is None else error.code,
            "uploads": counters.uploads, "uploaded_bytes": counters.uploaded_bytes,
            "upload_failures": counters.upload_failures, "forced_uploads": counters.forced_uploads,
            "retry_every_s": manager.cloud_retry_s, "quota_bytes": cloud_quota_bytes,
        }
    return {
        "as_of": now,
        "routes": sorted(routes.values(), key=lambda r: (not r["archived"], r["route"])),
        "disk": {"used_bytes": manager.disk_used(), "budget_bytes": manager.prices.disk_budget_bytes,
                 "full": intake.refusing, "inputs_refused": intake.refused},
        "inputs_archived": intake.appended,
        "uploads_pending": pending, "uploads_pending_bytes": pending_bytes,
        "cloud": cloud,
    }

"""The client's leases over their lives: requested on demand or ahead of need, shared, released when idle.

Which lease a task joins is :func:`agent.cloud._leases.choose_lease`'s call; this module makes the calls that
move leases through their stages and keeps them in upkeep.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from collections.abc import Callable
from typing import Any

from agent.cloud._api import LeaseGone, ResourceApi
from agent.cloud._circuit import CircuitBreaker
from agent.cloud._errors import CloudError, PermanentCloudError, TransientCloudError
from agent.cloud._leases import Lease, choose_lease
from agent.config import CloudSettings
from agent.telemetry import get_logger

log = get_logger("agent.cloud")

# Without a lease call for this long, the upkeep measures the RTT again with a lease GET.
RTT_REFRESH_S = 10.0


class LeasePool:
    """The leases of one client. ``reserve`` hands a task a ready lease (requesting one when needed);
    ``on_provisioned(seconds, now)`` hears how long each lease took to become ready."""

    def __init__(self, api: ResourceApi, settings: CloudSettings, breaker: CircuitBreaker, *,
                 clock: Callable[[], float], on_provisioned: Callable[[float, float], None]) -> None:
        self._api = api
        self._settings = settings
        self._breaker = breaker
        self._clock = clock
        self._on_provisioned = on_provisioned
        self.leases: list[Lease] = []
        self._upkeep: asyncio.Task[None] | None = None
        self._releases: set[asyncio.Task[None]] = set()

    def describe(self, now: float) -> list[dict[str, Any]]:
        """The leases as plain data (``edge-agent status``); times in seconds from ``now``."""
        return [
            {"id": lease.id, "stage": lease.stage, "vcpus": lease.quantity, "in_use": lease.reserved,
             "expires_in_s": lease.expires_at - now if math.isfinite(lease.expires_at) else None,
             "idle_s": now - lease.last_used if lease.last_used and not lease.reserved else None}
            for lease in self.leases if lease.stage != "gone"
        ]

    def prewarm(self) -> None:
        """Request a lease now, unless one is ready or on its way, the circuit is open or the client closed."""
        now = self._clock()
        if self._api.closed or self._breaker.is_open(now) or any(lease.usable(now) for lease in self.leases):
            return
        self.start_upkeep()
        lease = Lease(created_at=now)
        self.leases.append(lease)
        lease.task = asyncio.create_task(self._acquire(lease), name="cloud-lease-prewarm")

    async def reserve(self) -> Lease:
        """A ready lease with a place reserved for the caller, who gives it back with :meth:`unreserve`."""
        lease = choose_lease(self.leases, self._settings.max_quantity, self._clock())
        if lease is None:
            lease = Lease(created_at=self._clock())
            self.leases.append(lease)
            lease.task = asyncio.create_task(self._acquire(lease), name="cloud-lease-acquire")
        lease.reserved += 1
        try:
            await lease.settled.wait()
        except BaseException:
            lease.reserved -= 1
            raise
        if lease.error is not None:
            lease.reserved -= 1
            raise lease.error
        return lease

    def unreserve(self, lease: Lease) -> None:
        lease.reserved -= 1
        lease.last_used = self._clock()

    def forget(self, lease: Lease) -> None:
        """Stop using ``lease`` (gone, or about to be released)."""
        lease.stage = "gone"
        with contextlib.suppress(ValueError):
            self.leases.remove(lease)

    async def aclose(self) -> None:
        """Abandon lease requests still unanswered and release every lease (best effort).

        A lease request still unanswered is abandoned; the cloud expires that lease at its ``expires_at``.
        The caller has closed the API to new calls first.
        """
        leases = list(self.leases)  # before cancelling: a cancelled lease request drops its lease from the list
        tasks = [task for task in (self._upkeep, *(lease.task for lease in leases)) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.leases = []
        await asyncio.gather(*(self._api.release_lease(lease.id, "shutdown") for lease in leases
                               if lease.id is not None),
                             *self._releases, return_exceptions=True)

    # ------------------------------------------------------------------ a lease's request

    async def _acquire(self, lease: Lease) -> None:
        settings = self._settings
        try:
            # One loop turn, so the tasks of a burst that arrived together join before the size is fixed.
            await asyncio.sleep(0)
            now = self._clock()
            others = sum(other.quantity for other in self.leases if other is not lease and other.usable(now))
            lease.quantity = max(1, min(lease.reserved, settings.max_quantity - others))
            lease.slots = asyncio.Semaphore(lease.quantity)
            lease.stage = "provisioning"
            requested = self._clock()
            # The key makes a retried lease request (after a timeout) return the first lease, not a second one.
            resource = await self._api.request_lease(lease.quantity, f"lease-{uuid.uuid4()}")
            lease.id = resource.id
            while resource.status == "provisioning":
                if self._clock() - requested > settings.provisioning_timeout_s:
                    raise TransientCloudError(
                        f"the lease was not ready {settings.provisioning_timeout_s:g} s after it was requested")
                await asyncio.sleep(settings.poll_interval_s)
                resource = await self._api.get_lease(lease.id, "lease poll")
            if resource.status != "ready":
                raise TransientCloudError(f"the lease became {resource.status!r} before it was ready")
            now = self._clock()
            self._on_provisioned(now - requested, now)
            lease.stage = "ready"
            lease.last_used = now
            lease.expires_at = now + resource.expires_in_s
            lease.margin_s = min(settings.read_timeout_s, 0.25 * max(0.0, resource.expires_in_s))
            log.info("cloud_lease_ready", lease=lease.id, quantity=lease.quantity,
                     provisioning_s=round(now - requested, 3))
        except asyncio.CancelledError:
            self._abandon(lease, PermanentCloudError("the cloud client is closing", cloud_fault=False))
            raise
        except CloudError as exc:
            self._abandon(lease, exc)
        except Exception as exc:  # a bug here must fail the waiting tasks over to local, not hang them
            log.exception("cloud_lease_failed")
            self._abandon(lease, TransientCloudError(f"the lease request failed: {exc!r}"))
        else:
            lease.settled.set()

    def _abandon(self, lease: Lease, error: CloudError) -> None:
        lease.error = error
        lease.settled.set()
        # A lease that failed after the cloud created it is released, so it does not run up a bill.
        self.forget(lease)
        if lease.id is not None and not self._api.closed:
            task = asyncio.create_task(self._api.release_lease(lease.id, "not_ready"), name="cloud-lease-release")
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)

    # ------------------------------------------------------------------ upkeep

    def start_upkeep(self) -> None:
        if self._upkeep is None or self._upkeep.done():
            self._upkeep = asyncio.create_task(self._keep_up(), name="cloud-lease-upkeep")

    async def _keep_up(self) -> None:
        """Release idle or expiring leases; refresh the RTT with a lease GET while offloading."""
        interval = min(5.0, max(0.05, self._settings.lease_idle_s / 4))
        while True:
            await asyncio.sleep(interval)
            now = self._clock()
            for lease in list(self.leases):
                if lease.stage != "ready" or lease.reserved:
                    continue
                expiring = not lease.usable(now)
                if expiring or now - lease.last_used >= self._settings.lease_idle_s:
                    self.forget(lease)
                    assert lease.id is not None  # set before the lease is ready
                    await self._api.release_lease(lease.id, "expiring" if expiring else "idle")
            busy = [lease for lease in self.leases if lease.stage == "ready" and lease.reserved]
            if busy and now - self._api.rtt_at >= RTT_REFRESH_S and not self._breaker.is_open(now):
                lease = busy[0]
                assert lease.id is not None
                try:
                    await self._api.get_lease(lease.id, "lease check")
                except LeaseGone:
                    self.forget(lease)
                except CloudError as exc:
                    log.debug("cloud_lease_check_failed", lease=lease.id, cause=str(exc))

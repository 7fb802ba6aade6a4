"""Lease records and the choice of lease for the next task: which to join, when to ask for another."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from agent.cloud._errors import CloudError

LeaseStage = Literal["pending", "provisioning", "ready", "gone"]


@dataclass(slots=True, eq=False)
class Lease:
    """One compute lease as the client sees it. Mutable: it moves through its stages on the event loop.

    ``pending``: created, not yet requested; every task that arrives meanwhile joins it, and its ``quantity`` is
    fixed from that count when the request goes out. ``reserved`` counts tasks holding or waiting for one of its
    ``quantity`` slots. ``expires_at`` and ``last_used`` are on the client's clock.
    """

    created_at: float
    quantity: int = 0
    id: str | None = None
    stage: LeaseStage = "pending"
    reserved: int = 0
    last_used: float = 0.0
    expires_at: float = math.inf
    # A task is only started on a lease with at least this long to live (set from its lifetime when ready).
    margin_s: float = 0.0
    # Set when the lease is ready or has failed; ``error`` says which. An Event, unlike a shared future, lets a
    # waiting task be cancelled without touching the others.
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    error: CloudError | None = None
    slots: asyncio.Semaphore | None = None
    task: asyncio.Task[None] | None = None

    def usable(self, now: float) -> bool:
        return self.stage != "gone" and now < self.expires_at - self.margin_s


def choose_lease(leases: Sequence[Lease], max_quantity: int, now: float) -> Lease | None:
    """The lease the next task should use, or None when a new one should be requested.

    In order: a lease not yet requested (its size will count this task); a lease with a free slot, ready
    ones first, then the least loaded; a new lease while the usable ones add up to less than ``max_quantity``
    vCPUs; otherwise the least loaded lease, where the task waits for a slot. Leases near their expiry are
    not chosen (one that is replaced may overlap its successor briefly, so the bound is on usable leases).
    """
    usable = [lease for lease in leases if lease.usable(now)]
    for lease in usable:
        if lease.stage == "pending":
            return lease
    free = [lease for lease in usable if lease.reserved < lease.quantity]
    if free:
        return min(free, key=lambda lease: (lease.stage != "ready", lease.reserved / lease.quantity))
    if sum(lease.quantity for lease in usable) < max_quantity:
        return None
    return min(usable, key=lambda lease: lease.reserved / lease.quantity) if usable else None

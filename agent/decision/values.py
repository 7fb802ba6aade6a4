"""The decision's values: a task as the model sees it, a decision with both totals and every term, and the
names of those terms (docs/design.md#decision-model). No behaviour: agent.decision.model decides.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Target = Literal["local", "cloud"]
Reason = Literal["model", "placement", "no_cloud", "circuit_open"]
Placement = Literal["auto", "local", "cloud"]  # a route's placement (agent.config.Route), passed to decide()
Direction = Literal["up", "down"]

# Names of the terms, in the order of the formulas; each Decision.terms has all of them.
LOCAL_TERMS = ("local_wait_s", "local_service_s")
CLOUD_TERMS = (
    "provisioning_s",
    "rtt_s",
    "uplink_queue_s",
    "upload_s",
    "cloud_wait_s",
    "cloud_service_s",
    "download_s",
)

# Not frozen: a frozen dataclass sets each field through object.__setattr__, three times the cost of a plain
# one, and the daemon builds a Task and a Decision for every message. Treat both as values all the same.
@dataclass(slots=True)
class Task:
    """What the model needs to know about a task: its kind and its input size in bytes."""

    kind: str
    in_bytes: int


@dataclass(slots=True)
class Decision:
    """Where a task runs, both predicted totals, why, and every term of both totals (seconds)."""

    target: Target
    t_local_s: float
    t_cloud_s: float
    reason: Reason
    terms: Mapping[str, float]
    # True when the model preferred the gateway but the task goes to the cloud to refresh stale estimates.
    probe: bool = False
    # True when the cloud would have won but for provisioning: the caller should request a lease now, so the
    # next tasks find it warm (provisioning is paid once for many tasks, not charged to this one).
    prewarm: bool = False
    # Hedging a cloud task: if its result has not come ``hedge_after_s`` seconds after this decision, the caller
    # starts the same task on the gateway too (reporting it with ``task_started("local", task)``), keeps the
    # result that comes first and cancels or ignores the other copy: ``task_finished`` for each copy once it
    # ended, or ``cloud_cancelled`` for a cloud copy cancelled because the gateway's finished first. Finite only
    # for a cloud task the model chose (probes included); ``math.inf`` for local tasks and for routes placed in
    # the cloud by the operator. The delay is the predicted cloud total plus a bound that ordinary prediction
    # error stays within (see ``HEDGE_*``), so that a task stuck in an upload that met a fade does not wait for
    # the fade to end.
    hedge_after_s: float = math.inf
    # The upload's own deadline (seconds after this decision, ``math.inf`` where ``hedge_after_s`` is): a caller
    # that sees when each upload ends starts the gateway copy at this time if the upload has not ended yet
    # (see ``UPLOAD_HEDGE_*``). One that cannot see uploads end ignores it.
    upload_by_s: float = math.inf
    # True for a decision of Policy.rebind that moved a task waiting on the gateway to the cloud (late binding).
    rebound: bool = False

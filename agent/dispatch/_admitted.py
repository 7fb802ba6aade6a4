"""A task the dispatcher has decided and queued, and what its result message says of that decision."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from agent.decision import Decision, Task
from agent.store import TaskRef

# What a queued task keeps of its decision's terms: nothing (they are most of a decision's memory; the latest
# ones per kind stay in ``last_terms`` for /metrics).
NO_TERMS: Mapping[str, float] = {}


class Admitted(NamedTuple):
    """A task with its decision, waiting for its turn."""

    ref: TaskRef
    task: Task
    decision: Decision | None  # None: the kind is not installed (it fails without running)
    fallback: str | None = None  # why a task decided for the cloud runs on the gateway after all
    decided_at: float = 0.0  # the dispatcher's clock when it was decided (hedging counts from then)
    hedge: bool = False  # the gateway copy of a cloud task that was overdue


def micro(seconds: float) -> float:
    """``seconds`` to the microsecond: what ``round(seconds, 6)`` gives, at a third of its cost (five a result)."""
    try:
        return round(seconds * 1e6) / 1e6
    except (OverflowError, ValueError):  # inf, nan: as they are (a result writes them as null)
        return seconds


def decision_fields(item: Admitted, hedged: bool = False) -> dict[str, Any]:
    """The ``decision`` object of a result message, with its optional flags ``probe``, ``fallback`` (why a task
    decided for the cloud ran here) and ``hedged``: see docs/design.md#mqtt-contract."""
    decision = item.decision
    if decision is None:
        return {"t_local_s": None, "t_cloud_s": None, "reason": "unknown_task"}
    fields: dict[str, Any] = {"t_local_s": micro(decision.t_local_s), "t_cloud_s": micro(decision.t_cloud_s),
                              "reason": decision.reason}
    if decision.probe:
        fields["probe"] = True
    if item.fallback is not None:
        fields["fallback"] = item.fallback
    if hedged or item.hedge:
        fields["hedged"] = True
    if decision.rebound:
        fields["rebound"] = True
    return fields

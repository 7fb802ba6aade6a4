"""``edge-agent explain --archive ROUTE``: a route's next segment priced in both places, term by term.

:func:`as_json` is the plain-data form (what ``--json`` prints), :func:`render` the text an operator reads, made
from that form alone so that the same text can be made from an answer of the running agent.
"""

from __future__ import annotations

import math
from typing import Any

from agent.archive.cost import KNEE, ArchivePrices, Placement, SegmentFacts, Terms, place_segment

__all__ = ["as_json", "render"]


def _finite(value: float | str) -> float | str | None:
    # JSON has no infinity: an unbounded price (over the disk budget) is null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _terms(terms: Terms) -> dict[str, Any]:
    return {"storage": _finite(terms.storage), "retrieval": _finite(terms.retrieval), "total": _finite(terms.total),
            "explain": {key: _finite(value) for key, value in terms.explain.items()}}


def as_json(route: str, facts: SegmentFacts, prices: ArchivePrices, *, placement: Placement | None = None,
            estimate: dict[str, float | None] | None = None) -> dict[str, Any]:
    """One segment's placement as plain data. ``placement``: the one already made (default: made here);
    ``estimate``: the route's :meth:`~agent.archive.cost.RetrievalRate.snapshot`, to say where the expected
    reads come from."""
    if placement is None:
        placement = place_segment(facts, prices)
    return {
        "route": route,
        "segment": {"size_bytes": facts.size_bytes, "months_left": facts.months_left,
                    "retrievals_per_month": facts.retrievals_per_month, "disk_used_bytes": facts.disk_used_bytes},
        "prices": {"uplink_per_gb": prices.uplink_per_gb,
                   "cloud_storage_per_gb_month": prices.cloud_storage_per_gb_month,
                   "cloud_egress_per_gb": prices.cloud_egress_per_gb,
                   "disk_budget_bytes": prices.disk_budget_bytes, "margin": prices.margin, "knee": KNEE},
        "choice": placement.choice,
        "reason": placement.reason,
        "gateway": _terms(placement.gateway),
        "cloud": _terms(placement.cloud),
        "estimate": estimate,
    }


def _money(value: float | None) -> str:
    return f"{'∞':>10}" if value is None else f"{value:10.4f}"


def render(data: dict[str, Any]) -> str:
    """The text of ``explain --archive`` from :func:`as_json`'s data: the choice and why, then both totals and
    every term with the figures it was computed from."""
    seg, prices = data["segment"], data["prices"]
    gw, cl = data["gateway"], data["cloud"]
    g, c = gw["explain"], cl["explain"]
    gb = seg["size_bytes"] / 1e9
    where = "stays on the gateway" if data["choice"] == "gateway" else "goes to the cloud"
    margin = prices["margin"]
    if data["reason"] == "over_budget":
        why = "the archive is over its disk budget: the segment must leave whatever the price"
    elif data["reason"] == "margin":
        why = f"neither place is cheaper by more than {margin:.0%}, and moving has a price of its own"
    else:
        winner, loser = (gw["total"], cl["total"]) if data["choice"] == "gateway" else (cl["total"], gw["total"])
        by = 1.0 - winner / loser if loser else 0.0
        why = f"cheaper by {by:.0%}; the cheaper place must win by more than {margin:.0%}"
    fill = g["disk_fill"]
    shadow = g["shadow_per_gb_month"]
    budget_gb = prices["disk_budget_bytes"] / 1e9
    lines = [
        f"Route {data['route']}: the next segment, {seg['size_bytes']:,} bytes kept {seg['months_left']:.2f} "
        f"month(s) more, {where} ({why}).",
        "",
        f"{'on the gateway':<24}{_money(gw['total'])}",
        f"{'  storage':<24}{_money(gw['storage'])}   {gb:.3f} GB × {seg['months_left']:.2f} month(s) × "
        + ("the disk's shadow price, unbounded" if shadow is None
           else f"{shadow:.4g}/GB-month, the disk's shadow price"),
        *((f"{'':<37}the disk holds {fill:.1%} of its {budget_gb:.3g} GB budget: over it, nothing more may stay",)
          if shadow is None else
          (f"{'':<37}the disk holds {fill:.1%} of its {budget_gb:.3g} GB budget: the price is "
           f"{_share(g['shadow_factor'])} of a first",
           f"{'':<37}month in the cloud ({g['cloud_month_per_gb']:.4f}/GB, the upload and a month's storage), "
           f"all of it at {prices['knee']:.0%}")),
        f"{'  retrieval':<24}{_money(gw['retrieval'])}   {g['expected_reads']:.3f} expected read(s) × {gb:.3f} GB "
        f"× {prices['uplink_per_gb']:g}/GB over the metered uplink",
        f"{'in the cloud':<24}{_money(cl['total'])}",
        f"{'  storage':<24}{_money(cl['storage'])}   upload {gb:.3f} GB × {prices['uplink_per_gb']:g}/GB = "
        f"{c['upload']:.4f}, + {c['gb_months']:.4f} GB-months × {prices['cloud_storage_per_gb_month']:g}"
        f"/GB-month",
        f"{'  retrieval':<24}{_money(cl['retrieval'])}   {c['expected_reads']:.3f} expected read(s) × {gb:.3f} GB "
        f"× {prices['cloud_egress_per_gb']:g}/GB egress",
        "",
        _reads(seg["retrievals_per_month"], data.get("estimate")),
    ]
    return "\n".join(lines)


def _share(fraction: float) -> str:
    return "under 0.01%" if fraction < 0.0001 else f"{fraction:.2%}"


def _reads(per_month: float, estimate: dict[str, Any] | None) -> str:
    head = f"Expected reads: {per_month:.3f} per month of the segment's data"
    if not estimate:
        return head + " (the route's retrievals_per_month)."
    observed, weight = estimate.get("observed_per_month"), estimate.get("weight") or 0.0
    if observed is None or weight <= 0.0:
        return head + f" (the route's prior, {estimate['prior_per_month']:g}: no segment sealed yet)."
    return (head + f": {weight:.0%} learned from the route's reads ({observed:.3f} per month), "
            f"{1 - weight:.0%} the route's prior ({estimate['prior_per_month']:g}); half-life "
            f"{estimate.get('half_life_days', 30.0):g} days.")

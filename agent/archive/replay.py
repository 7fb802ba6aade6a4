"""``edge-agent archive replay``: a month of archive routes, placed by the agent and by baselines, in money.

A workload (``agent/archive/workloads/*.json``) gives each route's data rate, retention, prior and the queries
that read it back, and the prices and disk budget. The replay draws the segments and the queries once, then
places every segment under each policy and prices what happens, with the real prices only (uploads and reads
from the gateway over the metered uplink, cloud GB-months, cloud egress; the gateway's disk costs nothing, but
its budget is a hard limit):

- ``agent``: the daemon's decision code, :func:`agent.archive.cost.place_segment` at each seal and again each
  day for the segments still on the gateway (the daemon's manager asks every few minutes; the disk's fill
  changes over hours), with a :class:`~agent.archive.cost.RetrievalRate` per route learning from the simulated
  queries;
- ``always_local`` and ``always_cloud``;
- ``oracle``: knows every segment's future reads and every future seal, and schedules each segment (stay, go at
  its seal, or leave after some days) at least cost within the disk budget. That is an integer program; the
  replay solves its Lagrangian relaxation (a price per byte of disk at each moment) by subgradient ascent, which
  gives a lower bound on any schedule's cost, and repairs the relaxation's schedules into feasible ones, the
  cheapest of which is the oracle's (``oracle_gap``: how far above the bound it is). Without a binding budget
  the oracle is each segment's cheapest schedule, and the bound a hair lower (it allows moves between the
  grid's points at their least cost);
- ``route_oracle``: the same search knowing only each route's true reads by age, not which segment a query
  will hit: what the best policy that learns per route could do. The difference to ``oracle`` is the price of
  not knowing the dice (which clip a complaint will be about), which no online policy can know.

Every policy runs under the placement manager's hard rule: after a seal that takes the disk over its budget, the
oldest segments on the gateway move to the cloud until it fits. The replay begins with the archive in its steady
state: a warm-up of the longest retention (decided by the same policy, learning included) whose segments are not
counted; the costs are those of the segments sealed during ``days``, over their whole lives.

This module holds the workloads and the command, and imports no numpy (building the archive command's options
must stay cheap); the engine is :mod:`agent.archive.simulate`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from agent.archive.cost import SECONDS_PER_MONTH, ArchivePrices

__all__ = [
    "POLICIES",
    "SHIPPED",
    "ArchiveWorkload",
    "Query",
    "Route",
    "add_arguments",
    "load_workload",
    "run",
    "shipped",
    "workload_from_dict",
]

DAY = 86_400.0
HOUR = 3_600.0
MONTH = SECONDS_PER_MONTH
WORKLOADS = Path(__file__).with_name("workloads")
SHIPPED = ("default", "full-disk", "read-heavy", "expensive-uplink")
POLICIES = ("agent", "always_local", "always_cloud", "oracle", "route_oracle")
EX_USAGE = 2  # bad command-line input, as the other subcommands


@dataclass(frozen=True, slots=True)
class Query:
    """One way a route's archive is read back: each query reads ``span_hours`` of the route's time line.

    Periodic (``every_hours`` > 0): the span ends ``lag_hours`` before each query (a nightly export of the
    previous day). At random (``per_month`` > 0, Poisson): the span ends at a uniform time within the last
    ``within_days`` (complaints about a noise, an investigation)."""

    span_hours: float
    every_hours: float = 0.0
    per_month: float = 0.0
    lag_hours: float = 0.0
    within_days: float = 0.0

    def check(self) -> None:
        if self.span_hours <= 0 or min(self.lag_hours, self.within_days) < 0:
            raise ValueError("a query needs span_hours > 0, lag_hours and within_days >= 0")
        if (self.every_hours > 0) == (self.per_month > 0) or min(self.every_hours, self.per_month) < 0:
            raise ValueError("a query is either periodic (every_hours > 0) or at random (per_month > 0)")


@dataclass(frozen=True, slots=True)
class Route:
    """An archive route: its data rate, retention (``days``), configured prior and the queries that read it."""

    name: str
    gb_per_day: float
    days: float
    retrievals_per_month: float
    queries: tuple[Query, ...] = ()

    def check(self) -> None:
        if not self.name or self.gb_per_day <= 0 or self.days <= 0 or self.retrievals_per_month < 0:
            raise ValueError(f"route {self.name!r}: need a name, gb_per_day > 0, days > 0, "
                             "retrievals_per_month >= 0")
        for query in self.queries:
            query.check()


@dataclass(frozen=True, slots=True)
class ArchiveWorkload:
    name: str
    routes: tuple[Route, ...]
    prices: ArchivePrices
    description: str = ""
    days: float = 30.0  # segments sealed during this long are counted
    seal_age_s: float = 3_600.0  # a segment is sealed after this long ...
    seal_bytes: int = 128_000_000  # ... or at this size, whichever comes first
    size_sigma: float = 0.1  # segment sizes vary log-normally around the route's rate
    warmup_days: float | None = None  # None: the longest retention (the archive starts in its steady state)
    seed: int = 1
    oracle_grid_days: float = 1.0  # the oracle may move a segment to the cloud at its seal or after n × this

    def check(self) -> None:
        if not self.routes or self.days <= 0:
            raise ValueError("a workload needs routes and days > 0")
        if self.seal_age_s <= 0 or self.seal_bytes <= 0 or self.size_sigma < 0 or self.oracle_grid_days <= 0:
            raise ValueError("seal_age_s, seal_bytes and oracle_grid_days must be > 0, size_sigma >= 0")
        if self.warmup_days is not None and self.warmup_days < 0:
            raise ValueError("warmup_days must be >= 0")
        if len({route.name for route in self.routes}) != len(self.routes):
            raise ValueError("route names must be unique")
        for route in self.routes:
            route.check()
        self.prices.check()

    @property
    def warmup_s(self) -> float:
        days = max(r.days for r in self.routes) if self.warmup_days is None else self.warmup_days
        return days * DAY


def _build(cls: Any, data: Mapping[str, Any], what: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {what} fields: {', '.join(sorted(unknown))}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise ValueError(f"bad {what}: {exc}") from None


def workload_from_dict(data: Mapping[str, Any], name: str) -> ArchiveWorkload:
    """A workload from its JSON form: top-level fields of :class:`ArchiveWorkload` (``name`` defaults to the
    file's), ``prices`` those of :class:`~agent.archive.cost.ArchivePrices`, ``routes`` a list of
    :class:`Route` with ``queries`` lists of :class:`Query`."""
    values = dict(data)
    try:
        routes = tuple(
            _build(Route, {**route, "queries": tuple(_build(Query, q, "query") for q in route.get("queries", ()))},
                   "route")
            for route in values.pop("routes", ()))
        prices = _build(ArchivePrices, values.pop("prices", {}), "prices")
    except (AttributeError, TypeError):
        raise ValueError("routes are objects with their queries a list of objects; prices an object") from None
    values.setdefault("name", name)
    workload: ArchiveWorkload = _build(ArchiveWorkload, {**values, "routes": routes, "prices": prices}, "workload")
    workload.check()
    return workload


def load_workload(path: Path) -> ArchiveWorkload:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read: {exc.strerror}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return workload_from_dict(data, path.stem)


def shipped(name: str) -> ArchiveWorkload:
    """One of the workloads that ship with the agent (:data:`SHIPPED`), by name."""
    if name not in SHIPPED:
        raise ValueError(f"no shipped workload {name!r}; there are {', '.join(SHIPPED)}")
    return load_workload(WORKLOADS / f"{name}.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``edge-agent archive replay``."""
    parser.add_argument("--days", type=float, help="days of seals to count (default: the workload's, 30)")
    parser.add_argument("--workload", action="append", metavar="FILE|NAME",
                        help="workload JSON, or the name of a shipped one "
                             f"({', '.join(SHIPPED)}); repeat for several (default: default)")
    parser.add_argument("--all", action="store_true", help="every shipped workload")
    parser.add_argument("--json", action="store_true", help="print the results as JSON, one object per workload")


def run(args: argparse.Namespace) -> int:
    """``edge-agent archive replay``: replay each workload named and print its table (or JSON lines)."""
    names: list[str] = list(SHIPPED) if args.all else (args.workload or ["default"])
    if args.days is not None and args.days <= 0:
        print("edge-agent archive replay: --days must be > 0", file=sys.stderr)
        return EX_USAGE
    try:
        # A shipped workload by its name, anything else as a file ("default" in the working directory is a name).
        workloads = [shipped(name) if name in SHIPPED or (Path(name).suffix == "" and not Path(name).exists())
                     else load_workload(Path(name)) for name in names]
    except ValueError as exc:
        print(f"edge-agent archive replay: {exc}", file=sys.stderr)
        return EX_USAGE
    from agent.archive.simulate import as_json, format_table, run_replay  # numpy: only when replaying

    for i, workload in enumerate(workloads):
        result = run_replay(workload, days=args.days)
        if args.json:
            json.dump(as_json(result), sys.stdout)
            sys.stdout.write("\n")
        else:
            if i:
                print()
            print(format_table(result))
    return 0

"""The storage cost model: where a sealed archive segment costs least, C_total = C_storage + C_retrieval.

Pure arithmetic on plain values (no I/O, no settings classes), so the daemon's placement manager, ``edge-agent
explain --archive`` and ``edge-agent archive replay`` run the same code.

Per sealed segment, in the currency of the prices:

- on the gateway: C_storage = GB × months left × the disk's shadow price per GB-month; C_retrieval = expected
  retrieved GB × the uplink's price per GB (a read from the gateway crosses the metered uplink);
- in the cloud: C_storage = GB × the uplink's price (the upload) + GB × months left × the storage price;
  C_retrieval = expected retrieved GB × the cloud's egress price.

The gateway's disk is already paid for: its only cost is that a byte held here forces another byte to the cloud
once the disk budget is full. Its shadow price per GB-month is therefore the price of a first month in the cloud
(the upload plus a month of storage) scaled by how full the budget is: nearly nothing on an empty disk, the
cloud's at ``KNEE`` of the budget, unbounded past it. One price per GB-month for every route: a segment kept for
three months holds the disk three times as long as one kept for a month, and leaves first when disk gets dear.
The manager keeps the budget as a hard limit on top of this (over it, the oldest segments leave whatever the
price).

Expected retrievals come from :class:`RetrievalRate`, learned per route from real queries with the route's
``retrievals_per_month`` as the prior.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "GB",
    "KNEE",
    "SECONDS_PER_MONTH",
    "ArchivePrices",
    "Placement",
    "RetrievalRate",
    "SegmentFacts",
    "Terms",
    "place_segment",
    "shadow_factor",
]

GB = 1e9  # storage and transfer are priced per decimal gigabyte
SECONDS_PER_MONTH = 30 * 86_400.0  # a month of retention and of storage prices: 30 days
# The disk fill at which a GB-month on the gateway is priced like a first month in the cloud. Below it the price
# falls off fast (at 95 % of the budget it is a fiftieth of that, at 90 % a thousandth), above it it climbs to
# infinity at the budget: the archive uses nearly all of its budget before it pays for the cloud, and the rest
# is room for the segments being written. Each per cent left unused is a per cent of the budget's worth paid to
# the cloud (measured with the archive replay's full-disk workload: 0.97 cost 0.8 % more than 0.98).
KNEE = 0.98
_STEEPNESS = 4.0

Choice = Literal["gateway", "cloud"]


@dataclass(frozen=True, slots=True)
class ArchivePrices:
    """Prices and limits of the archive, from the ``EDGE_AGENT_ARCHIVE__*`` settings."""

    uplink_per_gb: float  # currency per GB over the gateway's metered uplink (uploads and reads from the gateway)
    cloud_storage_per_gb_month: float
    cloud_egress_per_gb: float  # currency per GB read back out of cloud storage
    disk_budget_bytes: int  # the archive's hard limit on the gateway's disk
    margin: float  # the cheaper place must win by this fraction of the other's total

    def check(self) -> None:
        if min(self.uplink_per_gb, self.cloud_storage_per_gb_month, self.cloud_egress_per_gb) < 0:
            raise ValueError("prices must be >= 0")
        if self.disk_budget_bytes <= 0:
            raise ValueError("disk_budget_bytes must be > 0")
        if not 0 <= self.margin < 1:
            raise ValueError("margin must be in [0, 1)")


@dataclass(frozen=True, slots=True)
class SegmentFacts:
    size_bytes: int
    months_left: float  # until retention deletes it
    retrievals_per_month: float  # expected reads of this segment's data per month (RetrievalRate.per_month)
    disk_used_bytes: int  # the archive's disk use now, this segment included


@dataclass(frozen=True, slots=True)
class Terms:
    """One place's cost, term by term. ``explain`` has the figures each term was computed from."""

    storage: float
    retrieval: float
    total: float
    explain: dict[str, float | str]


@dataclass(frozen=True, slots=True)
class Placement:
    gateway: Terms
    cloud: Terms
    choice: Choice
    # "cheaper": the chosen place wins by more than the margin; "margin": neither does, so the segment stays
    # where it was sealed (moving has a price of its own); "over_budget": the disk budget leaves no choice.
    reason: str


def shadow_factor(disk_used_bytes: int, disk_budget_bytes: int) -> float:
    """The disk's shadow price as a fraction of a first month in the cloud: ((u / (1 - u)) / (K / (1 - K)))⁴
    for the fill u, 1 at ``KNEE``, infinite at or over the budget."""
    fill = disk_used_bytes / disk_budget_bytes
    if fill >= 1.0:
        return math.inf
    if fill <= 0.0:
        return 0.0
    odds = (fill / (1.0 - fill)) / (KNEE / (1.0 - KNEE))
    return float(odds**_STEEPNESS)


def place_segment(facts: SegmentFacts, prices: ArchivePrices) -> Placement:
    """Both totals for one sealed segment, and the place that wins by ``prices.margin``."""
    gb = facts.size_bytes / GB
    months = max(facts.months_left, 0.0)
    reads = max(facts.retrievals_per_month, 0.0) * months  # expected reads over the rest of its life
    retrieved_gb = gb * reads

    upload = gb * prices.uplink_per_gb
    cloud_storage = upload + gb * months * prices.cloud_storage_per_gb_month
    cloud_retrieval = retrieved_gb * prices.cloud_egress_per_gb
    cloud = Terms(cloud_storage, cloud_retrieval, cloud_storage + cloud_retrieval, {
        "size_gb": gb,
        "months_left": months,
        "upload": upload,
        "uplink_per_gb": prices.uplink_per_gb,
        "gb_months": gb * months,
        "storage_per_gb_month": prices.cloud_storage_per_gb_month,
        "expected_reads": reads,
        "retrieved_gb": retrieved_gb,
        "egress_per_gb": prices.cloud_egress_per_gb,
        "storage_formula": "size_gb × uplink_per_gb + gb_months × storage_per_gb_month",
        "retrieval_formula": "retrieved_gb × egress_per_gb",
    })

    fill = facts.disk_used_bytes / prices.disk_budget_bytes
    factor = shadow_factor(facts.disk_used_bytes, prices.disk_budget_bytes)
    # A first month in the cloud per GB: what a byte here displaces for a month once the disk is full.
    reference = prices.uplink_per_gb + prices.cloud_storage_per_gb_month
    shadow = factor * reference if factor > 0 else 0.0
    gateway_storage = gb * months * shadow if gb * months > 0 else 0.0
    gateway_retrieval = retrieved_gb * prices.uplink_per_gb
    gateway = Terms(gateway_storage, gateway_retrieval, gateway_storage + gateway_retrieval, {
        "size_gb": gb,
        "months_left": months,
        "disk_used_bytes": float(facts.disk_used_bytes),
        "disk_budget_bytes": float(prices.disk_budget_bytes),
        "disk_fill": fill,
        "shadow_factor": factor,
        "cloud_month_per_gb": reference,
        "shadow_per_gb_month": shadow,
        "expected_reads": reads,
        "retrieved_gb": retrieved_gb,
        "uplink_per_gb": prices.uplink_per_gb,
        "storage_formula": "size_gb × months_left × shadow_per_gb_month "
                           "(shadow_per_gb_month = shadow_factor × cloud_month_per_gb)",
        "retrieval_formula": "retrieved_gb × uplink_per_gb",
    })

    if math.isinf(gateway.total):
        return Placement(gateway, cloud, "cloud", "over_budget")
    if cloud.total < gateway.total * (1.0 - prices.margin):
        return Placement(gateway, cloud, "cloud", "cheaper")
    if gateway.total < cloud.total * (1.0 - prices.margin):
        return Placement(gateway, cloud, "gateway", "cheaper")
    return Placement(gateway, cloud, "gateway", "margin")


class RetrievalRate:
    """How often a route's archived data is read back, learned online from real reads, the route's prior first.

    What it learns is a flow ratio: bytes read back (from either place) per byte sealed, both as sums fading
    with a half-life. In a steady archive that is the number of times a segment is read over its life, whatever
    the ages the queries ask for (recent clips after a complaint, a month of counts for planning), and it needs
    no notion of how much data the route holds. Divided by the retention it is the expected reads per month of a
    segment's data, which :class:`SegmentFacts` takes.

    The half-life defaults to twice the retention, and to at least two months: a segment's reads are spread over
    its life, and a city reads much of its data back in lumps (a monthly report); a lump every P days swings the
    estimate by a factor of 2^(P / half-life) between lumps, ±17 % at most for lumps once a retention or once a
    month. The prior counts as ``prior_weight_days`` of observation that fades like the rest, so the
    first query of a quiet route does not swing a month of placements, and a year later the prior is forgotten.
    """

    __slots__ = ("_half_life_s", "_last", "_prior", "_prior_weight_s", "_read", "_retention_months", "_sealed",
                 "_seen_s")

    def __init__(self, prior_per_month: float, retention_days: float, *, half_life_days: float | None = None,
                 prior_weight_days: float = 7.0, start: float | None = None) -> None:
        if half_life_days is None:
            half_life_days = max(2.0 * retention_days, 60.0)
        if prior_per_month < 0 or retention_days <= 0 or half_life_days <= 0 or prior_weight_days < 0:
            raise ValueError("need prior_per_month >= 0, retention_days > 0, half_life_days > 0, "
                             "prior_weight_days >= 0")
        self._prior = prior_per_month
        self._retention_months = retention_days * 86_400.0 / SECONDS_PER_MONTH
        self._half_life_s = half_life_days * 86_400.0
        self._prior_weight_s = prior_weight_days * 86_400.0  # fades like the observations
        self._read = 0.0  # faded bytes read back
        self._sealed = 0.0  # faded bytes sealed
        self._seen_s = 0.0  # faded seconds of observation
        self._last = start

    @property
    def half_life_days(self) -> float:
        return self._half_life_s / 86_400.0

    def _advance(self, now: float) -> None:
        if self._last is None:
            self._last = now
            return
        dt = now - self._last
        if dt <= 0:
            return  # a clock step backwards: no fading, no observation time
        fade = 0.5 ** (dt / self._half_life_s)
        self._read *= fade
        self._sealed *= fade
        self._prior_weight_s *= fade
        # The integral of the fading over dt: the weight of the time just observed, as it stands now.
        self._seen_s = self._seen_s * fade + self._half_life_s / math.log(2) * (1.0 - fade)
        self._last = now

    def sealed(self, now: float, size_bytes: int) -> None:
        """A segment of ``size_bytes`` of this route was sealed."""
        self._advance(now)
        self._sealed += size_bytes

    def read(self, now: float, size_bytes: int) -> None:
        """A query read ``size_bytes`` of this route's archived data (whichever place it came from)."""
        self._advance(now)
        self._read += size_bytes

    def observed_per_month(self, now: float) -> float | None:
        """What the reads alone say, None before anything was sealed."""
        self._advance(now)
        if self._sealed <= 0.0:
            return None
        return self._read / self._sealed / self._retention_months

    def weight(self, now: float) -> float:
        """The share of :meth:`per_month` that comes from observation rather than the prior, in [0, 1]."""
        self._advance(now)
        if self._sealed <= 0.0:
            return 0.0
        total = self._seen_s + self._prior_weight_s
        return self._seen_s / total if total > 0 else 1.0

    def per_month(self, now: float) -> float:
        """Expected reads per month of a segment's data."""
        observed = self.observed_per_month(now)
        if observed is None:
            return self._prior
        w = self.weight(now)
        return w * observed + (1.0 - w) * self._prior

    def snapshot(self, now: float) -> dict[str, float | None]:
        """The estimate and where it comes from, for explain and /status."""
        return {"per_month": self.per_month(now), "prior_per_month": self._prior,
                "observed_per_month": self.observed_per_month(now), "weight": self.weight(now),
                "half_life_days": self.half_life_days}

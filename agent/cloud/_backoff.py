"""Backing off as the server asks: the ``Retry-After`` header. The agent's own backoff is ``agent.backoff``."""

from __future__ import annotations

import math
from datetime import UTC, datetime


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """``Retry-After`` (RFC 9110 §10.2.3) in seconds from ``now``: delay-seconds or an HTTP-date.

    None when absent or unreadable (the caller then uses ``agent.backoff``); a date in the past gives 0.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():
        return float(int(text))
    # Imported here: the daemon loads this module with the cloud off too, and email costs it memory for life.
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" in the date: RFC 5322 says the zone is unknown; HTTP dates are UTC
        when = when.replace(tzinfo=UTC)
    seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None

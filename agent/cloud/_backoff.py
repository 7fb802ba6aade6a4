"""Retry arithmetic as pure functions: backoff with jitter and the ``Retry-After`` header."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime


def compute_backoff(attempt: int, min_s: float, max_s: float, jitter: float) -> float:
    """Seconds to wait before retry number ``attempt`` (1 = the first retry).

    Exponential (``min_s``·2^(attempt-1), capped at ``max_s``) with "equal jitter": a uniform draw over the
    upper half of that figure (``jitter`` in [0, 1) picks where), so clients that failed together spread out
    yet none retries sooner than half the nominal delay. The result always lies in [min_s, max_s].
    """
    if attempt < 1:
        raise ValueError("attempt counts retries from 1")
    if not 0.0 <= jitter <= 1.0:
        raise ValueError("jitter must be in [0, 1]")
    # min(...) before the power would overflow for large attempts; 2**64 is beyond any sensible max_s ratio.
    nominal = min(max_s, min_s * 2.0 ** min(attempt - 1, 64))
    return min(max_s, max(min_s, nominal * (0.5 + 0.5 * jitter)))


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """``Retry-After`` (RFC 9110 §10.2.3) in seconds from ``now``: delay-seconds or an HTTP-date.

    None when absent or unreadable (the caller then uses its own backoff); a date in the past gives 0.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():
        return float(int(text))
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" in the date: RFC 5322 says the zone is unknown; HTTP dates are UTC
        when = when.replace(tzinfo=UTC)
    seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None

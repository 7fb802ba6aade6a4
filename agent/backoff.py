"""The agent's one backoff: how long to wait before the next try, for the MQTT reconnects and the cloud's retries."""

from __future__ import annotations


def compute_backoff(attempt: int, min_s: float, max_s: float, jitter: float) -> float:
    """Seconds to wait before retry number ``attempt`` (1 = the first retry); ``jitter`` in [0, 1] picks where.

    Exponential with "equal jitter": the cap ``min_s``·2^attempt (at most ``max_s``) is halved, and the jitter
    spreads the wait over the upper half, from cap/2 to the cap. Retry 1 waits between ``min_s`` and twice it,
    retry 2 between twice and four times, and so on; once capped, between ``max_s``/2 and ``max_s``. So clients
    that failed together spread out from the first retry on, and none waits less than ``min_s`` or more than
    ``max_s`` (``max_s`` wins where the two are crossed).
    """
    if attempt < 1:
        raise ValueError("attempt counts retries from 1")
    if not 0.0 <= jitter <= 1.0:
        raise ValueError("jitter must be in [0, 1]")
    # The exponent is bounded so the power cannot overflow; 2**64 is beyond any sensible max_s/min_s ratio.
    cap = min(max_s, min_s * 2.0 ** min(attempt, 64))
    low = max(min_s, cap / 2)
    return min(max_s, max(min_s, low + (cap - low) * jitter))

"""The circuit breaker: a pure state machine over an injected ``now``."""

from __future__ import annotations

import enum


class CircuitState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Stops offloading after ``failures`` consecutive failed offloads, for ``cooldown_s``.

    After the cool-down exactly one call (the probe) is let through: its success closes the circuit, its
    failure opens it for another cool-down. ``trip`` opens it at once (a rejected token fails every call).
    """

    def __init__(self, failures: int, cooldown_s: float) -> None:
        if failures < 1 or cooldown_s <= 0:
            raise ValueError("failures must be at least 1 and the cool-down positive")
        self._threshold = failures
        self._cooldown_s = cooldown_s
        self._state = CircuitState.CLOSED
        self._consecutive = 0
        self._opened_at = 0.0
        self._probe_in_flight = False

    @property
    def state(self) -> CircuitState:
        return self._state

    def is_open(self, now: float) -> bool:
        """True while no call would be let through (cooling down, or the probe is out)."""
        if self._state is CircuitState.CLOSED:
            return False
        if self._state is CircuitState.OPEN:
            return now - self._opened_at < self._cooldown_s
        return self._probe_in_flight

    def retry_in(self, now: float) -> float:
        if self._state is CircuitState.OPEN:
            return max(0.0, self._opened_at + self._cooldown_s - now)
        return 0.0 if self._state is CircuitState.CLOSED else self._cooldown_s

    def allow(self, now: float) -> bool:
        """Ask to make a call. After the cool-down the first caller becomes the probe; others are refused."""
        if self._state is CircuitState.CLOSED:
            return True
        if self._state is CircuitState.OPEN:
            if now - self._opened_at < self._cooldown_s:
                return False
            self._state = CircuitState.HALF_OPEN
            self._probe_in_flight = False
        if self._probe_in_flight:
            return False
        self._probe_in_flight = True
        return True

    def record_success(self) -> None:
        self._state = CircuitState.CLOSED
        self._consecutive = 0
        self._probe_in_flight = False

    def record_failure(self, now: float) -> None:
        self._consecutive += 1
        # Calls that were already out when the circuit opened fail too; they must not extend the cool-down.
        if self._state is CircuitState.HALF_OPEN or (
            self._state is CircuitState.CLOSED and self._consecutive >= self._threshold
        ):
            self._open(now)

    def record_abandoned(self) -> None:
        """A call ended without an outcome (cancelled): if it was the probe, the next caller may probe."""
        if self._state is CircuitState.HALF_OPEN:
            self._probe_in_flight = False

    def trip(self, now: float) -> None:
        self._consecutive = max(self._consecutive, self._threshold)
        self._open(now)

    def _open(self, now: float) -> None:
        self._state = CircuitState.OPEN
        self._opened_at = now
        self._probe_in_flight = False

"""Errors of the resource API client.

    AgentError
    └── CloudError               an offload did not produce a result; the caller runs the task locally
        ├── TransientCloudError  the cloud may answer later: connection errors, timeouts, 429, 502-504, a lease
        │                        that did not become ready; raised once the retries are used up
        ├── PermanentCloudError  the same request would fail again: 400, 401, a lease gone twice, a malformed
        │                        answer; never retried
        └── CircuitOpen          not attempted: recent offloads failed and the breaker is cooling down

``cloud_fault`` tells the circuit breaker whether the failure says something about the cloud (unreachable,
rejecting our token) or only about this one task (its input was refused), which must not stop offloading.
"""

from __future__ import annotations

from agent.errors import AgentError


class CloudError(AgentError):
    """An offload failed. ``status`` is the HTTP status when there was an answer, ``code`` its error code."""

    cloud_fault = True

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class TransientCloudError(CloudError):
    """Retrying later may succeed; ``retry_after`` is the server's ``Retry-After`` in seconds, if it gave one."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message, status=status, code=code)
        self.retry_after = retry_after


class PermanentCloudError(CloudError):
    """Retrying would fail the same way."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 cloud_fault: bool = True) -> None:
        super().__init__(message, status=status, code=code)
        self.cloud_fault = cloud_fault


class CircuitOpen(CloudError):
    """Offloading is paused after consecutive failures; ``retry_in`` seconds until the next probe may go."""

    def __init__(self, retry_in: float) -> None:
        super().__init__(f"the cloud circuit is open after repeated failures; next probe in {retry_in:.1f} s")
        self.retry_in = retry_in

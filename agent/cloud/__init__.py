"""Resource API client (docs/design.md#resource-api): leases, task submission, retries with backoff, circuit breaker.

Usage by the daemon::

    client = CloudClient(settings.cloud, observer=policy)
    try:
        cloud = await client.submit(task_id, kind, payload, options)   # CloudResult
    except CloudError:
        ...run the task locally...
    await client.aclose()                                              # releases the leases

``client.circuit_open(now)`` tells the decision to keep tasks local; ``client.lease_status()`` gives it the
lease capacity. ``Cloud`` is what the agent uses of a client (a Protocol: tests stand in for it), and
``CloudFactory`` how one is built (``CloudClient`` itself).

The client (and with it httpx) is imported on first use of its names: an agent without a cloud URL never loads
httpx, and the errors, the circuit breaker and the backoff come without it.
"""

from typing import TYPE_CHECKING, Any

from agent.backoff import compute_backoff
from agent.cloud._backoff import parse_retry_after
from agent.cloud._circuit import CircuitBreaker, CircuitState
from agent.cloud._errors import CircuitOpen, CloudError, PermanentCloudError, TransientCloudError
from agent.cloud._leases import Lease, choose_lease
from agent.cloud._surface import Cloud, CloudFactory

if TYPE_CHECKING:
    from agent.cloud._client import CloudClient, CloudObserver, CloudResult, LeaseSnapshot

_CLIENT_NAMES = frozenset({"CloudClient", "CloudObserver", "CloudResult", "LeaseSnapshot"})


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        from agent.cloud import _client

        return getattr(_client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "CircuitBreaker",
    "CircuitOpen",
    "CircuitState",
    "Cloud",
    "CloudClient",
    "CloudError",
    "CloudFactory",
    "CloudObserver",
    "CloudResult",
    "Lease",
    "LeaseSnapshot",
    "PermanentCloudError",
    "TransientCloudError",
    "choose_lease",
    "compute_backoff",
    "parse_retry_after",
]

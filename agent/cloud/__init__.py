"""Resource API client (docs/design.md#resource-api): leases, task submission, retries with backoff, circuit breaker.

Usage by the daemon::

    client = CloudClient(settings.cloud, observer=policy)
    try:
        cloud = await client.submit(task_id, kind, payload, options)   # CloudResult
    except CloudError:
        ...run the task locally...
    await client.aclose()                                              # releases the leases

``client.circuit_open(now)`` tells the decision to keep tasks local; ``client.lease_status()`` gives it the
lease capacity.
"""

from agent.cloud._backoff import compute_backoff, parse_retry_after
from agent.cloud._circuit import CircuitBreaker, CircuitState
from agent.cloud._client import CloudClient, CloudObserver, CloudResult, LeaseSnapshot
from agent.cloud._errors import CircuitOpen, CloudError, PermanentCloudError, TransientCloudError
from agent.cloud._leases import Lease, choose_lease

__all__ = [
    "CircuitBreaker",
    "CircuitOpen",
    "CircuitState",
    "CloudClient",
    "CloudError",
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

"""What the daemon, the dispatcher and /status use of the cloud client: :class:`Cloud`; :class:`CloudFactory`.

``CloudClient`` is the one implementation (and loads httpx); tests stand in for it. No httpx here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from agent.cloud._circuit import CircuitState
    from agent.cloud._client import CloudObserver, CloudResult, LeaseSnapshot
    from agent.config import CloudSettings


class Cloud(Protocol):
    @property
    def circuit_state(self) -> CircuitState: ...
    @property
    def sees_uploads(self) -> bool: ...

    def circuit_open(self, now: float) -> bool: ...
    def lease_status(self) -> LeaseSnapshot: ...
    def describe(self) -> dict[str, Any]: ...
    def prewarm(self) -> None: ...
    async def submit(self, task_id: str, kind: str, payload: bytes, options: Mapping[str, Any] | None = None,
                     on_uploaded: Callable[[], None] | None = None) -> CloudResult: ...
    async def aclose(self) -> None: ...


class CloudFactory(Protocol):
    """``CloudClient`` itself: the client reports what it measures to the decision's policy (the observer)."""

    def __call__(self, settings: CloudSettings, observer: CloudObserver | None = None) -> Cloud: ...

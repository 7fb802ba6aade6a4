"""The total-time model's parameters as plain values: priors per task kind and the policy's tuning
(docs/design.md#policy-interface).

The agent's settings (``agent.config.DecisionSettings``, the ``EDGE_AGENT_DECISION__*`` variables) validate and
document these figures and turn themselves into a :class:`DecisionParams` (``DecisionSettings.as_params()``);
the policy reads nothing else, so the decision package needs neither pydantic nor the settings. The defaults
here are the settings' defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class KindParams:
    """What the policy assumes about one task kind before it has measured it: service time
    ``fixed_s + per_byte_s × input bytes`` on each side, and the size of a result (bytes)."""

    local_fixed_s: float
    local_per_byte_s: float
    cloud_fixed_s: float
    cloud_per_byte_s: float
    out_bytes: int


# The priors of the built-in tasks, and of every other kind under "*".
DEFAULT_KINDS: Mapping[str, KindParams] = {
    # A JSON row and a rolling window: about a millisecond on a small ARM gateway, so local wins unless the
    # gateway is badly backed up; the cloud side is the same work behind a web framework.
    "sensor.stats": KindParams(local_fixed_s=0.001, local_per_byte_s=2e-8, cloud_fixed_s=0.0005,
                               cloud_per_byte_s=1e-8, out_bytes=400),
    # An FFT over the clip: linear in the clip length to first order. ~0.5 s for a 5 s clip (160 kB) on a
    # gateway-class core, and a cloud vCPU about four times faster; the answer is a few hundred bytes.
    "noise.spectrum": KindParams(local_fixed_s=0.02, local_per_byte_s=3e-6, cloud_fixed_s=0.005,
                                 cloud_per_byte_s=7.5e-7, out_bytes=300),
    # Any other kind (plugins): assume moderate, size-proportional work, so the first executions decide.
    "*": KindParams(local_fixed_s=0.01, local_per_byte_s=1e-6, cloud_fixed_s=0.005, cloud_per_byte_s=2.5e-7,
                    out_bytes=1000),
}


def _default_kinds() -> Mapping[str, KindParams]:
    return dict(DEFAULT_KINDS)


@dataclass(frozen=True, slots=True)
class DecisionParams:
    """Priors and tuning of the total-time model (docs/design.md#decision-model). The meaning of each field is
    that of its ``EDGE_AGENT_DECISION__*`` setting (docs/reference/configuration.md).

    ``kinds`` always holds ``"*"``, the priors of every kind not listed: the default's when it is not given.
    """

    kinds: Mapping[str, KindParams] = field(default_factory=_default_kinds)
    # Cellular uplinks in the field average 1-2 Mbit/s (agent/data/traces); a prior in that range neither
    # tempts the agent into offloading on a link it has not measured nor rules the cloud out.
    uplink_mbps: float = 2.0
    # Downlinks are typically 2-5x the uplink; results are small, so this prior barely matters.
    downlink_mbps: float = 5.0
    # A cellular round trip to a regional cloud: 50-100 ms.
    rtt_s: float = 0.08
    # Typical time for the resource API to bring a compute lease to "ready" (container start).
    provisioning_s: float = 3.0
    # 4 matches the lease size the agent asks for by default.
    cloud_slots: int = 4
    # 5 ms keeps exact ties and float noise from flapping between targets; a share costs real time in replays
    # (every near-tie the cloud would have won goes local), so it is 0.
    margin_s: float = 0.005
    margin_ratio: float = 0.0
    # Cellular capacity changes within seconds: 5 s did better than 10 or 20 s in the replays.
    network_half_life_s: float = 5.0
    baseline_half_life_s: float = 600.0
    service_memory: int = 50
    service_half_life_s: float = 3600.0
    # With no warm lease, a lease is requested first and the probe waits for it, so no task waits out
    # provisioning.
    probe_interval_s: float = 120.0
    probe_budget_s: float = 0.2

    def __post_init__(self) -> None:
        if "*" not in self.kinds:
            # Callers list the kinds they know; unknown ones still need a prior.
            object.__setattr__(self, "kinds", {**self.kinds, "*": DEFAULT_KINDS["*"]})


class ParamsSource(Protocol):
    """Anything that can give the policy its parameters: ``agent.config.DecisionSettings`` is one."""

    def as_params(self) -> DecisionParams: ...


def decision_params(given: DecisionParams | ParamsSource | None) -> DecisionParams:
    """What a :class:`~agent.decision.Policy` is given, as parameters (``None``: the defaults)."""
    if given is None:
        return DecisionParams()
    if isinstance(given, DecisionParams):
        return given
    return given.as_params()

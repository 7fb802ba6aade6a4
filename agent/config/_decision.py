"""The decision section: the total-time model's priors and tuning as settings (docs/design.md#decision-model)."""

from __future__ import annotations

from pydantic import Field, field_validator

from agent.config._sections import Frozen
from agent.decision import DEFAULT_KINDS, DecisionParams, KindParams


class KindPrior(Frozen):
    """What the agent assumes about one task kind before it has measured it (docs/design.md#decision-model).

    Service time is modelled as ``fixed_s + per_byte_s × input bytes`` on each side; measurements replace these
    numbers within a few dozen executions, so they only need to be the right order of magnitude. The settings
    form of ``agent.decision.KindParams``.
    """

    local_fixed_s: float = Field(ge=0, le=3600, description="service time on the gateway, fixed part (s)")
    local_per_byte_s: float = Field(ge=0, le=1, description="service time on the gateway per input byte (s)")
    cloud_fixed_s: float = Field(ge=0, le=3600, description="service time in the cloud, fixed part (s)")
    cloud_per_byte_s: float = Field(ge=0, le=1, description="service time in the cloud per input byte (s)")
    out_bytes: int = Field(ge=0, le=256 * 1024 * 1024, description="size of a result, for the download term")

    @classmethod
    def from_params(cls, params: KindParams) -> KindPrior:
        return cls(local_fixed_s=params.local_fixed_s, local_per_byte_s=params.local_per_byte_s,
                   cloud_fixed_s=params.cloud_fixed_s, cloud_per_byte_s=params.cloud_per_byte_s,
                   out_bytes=params.out_bytes)

    def as_params(self) -> KindParams:
        return KindParams(local_fixed_s=self.local_fixed_s, local_per_byte_s=self.local_per_byte_s,
                          cloud_fixed_s=self.cloud_fixed_s, cloud_per_byte_s=self.cloud_per_byte_s,
                          out_bytes=self.out_bytes)


def default_kind_priors() -> dict[str, KindPrior]:
    return {name: KindPrior.from_params(params) for name, params in DEFAULT_KINDS.items()}


# The model's own defaults (agent/decision/params.py, where each is explained) are the settings' defaults.
_DEFAULT = DecisionParams()


class DecisionSettings(Frozen):
    """Priors and tuning of the total-time model (docs/design.md#decision-model), validated and documented as
    settings; :meth:`as_params` turns them into what ``agent.decision.Policy`` reads."""

    kinds: dict[str, KindPrior] = Field(
        default_factory=default_kind_priors,
        description="service-time and result-size priors per task kind, as JSON (keys below); `*` stands for "
        "every kind not listed and is added when missing")
    uplink_mbps: float = Field(
        default=_DEFAULT.uplink_mbps, gt=0, le=100_000, description="uplink bandwidth before any measurement")
    downlink_mbps: float = Field(
        default=_DEFAULT.downlink_mbps, gt=0, le=100_000, description="downlink bandwidth before any measurement")
    rtt_s: float = Field(
        default=_DEFAULT.rtt_s, ge=0, le=60, description="round trip to the resource API before any measurement")
    provisioning_s: float = Field(
        default=_DEFAULT.provisioning_s, ge=0, le=3600,
        description="time to bring a compute lease to ready, before any measurement")
    cloud_slots: int = Field(
        default=_DEFAULT.cloud_slots, ge=1, le=1024,
        description="tasks a lease runs at once until the lease manager reports its real size: the cloud queue "
        "wait is the queued cloud work over this")
    margin_s: float = Field(
        default=_DEFAULT.margin_s, ge=0, le=60,
        description="offload only when the cloud is expected to be faster by more than this (seconds) ...")
    margin_ratio: float = Field(
        default=_DEFAULT.margin_ratio, ge=0, le=1,
        description="... or by this share of the local total, if larger")
    network_half_life_s: float = Field(
        default=_DEFAULT.network_half_life_s, gt=0, le=86_400,
        description="half-life (s) of the short-term bandwidth and RTT estimates; with no new sample they fall "
        "back to the long-term ones, so a recovered (or slowed) link is noticed")
    baseline_half_life_s: float = Field(
        default=_DEFAULT.baseline_half_life_s, gt=0, le=864_000,
        description="half-life (s) with which the long-term network estimates age toward the priors")
    service_memory: int = Field(
        default=_DEFAULT.service_memory, ge=2, le=100_000,
        description="executions a service-time fit remembers: a gateway that got slower (thermal throttling) is "
        "learned within about this many tasks of the kind")
    service_half_life_s: float = Field(
        default=_DEFAULT.service_half_life_s, gt=0, le=864_000,
        description="half-life (s) with which a kind not run on one side for a while ages back toward its prior")
    probe_interval_s: float = Field(
        default=_DEFAULT.probe_interval_s, ge=0, le=86_400,
        description="with no cloud result for this long, one small task goes to the cloud as a probe to refresh "
        "RTT and bandwidth; doubles (up to 16x) while probes never lead to offloading; 0: no probes")
    probe_budget_s: float = Field(
        default=_DEFAULT.probe_budget_s, ge=0, le=3600,
        description="a probe is a task expected to take at most this much longer in the cloud, provisioning aside")

    @field_validator("kinds")
    @classmethod
    def _fallback_kind(cls, value: dict[str, KindPrior]) -> dict[str, KindPrior]:
        if "*" not in value:
            # Operators list the kinds they know; unknown ones still need a prior.
            value = {**value, "*": KindPrior.from_params(DEFAULT_KINDS["*"])}
        return value

    def as_params(self) -> DecisionParams:
        """The settings as the model's parameters: the one way from the settings to a ``Policy``, whose
        constructor and ``reconfigure`` call it when given these settings (docs/design.md#policy-interface)."""
        return DecisionParams(
            kinds={name: prior.as_params() for name, prior in self.kinds.items()},
            uplink_mbps=self.uplink_mbps,
            downlink_mbps=self.downlink_mbps,
            rtt_s=self.rtt_s,
            provisioning_s=self.provisioning_s,
            cloud_slots=self.cloud_slots,
            margin_s=self.margin_s,
            margin_ratio=self.margin_ratio,
            network_half_life_s=self.network_half_life_s,
            baseline_half_life_s=self.baseline_half_life_s,
            service_memory=self.service_memory,
            service_half_life_s=self.service_half_life_s,
            probe_interval_s=self.probe_interval_s,
            probe_budget_s=self.probe_budget_s,
        )

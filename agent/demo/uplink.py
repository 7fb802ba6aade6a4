"""The cloud uplink follows a real trace: once a second the devcloud's bandwidth knob gets the trace's capacity.

The devcloud applies the cap to task uploads and downloads (one shared link), chunk by chunk, so a change
reaches transfers already under way. The agent is never told the capacity: it must measure it, which is the
point — the view shows the trace's true capacity beside the agent's estimate.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from agent.demo.processes import DemoError
from agent.replay.traces import Trace, TraceError, load_trace

# The knob's 0 means "no cap"; a trace's outage must stay an outage, so the floor is a trickle (1 kB/s).
OUTAGE_BYTES_PER_S = 1000.0


def load(path: Path) -> Trace:
    try:
        return load_trace(path)
    except TraceError as exc:
        raise DemoError(f"cannot use the uplink trace: {exc}") from None


class Uplink:
    """Plays ``trace`` at ``speed`` trace-seconds per second, one knob update per call of :meth:`tick`."""

    def __init__(self, trace: Trace, devcloud_url: str, token: str, speed: float) -> None:
        self.trace = trace
        self.speed = speed
        self._client = httpx.Client(base_url=devcloud_url, headers={"Authorization": f"Bearer {token}"},
                                    timeout=2.0)
        self.mbps = 0.0
        self.updates = 0

    def capacity_mbps(self, elapsed_s: float, step_s: float = 1.0) -> float:
        """Mean capacity over the next ``step_s`` seconds of demo time, in Mbit/s."""
        t0 = elapsed_s * self.speed
        return self.trace.mbps(t0, t0 + step_s * self.speed)

    def tick(self, elapsed_s: float) -> None:
        mbps = self.capacity_mbps(elapsed_s)
        rate = max(mbps * 1e6 / 8.0, OUTAGE_BYTES_PER_S)
        try:
            response = self._client.post("/admin/knobs", json={"bandwidth_bytes_per_s": rate})
        except httpx.HTTPError as exc:
            raise DemoError(f"cannot set the devcloud's bandwidth: {exc}") from None
        if response.status_code != 200:
            raise DemoError(f"the devcloud refused the bandwidth knob: {response.status_code} {response.text}")
        self.mbps = mbps
        self.updates += 1

    def close(self) -> None:
        self._client.close()

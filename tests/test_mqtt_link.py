"""The MQTT link's supervisor against a broker that is not there: a long backoff is not a stuck link."""

from __future__ import annotations

import asyncio
import time

import pytest

from agent.config import MqttSettings
from agent.daemon import STUCK_AFTER_S

from support import free_port


@pytest.mark.slow  # it watches the link for longer than the health check's window: 11.5 s
def test_a_long_reconnect_backoff_keeps_the_link_alive_for_the_watchdog() -> None:
    # With RECONNECT_MAX_S above the health check's window, the backoff after a refused connection lasts
    # longer than STUCK_AFTER_S; the watchdog must not take that wait for a stuck supervisor and kill the agent
    # in the middle of a broker outage.
    from agent.mqtt import MqttLink

    wait_s = 2.5 * STUCK_AFTER_S  # the first backoff is between half and all of this
    settings = MqttSettings(port=free_port(), reconnect_min_s=wait_s, reconnect_max_s=wait_s)
    link = MqttLink(settings, client_id="c", agent_id="gw", topic_filters=[("a/#", 1)],
                    on_message=lambda m: None, on_puback=lambda mid: None)

    async def watch() -> list[bool]:
        link.start()
        seen = []
        end = time.monotonic() + STUCK_AFTER_S + 1.5
        while time.monotonic() < end:
            await asyncio.sleep(0.5)
            seen.append(link.alive(within_s=STUCK_AFTER_S))
        await link.stop(1.0)
        return seen

    seen = asyncio.run(watch())
    assert not link.connected.is_set()
    assert seen and all(seen)

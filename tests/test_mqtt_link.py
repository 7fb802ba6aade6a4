"""The MQTT link's supervisor against a broker that is not there: a long backoff is not a stuck link."""

from __future__ import annotations

import asyncio
import time
from collections.abc import MutableMapping
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.config import MqttSettings
from agent.daemon import STUCK_AFTER_S

from support import free_port, wait_until


@pytest.mark.slow  # it watches the link for longer than the health check's window: 11.5 s
def test_a_long_reconnect_backoff_keeps_the_link_alive_for_the_watchdog() -> None:
    # With RECONNECT_MAX_S above the health check's window, the backoff after a refused connection lasts
    # longer than STUCK_AFTER_S; the watchdog must not take that wait for a stuck supervisor and kill the agent
    # in the middle of a broker outage.
    from agent.mqtt import MqttLink

    wait_s = 2.5 * STUCK_AFTER_S  # with the minimum at the maximum, the backoff is exactly this
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


def test_reconnect_waits_stay_within_the_reconnect_bounds() -> None:
    # The link's reconnects take the agent's one backoff (agent.backoff): refused by a port nobody listens on,
    # each wait lies between RECONNECT_MIN_S and RECONNECT_MAX_S, the first included.
    from agent.mqtt import MqttLink

    settings = MqttSettings(port=free_port(), reconnect_min_s=0.1, reconnect_max_s=0.4)
    link = MqttLink(settings, client_id="c", agent_id="gw", topic_filters=[("a/#", 1)],
                    on_message=lambda m: None, on_puback=lambda mid: None)

    async def watch() -> list[MutableMapping[str, Any]]:
        with capture_logs() as logs:
            link.start()
            await wait_until(lambda: sum(entry["event"] == "mqtt_reconnect_wait" for entry in logs) >= 3, 10,
                             "three reconnect waits")
            await link.stop(1.0)
        return [entry for entry in logs if entry["event"] == "mqtt_reconnect_wait"]

    waits = asyncio.run(watch())
    assert [entry["attempt"] for entry in waits[:3]] == [1, 2, 3]
    assert all(0.1 <= entry["seconds"] <= 0.4 for entry in waits)

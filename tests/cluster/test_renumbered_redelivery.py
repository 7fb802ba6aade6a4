"""Redeliveries under new packet ids, as RabbitMQ 3.10 sends them, recognised by ingress on a real store.

RabbitMQ numbers a session's deliveries afresh on each connection (its AMQP delivery tags): what it had sent
and not seen acknowledged comes again with DUP and another packet id, which an id-only check would take for a
new message and run a second time, under a second task_id. The cluster tests show it under load
(test_cluster_fleet.py); this is the logic, in process and in a fraction of a second.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from pathlib import Path

from test_store import Hooked, new_task

from agent.config import Route
from agent.ingress import Ingress
from agent.mqtt import InboundMessage
from agent.store import Store


def test_a_restarted_agent_recognises_redeliveries_under_new_ids(tmp_path: Path) -> None:
    store = Store(tmp_path, max_tasks=100, max_bytes=10_000_000)
    hook = Hooked()
    store.start(hook)
    first = [new_task(i)._replace(mid=40 + i, payload=f"reading {i}".encode(), crc=zlib.crc32(f"reading {i}".encode()))
             for i in range(2)]
    store.ingest(first, [(t.mid, 1) for t in first if t.mid is not None])
    assert len(hook.gather(2, "tasks")) == 2
    store.stop()

    again = Store(tmp_path, max_tasks=100, max_bytes=10_000_000)
    acked: list[int] = []
    routes = [Route(topic="city/+/traffic/+/data", task="sensor.stats")]
    ingress = Ingress(agent_id="gw", routes=routes, max_payload_bytes=1000, store=again,
                      ack=lambda mid, qos: acked.append(mid), request_redelivery=lambda: None,
                      renumbered_redeliveries=True)
    ingress.remember(again.recent_deliveries(65_535))

    def redeliver(i: int, mid: int, dup: bool = True) -> None:
        ingress.handle(InboundMessage(first[i].topic, f"reading {i}".encode(), 1, mid, dup, time.time()))

    async def connection() -> None:
        ingress.start(asyncio.get_running_loop())
        # The new connection's ids start at 1: neither matches the id the message had, nor the message there.
        redeliver(1, 1)
        redeliver(0, 2)
        assert ingress.counters.duplicates == 2 and ingress.counters.accepted == 0 and acked == [1, 2]
        # Our PUBACK of id 1 lost again: the next connection's copy is still the same task.
        redeliver(1, 1)
        assert ingress.counters.duplicates == 3 and acked == [1, 2, 1]
        # The same reading again without DUP is a new message from the device: a new task.
        redeliver(0, 3, dup=False)
        await asyncio.sleep(0)  # the turn's hand-over to the store
        assert ingress.counters.accepted == 1

    try:
        asyncio.run(connection())
    finally:
        again.stop()

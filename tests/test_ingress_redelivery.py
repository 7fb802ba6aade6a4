"""Which DUP deliveries ingress takes for redeliveries of committed messages, on a real store.

A device may publish the very same payload on a topic twice (a parking bay still occupied); each is a message of
its own. Only a broker that re-sends under new packet ids (EDGE_AGENT_MQTT__RENUMBERED_REDELIVERIES) makes the
agent match a redelivery by content; a standard broker re-sends under the original id, which is what counts.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from test_store import Hooked

from agent.config import Route
from agent.ingress import Ingress
from agent.mqtt import InboundMessage
from agent.store import Store

TOPIC = "city/aarhus/parking/bay-7/data"
SAME = b'{"occupied": true}'


def ingress_on(store: Store, acked: list[int], renumbered: bool) -> Ingress:
    routes = [Route(topic="city/+/parking/+/data", task="sensor.stats")]
    return Ingress(agent_id="gw", routes=routes, max_payload_bytes=1000, store=store,
                   ack=lambda mid, qos: acked.append(mid), request_redelivery=lambda: None,
                   renumbered_redeliveries=renumbered)


def deliver(ingress: Ingress, mid: int, dup: bool) -> None:
    ingress.handle(InboundMessage(TOPIC, SAME, 1, mid, dup, time.time()))


def test_on_a_standard_broker_the_same_payload_under_another_id_is_a_new_message(tmp_path: Path) -> None:
    store = Store(tmp_path, max_tasks=100, max_bytes=10_000_000)
    hook = Hooked()
    store.start(hook)
    acked: list[int] = []
    ingress = ingress_on(store, acked, renumbered=False)

    async def run() -> None:
        ingress.start(asyncio.get_running_loop())
        deliver(ingress, 5, dup=False)
        await asyncio.sleep(0)  # the turn's hand-over to the store
        committed = hook.gather(1, "tasks")
        ingress.mark_acked([(5, 1)] * len(committed))
        # After a lost connection the broker re-sends what it had in flight under the original ids: id 9 carried
        # the second "occupied", never read before the connection went.
        deliver(ingress, 9, dup=True)
        await asyncio.sleep(0)
        assert ingress.counters.accepted == 2 and ingress.counters.duplicates == 0

    try:
        asyncio.run(run())
    finally:
        store.stop()


def test_a_message_held_back_by_a_full_store_runs_when_redelivered(tmp_path: Path) -> None:
    # Even on a broker that renumbers: the held-back copy was never committed, so it is not a duplicate of the
    # committed message with the same payload.
    store = Store(tmp_path, max_tasks=10, max_bytes=10_000_000)
    hook = Hooked()
    store.start(hook)
    acked: list[int] = []
    ingress = ingress_on(store, acked, renumbered=True)

    async def run() -> None:
        ingress.start(asyncio.get_running_loop())
        deliver(ingress, 1, dup=False)
        await asyncio.sleep(0)
        hook.gather(1, "tasks")
        ingress.mark_acked([(1, 1)])
        ingress.paused = True  # the store is full: the next message is held back, not acknowledged
        deliver(ingress, 2, dup=False)
        assert ingress.counters.held_back == 1 and ingress.counters.accepted == 1
        ingress.paused = False
        deliver(ingress, 2, dup=True)  # the broker re-sends it, under its id
        await asyncio.sleep(0)
        assert ingress.counters.accepted == 2 and ingress.counters.duplicates == 0

    try:
        asyncio.run(run())
    finally:
        store.stop()



def acks_of_next_commit(hook: Hooked) -> list[tuple[int, int]]:
    return list(hook.commits.get(timeout=5).acks)


@pytest.mark.parametrize(("renumbered", "late"), [(True, []), (False, [(1, 1)])])
def test_a_commit_that_outlives_the_connection_acknowledges_nothing_on_a_renumbering_broker(
        tmp_path: Path, renumbered: bool, late: list[tuple[int, int]]) -> None:
    # RabbitMQ gives the old ids to other messages on the new connection: the late PUBACK would acknowledge one of
    # those. On a standard broker the id still names the same (redelivered) message, so the PUBACK goes out.
    store = Store(tmp_path, max_tasks=100, max_bytes=10_000_000)
    hook = Hooked()
    store.start(hook)
    ingress = ingress_on(store, [], renumbered=renumbered)

    async def run() -> None:
        ingress.start(asyncio.get_running_loop())
        deliver(ingress, 1, dup=False)
        await asyncio.sleep(0)  # handed to the store
        ingress.reconnected()  # the connection is lost and back before the commit comes back
        assert list(ingress.to_send(acks_of_next_commit(hook))) == late
        deliver(ingress, 2, dup=False)  # a message of the new connection
        await asyncio.sleep(0)
        assert list(ingress.to_send(acks_of_next_commit(hook))) == [(2, 1)]

    try:
        asyncio.run(run())
    finally:
        store.stop()

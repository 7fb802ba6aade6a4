"""A fleet: several agents with one EDGE_AGENT_MQTT__SHARED_GROUP split a stream on one real Mosquitto.

What Mosquitto 2.0 does with a shared subscription (these tests rely on it and the README describes it): each
message goes to the next member of the group, round robin, whether that member is connected or not. A member
that is away with a persistent session (ours always are) keeps receiving its share into its session, and the
QoS 1 messages it had not acknowledged stay in its session too: nothing is handed to the other members. When
the member comes back under the same client id, it gets all of it. (When the session expires instead, the
broker discards it.)
"""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from support import Agent, Collector, Mosquitto, citypulse_rows, publisher, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # a fleet of agents and 1000s of messages per test

TRAFFIC = "city/aarhus/traffic/{}/data"
ROUTES = [{"topic": "city/+/traffic/+/data", "task": "sensor.stats"}]
GROUP = {"EDGE_AGENT_MQTT__SHARED_GROUP": "gateways"}
MESSAGES = 3000


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Callable[[Mosquitto, int], list[Agent]]]:
    made: list[Agent] = []

    def make(broker: Mosquitto, count: int) -> list[Agent]:
        # Each its own store and agent id (so its own client id and results topic), one group.
        agents = [Agent(tmp_path / f"agent{i}", broker.port, agent_id=f"gw{i}", routes=ROUTES, extra_env=GROUP)
                  for i in range(count)]
        made.extend(agents)
        return agents

    yield make
    for agent in made:
        agent.cleanup()


def results(collector: Collector) -> list[tuple[str, int, str]]:
    """(agent id, seq, task_id) for every result seen, duplicates included."""
    out = []
    for topic, payload in collector.snapshot():
        if "/results/" in topic:
            body: dict[str, Any] = json.loads(payload)
            out.append((topic.split("/")[1], int(body["result"]["fields"]["seq"]["value"]), body["task_id"]))
    return out


def publish_rows(port: int, start: int, count: int, per_second: float | None = None) -> None:
    """QoS 1 rows with seq start…start+count-1, each acknowledged by the broker before this returns."""
    device = publisher(port)
    infos = []
    began = time.monotonic()
    for i, row in enumerate(citypulse_rows(count, start_seq=start)):
        infos.append(device.publish(TRAFFIC.format(row["REPORT_ID"]), json.dumps(row), qos=1))
        if per_second is not None and i % 50 == 49:  # a device's pace, the point: not all at once
            time.sleep(max(0.0, began + (i + 1) / per_second - time.monotonic()))
    for info in infos:
        info.wait_for_publish(30)
    device.loop_stop()
    device.disconnect()


def settled(read: Callable[[], int], quiet_s: float, timeout: float, what: str) -> int:
    """Wait until ``read()`` has not changed for ``quiet_s``; return its value."""
    last = (read(), time.monotonic())

    def quiet() -> bool:
        nonlocal last
        value = read()
        if value != last[0]:
            last = (value, time.monotonic())
        return time.monotonic() - last[1] >= quiet_s

    wait_for(quiet, timeout, what, interval=0.1)
    return last[0]


def test_three_agents_process_each_message_exactly_once(broker: Mosquitto, fleet) -> None:  # type: ignore[no-untyped-def]
    agents = fleet(broker, 3)
    collector = Collector(broker.port, "edge/+/results/#")
    for agent in agents:
        agent.start()

    publish_rows(broker.port, 0, MESSAGES)
    wait_for(lambda: len(results(collector)) >= MESSAGES, 120, f"{MESSAGES} results from the fleet")
    # Anything published twice would arrive right behind the rest.
    settled(lambda: len(results(collector)), 1.5, 30, "the results to stop")

    seen = results(collector)
    assert sorted(seq for _, seq, _ in seen) == list(range(MESSAGES))  # every seq, each exactly once
    assert len({task_id for _, _, task_id in seen}) == MESSAGES
    shares = {agent.agent_id: sum(1 for who, _, _ in seen if who == agent.agent_id) for agent in agents}
    assert all(share >= MESSAGES // 10 for share in shares.values()), shares
    for agent in agents:
        assert agent.terminate() == 0


def test_a_member_killed_mid_stream_loses_nothing(broker: Mosquitto, fleet) -> None:  # type: ignore[no-untyped-def]
    agents = fleet(broker, 3)
    victim, survivors = agents[0], agents[1:]
    collector = Collector(broker.port, "edge/+/results/#")
    for agent in agents:
        agent.start()

    def count_by(who: str) -> int:
        return sum(1 for agent_id, _, _ in results(collector) if agent_id == who)

    # Devices keep publishing at a steady rate while the victim dies.
    device = threading.Thread(target=publish_rows, args=(broker.port, 0, MESSAGES, 1000.0), daemon=True)
    device.start()
    wait_for(lambda: count_by(victim.agent_id) >= 300, 60, "the victim to be well into its share")
    victim.kill()  # SIGKILL to the agent and its workers: no DISCONNECT, no offline status of its own
    killed_at = {agent.agent_id: count_by(agent.agent_id) for agent in survivors}
    device.join(60)
    assert not device.is_alive()

    # The survivors keep working through their own shares while the victim is down …
    distinct = settled(lambda: len({seq for _, seq, _ in results(collector)}), 2.0, 60, "the survivors to finish")
    for agent in survivors:
        assert count_by(agent.agent_id) > killed_at[agent.agent_id] + 300, (agent.agent_id, killed_at)
    # … but they never see the victim's: Mosquitto keeps it (and what the victim had not acknowledged) in the
    # victim's persistent session.
    assert distinct < MESSAGES

    victim.start()  # same store, same client id: the broker hands over the session's messages
    wait_for(lambda: len({seq for _, seq, _ in results(collector)}) == MESSAGES, 120,
             "every seq to have a result after the victim's restart")
    settled(lambda: len(results(collector)), 1.5, 30, "the results to stop")

    by_seq: dict[int, list[tuple[str, str]]] = {}
    for who, seq, task_id in results(collector):
        by_seq.setdefault(seq, []).append((who, task_id))
    assert sorted(by_seq) == list(range(MESSAGES))
    repeated = {seq: seen for seq, seen in by_seq.items() if len(seen) > 1}
    for seq, seen in repeated.items():
        # A duplicate is a result the victim published before the kill and the broker had not acknowledged to
        # it (or whose acknowledgement it had not yet recorded): republished from its store, same task_id.
        assert {who for who, _ in seen} == {victim.agent_id}, (seq, seen)
        assert len({task_id for _, task_id in seen}) == 1, (seq, seen)
    # Only the results in flight at the kill: Mosquitto's default max_inflight_messages (20) is the
    # Receive Maximum it announces and caps the agent's publish window, plus acknowledgements not yet committed.
    assert len(repeated) <= 100, len(repeated)
    for agent in agents:
        assert agent.terminate() == 0


def session_present(port: int, client_id: str) -> bool:
    """Whether the broker still holds a session for ``client_id`` (connecting with MQTT 5, clean start off, and
    leaving the session as it was: the same expiry as the agent's)."""
    flags: dict[str, bool] = {}
    done = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)

    def on_connect(c: paho.Client, u: Any, f: Any, rc: Any, p: Any) -> None:
        flags["present"] = bool(f.session_present)
        done.set()

    client.on_connect = on_connect
    client.connect("127.0.0.1", port, clean_start=False)
    client.loop_start()
    assert done.wait(10), "no CONNACK"
    client.disconnect()
    client.loop_stop()
    return flags["present"]


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_member_leaves_the_group_without_losing_its_share(broker: Mosquitto, fleet, protocol: str) -> None:  # type: ignore[no-untyped-def]
    """SIGUSR1: the member unsubscribes, takes in what its session holds, finishes it and ends its session."""
    agents = fleet(broker, 2)
    leaver, stayer = agents
    for agent in agents:
        agent.write_env(EDGE_AGENT_MQTT__PROTOCOL=protocol)
    collector = Collector(broker.port, "edge/+/results/#")
    for agent in agents:
        agent.start()

    def seqs_of(who: str) -> set[int]:
        return {seq for agent_id, seq, _ in results(collector) if agent_id == who}

    publish_rows(broker.port, 0, 1000)
    wait_for(lambda: len(results(collector)) >= 1000, 60, "the first 1,000 results")
    # The leaver is paused (its share then piles up in its socket and session, as for a member that is busy
    # or away) and told to leave before it resumes.
    assert leaver.proc is not None
    leaver.proc.send_signal(signal.SIGSTOP)
    publish_rows(broker.port, 1000, 1000)
    leaver.proc.send_signal(signal.SIGUSR1)
    leaver.proc.send_signal(signal.SIGCONT)
    leaver.wait_logged("mqtt_unsubscribed")
    publish_rows(broker.port, 2000, 1000)  # all to the stayer now
    assert leaver.proc.wait(60) == 0, leaver.log_tail()
    events = {e.get("event"): e for e in leaver.events()}
    assert events["left_group"]["session"] == "ended", leaver.log_tail()

    wait_for(lambda: len({seq for _, seq, _ in results(collector)}) == 3000, 60, "every seq to have a result")
    settled(lambda: len(results(collector)), 1.5, 30, "the results to stop")
    seen = results(collector)
    assert sorted(seq for _, seq, _ in seen) == list(range(3000))  # each exactly once
    # The leaver finished its share of the rows published while it was paused, and got none after it left.
    assert len(seqs_of(leaver.agent_id) & set(range(1000, 2000))) >= 300
    assert not seqs_of(leaver.agent_id) & set(range(2000, 3000))
    # Its session is gone: nothing more is assigned to it, nothing is kept for it.
    assert not session_present(broker.port, f"edge-agent-{leaver.agent_id}")
    assert stayer.terminate() == 0


def leaving_mark(agent: Agent) -> str | None:
    """The store's record of a leave under way, read as another SQLite reader would."""
    db = sqlite3.connect(f"file:{agent.workdir / 'state' / 'edge-agent.db'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT value FROM meta WHERE key='leaving'").fetchone()
    finally:
        db.close()
    return None if row is None else str(row[0])


def test_a_leave_cut_short_by_a_crash_resumes_at_the_next_start(broker: Mosquitto, fleet) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL (a power cut) in the middle of a leave: the restarted member leaves instead of rejoining."""
    leaver, stayer = fleet(broker, 2)
    collector = Collector(broker.port, "edge/+/results/#")
    for agent in (leaver, stayer):
        agent.start()
    publish_rows(broker.port, 0, 1000)
    assert leaver.proc is not None
    leaver.proc.send_signal(signal.SIGUSR1)
    leaver.wait_logged("mqtt_unsubscribed")
    wait_for(lambda: leaving_mark(leaver) == "1", 10, "the leave to be recorded in the store")
    leaver.kill()  # within the 2 s it waits for its session to fall quiet
    publish_rows(broker.port, 1000, 1000)  # all to the stayer: the leaver's UNSUBSCRIBE was confirmed

    leaver.start()
    assert leaver.proc.wait(60) == 0, leaver.log_tail()
    assert leaver.terminate() == 0  # it has exited by itself; this closes its log
    events = [e.get("event") for e in leaver.events()]
    assert "leave_resumed" in events and events.count("left_group") == 1, leaver.log_tail()
    wait_for(lambda: len({seq for _, seq, _ in results(collector)}) == 2000, 60, "every seq to have a result")
    settled(lambda: len(results(collector)), 1.5, 30, "the results to stop")
    by_seq: dict[int, set[tuple[str, str]]] = {}
    for who, seq, task_id in results(collector):
        by_seq.setdefault(seq, set()).add((who, task_id))
    assert sorted(by_seq) == list(range(2000))
    # A result the kill caught unacknowledged comes again from the leaver's store, with the same task_id.
    assert all(len(seen) == 1 for seen in by_seq.values()), {s: v for s, v in by_seq.items() if len(v) > 1}
    assert not session_present(broker.port, f"edge-agent-{leaver.agent_id}")
    assert leaving_mark(leaver) == ""
    # A later start is an ordinary member again: the finished leave left no mark behind.
    leaver.start()
    # A leave to resume is said right after agent_started, before the connection that start() waited for.
    later = [e.get("event") for e in leaver.events()][len(events):]
    assert "agent_started" in later and "leave_resumed" not in later
    assert leaver.terminate() == 0
    assert stayer.terminate() == 0

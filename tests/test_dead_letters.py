"""Dead letters kept in the store, listed, shown, purged and replayed: the real agent, a real Mosquitto and the
real `edge-agent dead-letters` command beside it."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from agent import deadletters
from agent.deadletters import LOG_FIRST, DeadLetterLog, DropLog

from support import Agent, Agents, Collector, Mosquitto, free_port, publisher, wait_for

TRAFFIC = {"topic": "city/+/traffic/+/data", "task": "sensor.stats"}
PARKING = {"topic": "city/+/parking/+/data", "task": "sensor.stats"}
NOISE = {"topic": "city/+/noise/+/pcm", "task": "noise.spectrum"}
FIELDS = {"topic", "reason", "detail", "size", "received_at", "id"}


def dead_letters(agent: Agent, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """`edge-agent dead-letters …` as an operator runs it, with the agent's env file."""
    command, *rest = args
    proc = subprocess.run([sys.executable, "-m", "agent", "dead-letters", command, "--env-file", str(agent.env_file),
                           *rest], capture_output=True, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr.decode()
    return proc


def listed(agent: Agent, *args: str) -> list[dict[str, Any]]:
    return list(json.loads(dead_letters(agent, "list", "--json", *args).stdout))


def by_event(agent: Agent, event: str) -> list[dict[str, Any]]:
    return [e for e in agent.events() if e.get("event") == event]


def metric(port: int, name: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


@pytest.mark.slow
@pytest.mark.integration
def test_a_route_mistake_is_replayed_once_the_routes_are_fixed(broker: Mosquitto, agents: Agents) -> None:
    port = free_port()
    agent = agents(broker, routes=[TRAFFIC, PARKING], extra_env={"EDGE_AGENT_METRICS__PORT": str(port)})
    collector = Collector(broker.port, f"edge/{agent.agent_id}/#")
    agent.start()
    assert agent.terminate() == 0
    # The mistake: a typo in the parking route. Its old subscription still holds what devices sent meanwhile,
    # and the agent has no route for it.
    typo = {**PARKING, "topic": "city/+/parkng/+/data"}
    agent.write_env(EDGE_AGENT_ROUTES=json.dumps([TRAFFIC, typo]))
    device = publisher(broker.port)
    sent = [json.dumps({"free": i, "seq": i}).encode() for i in range(5)] + [b"{not json"]
    for i, payload in enumerate(sent):
        device.publish(f"city/aarhus/parking/{i}/data", payload, qos=1).wait_for_publish(5)
    agent.start()
    wait_for(lambda: len(collector.json_under(f"edge/{agent.agent_id}/dead-letter/")) == 6, 30, "6 dead letters")
    published = collector.json_under(f"edge/{agent.agent_id}/dead-letter/")
    assert all(set(body) == FIELDS and body["reason"] == "unknown_task" for body in published)
    kept = listed(agent)
    assert [row["id"] for row in kept] == [body["id"] for body in published]  # the message names its copy
    assert [row["topic"] for row in kept] == [f"city/aarhus/parking/{i}/data" for i in range(6)]
    assert [e["id"] for e in by_event(agent, "dead_letter")] == [row["id"] for row in kept]

    # The fix, by a reload; the replay is taken by the running agent.
    agent.write_env(EDGE_AGENT_ROUTES=json.dumps([TRAFFIC, PARKING]))
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)
    agent.wait_logged("reload_applied")
    dry = dead_letters(agent, "replay", "--dry-run").stdout.decode()
    assert "6 would be replayed" in dry and "task sensor.stats (route city/+/parking/+/data)" in dry
    assert len(listed(agent)) == 6  # a dry run changes nothing
    out = dead_letters(agent, "replay").stdout.decode()
    assert "6 dead letters asked to replay" in out and "the agent took them" in out

    def results() -> list[dict[str, Any]]:
        return collector.json_under(f"edge/{agent.agent_id}/results/")

    wait_for(lambda: len(results()) == 5, 30, "the results of the replayed messages")
    assert [r["result"]["fields"]["seq"]["value"] for r in results()] == list(range(5))  # in order
    old_ids = {row["task_id"] for row in kept}
    assert len({r["task_id"] for r in results()} - old_ids) == 5  # new tasks
    # The broken one fails again, as a new dead letter with a new id and its payload kept again.
    wait_for(lambda: len(collector.json_under(f"edge/{agent.agent_id}/dead-letter/")) == 7, 30, "the 7th")
    again = collector.json_under(f"edge/{agent.agent_id}/dead-letter/")[-1]
    assert again["reason"] == "invalid_json" and again["id"] > max(row["id"] for row in kept)
    assert [(row["id"], row["reason"]) for row in listed(agent)] == [(again["id"], "invalid_json")]
    replayed = by_event(agent, "dead_letter_replayed")
    assert [e["id"] for e in replayed] == [row["id"] for row in kept]
    assert {e["task_id"] for e in replayed} == {r["task_id"] for r in results()} | {again_task(agent, again)}
    assert metric(port, "edge_agent_dead_letters_replayed_total") == 6
    assert metric(port, "edge_agent_dead_letters_kept") == 1
    time.sleep(1.5)  # nothing twice: the replay is forgotten by the commit that took it
    assert len(results()) == 5
    assert dead_letters(agent, "replay", "--reason", "unknown_task").stdout.decode().strip() == "nothing to replay"
    assert agent.terminate() == 0


def again_task(agent: Agent, body: dict[str, Any]) -> str:
    (row,) = [row for row in listed(agent) if row["id"] == body["id"]]
    return str(row["task_id"])


@pytest.mark.slow
@pytest.mark.integration
def test_a_replay_asked_for_while_the_agent_is_stopped_runs_at_its_start(broker: Mosquitto, agents: Agents) -> None:
    agent = agents(broker, routes=[TRAFFIC, PARKING])
    collector = Collector(broker.port, f"edge/{agent.agent_id}/#")
    agent.start()
    assert agent.terminate() == 0
    agent.write_env(EDGE_AGENT_ROUTES=json.dumps([TRAFFIC]))  # the parking route forgotten
    device = publisher(broker.port)
    for i in range(3):
        device.publish(f"city/aarhus/parking/{i}/data", json.dumps({"free": i, "seq": i}), qos=1).wait_for_publish(5)
    agent.start()
    wait_for(lambda: len(collector.json_under(f"edge/{agent.agent_id}/dead-letter/")) == 3, 30, "3 dead letters")
    assert agent.terminate() == 0

    agent.write_env(EDGE_AGENT_ROUTES=json.dumps([TRAFFIC, PARKING]))
    out = dead_letters(agent, "replay", "--wait", "1").stdout.decode()
    assert "3 dead letters asked to replay" in out and "3 not taken yet: the agent is not running" in out
    assert [row["replay_requested"] for row in listed(agent)] == [True] * 3
    assert "replay asked for" in dead_letters(agent, "list").stdout.decode()
    agent.start()
    wait_for(lambda: len(collector.json_under(f"edge/{agent.agent_id}/results/")) == 3, 30, "3 results")
    assert [r["result"]["fields"]["seq"]["value"]
            for r in collector.json_under(f"edge/{agent.agent_id}/results/")] == [0, 1, 2]
    wait_for(lambda: listed(agent) == [], 10, "the replayed copies to be gone")
    assert agent.terminate() == 0


@pytest.mark.slow
@pytest.mark.integration
def test_list_show_and_purge(broker: Mosquitto, agents: Agents) -> None:
    agent = agents(broker, routes=[TRAFFIC, NOISE], extra_env={"EDGE_AGENT_MAX_PAYLOAD_BYTES": "8192"})
    collector = Collector(broker.port, f"edge/{agent.agent_id}/dead-letter/#")
    agent.start()
    device = publisher(broker.port)
    big = b'{"x": "' + b"y" * 9000 + b'"}'
    messages = [
        ("city/a/traffic/1/data", b"{not json"),
        ("city/a/noise/2/pcm", b"\x1b[2J\x00\x01\x02"),  # odd-length PCM with a terminal escape in it
        ("city/a/traffic/3/data", big),
        ("city/b/traffic/4/data", b'["a", "b"]'),
    ]
    for topic, payload in messages:
        device.publish(topic, payload, qos=1)
    wait_for(lambda: len(collector.snapshot()) == 4, 30, "4 dead letters")
    rows = listed(agent)
    assert [(r["topic"], r["reason"]) for r in rows] == [
        ("city/a/traffic/1/data", "invalid_json"), ("city/a/noise/2/pcm", "invalid_payload"),
        ("city/a/traffic/3/data", "too_large"), ("city/b/traffic/4/data", "invalid_payload")]
    too_large = rows[2]
    assert too_large["size"] == len(big) and too_large["truncated"] and too_large["kept_bytes"] == 4096
    assert [r["id"] for r in listed(agent, "--reason", "invalid_payload")] == [rows[1]["id"], rows[3]["id"]]
    assert [r["id"] for r in listed(agent, "--topic", "city/a/#")] == [r["id"] for r in rows[:3]]
    assert [r["id"] for r in listed(agent, "--topic", "city/+/traffic/+/data", "--reason", "invalid_payload")] == [
        rows[3]["id"]]
    text = dead_letters(agent, "list").stdout.decode()
    assert "truncated: 4096 bytes kept" in text and "4 dead letters" in text

    shown = dead_letters(agent, "show", str(rows[0]["id"])).stdout.decode()
    assert "reason:        invalid_json" in shown and "payload (UTF-8 text):\n{not json\n" in shown
    binary = dead_letters(agent, "show", str(rows[1]["id"])).stdout
    assert b"\x1b" not in binary and b"payload (binary, base64" in binary and b"G1sySgABAg==" in binary
    raw = dead_letters(agent, "show", str(rows[1]["id"]), "--raw").stdout
    assert raw == b"\x1b[2J\x00\x01\x02"
    assert dead_letters(agent, "show", str(rows[2]["id"]), "--raw").stdout == big[:4096]
    assert "truncated: cannot be replayed" in dead_letters(agent, "show", str(rows[2]["id"])).stdout.decode()
    missing = dead_letters(agent, "show", "999999", check=False)
    assert missing.returncode == 1 and b"no dead letter 999999" in missing.stderr
    out = dead_letters(agent, "replay", "--reason", "too_large").stdout.decode()
    assert "1 truncated dead letter (too_large) cannot be replayed" in out and "nothing to replay" in out

    # Purged while the agent runs; the agent's count follows.
    assert dead_letters(agent, "purge", "--reason", "invalid_payload").stdout.decode().strip() == (
        "2 dead letters purged")
    assert [r["id"] for r in listed(agent)] == [rows[0]["id"], rows[2]["id"]]
    assert dead_letters(agent, "purge").stdout.decode().strip() == "2 dead letters purged"
    assert listed(agent) == [] and dead_letters(agent, "list").stdout.decode().strip() == "no dead letters kept"
    assert agent.terminate() == 0


@pytest.mark.slow
@pytest.mark.integration
def test_the_bound_drops_the_oldest_and_counts_them(broker: Mosquitto, agents: Agents) -> None:
    port = free_port()
    agent = agents(broker, extra_env={"EDGE_AGENT_DEAD_LETTERS__MAX_COUNT": "3",
                                      "EDGE_AGENT_DEAD_LETTERS__MAX_BYTES": "1000",
                                      "EDGE_AGENT_METRICS__PORT": str(port)})
    collector = Collector(broker.port, f"edge/{agent.agent_id}/dead-letter/#")
    agent.start()
    device = publisher(broker.port)
    for i in range(5):
        device.publish("city/a/traffic/1/data", f"bad json {i:02}".encode(), qos=1)  # 11 bytes each
    wait_for(lambda: len(collector.snapshot()) == 5, 30, "5 dead letters")
    ids = [json.loads(p)["id"] for _, p in collector.snapshot()]
    wait_for(lambda: [r["id"] for r in listed(agent)] == ids[2:], 10, "the newest three kept")
    wait_for(lambda: metric(port, "edge_agent_dead_letters_dropped_total") == 2, 10, "2 counted as dropped")
    # The bytes bound: 11 + 985 bytes fit in 1,000, a second small one does not.
    device.publish("city/a/traffic/1/data", b"x" * 985, qos=1)
    wait_for(lambda: len(collector.snapshot()) == 6, 30, "the 6th")
    wait_for(lambda: [r["kept_bytes"] for r in listed(agent)] == [11, 985], 10, "the bytes bound")
    assert metric(port, "edge_agent_dead_letters_kept") == 2
    assert metric(port, "edge_agent_dead_letters_kept_bytes") == 996
    assert metric(port, "edge_agent_dead_letters_dropped_total") == 4
    assert agent.terminate() == 0
    drops = by_event(agent, "dead_letters_dropped")
    assert drops and sum(e["dropped"] for e in drops) == 4 and drops[-1]["dropped_total"] == 4
    assert drops[0]["max_count"] == 3 and drops[0]["max_bytes"] == 1000
    # A lower bound at the next start applies at once.
    agent.write_env(EDGE_AGENT_DEAD_LETTERS__MAX_COUNT="1")
    agent.start()
    assert [r["kept_bytes"] for r in listed(agent)] == [985]
    assert agent.terminate() == 0


@pytest.mark.integration
def test_a_flood_of_dead_letters_is_logged_in_part_then_counted(broker: Mosquitto, agents: Agents) -> None:
    agent = agents(broker)
    collector = Collector(broker.port, f"edge/{agent.agent_id}/dead-letter/#")
    agent.start()
    device = publisher(broker.port)
    for i in range(40):
        device.publish("city/a/traffic/1/data", f"not json {i}".encode(), qos=1)
    device.publish("city/a/traffic/2/data", b"[1]", qos=1)  # another reason has its own allowance
    wait_for(lambda: len(collector.snapshot()) == 41, 30, "41 dead letters")
    assert agent.terminate() == 0  # a stop sums up the window that is still open
    logged = by_event(agent, "dead_letter")
    assert [e["reason"] for e in logged].count("invalid_json") == LOG_FIRST
    assert [e["reason"] for e in logged].count("invalid_payload") == 1
    first = logged[0]
    assert first["level"] == "warning" and first["topic"] == "city/a/traffic/1/data" and "task_id" in first
    assert first["id"] == json.loads(collector.snapshot()[0][1])["id"]
    (summary,) = by_event(agent, "dead_letters_suppressed")
    assert summary["reason"] == "invalid_json" and summary["suppressed"] == 40 - LOG_FIRST


class Lines:
    """Stands in for the module's logger: what it was asked to log."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))

    def events(self, event: str) -> list[dict[str, Any]]:
        return [fields for name, fields in self.lines if name == event]


def test_the_log_window_rolls_over_and_sums_up_what_it_held_back(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    logged = Lines()
    monkeypatch.setattr(deadletters, "log", logged)
    dead_log = DeadLetterLog(first=2, window_s=60, clock=lambda: now[0])
    for _ in range(5):
        dead_log.record("invalid_json", id=1)
    dead_log.record("task_failed", "task_failed", id=2)
    dead_log.flush()
    assert [name for name, _ in logged.lines] == ["dead_letter", "dead_letter", "task_failed"]  # still open
    now[0] = 61
    dead_log.flush()
    assert logged.events("dead_letters_suppressed") == [
        {"reason": "invalid_json", "suppressed": 3, "logged": 2, "window_s": 60}]  # none for task_failed
    dead_log.record("invalid_json", id=3)  # a new window
    assert logged.lines[-1] == ("dead_letter", {"reason": "invalid_json", "id": 3})

    drops = DropLog(every_s=60, clock=lambda: now[0])
    drops.check(2, kept=10)
    drops.check(5)  # within the minute: held back
    assert [e["dropped"] for e in logged.events("dead_letters_dropped")] == [2]
    now[0] = 200
    drops.check(5)
    drops.check(5)
    assert [(e["dropped"], e["dropped_total"]) for e in logged.events("dead_letters_dropped")] == [(2, 2), (3, 5)]


# The tables an agent before dead letters were kept made (schema 1), as it wrote them.
SCHEMA_1 = """
CREATE TABLE tasks (id INTEGER PRIMARY KEY, task_id TEXT NOT NULL, topic TEXT NOT NULL, kind TEXT, placement TEXT,
    options TEXT, payload BLOB, size INTEGER NOT NULL, received_at REAL NOT NULL, mid INTEGER, crc INTEGER,
    state INTEGER NOT NULL, out_topic TEXT, out_payload BLOB, out_seq INTEGER);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE task_state (kind TEXT NOT NULL, key TEXT NOT NULL, state BLOB NOT NULL, saved_at REAL NOT NULL,
    PRIMARY KEY (kind, key)) WITHOUT ROWID;
CREATE INDEX outbox_order ON tasks (out_seq) WHERE state = 1;
INSERT INTO meta VALUES ('schema', '1');
"""


@pytest.mark.slow
@pytest.mark.integration
def test_a_store_of_the_earlier_schema_is_upgraded_in_place(broker: Mosquitto, agents: Agents) -> None:
    agent = agents(broker)
    state = agent.workdir / "state"
    state.mkdir()
    db = sqlite3.connect(state / "edge-agent.db")
    db.executescript(SCHEMA_1)
    db.execute("PRAGMA journal_mode=WAL")
    # A task the old agent had committed and not yet run: the upgraded agent runs it.
    payload = b'{"speed": 42}'
    db.execute("INSERT INTO tasks (id, task_id, topic, kind, placement, payload, size, received_at, state) "
               "VALUES (7, 'feedfacefeedfacefeedfacefeedface', 'city/a/traffic/9/data', 'sensor.stats', 'auto', ?, "
               "?, ?, 0)", (payload, len(payload), time.time()))
    db.commit()
    db.close()
    note = dead_letters(agent, "list")  # the command does not upgrade a store the old agent may still use
    assert note.stdout.decode().strip() == "no dead letters kept" and b"earlier version" in note.stderr

    collector = Collector(broker.port, f"edge/{agent.agent_id}/#")
    agent.start()
    wait_for(lambda: len(collector.json_under(f"edge/{agent.agent_id}/results/")) == 1, 30, "the stored task's result")
    assert collector.json_under(f"edge/{agent.agent_id}/results/")[0]["task_id"] == "feedfacefeedfacefeedfacefeedface"
    (upgraded,) = by_event(agent, "store_schema_upgraded")
    assert (upgraded["old"], upgraded["new"]) == (1, 2)
    device = publisher(broker.port)
    device.publish("city/a/traffic/1/data", b"{not json", qos=1)
    wait_for(lambda: len(collector.json_under(f"edge/{agent.agent_id}/dead-letter/")) == 1, 30, "a dead letter")
    assert [r["reason"] for r in listed(agent)] == ["invalid_json"]
    assert agent.terminate() == 0
    agent.start()  # started again: already upgraded, nothing to do
    assert len(by_event(agent, "store_schema_upgraded")) == 1
    assert agent.terminate() == 0

    # A store a newer version wrote is refused, naming the directory, rather than misread.
    db = sqlite3.connect(state / "edge-agent.db")
    db.execute("UPDATE meta SET value='3' WHERE key='schema'")
    db.commit()
    db.close()
    proc = subprocess.run([sys.executable, "-m", "agent", "run", "--env-file", str(agent.env_file)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 78 and "EDGE_AGENT_STATE_DIR" in proc.stderr and "schema 3" in proc.stderr
    refused = dead_letters(agent, "list", check=False)
    assert refused.returncode == 78 and b"schema 3" in refused.stderr


def test_the_command_never_creates_a_store(tmp_path: Path) -> None:
    env = tmp_path / "agent.env"
    env.write_text(f"EDGE_AGENT_STATE_DIR={tmp_path / 'nowhere'}\n")
    proc = subprocess.run([sys.executable, "-m", "agent", "dead-letters", "list", "--env-file", str(env)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 78 and "EDGE_AGENT_STATE_DIR: no store at" in proc.stderr
    assert not (tmp_path / "nowhere").exists()

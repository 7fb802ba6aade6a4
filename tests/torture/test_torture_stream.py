"""Torture: a long QoS 1 stream through the real agent while it is SIGKILLed, the broker restarts and the
resource API dies and comes back, with a store bound small enough to be hit.

Everything is real: Mosquitto with persistence (restarted on the same port, so sessions survive), the agent
as a process (killed with its worker pool, as a power cut would), the devcloud (killed with SIGKILL) and
SQLite. Afterwards every input has its answer (a result, or a dead letter for the malformed ones), the
duplicates stay within what the in-flight windows allow, a duplicate of a committed task keeps its task_id,
and the agent's memory stays bounded.

The parameters are module constants with environment overrides for a longer soak, e.g.::

    TORTURE_MESSAGES=200000 TORTURE_KILLS=100 TORTURE_RESTARTS=40 \
        TORTURE_RATE=500 .venv/bin/python -m pytest tests/torture/test_torture_stream.py -s

The seed is printed; ``TORTURE_SEED`` replays a schedule (the timing of a real system still varies).
"""

from __future__ import annotations

import csv
import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from harness import Device, RssSampler, elapsed, env_float, env_int, http_status
from support import CITYPULSE, Agent, Collector, DevCloud, Mosquitto, citypulse_rows, free_port, pcm_noise, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MESSAGES = env_int("TORTURE_MESSAGES", 20_000)
KILLS = env_int("TORTURE_KILLS", 10)  # SIGKILLs of the agent (with its worker pool)
RESTARTS = env_int("TORTURE_RESTARTS", 5)  # broker restarts on the same port
CLOUD_OUTAGES = env_int("TORTURE_CLOUD_OUTAGES", 2)  # devcloud SIGKILLed, later started again
RATE = env_float("TORTURE_RATE", 300.0)  # messages per second offered by the devices
SEED = env_int("TORTURE_SEED", random.SystemRandom().randrange(1 << 32))

# The agent's bounds. The store bound is small so that a backlog after a kill, a broker restart or a slow
# cloud fills it and intake pauses (the broker keeps the messages).
MAX_TASKS = 300
RECEIVE_MAXIMUM = 100
PUBLISH_WINDOW = 100
MAX_PAYLOAD = 16_384
DEVICE_INFLIGHT = 100
BROKER_INFLIGHT = 100  # Mosquitto's max_inflight_messages: its Receive Maximum, and per-client outbound window
# Peak RSS of the agent's main process. It peaks near 75 MB draining a 100,000-message backlog
# (benchmarks/throughput.py); 120 MB leaves room for a noisy machine but not for a queue that grows with the
# stream.
MAX_RSS_MB = env_float("TORTURE_MAX_RSS_MB", 120.0)

TRAFFIC_ROUTE = {"topic": "city/+/traffic/+/data", "task": "sensor.stats", "placement": "auto"}
PARKING_ROUTE = {"topic": "city/+/parking/+/data", "task": "sensor.stats", "placement": "cloud"}
NOISE_ROUTE = {"topic": "city/+/noise/+/pcm", "task": "noise.spectrum", "placement": "local"}


@dataclass(frozen=True, slots=True)
class Message:
    """One device message. ``key`` is unique; ``expect`` is ``"result"`` or the dead-letter reason."""

    key: int
    topic: str
    payload: bytes
    expect: str


def parking_rows() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for path in sorted(CITYPULSE.glob("AarhusParkingData*.csv")):
        with path.open(newline="") as fh:
            for row in csv.DictReader(fh):
                rows.append({"vehiclecount": int(row["vehiclecount"]), "totalspaces": int(row["totalspaces"]),
                             "garagecode": row["garagecode"], "updatetime": row["updatetime"]})
    return rows


def malformed(key: int, rng: random.Random) -> Message:
    """A broken device message on its own topic (the dead letter carries the topic, not the payload)."""
    topic = f"city/aarhus/traffic/bad{key}/data"
    choice = rng.randrange(5)
    if choice == 0:
        return Message(key, topic, b"{\"seq\": " + str(key).encode() + b", \"avgSpeed\": ", "invalid_json")
    if choice == 1:
        return Message(key, topic, b"{\"seq\": %d, \"avgSpeed\": NaN}" % key, "invalid_json")
    if choice == 2:
        return Message(key, topic, json.dumps(["seq", key]).encode(), "invalid_payload")
    if choice == 3:
        return Message(key, topic, json.dumps({"status": "OK", "id": f"x{key}"}).encode(), "invalid_payload")
    return Message(key, topic, b"{\"seq\": %d, \"pad\": \"%s\"}" % (key, b"x" * MAX_PAYLOAD), "too_large")


def build_stream(n: int, rng: random.Random) -> list[Message]:
    """CityPulse traffic rows (routed auto: local), parking rows (routed to the cloud), a few noise clips
    (the worker pool) and about 1 % malformed messages, each with a unique key."""
    traffic = citypulse_rows(n)
    parking = parking_rows()
    clips = [pcm_noise(0.1 + 0.1 * i, seed=i) for i in range(4)]
    out: list[Message] = []
    for key in range(n):
        row = next(traffic)
        draw = rng.random()
        if draw < 0.01:
            out.append(malformed(key, rng))
        elif draw < 0.02:
            out.append(Message(key, f"city/aarhus/noise/mic{key}/pcm", clips[key % len(clips)], "result"))
        elif draw < 0.15:
            body = dict(parking[key % len(parking)], seq=key)
            out.append(Message(key, f"city/aarhus/parking/{body['garagecode']}/data", json.dumps(body).encode(),
                               "result"))
        else:
            row["seq"] = key
            out.append(Message(key, f"city/aarhus/traffic/{row['REPORT_ID']}/data", json.dumps(row).encode(),
                               "result"))
    return out


def key_of(topic: str, body: dict[str, Any]) -> int:
    """The input a result or dead letter answers: ``seq`` in a reading, else the key in the device id."""
    device = body["topic"].split("/")[3]
    for prefix in ("bad", "mic"):
        if device.startswith(prefix):
            return int(device[len(prefix):])
    return int(body["result"]["fields"]["seq"]["value"])


@dataclass
class Chaos:
    """What the chaos thread did, for the summary and the duplicate bound."""

    kills: int = 0
    restarts: int = 0
    cloud_outages: int = 0
    at_risk: set[int] = field(default_factory=set)  # device messages unacknowledged when the broker went down
    log: list[str] = field(default_factory=list)
    error: BaseException | None = None


def schedule(rng: random.Random, duration_s: float) -> list[tuple[float, str]]:
    """Event times over the stream: kills, broker restarts, cloud down/up, in random order and moments."""
    events = ["kill"] * KILLS + ["broker"] * RESTARTS + ["cloud_down"] * CLOUD_OUTAGES
    rng.shuffle(events)
    slot = duration_s / (len(events) + 1)
    timed = [(slot * (i + 0.5) + rng.uniform(0, slot * 0.9), event) for i, event in enumerate(events)]
    # Each outage lasts a random few seconds; other events go on meanwhile.
    timed += [(t + rng.uniform(2.0, 6.0), "cloud_up") for t, e in timed if e == "cloud_down"]
    return sorted(timed)


def run_chaos(events: list[tuple[float, str]], start: float, rng: random.Random, agent: Agent, broker: Mosquitto,
              cloud: DevCloud, device: Device, chaos: Chaos) -> None:
    try:
        for at, event in events:
            time.sleep(max(0.0, start + at - time.monotonic()))  # the schedule: each event at its moment
            stamp = f"{time.monotonic() - start:6.1f}s"
            if event == "kill":
                agent.kill()
                time.sleep(rng.uniform(0.0, 1.0))  # the gateway stays off a moment, as after a power cut
                agent.start()
                chaos.kills += 1
            elif event == "broker":
                broker.stop()
                # The broker is gone: no PUBACK can reach the device any more, so this is the complete set of
                # messages paho will send again after the reconnect.
                chaos.at_risk |= device.unacknowledged()
                time.sleep(rng.uniform(0.2, 1.5))  # the broker's outage
                broker.start()
                chaos.restarts += 1
            elif event == "cloud_down":
                cloud.kill()
                chaos.cloud_outages += 1
            elif event == "cloud_up" and not cloud.running:
                cloud.start()
            chaos.log.append(f"{stamp} {event}")
    except BaseException as exc:  # reported by the test thread
        chaos.error = exc


@pytest.mark.timeout(int(MESSAGES / RATE) + 480)
def test_stream_survives_kills_broker_restarts_and_cloud_outages(tmp_path: Path) -> None:
    started = time.monotonic()
    rng = random.Random(SEED)
    print(f"\ntorture seed {SEED} (TORTURE_SEED={SEED} replays the schedule)")
    messages = build_stream(MESSAGES, rng)
    expected = {m.key: m.expect for m in messages}
    duration_s = MESSAGES / RATE
    events = schedule(rng, duration_s)

    broker = Mosquitto(tmp_path / "broker", extra_conf=f"max_inflight_messages {BROKER_INFLIGHT}\n")
    broker.start()
    cloud = DevCloud(tmp_path / "devcloud" / "devcloud.log", workers=1, provisioning_s=0.2)
    metrics_port = free_port()
    env = {
        "EDGE_AGENT_STORE__MAX_TASKS": str(MAX_TASKS),
        "EDGE_AGENT_MQTT__RECEIVE_MAXIMUM": str(RECEIVE_MAXIMUM),
        "EDGE_AGENT_MQTT__PUBLISH_WINDOW": str(PUBLISH_WINDOW),
        "EDGE_AGENT_MAX_PAYLOAD_BYTES": str(MAX_PAYLOAD),
        "EDGE_AGENT_METRICS__PORT": str(metrics_port),
        **cloud.agent_env(connect_timeout_s=0.5, read_timeout_s=5, max_retries=1, retry_min_s=0.05,
                          retry_max_s=0.2, circuit_failures=3, circuit_cooldown_s=1, provisioning_timeout_s=5),
    }
    agent = Agent(tmp_path / "agent", broker.port, routes=[TRAFFIC_ROUTE, PARKING_ROUTE, NOISE_ROUTE],
                  extra_env=env)
    collector = Collector(broker.port, f"edge/{agent.agent_id}/#", client_id=f"torture-consumer-{SEED}")
    collector.client.reconnect_delay_set(1, 2)
    sampler = RssSampler(lambda: agent.proc.pid if agent.proc is not None and agent.proc.poll() is None else None)
    device: Device | None = None
    chaos = Chaos()
    try:
        agent.start()
        sampler.start()
        device = Device(broker.port, inflight=DEVICE_INFLIGHT)
        stream_start = time.monotonic()
        chaos_thread = threading.Thread(
            target=run_chaos, args=(events, stream_start, random.Random(SEED + 1), agent, broker, cloud, device,
                                    chaos), daemon=True)
        chaos_thread.start()
        for i, message in enumerate(messages):
            delay = stream_start + i / RATE - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # the devices' pace (RATE), the point: a stream, not one burst
            device.publish(message.key, message.topic, message.payload)
            assert chaos.error is None, f"chaos failed: {chaos.error!r}"
        publish_s = elapsed(stream_start)
        chaos_thread.join(duration_s + 120)
        assert not chaos_thread.is_alive(), "the chaos schedule did not finish"
        assert chaos.error is None, f"chaos failed: {chaos.error!r}\n{agent.log_tail()}"
        if not cloud.running:
            cloud.start()

        wait_for(device.all_acknowledged, 120, "the broker to acknowledge every device message")

        def answered() -> set[int]:
            return {key_of(t, json.loads(p)) for t, p in collector.snapshot() if "/status" not in t}

        def missing() -> int:
            return len(expected.keys() - answered())

        # A poll, not a wait_for: at the deadline the summary below still says what is missing.
        drain_deadline = time.monotonic() + 240
        while missing() and time.monotonic() < drain_deadline:
            assert agent.proc is not None and agent.proc.poll() is None, f"the agent died:\n{agent.log_tail()}"
            time.sleep(0.5)
        health = http_status(f"http://127.0.0.1:{metrics_port}/healthz")
        rss_main_final = sampler.last_main
        sampler.stop()

        outputs = [(t, json.loads(p)) for t, p in collector.snapshot() if "/status" not in t]
        # The evidence, for a failure's post-mortem: every answer in arrival order, and the chaos timeline.
        with (tmp_path / "outputs.jsonl").open("w") as fh:
            for topic, body in outputs:
                fh.write(json.dumps({"topic": topic, **body}) + "\n")
        (tmp_path / "chaos.json").write_text(json.dumps({"seed": SEED, "schedule": chaos.log,
                                                         "device_at_risk": sorted(chaos.at_risk)}))
        by_key: dict[int, list[tuple[str, dict[str, Any]]]] = {}
        for topic, body in outputs:
            by_key.setdefault(key_of(topic, body), []).append((topic, body))
        lost = sorted(expected.keys() - by_key.keys())
        unexpected = sorted(by_key.keys() - expected.keys())

        wrong: list[str] = []
        duplicates = 0
        same_task_duplicates = 0
        device_duplicates = 0
        foreign_task_ids: list[int] = []
        for key, copies in by_key.items():
            want = expected.get(key)
            for topic, body in copies:
                got = "result" if "/results/" in topic else body.get("reason")
                if got != want:
                    wrong.append(f"{key}: expected {want}, got {got} ({body.get('detail', '')})")
            duplicates += len(copies) - 1
            task_ids = Counter(body["task_id"] for topic, body in copies if "/results/" in topic)
            same_task_duplicates += sum(n - 1 for n in task_ids.values())
            if len(task_ids) > 1:
                if key in chaos.at_risk:
                    device_duplicates += len(task_ids) - 1
                else:
                    foreign_task_ids.append(key)

        events_logged = Counter(e.get("event") for e in agent.events())
        placements = Counter(body.get("placement") for topic, body in outputs if "/results/" in topic)
        fallbacks = sum(1 for topic, body in outputs if "/results/" in topic and "fallback" in body["decision"])
        # At-least-once costs duplicates only around what was in flight when a connection ended:
        # - a SIGKILL repeats results published but not yet recorded as acknowledged: at most the publish
        #   window, plus acknowledgements still queued for the store writer (at most the receive maximum);
        # - every reconnect (broker restarts, and the agent's own reconnects that have the broker redeliver
        #   what it held back while the store was full) makes paho send the unacknowledged results again: at
        #   most the publish window each;
        # - a broker restart may also repeat what it had in flight to the consumer and, for the device, what
        #   the device had in flight (those are new messages to the agent, counted apart by task_id).
        reconnects = events_logged["mqtt_connected"] - agent.starts
        bound = (chaos.kills * (PUBLISH_WINDOW + RECEIVE_MAXIMUM) + reconnects * PUBLISH_WINDOW
                 + chaos.restarts * (BROKER_INFLIGHT + DEVICE_INFLIGHT))
        summary = {
            "seed": SEED, "messages": MESSAGES, "rate_per_s": RATE, "kills": chaos.kills,
            "broker_restarts": chaos.restarts, "cloud_outages": chaos.cloud_outages,
            "agent_starts": agent.starts, "outputs": len(outputs), "duplicates": duplicates,
            "duplicates_same_task_id": same_task_duplicates, "device_resent_duplicates": device_duplicates,
            "device_messages_at_risk": len(chaos.at_risk), "agent_reconnects": reconnects,
            "duplicate_bound": bound,
            "store_full_pauses": events_logged["store_full_intake_paused"],
            "placements": dict(placements), "cloud_fallbacks": fallbacks,
            "peak_rss_main_mb": round(sampler.peak_main / 2**20, 1),
            "peak_rss_tree_mb": round(sampler.peak_tree / 2**20, 1),
            "final_rss_main_mb": round(rss_main_final / 2**20, 1), "rss_samples": sampler.samples,
            "publish_s": publish_s, "duration_s": elapsed(started),
        }
        print("torture schedule: " + ", ".join(chaos.log))
        print("torture summary: " + json.dumps(summary))

        assert not lost, f"{len(lost)} messages have neither a result nor a dead letter, e.g. {lost[:20]}"
        assert not unexpected, f"answers to messages never sent: {unexpected[:20]}"
        assert not wrong, f"{len(wrong)} wrong answers, e.g. {wrong[:10]}"
        assert not foreign_task_ids, (
            f"{len(foreign_task_ids)} messages sent once got results under different task_ids, "
            f"e.g. {foreign_task_ids[:20]}")
        assert duplicates <= bound, f"{duplicates} duplicates, more than the in-flight bound {bound}"
        assert chaos.kills == KILLS and chaos.restarts == RESTARTS and chaos.cloud_outages == CLOUD_OUTAGES
        assert events_logged["store_full_intake_paused"] >= 1, "the store bound was never reached"
        assert placements["cloud"] > 0, "nothing ran in the cloud"
        assert fallbacks > 0 or events_logged["cloud_offload_failed"] > 0 or any(
            body["decision"]["reason"] == "circuit_open" for topic, body in outputs if "/results/" in topic
        ), "no task met a cloud outage"
        assert sampler.samples > 0
        assert sampler.peak_main < MAX_RSS_MB * 2**20, (
            f"the agent's RSS peaked at {sampler.peak_main / 2**20:.0f} MB, above {MAX_RSS_MB:.0f} MB")
        assert health == 200, f"/healthz answered {health}"
        assert agent.terminate() == 0
    finally:
        sampler.stop()
        if device is not None:
            device.close()
        collector.close()
        agent.cleanup()
        cloud.stop()
        broker.stop()

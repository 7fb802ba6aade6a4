"""Simulated devices: CityPulse Aarhus sensors and noise monitors, publishing QoS 1 over paho from one thread.

Sensors replay real rows (traffic, parking, weather) as ``sensor.stats`` JSON at a steady rate. Microphones send
synthetic 16 kHz 16-bit PCM clips of 1-20 s for ``noise.spectrum``: a trickle, plus a burst every so often (a
siren passes, every microphone uploads at once) that builds a queue on the gateway's single worker — which is
when offloading to the cloud can pay off, if the uplink is fast enough at that moment.
"""

from __future__ import annotations

import csv
import itertools
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.demo.processes import DemoError

SAMPLE_RATE = 16_000
SENSOR_RATE_HZ = 40.0  # all sensors together
CLIP_EVERY_S = 1.5  # the trickle
BURST_EVERY_S = 15.0
BURST_CLIPS = 48
CLIP_SECONDS = (1.0, 20.0)
MICROPHONES = 6
MAX_UNACKED = 400  # publishes the broker has not acknowledged yet: beyond this the devices wait
# Identifiers are not readings: a z-score of a row id means nothing, so they are not sent as numbers.
IDENTIFIERS = {"_id", "extID", "REPORT_ID"}


@dataclass(frozen=True, slots=True)
class SensorFile:
    kind: str  # device type in the topic: traffic, parking, weather
    device: str
    path: Path


def sensor_files(data: Path) -> list[SensorFile]:
    """The CSVs the demo replays; a clear error if the directory is not the CityPulse Aarhus collection."""
    if not data.is_dir():
        raise DemoError(f"the CityPulse data directory {data} does not exist; give the right one with --data DIR "
                        "(without it the demo plays the sample shipped with the package)")
    files: list[SensorFile] = []
    for path in sorted(data.glob("AarhusTrafficData*.csv")):
        files.append(SensorFile("traffic", path.stem.removeprefix("AarhusTrafficData"), path))
    for path in sorted(data.glob("AarhusParkingData*.csv")):
        files.append(SensorFile("parking", path.stem.removeprefix("AarhusParkingData").lower(), path))
    for path in sorted(data.glob("AarhusWeatherData*.csv")):
        files.append(SensorFile("weather", "station" + path.stem.removeprefix("AarhusWeatherData"), path))
    if not files:
        raise DemoError(f"{data} has no AarhusTrafficData*/AarhusParkingData*/AarhusWeatherData* CSV files; "
                        "give the CityPulse Aarhus directory with --data DIR")
    return files


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def rows(source: SensorFile) -> Iterator[dict[str, Any]]:
    """The file's rows forever (a demo outlasting the data starts over), numbers as JSON numbers."""
    while True:
        with source.path.open(newline="", encoding="utf-8") as fh:
            empty = True
            for row in csv.DictReader(fh):
                empty = False
                yield {k: _number(v) for k, v in row.items() if k is not None and k not in IDENTIFIERS}
        if empty:
            raise DemoError(f"{source.path} has no rows")


def clip(rng: np.random.Generator, seconds: float) -> bytes:
    """A street scene: a few tones (engines, a siren's partials) over broadband noise, as 16-bit LE PCM."""
    n = int(SAMPLE_RATE * seconds)
    t = np.arange(n) / SAMPLE_RATE
    signal = rng.normal(0.0, rng.uniform(300, 3000), n)
    for _ in range(int(rng.integers(1, 4))):
        freq = rng.uniform(80, 4000)
        signal += rng.uniform(1000, 8000) * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
    return bytes(signal.clip(-32768, 32767).astype("<i2").tobytes())


class Devices:
    """All simulated devices on one MQTT connection, paced by one thread."""

    def __init__(self, host: str, port: int, data: Path, seed: int) -> None:
        self._sources = [(f"city/aarhus/{s.kind}/{s.device}/data", rows(s)) for s in sensor_files(data)]
        self._rng = np.random.default_rng(seed)
        self._host, self._port = host, port
        self._stop = threading.Event()
        self._unacked: deque[paho.MQTTMessageInfo] = deque()
        self.sent = {"sensor.stats": 0, "noise.spectrum": 0}
        self.sent_bytes = 0
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"demo-devices-{uuid.uuid4().hex[:8]}",
                                  protocol=paho.MQTTv311)
        self.client.max_inflight_messages_set(100)
        self._thread = threading.Thread(target=self._run, name="demo-devices", daemon=True)
        self.error: Exception | None = None

    def start(self) -> None:
        self.client.connect(self._host, self._port)
        self.client.loop_start()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        self.client.disconnect()
        self.client.loop_stop()

    def _publish(self, topic: str, payload: bytes, kind: str) -> None:
        # Back-pressure like a real device with a small buffer: wait for the broker rather than queue without end.
        while len(self._unacked) >= MAX_UNACKED and not self._stop.is_set():
            while self._unacked and self._unacked[0].is_published():
                self._unacked.popleft()
            if len(self._unacked) >= MAX_UNACKED:
                self._stop.wait(0.01)
        self._unacked.append(self.client.publish(topic, payload, qos=1))
        while self._unacked and self._unacked[0].is_published():
            self._unacked.popleft()
        self.sent[kind] += 1
        self.sent_bytes += len(payload)

    def _audio(self, count: int) -> None:
        for _ in range(count):
            mic = int(self._rng.integers(1, MICROPHONES + 1))
            payload = clip(self._rng, float(self._rng.uniform(*CLIP_SECONDS)))
            self._publish(f"city/aarhus/noise/mic{mic}/pcm", payload, "noise.spectrum")

    def _run(self) -> None:
        try:
            sensors = itertools.cycle(self._sources)
            start = time.monotonic()
            next_sensor = next_clip = start
            next_burst = start + BURST_EVERY_S / 2  # the first burst comes soon, once the agent has warmed up
            while not self._stop.is_set():
                now = time.monotonic()
                while next_sensor <= now:
                    topic, source = next(sensors)
                    self._publish(topic, orjson.dumps(next(source)), "sensor.stats")
                    next_sensor += 1.0 / SENSOR_RATE_HZ
                if next_clip <= now:
                    self._audio(1)
                    next_clip = now + float(self._rng.exponential(CLIP_EVERY_S))
                if next_burst <= now:
                    self._audio(BURST_CLIPS)
                    next_burst = now + BURST_EVERY_S
                    next_sensor = max(next_sensor, time.monotonic() - 1.0)  # no catch-up storm after a burst
                self._stop.wait(max(0.0, min(next_sensor, next_clip, next_burst) - time.monotonic()))
        except Exception as exc:  # noqa: BLE001 - a dying thread says nothing; the main loop reports it and stops
            self.error = exc

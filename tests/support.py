"""Real parts for the tests: a Mosquitto broker on a free port, the agent as a process, MQTT clients."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import SecretStr

from agent.config import CloudSettings
from agent.data import CITYPULSE_DIR

ROOT = Path(__file__).resolve().parents[1]
PROVISIONING_S = 0.3
AGENTS: list[Agent] = []  # the agents of the running test, whose logs a failure report shows (conftest.py)
CITYPULSE = CITYPULSE_DIR  # the sample shipped with the package: tests need nothing beside the repository


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """``wait_for`` inside a running event loop: the loop's own tasks (a client's lease upkeep) go on meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def pcm(samples: np.ndarray[Any, np.dtype[np.float64]]) -> bytes:
    """Float samples in [-1, 1) as 16-bit little-endian PCM (rounded, clipped)."""
    return np.clip(np.round(samples * 32768.0), -32768, 32767).astype("<i2").tobytes()


def sine(freq: float, amplitude: float, seconds: float, rate: int = 16000) -> np.ndarray[Any, np.dtype[np.float64]]:
    t = np.arange(round(seconds * rate)) / rate
    return amplitude * np.sin(2 * np.pi * freq * t)


def pcm_sine(seconds: float, freq: float = 1000.0, amplitude: float = 0.3, rate: int = 16000) -> bytes:
    """A pure tone: a known spectrum."""
    return pcm(sine(freq, amplitude, seconds, rate))


def pcm_noise(seconds: float, seed: int = 0, level: float = 0.1, rate: int = 16000) -> bytes:
    """Gaussian noise of standard deviation ``level`` (full scale 1), reproducible by ``seed``: street noise."""
    return pcm(np.random.default_rng(seed).normal(0.0, level, round(seconds * rate)))


class Mosquitto:
    """A real Mosquitto with persistence, so a restart keeps sessions and queued messages."""

    def __init__(self, workdir: Path, port: int | None = None, extra_conf: str = "") -> None:
        exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
        if exe is None:
            raise RuntimeError("mosquitto is not installed: apt-get install mosquitto mosquitto-clients")
        self.exe = exe
        self.workdir = workdir
        self.port = port or free_port()
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {workdir}/\n"
            "autosave_interval 1\n"
            "max_queued_messages 0\n"
            "max_queued_bytes 0\n"
            f"log_dest file {self.log}\n"
            # Started as root (CI), mosquitto would switch to its own user and lose access to this folder.
            "user root\n"
            # subscribe: each subscription as the broker takes it, which subscribed() reads.
            "log_type error\nlog_type warning\nlog_type notice\nlog_type subscribe\n"
            + extra_conf
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_for(self._listening, 10, f"mosquitto on port {self.port}")

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited: {self.log.read_text() if self.log.exists() else ''}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def subscribed(self, client_id: str, topic: str) -> bool:
        """Whether ``client_id`` has subscribed to ``topic``: from then on the broker routes that topic to it."""
        line = re.compile(rf"^\d+: {re.escape(client_id)} \d {re.escape(topic)}$", re.MULTILINE)
        return self.log.exists() and line.search(self.log.read_text(errors="replace")) is not None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: mosquitto saves its persistence file on the way out
            self.proc.wait(10)
        self.proc = None

    def restart(self, down_s: float = 0.5) -> None:
        self.stop()
        time.sleep(down_s)  # the outage itself: clients find no broker for this long
        self.start()


class Collector:
    """A persistent-session QoS 1 subscriber that keeps every message it receives."""

    def __init__(self, port: int, topic: str, client_id: str | None = None) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2,
                                  client_id=client_id or f"collector-{uuid.uuid4().hex[:8]}",
                                  protocol=paho.MQTTv311, clean_session=False)
        subscribed = threading.Event()
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda c, u, mid, codes, p: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        # From the SUBACK on the broker keeps what is published for this session, even before a first start.
        wait_for(subscribed.is_set, 10, "the collector's subscription")

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, msg.payload))

    def snapshot(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return list(self.messages)

    def json_under(self, prefix: str) -> list[dict[str, Any]]:
        return [json.loads(p) for t, p in self.snapshot() if t.startswith(prefix)]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Relay:
    """A TCP relay from a client to the broker whose client → broker direction can be cut (``cut.set()``).

    What the client sends from then on (acknowledgements, results) is read and dropped, never reaching the
    broker, while the broker's messages still reach the client: the case of a gateway that handled a message
    and lost power before its answers left. Not a fake of either side: both speak real MQTT through it.
    """

    def __init__(self, broker_port: int) -> None:
        self.broker_port = broker_port
        self.cut = threading.Event()
        # Set: what the client sends after its first write (its CONNECT) waits here until ``release()``.
        self.held = threading.Event()
        self._waiting: list[tuple[socket.socket, bytes]] = []
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
                broker = socket.create_connection(("127.0.0.1", self.broker_port))
            except OSError:
                return  # closed
            self._sockets += [client, broker]
            threading.Thread(target=self._pump, args=(client, broker, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(broker, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, outbound: bool) -> None:
        first = True
        try:
            while data := source.recv(65536):
                if not outbound:
                    sink.sendall(data)  # no lock: it may block while the client pauses its reading
                    continue
                if self.cut.is_set():
                    continue
                with self._lock:
                    if not first and self.held.is_set():
                        self._waiting.append((sink, data))
                    else:
                        sink.sendall(data)
                first = False
        except OSError:
            pass
        for sock in (source, sink):  # one side gone: the other sees the connection end
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def release(self) -> None:
        """Pass on what ``held`` kept back, in order, and hold nothing from now on."""
        with self._lock:
            self.held.clear()
            for sink, data in self._waiting:
                sink.sendall(data)
            self._waiting.clear()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self._server.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def publisher(port: int, client_id: str | None = None) -> paho.Client:
    """A device: QoS 1 publishes with a persistent session, so it re-sends across broker restarts."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"device-{uuid.uuid4().hex[:8]}",
                         protocol=paho.MQTTv311, clean_session=False)
    client.max_inflight_messages_set(200)
    client.connect("127.0.0.1", port)
    client.loop_start()
    wait_for(client.is_connected, 10, "device connection")
    return client


def citypulse_rows(n: int, start_seq: int = 0) -> Iterator[dict[str, Any]]:
    """Real Aarhus traffic rows with numbers as numbers and a unique ``seq``."""
    seq = start_seq
    files = sorted(CITYPULSE.glob("AarhusTrafficData*.csv"))
    while True:
        for path in files:
            with path.open(newline="") as fh:
                for row in csv.DictReader(fh):
                    out: dict[str, Any] = {}
                    for key, value in row.items():
                        try:
                            out[key] = int(value)
                        except ValueError:
                            try:
                                out[key] = float(value)
                            except ValueError:
                                out[key] = value
                    out["seq"] = seq
                    yield out
                    seq += 1
                    if seq - start_seq >= n:
                        return


class Agent:
    """The agent as a real process, configured by an env file."""

    def __init__(self, workdir: Path, broker_port: int, agent_id: str | None = None,
                 extra_env: dict[str, str] | None = None, routes: list[dict[str, Any]] | None = None,
                 pythonpath: Path | None = None, process_env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.pythonpath = pythonpath
        self.process_env = process_env or {}  # beside the env file, e.g. systemd's NOTIFY_SOCKET
        workdir.mkdir(parents=True, exist_ok=True)
        self.agent_id = agent_id or f"gw-{uuid.uuid4().hex[:6]}"
        self.env_file = workdir / "agent.env"
        self.log_path = workdir / "agent.log"
        lines = {
            "EDGE_AGENT_AGENT_ID": self.agent_id,
            "EDGE_AGENT_MQTT__HOST": "127.0.0.1",
            "EDGE_AGENT_MQTT__PORT": str(broker_port),
            "EDGE_AGENT_STATE_DIR": str(workdir / "state"),
            "EDGE_AGENT_METRICS__PORT": "0",
            "EDGE_AGENT_LOCAL__WORKERS": "1",
            "EDGE_AGENT_MQTT__RECONNECT_MIN_S": "0.2",
            "EDGE_AGENT_MQTT__RECONNECT_MAX_S": "2",
            "EDGE_AGENT_LOG__FORMAT": "json",
        }
        if routes is not None:
            lines["EDGE_AGENT_ROUTES"] = json.dumps(routes)
        lines.update(extra_env or {})
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        AGENTS.append(self)

    def start(self, wait_connected: bool = True) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
        env.pop("CREDENTIALS_DIRECTORY", None)
        if self.pythonpath is not None:
            env["PYTHONPATH"] = str(self.pythonpath)
        env.update(self.process_env)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log_fh = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--env-file", str(self.env_file)],
            stdout=self._log_fh, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        self.starts += 1
        if wait_connected:
            wait_for(lambda: self._logged_since(offset, "mqtt_connected"), 30, "the agent to connect")
            # The CONNACK comes before the SUBACK: a device publishing in between, on the first start of a
            # client id, publishes to no one. (A leaving member unsubscribes instead; a refusal is the test's.)
            wait_for(lambda: self._logged_since(offset, "mqtt_subscribed", "mqtt_subscribe_refused",
                                                "mqtt_unsubscribing"), 30, "the broker to confirm the routes")

    def _logged_since(self, offset: int, *events: str) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log_tail()}")
        with self.log_path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read()
        return any(f'"event": "{event}"'.encode() in data or f'"event":"{event}"'.encode() in data
                   for event in events)

    def write_env(self, **settings: str) -> None:
        """Change settings in the env file (for SIGHUP reloads)."""
        lines = dict(line.split("=", 1) for line in self.env_file.read_text().splitlines() if "=" in line)
        lines.update(settings)
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))

    def wait_logged(self, event: str, timeout: float = 30) -> None:
        wait_for(lambda: any(e.get("event") == event for e in self.events()), timeout, f"the agent to log {event}")

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:]) if self.log_path.exists() else ""

    def kill(self) -> None:
        assert self.proc is not None
        # SIGKILL the whole process group: the worker pool dies with the agent, as in a power cut.
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._log_fh.close()

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._log_fh.close()
        return code

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        if self.proc is not None:
            self._log_fh.close()


class Agents:
    """Agents made in one test's folder and killed, whatever is left of them, after it (the ``agents`` fixture).

    ``agents(broker)`` makes an agent in ``folder / "agent"``; the same ``name`` again is the same folder, so
    the same store: that gateway started anew under other settings. ``routes`` default to the ``routes`` given
    here (the ``agent_routes`` fixture, which a module overrides for its own).
    """

    def __init__(self, folder: Path, routes: list[dict[str, Any]]) -> None:
        self.folder = folder
        self.routes = routes
        self.made: list[Agent] = []

    def __call__(self, broker: Mosquitto, name: str = "agent", *, routes: list[dict[str, Any]] | None = None,
                 **kwargs: Any) -> Agent:
        agent = Agent(self.folder / name, broker.port, routes=self.routes if routes is None else routes, **kwargs)
        self.made.append(agent)
        return agent

    def cleanup(self) -> None:
        for agent in self.made:
            agent.cleanup()


class DevCloud:
    """``python -m agent.devcloud`` on a free port, with helpers for its admin endpoints.

    Started at once unless ``start=False``. ``kill()`` then ``start()`` brings it back on the same port: the
    agent's ``EDGE_AGENT_CLOUD__URL`` is fixed for its life, so an outage it recovers from needs the port back.
    """

    def __init__(self, log_path: Path, *extra: str, ca_file: Path | None = None, workers: int = 2,
                 provisioning_s: float = PROVISIONING_S, start: bool = True) -> None:
        """With ``--tls-cert``/``--tls-key`` in ``extra``, pass the CA that signed them as ``ca_file``."""
        self.port = free_port()
        self.token = f"test-{uuid.uuid4().hex}"
        self.ca_file = ca_file
        self.url = f"{'https' if ca_file else 'http'}://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.command = [sys.executable, "-m", "agent.devcloud", "--host", "127.0.0.1", "--port", str(self.port),
                        "--token", self.token, "--workers", str(workers),
                        "--provisioning-delay", str(provisioning_s), *extra]
        self.proc: subprocess.Popen[bytes] | None = None
        if start:
            self.start()

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            # Its own process group: kill() takes the worker pool with it.
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                         start_new_session=True)
        wait_for(self._healthy, 60, "the devcloud to start")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the server and its worker pool: leases and answers in progress vanish with it."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def agent_env(self, **cloud: Any) -> dict[str, str]:
        """The agent's settings for this cloud (URL, token, CA, location, a quick poll), plus ``cloud`` as
        ``EDGE_AGENT_CLOUD__<NAME>``: ``connect_timeout_s=1`` is ``EDGE_AGENT_CLOUD__CONNECT_TIMEOUT_S=1``."""
        env = {"EDGE_AGENT_CLOUD__URL": self.url, "EDGE_AGENT_CLOUD__TOKEN": self.token,
               "EDGE_AGENT_CLOUD__LOCATION": "aarhus", "EDGE_AGENT_CLOUD__POLL_INTERVAL_S": "0.05"}
        if self.ca_file is not None:
            env["EDGE_AGENT_CLOUD__CA_FILE"] = str(self.ca_file)
        env.update({f"EDGE_AGENT_CLOUD__{name.upper()}": str(value) for name, value in cloud.items()})
        return env

    def _verify(self) -> ssl.SSLContext | bool:
        return ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file else True

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"the devcloud exited: {self.log_path.read_text(errors='replace')[-2000:]}")
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1, verify=self._verify()).status_code == 200
        except httpx.TransportError:
            return False

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def knobs(self, **change: Any) -> dict[str, Any]:
        response = httpx.post(f"{self.url}/admin/knobs", json=change, headers=self.auth, verify=self._verify())
        assert response.status_code == 200, response.text
        return dict(response.json())

    def stats(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/admin/stats", headers=self.auth, verify=self._verify()).json())

    def reset(self) -> None:
        assert httpx.post(f"{self.url}/admin/reset", headers=self.auth, verify=self._verify()).status_code == 204

    def settings(self, **overrides: Any) -> CloudSettings:
        values: dict[str, Any] = {
            "url": self.url, "token": SecretStr(self.token), "location": "aarhus", "poll_interval_s": 0.05,
            "retry_min_s": 0.05, "retry_max_s": 2.0, "max_retries": 2, "circuit_failures": 3,
            "circuit_cooldown_s": 1.0, "connect_timeout_s": 1.0, "read_timeout_s": 10.0,
        }
        values.update(overrides)
        return CloudSettings(**values)

    def stop(self) -> None:
        """SIGTERM, so the server shuts its pool down itself; SIGKILL for what is left after 15 s."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

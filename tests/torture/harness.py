"""Parts the torture tests add to ``support``: a device that loses nothing across broker restarts, RSS sampling
of the agent's process tree, and env-tunable knobs. (The resource API that dies and comes back on its port is
``support.DevCloud``.)"""

from __future__ import annotations

import os
import threading
import time
import urllib.error
import urllib.request
import uuid

import paho.mqtt.client as paho
import psutil
from paho.mqtt.enums import CallbackAPIVersion

from support import wait_for


def env_int(name: str, default: int) -> int:
    """A test parameter an operator may raise for a longer soak, e.g. ``TORTURE_MESSAGES=200000``.

    Named outside ``EDGE_AGENT_``: the agent refuses any name under its prefix that is not one of its settings.
    """
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - our own loopback endpoint
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


class Device:
    """A device publishing QoS 1 that loses nothing across broker restarts.

    A persistent session (``clean_session=False``) and paho's own resend: every message not acknowledged when
    the connection drops is sent again, with DUP, after the next CONNACK, and publishes made while the broker
    is away wait in paho's queue. Each message's ``MQTTMessageInfo`` tells whether its PUBACK came back.

    A message whose PUBACK the broker never sent before going down may have reached the broker anyway; sent
    again it is a second message as far as MQTT QoS 1 is concerned, and the agent rightly makes a second task
    of it. :meth:`unacknowledged` (called while the broker is down) names those messages, so the test can tell
    such device-side duplicates from the agent's own.
    """

    def __init__(self, port: int, inflight: int) -> None:
        self.inflight = inflight
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"torture-device-{uuid.uuid4().hex[:8]}",
                                  protocol=paho.MQTTv311, clean_session=False)
        self.client.max_inflight_messages_set(inflight)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(1, 2)
        self.infos: list[tuple[int, paho.MQTTMessageInfo]] = []  # (key, info) in publish order
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        wait_for(self.client.is_connected, 10, "device connection")

    def publish(self, key: int, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            raise AssertionError(f"paho refused message {key}: {paho.error_string(info.rc)}")
        self.infos.append((key, info))

    def unacknowledged(self) -> set[int]:
        return {key for key, info in list(self.infos) if not self.acknowledged(info)}

    @staticmethod
    def acknowledged(info: paho.MQTTMessageInfo) -> bool:
        # is_published() raises for a message published while disconnected (rc NO_CONN), although paho keeps it
        # and sends it after the reconnect; the flag it reads is set by the PUBACK in either case.
        return bool(info._published)

    def all_acknowledged(self) -> bool:
        return not self.unacknowledged()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class RssSampler:
    """Samples the RSS of the agent's main process and of its whole tree (worker pool included) in a thread.

    ``pid`` is asked on every sample because the agent is restarted under new pids during the test.
    """

    def __init__(self, pid: object, interval_s: float = 0.2) -> None:
        self._pid = pid
        self.interval_s = interval_s
        self.samples = 0
        self.peak_main = 0
        self.peak_tree = 0
        self.last_main = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            pid = self._pid() if callable(self._pid) else None
            if pid is None:
                continue
            try:
                proc = psutil.Process(pid)
                main = proc.memory_info().rss
                tree = main + sum(child.memory_info().rss for child in proc.children(recursive=True))
            except psutil.Error:
                continue  # killed between two calls
            self.samples += 1
            self.last_main = main
            self.peak_main = max(self.peak_main, main)
            self.peak_tree = max(self.peak_tree, tree)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def elapsed(since: float) -> float:
    return round(time.monotonic() - since, 1)

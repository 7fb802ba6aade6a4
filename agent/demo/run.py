"""``edge-agent demo``: start the parts, show them working, stop them in order.

Start order: broker and devcloud (in parallel), the result watcher, the agent, then the devices. Stop order is the
reverse of what depends on what: devices first (no new input), a short drain, the agent (SIGTERM, it must exit 0),
the watcher, the devcloud, the broker. Ctrl-C or SIGTERM starts that stop and the demo exits 0; a second one
skips the waiting, kills what is left and exits 130.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import secrets
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from agent.demo.devices import Devices, sensor_files
from agent.demo.processes import Child, DemoError, child_env, free_port, port_open
from agent.demo.uplink import Uplink, load
from agent.demo.watch import Metrics, Rates, ResultWatch, Scraper

REFRESH_S = 0.5
PROGRESS_EVERY_S = 5.0
DRAIN_S = 5.0  # after the devices stop, how long the agent may take to finish what it holds before SIGTERM
AGENT_STOP_S = 30.0
PROVISIONING_DELAY_S = 1.0  # a container start, shortened so a minute-long demo sees leases come and go
LOCATION = "aarhus"


def _missing_extra() -> str | None:
    """The demo's optional dependencies, checked up front so a fresh install gets one clear sentence."""
    for module in ("rich", "amqtt", "fastapi", "uvicorn"):
        try:
            __import__(module)
        except ImportError:
            return module
    return None


def main(args: argparse.Namespace) -> int:
    missing = _missing_extra()
    if missing is not None:
        print(f"edge-agent demo: {missing} is not installed; install the demo extra: pip install 'edge-agent[demo]'",
              file=sys.stderr)
        return 1
    if args.broker is None and args.protocol == "5":
        print("edge-agent demo: the embedded broker (amqtt) speaks MQTT 3.1.1 only; use --protocol 3.1.1 or "
              "--broker HOST:PORT", file=sys.stderr)
        return 2
    stop, force = threading.Event(), threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        (force if stop.is_set() else stop).set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with tempfile.TemporaryDirectory(prefix="edge-agent-demo-") as tmp:
            demo = Demo(args, Path(tmp), stop, force)
            try:
                demo.run()
            except DemoError as exc:
                demo.failed = True
                print(f"edge-agent demo: {exc}", file=sys.stderr)
            finally:
                demo.shutdown()
            if force.is_set():
                return 128 + signal.SIGINT  # the shell's convention for "interrupted"
            return 1 if demo.failed else 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Demo:
    def __init__(self, args: argparse.Namespace, workdir: Path, stop: threading.Event, force: threading.Event) -> None:
        self.args = args
        self.workdir = workdir
        self.stop, self.force = stop, force
        self.failed = False
        self.tty = sys.stdout.isatty()
        self.agent_id = f"demo-{uuid.uuid4().hex[:6]}"
        self.token = secrets.token_urlsafe(24)
        self.broker: Child | None = None
        self.devcloud: Child | None = None
        self.agent: Child | None = None
        self.watch: ResultWatch | None = None
        self.devices: Devices | None = None
        self.uplink: Uplink | None = None
        self.scraper: Scraper | None = None
        self.started_at: float | None = None
        self.elapsed_s = 0.0
        self.final: Metrics | None = None

    # ------------------------------------------------------------------ start

    def say(self, text: str) -> None:
        print(f"edge-agent demo: {text}", flush=True)

    def run(self) -> None:
        args = self.args
        sensor_files(args.data)  # a wrong --data fails now, before anything starts
        trace = load(args.uplink)
        env = child_env()
        if args.broker is None:
            host, port = "127.0.0.1", free_port()
            self.broker = Child.python("broker", ["-m", "agent.demo.broker", "--host", host, "--port", str(port)],
                                       self.workdir / "broker.log", env)
            broker_name = f"embedded amqtt on {host}:{port}"
        else:
            host, port = args.broker
            if not port_open(host, port):
                raise DemoError(f"no MQTT broker answers on {host}:{port}")
            broker_name = f"broker {host}:{port}"
        protocol = args.protocol or ("3.1.1" if args.broker is None else "5")

        cloud_port = free_port()
        cloud_url = f"http://127.0.0.1:{cloud_port}"
        start_mbps = trace.mbps(0.0, args.trace_speed)
        # The token goes by environment, not argv, where any local user could read it in ps.
        self.devcloud = Child.python("devcloud", [
            "-m", "agent.devcloud", "--host", "127.0.0.1", "--port", str(cloud_port), "--workers", "2",
            "--provisioning-delay", str(PROVISIONING_DELAY_S),
            "--bandwidth", str(max(start_mbps * 1e6 / 8, 1000.0)),
            "--storage",  # the archive's cloud side: storage resources on the devcloud's own S3 server
        ], self.workdir / "devcloud.log", child_env({"EDGE_AGENT_DEVCLOUD_TOKEN": self.token}))
        self.say(f"starting the {broker_name} and the devcloud on {cloud_url}")
        if self.broker is not None:
            self.broker.wait_until(lambda: port_open(host, port), 20, "ready", self.stop)
        self.devcloud.wait_until(lambda: _healthy(cloud_url), 60, "ready", self.stop)
        if self.stop.is_set():
            return

        self.watch = ResultWatch(host, port, self.agent_id)
        if not self.watch.wait_subscribed(10):
            raise DemoError(f"could not subscribe to the results on {host}:{port}")
        metrics_port = free_port()
        env_file = self._write_env(host, port, protocol, cloud_url, metrics_port)
        self.say(f"starting the agent {self.agent_id} (settings: {env_file}, log: {self.workdir / 'agent.log'})")
        self.agent = Child.python("agent", ["-m", "agent", "run", "--env-file", str(env_file)],
                                  self.workdir / "agent.log", env)
        self.scraper = Scraper(metrics_port)
        self.agent.wait_until(self.scraper.ready, 60, "connected to the broker and subscribed", self.stop)
        if self.stop.is_set():
            return
        self.uplink = Uplink(trace, cloud_url, self.token, args.trace_speed)
        self.devices = Devices(host, port, args.data, args.seed)
        speed = "real time" if args.trace_speed == 1 else f"{args.trace_speed:g}x real time"
        self.say(f"devices started; the uplink follows {trace.name} ({trace.mean_mbps:.2f} Mbit/s mean, "
                 f"{trace.period_s:.0f} s, played at {speed})")
        self.devices.start()
        self.started_at = time.monotonic()
        self._loop()

    def _write_env(self, host: str, port: int, protocol: str, cloud_url: str, metrics_port: int) -> Path:
        # Both routes keep their raw inputs: readings a year for planning (rarely read back), noise clips a month
        # for complaints (read back often). The archive places each sealed segment where it costs least.
        routes = [{"topic": f"city/{LOCATION}/+/+/data", "task": "sensor.stats",
                   "archive": {"days": 365, "retrievals_per_month": 0.05}},
                  {"topic": f"city/{LOCATION}/noise/+/pcm", "task": "noise.spectrum",
                   "archive": {"days": 30, "retrievals_per_month": 3}}]
        settings = {
            "EDGE_AGENT_AGENT_ID": self.agent_id,
            "EDGE_AGENT_MQTT__HOST": host,
            "EDGE_AGENT_MQTT__PORT": str(port),
            "EDGE_AGENT_MQTT__PROTOCOL": protocol,
            "EDGE_AGENT_STATE_DIR": str(self.workdir / "state"),
            "EDGE_AGENT_METRICS__PORT": str(metrics_port),
            # One worker, like a small gateway: a burst of clips then queues, and the cloud can win.
            "EDGE_AGENT_LOCAL__WORKERS": "1",
            "EDGE_AGENT_ROUTES": json.dumps(routes),
            "EDGE_AGENT_CLOUD__URL": cloud_url,
            "EDGE_AGENT_CLOUD__TOKEN": self.token,
            "EDGE_AGENT_CLOUD__LOCATION": LOCATION,
            "EDGE_AGENT_CLOUD__POLL_INTERVAL_S": "0.1",
            # The default (120 s) outlasts a short demo; probe sooner so a link written off gets another look.
            "EDGE_AGENT_DECISION__PROBE_INTERVAL_S": "20",
            # Segments sealed every few seconds and a small disk budget, so a short demo shows both places.
            "EDGE_AGENT_ARCHIVE__SEAL_AGE_S": "5",
            "EDGE_AGENT_ARCHIVE__SEAL_BYTES": str(512 * 1024),
            "EDGE_AGENT_ARCHIVE__DISK_BUDGET_BYTES": str(16 * 1024 * 1024),
            "EDGE_AGENT_ARCHIVE__PASS_INTERVAL_S": "1",
            "EDGE_AGENT_LOG__FORMAT": "json",
        }
        path = self.workdir / "agent.env"
        path.touch(mode=0o600)  # it holds the cloud token
        path.write_text("".join(f"{k}={v}\n" for k, v in settings.items()), encoding="utf-8")
        return path

    # ------------------------------------------------------------------ run

    def _frames(self) -> Iterator[Any]:
        """One frame per refresh until the duration is up, a signal arrives or a part fails."""
        from agent.demo.view import Frame

        assert self.started_at is not None and self.devices and self.watch and self.uplink and self.scraper
        rates = Rates()
        next_knob = 0.0
        while not self.stop.is_set():
            self.elapsed_s = time.monotonic() - self.started_at
            if self.args.duration is not None and self.elapsed_s >= self.args.duration:
                return
            self._check_parts()
            if self.elapsed_s >= next_knob:
                self.uplink.tick(self.elapsed_s)
                next_knob += 1.0
            metrics = self.scraper.scrape()
            results = self.watch.snapshot()
            in_rate, out_rate = rates.add(time.monotonic(), metrics.received if metrics else 0.0, results.results)
            yield Frame(self.elapsed_s, self.args.duration, f"edge-agent demo · agent {self.agent_id}", metrics,
                        results, in_rate, out_rate, self.uplink.mbps, self.uplink.trace.name,
                        dict(self.devices.sent), self.devices.sent_bytes)
            self.stop.wait(REFRESH_S)

    def _loop(self) -> None:
        from agent.demo import view

        if self.tty:
            from rich.console import Console
            from rich.live import Live

            console = Console()
            with Live(console=console, auto_refresh=False, transient=False) as live:
                for frame in self._frames():
                    # Everything but the latest results takes ~33 lines; those get whatever the terminal has left.
                    rows = max(2, min(12, console.size.height - 33))
                    live.update(view.live(dataclasses.replace(frame, recent_rows=rows)), refresh=True)
            return
        last = -PROGRESS_EVERY_S
        for frame in self._frames():
            if frame.elapsed_s - last >= PROGRESS_EVERY_S:
                print(view.progress_line(frame), flush=True)
                last = frame.elapsed_s

    def _check_parts(self) -> None:
        for child in (self.broker, self.devcloud, self.agent):
            if child is not None and not child.running:
                raise DemoError(f"the {child.name} exited with status {child.proc.returncode}:\n{child.log_tail()}")
        if self.devices is not None and self.devices.error is not None:
            raise DemoError(f"the simulated devices failed: {self.devices.error!r}")

    # ------------------------------------------------------------------ stop

    def shutdown(self) -> None:
        """Stop every part that started, in order; each step runs even if an earlier one failed."""
        steps: list[tuple[str, Callable[[], None]]] = [
            ("devices", self._stop_devices),
            ("agent", self._stop_agent),
            ("result watcher", self._close_watch),
            ("devcloud", lambda: self._stop_quietly(self.devcloud, 15.0)),
            ("broker", lambda: self._stop_quietly(self.broker, 10.0)),
        ]
        for name, step in steps:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - the later parts must still be stopped; said below
                self.failed = True
                print(f"edge-agent demo: stopping the {name} failed: {exc!r}", file=sys.stderr)
        for closable in (self.uplink, self.scraper):
            if closable is not None:
                closable.close()
        if self.watch is not None and self.started_at is not None:
            from agent.demo.view import summary

            sent = dict(self.devices.sent) if self.devices else {}
            print(summary(self.elapsed_s, self.final, self.watch.snapshot(), sent,
                          self.devices.sent_bytes if self.devices else 0), flush=True)

    def _stop_devices(self) -> None:
        if self.devices is None:
            return
        self.devices.stop()
        if self.agent is None or self.scraper is None or self.watch is None or not self.agent.running:
            return
        # Let the agent answer what it already holds, so the summary's counts add up.
        deadline = time.monotonic() + DRAIN_S
        while time.monotonic() < deadline and not self.force.is_set():
            metrics, results = self.scraper.scrape(), self.watch.snapshot()
            if metrics is not None and results.results + sum(results.dead.values()) >= metrics.received:
                break
            time.sleep(0.1)
        self.final = self.scraper.scrape()

    def _stop_agent(self) -> None:
        if self.agent is None:
            return
        if self.final is None and self.scraper is not None and self.agent.running:
            self.final = self.scraper.scrape()
        was_running = self.agent.running
        code = self._stop_child(self.agent, AGENT_STOP_S)
        if was_running and self.force.is_set():
            self.failed = True
            print("edge-agent demo: stopped without waiting (second Ctrl-C); the agent was "
                  + ("killed" if code is None else f"done, status {code}"), file=sys.stderr)
        elif was_running and code != 0:
            self.failed = True
            print(f"edge-agent demo: the agent exited with status {code} on SIGTERM:\n{self.agent.log_tail()}",
                  file=sys.stderr)

    def _close_watch(self) -> None:
        if self.watch is not None:
            time.sleep(0.2)  # the last results the agent published before exiting are still on their way
            self.watch.close()

    def _stop_quietly(self, child: Child | None, timeout: float) -> None:
        # Their exit status is not the demo's concern (uvicorn and amqtt exit 0 on SIGTERM, and a hang is killed).
        self._stop_child(child, timeout)

    def _stop_child(self, child: Child | None, timeout: float) -> int | None:
        if child is None:
            return None
        return child.stop(timeout, self.force)


def _healthy(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200
    return False

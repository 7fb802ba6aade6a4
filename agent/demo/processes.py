"""The demo's subprocesses (broker, devcloud, agent): started in their own process groups, stopped in order."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


class DemoError(RuntimeError):
    """A part of the demo could not start or died; the message says which and why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.3):
            return True
    except OSError:
        return False


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The demo's environment minus the operator's EDGE_AGENT_* settings, which would override the generated file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    env.pop("CREDENTIALS_DIRECTORY", None)
    env.update(extra or {})
    return env


class Child:
    """One subprocess with its output in a log file.

    Each child gets a process group of its own: Ctrl-C in the terminal then reaches only the demo, which stops
    the parts in order (devices, agent, devcloud, broker) instead of all of them at once — the agent must still
    reach its broker while it drains. A child that ignores SIGTERM loses its whole group (worker pools included).
    """

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: Mapping[str, str]) -> None:
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("wb")
        try:
            self.proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=self._log,
                                         stderr=subprocess.STDOUT, env=dict(env), process_group=0)
        except OSError:
            self._log.close()
            raise

    @classmethod
    def python(cls, name: str, args: Sequence[str], log_path: Path, env: Mapping[str, str]) -> Child:
        return cls(name, [sys.executable, *args], log_path, env)

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str, stop: threading.Event) -> None:
        """Poll ``ready`` until true; fail if the child exits or time runs out; give up quietly on ``stop``."""
        deadline = time.monotonic() + timeout
        while not stop.is_set():
            if not self.running:
                raise DemoError(f"the {self.name} exited with status {self.proc.returncode} while starting:\n"
                                f"{self.log_tail()}")
            if ready():
                return
            if time.monotonic() > deadline:
                raise DemoError(f"the {self.name} did not become {what} within {timeout:.0f} s:\n{self.log_tail()}")
            stop.wait(0.1)

    def stop(self, timeout: float, force: threading.Event | None = None) -> int | None:
        """SIGTERM, wait up to ``timeout`` (less if ``force`` is set), then SIGKILL the group. The exit status."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.running and time.monotonic() < deadline and not (force is not None and force.is_set()):
                time.sleep(0.05)
        code = self.proc.poll()
        # Whatever is left of the group (a worker pool whose parent is gone, or the child itself) goes now.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if code is None:
            self.proc.wait()
        self._log.close()
        return code

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join("    " + line for line in text.splitlines()[-lines:])

"""The outcome of a reload, told to whoever asked for it (``edge-agent reload``, the unit's ExecReload=).

A SIGHUP has no answer, and systemd 252 has no ``Type=notify-reload``: ``ExecReload=/bin/kill -HUP $MAINPID``
returns before the agent has read anything and succeeds whatever it found. So after every reload the agent writes
its :class:`Outcome` to :data:`OUTCOME_FILE` in its state directory (atomically: a reader sees the previous outcome
or this one, never a part), and :func:`request` sends the SIGHUP and waits for an outcome of a reload that began
after it. The file works whatever else is configured (no metrics port, no broker) and the unit's sandbox allows
it: the state directory is the one place the agent and its ExecReload= command can both write and read.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

OUTCOME_FILE = "reload-outcome.json"
Result = Literal["applied", "failed", "ignored"]


@dataclass(frozen=True)
class Outcome:
    pid: int  # the agent that reloaded
    started_ns: int  # CLOCK_MONOTONIC when it began to read its settings, after the SIGHUP arrived
    result: Result
    problems: list[tuple[str, str]] = field(default_factory=list)  # (variable, problem) when it failed
    needs_restart: list[str] = field(default_factory=list)  # variables changed that wait for a restart
    environment_wins: list[str] = field(default_factory=list)  # changed in the file, overridden by the environment
    routes: list[str] = field(default_factory=list)  # the topic filters in force afterwards
    subscribed: bool = True  # the broker confirmed the routes in force (False: it has not answered yet)
    detail: str = ""  # why it was ignored

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Outcome:
        return cls(pid=int(data["pid"]), started_ns=int(data["started_ns"]), result=data["result"],
                   problems=[(str(v), str(p)) for v, p in data.get("problems", [])],
                   needs_restart=list(data.get("needs_restart", [])),
                   environment_wins=list(data.get("environment_wins", [])), routes=list(data.get("routes", [])),
                   subscribed=bool(data.get("subscribed", True)), detail=str(data.get("detail", "")))


def outcome_dir(state_dir: Path) -> Path:
    """Where the agent writes its outcome: systemd's state directory when it runs as a unit (``$STATE_DIRECTORY``,
    which ExecReload= gets too, whatever EDGE_AGENT_STATE_DIR says), otherwise the store's directory."""
    given = os.environ.get("STATE_DIRECTORY", "")
    return Path(given.split(":")[0]) if given else state_dir


def write_outcome(directory: Path, outcome: Outcome) -> None:
    """Replace the outcome file in one step (write aside, rename); raises OSError when it cannot."""
    target = directory / OUTCOME_FILE
    aside = directory / f".{OUTCOME_FILE}.{os.getpid()}"
    try:
        aside.write_text(json.dumps(asdict(outcome)) + "\n")
        aside.replace(target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            aside.unlink()


def read_outcome(directory: Path) -> Outcome | None:
    try:
        return Outcome.from_json(json.loads((directory / OUTCOME_FILE).read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return None  # not one of ours, or from another version: wait for the next


class ReloadError(Exception):
    """No outcome: the process is gone, cannot be signalled, or did not answer in time."""


def request(pid: int, directory: Path, timeout_s: float, *, poll_s: float = 0.05,
            clock: Callable[[], int] = time.monotonic_ns) -> Outcome:
    """Send SIGHUP to ``pid`` and return the outcome of the first reload it began after that."""
    asked = clock()
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise ReloadError(f"no process {pid}: is the agent running?") from None
    except PermissionError:
        raise ReloadError(f"not allowed to signal process {pid}: run as its user (edge-agent) or root") from None
    deadline = time.monotonic() + timeout_s
    while True:
        outcome = read_outcome(directory)
        if outcome is not None and outcome.pid == pid and outcome.started_ns >= asked:
            return outcome
        if time.monotonic() >= deadline:
            break
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise ReloadError(f"process {pid} ended before it reported the reload") from None
        except PermissionError:
            pass  # it exists
        time.sleep(poll_s)
    raise ReloadError(f"process {pid} did not report the reload within {timeout_s:g} s in "
                      f"{directory / OUTCOME_FILE} (a stuck event loop, or a state directory other than its own)")


def describe(outcome: Outcome) -> tuple[list[str], bool]:
    """What ``edge-agent reload`` prints, one line a fact, and whether the reload succeeded."""
    if outcome.result == "failed":
        lines = [f"configuration error: {variable}: {problem}" for variable, problem in outcome.problems]
        lines.append(f"reload failed ({len(outcome.problems)} problem{'s' if len(outcome.problems) != 1 else ''}); "
                     "the agent keeps running with its previous settings")
        return lines, False
    if outcome.result == "ignored":
        return [f"reload ignored: {outcome.detail}"], False
    lines = [f"{variable}: changed; takes effect at the next start (restart the agent)"
             for variable in outcome.needs_restart]
    lines += [f"{variable}: changed in the env file, but also set in the agent's environment, which wins; "
              "change it where the environment is set (the unit's Environment=) and restart"
              for variable in outcome.environment_wins]
    routes = ", ".join(outcome.routes)
    confirmed = "" if outcome.subscribed else " (not yet confirmed by the broker)"
    lines.append(f"reload applied; routes: {routes}{confirmed}")
    return lines, True

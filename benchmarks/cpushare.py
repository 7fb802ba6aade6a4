"""Where a benchmark's CPU goes: runs a command and adds up the CPU time of every process it and its neighbours
use, grouped by patterns of their command lines.

On a 2-core machine the agent shares the CPUs with the broker and whatever consumes its results; a contender
that costs the broker or the consumer more CPU a message loses throughput for it even if its own CPU time is
lower. This shows each part's share, from ``/proc/<pid>/stat`` (user + system time, all threads), sampled every
``--interval`` seconds while the command runs (a process that ends between two samples loses at most its last
interval). Processes already running when it starts count only what they use afterwards.

    .venv/bin/python benchmarks/cpushare.py --group agent='edge-agent run' --group broker='^mosquitto ' \\
        --group collector='mosquitto_sub|peer.py collect' --group nodered='node-red' -- COMMAND ARGS...

Prints one line per group (CPU seconds, share of the wall time in cores) and the command's wall time; ``--json``
prints them as one JSON object. The command's own output goes through unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

TICKS = os.sysconf("SC_CLK_TCK")


def _processes() -> dict[int, tuple[str, float]]:
    """pid → (command line, CPU seconds so far) of every process readable now."""
    seen: dict[int, tuple[str, float]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # ended meanwhile
        fields = stat[stat.rindex(")") + 2:].split()
        seen[int(name)] = (cmdline, (int(fields[11]) + int(fields[12])) / TICKS)
    return seen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", action="append", default=[], metavar="NAME=REGEX",
                        help="a group of processes whose command line matches REGEX (first match wins)")
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or not args.group:
        parser.error("give at least one --group and a command after --")
    groups = []
    for spec in args.group:
        name, sep, pattern = spec.partition("=")
        if not sep:
            parser.error(f"--group {spec!r}: expected NAME=REGEX")
        groups.append((name, re.compile(pattern)))

    before = _processes()
    last: dict[int, tuple[str, float]] = {}
    started = time.monotonic()
    child = subprocess.Popen(command)
    while child.poll() is None:
        last.update(_processes())
        time.sleep(args.interval)
    wall = time.monotonic() - started
    last.update(_processes())

    totals = {name: 0.0 for name, _ in groups}
    for pid, (cmdline, cpu) in last.items():
        for name, pattern in groups:
            if pattern.search(cmdline):
                old = before.get(pid)
                totals[name] += cpu - (old[1] if old is not None and old[0] == cmdline else 0.0)
                break
    if args.json:
        print(json.dumps({"wall_s": round(wall, 2), "cpu_s": {k: round(v, 2) for k, v in totals.items()}}))
    else:
        for name, cpu in totals.items():
            print(f"{name:>12}: {cpu:7.2f} s CPU  ({cpu / wall:.2f} cores over the run)", file=sys.stderr)
        print(f"{'wall':>12}: {wall:7.2f} s", file=sys.stderr)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())

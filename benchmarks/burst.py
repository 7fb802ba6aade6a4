"""A burst of a task the agent has no prior for: the makespan with ``placement`` auto, cloud and local, in one run.

    .venv/bin/python benchmarks/burst.py [--count 120] [--service-s 0.25] [--json]

For each placement, on a fresh Mosquitto, devcloud (its default pool: one worker per CPU) and agent (one
worker, default priors): a user task registered as an entry-point plugin (``burst.sleep``: it sleeps
``--service-s`` a call, on the gateway and in the devcloud alike), ``--count`` messages of 20 kB published at
once, and the time from the first publish to the last result. The ideal split is what both sides' measured
throughputs added would give: ``T_local × T_cloud / (T_local + T_cloud)``. See tests/burst_scenario.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from burst_scenario import ideal_split_s, run_burst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=120)
    parser.add_argument("--service-s", type=float, default=0.25)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory(prefix="edge-agent-burst-") as tmp:
        for placement in ("auto", "cloud", "local"):
            runs[placement] = run_burst(Path(tmp) / placement, placement, count=args.count,
                                        service_s=args.service_s)
    ideal = ideal_split_s(runs["local"]["makespan_s"], runs["cloud"]["makespan_s"])
    if args.json:
        print(json.dumps({"runs": runs, "ideal_split_s": ideal}, indent=2))
        return 0
    print(f"{args.count} tasks of {args.service_s} s, 1 gateway worker, the devcloud's default pool")
    print(f"{'placement':<10}{'makespan s':>12}{'local':>7}{'cloud':>7}{'rebound':>9}{'hedged':>8}")
    for name, run in runs.items():
        print(f"{name:<10}{run['makespan_s']:>12.2f}{run['local']:>7}{run['cloud']:>7}{run['rebound']:>9}"
              f"{run['hedged']:>8}")
    print(f"{'ideal':<10}{ideal:>12.2f}   (both sides' throughputs added)")
    print(f"auto / ideal = {runs['auto']['makespan_s'] / ideal:.2f}; auto / best of cloud and local = "
          f"{runs['auto']['makespan_s'] / min(runs['cloud']['makespan_s'], runs['local']['makespan_s']):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

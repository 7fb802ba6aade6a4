"""``edge-agent replay --plot FILE.png``: the uplink over time and where each policy sent each task.

matplotlib is an optional extra (``pip install 'edge-agent[plot]'``); it is imported only here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.replay import Replay


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def plot_replay(replay: Replay, path: Path, bin_s: float = 1.0) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: never needs a display
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailable("--plot needs matplotlib: pip install 'edge-agent[plot]'") from exc

    arrivals = np.asarray(replay.arrivals.arrival_s)
    end = float(arrivals.max()) if arrivals.size else 1.0
    edges = np.arange(0.0, end + bin_s, bin_s)
    up = [replay.uplink.mbps(t, t + bin_s) for t in edges[:-1]]
    names = list(replay.outcomes)

    fig, (ax_bw, ax_dec) = plt.subplots(2, 1, sharex=True, figsize=(11, 6), height_ratios=(1, 1.4))
    ax_bw.step(edges[:-1], up, where="post", linewidth=0.8)
    ax_bw.set_ylabel("uplink Mbit/s")
    ax_bw.set_title(f"{replay.uplink.name}: uplink capacity and offloading decisions")
    for row, name in enumerate(names):
        cloud = np.asarray(replay.outcomes[name].cloud)
        stats = replay.stats[name]
        ax_dec.scatter(arrivals[cloud], np.full(int(cloud.sum()), row), s=4, marker="|", color="tab:orange")
        ax_dec.text(end * 1.005, row, f"mean {stats.mean_s:.2f} s", va="center", fontsize=8)
    ax_dec.set_yticks(range(len(names)), names)
    ax_dec.set_ylim(-0.5, len(names) - 0.5)
    ax_dec.set_xlabel("time (s); a mark is a task sent to the cloud")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

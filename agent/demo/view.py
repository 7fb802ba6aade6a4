"""The demo's output: a live rich view on a terminal, a plain progress line otherwise, and the final summary."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from agent.demo.watch import Metrics, ResultSnapshot

PLACEMENT_STYLE = {"local": "cyan", "cloud": "magenta"}
TOPIC_PREFIX = "city/aarhus/"  # every device's; the view shows the rest


@dataclass(frozen=True, slots=True)
class Frame:
    """Everything one refresh shows."""

    elapsed_s: float
    duration_s: float | None
    header: str
    metrics: Metrics | None
    results: ResultSnapshot
    in_rate: float
    out_rate: float
    trace_mbps: float
    trace_name: str
    sent: dict[str, int]
    sent_bytes: int
    recent_rows: int = 8  # rows of latest results that fit the terminal


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 0.01:
        return f"{value * 1000:.1f} ms"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _mbytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _clock(f: Frame) -> str:
    return f"{f.elapsed_s:.0f} s" + (f" of {f.duration_s:.0f} s" if f.duration_s else " (Ctrl-C to stop)")


def _traffic(f: Frame) -> Table:
    m = f.metrics
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column(justify="right")
    t.add_row("messages in", f"{f.in_rate:,.1f}/s")
    t.add_row("results out", f"{f.out_rate:,.1f}/s")
    t.add_row("received", f"{m.received:,.0f}" if m else "-")
    t.add_row("results", f"{f.results.results:,}")
    t.add_row("queued / running", f"{m.queue_depth:.0f} / {m.running:.0f}" if m else "-")
    for kind, n in f.sent.items():
        t.add_row(f"sent {kind}", f"{n:,}")
    t.add_row("sent in all", _mbytes(f.sent_bytes))
    return t


def _uplink(f: Frame) -> Table:
    m = f.metrics
    e = m.estimates if m else {}
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column(justify="right")
    t.add_row("trace capacity now", f"[green]{f.trace_mbps:.2f} Mbit/s[/]")
    t.add_row("agent's estimate", f"{e['uplink_mbps']:.2f} Mbit/s" if "uplink_mbps" in e else "-")
    t.add_row("  long-term", f"{e['uplink_baseline_mbps']:.2f} Mbit/s" if "uplink_baseline_mbps" in e else "-")
    t.add_row("round trip", _seconds(e.get("rtt_s")))
    t.add_row("provisioning", _seconds(e.get("provisioning_s")))
    t.add_row("lease", "warm" if e.get("lease_warm") else "none ready")
    circuit = m.circuit if m else "-"
    t.add_row("circuit breaker", f"[red]{circuit}[/]" if circuit == "open" else circuit)
    requests = m.cloud_requests if m else {}
    t.add_row("cloud requests", ", ".join(f"{k} {v:.0f}" for k, v in sorted(requests.items())) or "none yet")
    return t


def _decisions(f: Frame) -> Table:
    t = Table(title="decisions", title_style="bold", expand=True, show_edge=False, pad_edge=False)
    t.add_column("target")
    t.add_column("reason")
    t.add_column("count", justify="right")
    decisions = f.metrics.decisions if f.metrics else {}
    for (target, reason), n in sorted(decisions.items(), key=lambda kv: -kv[1]):
        t.add_row(Text(target, style=PLACEMENT_STYLE.get(target, "")), reason, f"{n:,.0f}")
    if f.results.probes:
        t.add_row("", "of which probes", f"{f.results.probes:,}")
    return t


def _by_kind(f: Frame) -> Table:
    t = Table(title="results by kind and placement", title_style="bold", expand=True, show_edge=False,
              pad_edge=False)
    t.add_column("kind")
    t.add_column("where")
    t.add_column("n", justify="right")
    t.add_column("mean total", justify="right")
    t.add_column("service", justify="right")
    service = f.metrics.service_s if f.metrics else {}
    for (kind, placement), n in sorted(f.results.count.items()):
        total, count = service.get((placement, kind), (0.0, 0.0))
        t.add_row(kind, Text(placement, style=PLACEMENT_STYLE.get(placement, "")), f"{n:,}",
                  _seconds(f.results.mean_total_s(kind, placement)), _seconds(total / count if count else None))
    return t


def _recent(f: Frame) -> Table:
    t = Table(title="latest results", title_style="bold", expand=True, show_edge=False, pad_edge=False)
    # Fixed columns keep their width; the topic and the result shrink (with an ellipsis) on a narrow terminal.
    for name in ("topic", "kind", "where", "why", "expected", "took", "result"):
        flexible = name in ("topic", "result")
        t.add_column(name, justify="right" if name in ("expected", "took") else "left", no_wrap=True,
                     overflow="ellipsis", ratio=(2 if name == "topic" else 3) if flexible else None,
                     min_width=8 if flexible else None)
    # The latest of every kind, shared fairly, newest first: 40 sensor rows a second must not hide the spectra.
    kinds = sorted({r.kind for r in f.results.recent})
    per_kind = -(-f.recent_rows // max(1, len(kinds)))
    shown = [r for k in kinds for r in [x for x in f.results.recent if x.kind == k][-per_kind:]]
    for r in sorted(shown, key=lambda r: r.at, reverse=True)[:f.recent_rows]:
        why = r.reason + (" (probe)" if r.probe else "")
        t.add_row(r.topic.removeprefix(TOPIC_PREFIX), r.kind,
                  Text(r.placement, style=PLACEMENT_STYLE.get(r.placement, "")), why,
                  f"{_seconds(r.t_local_s)} / {_seconds(r.t_cloud_s)}", _seconds(r.total_s), r.summary)
    return t


ARCHIVE_PLACES = (("gateway", "cyan"), ("uploading", "yellow"), ("cloud", "magenta"))


def _archive(f: Frame) -> Table:
    """Where the sealed segments are and what the cost model expected each place to cost them."""
    t = Table(expand=True, show_edge=False, pad_edge=False)
    t.add_column("place")
    t.add_column("segments", justify="right")
    t.add_column("size", justify="right")
    t.add_column("expected cost (C_storage + C_retrieval)", justify="right")
    m = f.metrics
    for place, style in ARCHIVE_PLACES:
        segments = m.archive_segments.get(place, 0.0) if m else 0.0
        if place == "uploading" and not segments:
            continue
        cost = m.archive_cost.get(place) if m else None
        t.add_row(Text(place, style=style), f"{segments:,.0f}",
                  _mbytes(int(m.archive_bytes.get(place, 0.0))) if m else "-",
                  "-" if cost is None else f"{cost:.6f}")
    return t


def _archive_caption(f: Frame) -> str:
    m = f.metrics
    if m is None:
        return ""
    cloud = "cloud ok" if m.archive_cloud_available else "cloud unavailable"
    return (f"disk {_mbytes(int(m.archive_disk_used))} of {_mbytes(int(m.archive_disk_budget))} · uploads "
            f"{m.archive_uploads:,.0f} (over budget {m.archive_forced:,.0f}) · {cloud}")


def _errors(f: Frame) -> RenderableType:
    dead = f.results.dead
    if not dead and not f.results.unreadable:
        return Text("no dead letters", style="green")
    lines = [Text("dead letters: " + ", ".join(f"{k} {v}" for k, v in sorted(dead.items())), style="red")]
    lines += [Text(f"  {d.topic}: {d.reason}: {d.detail}", style="red") for d in f.results.recent_dead]
    if f.results.unreadable:
        lines.append(Text(f"{f.results.unreadable} result message(s) the view could not read", style="yellow"))
    return Group(*lines)


def live(f: Frame) -> RenderableType:
    top = Table.grid(expand=True, padding=(0, 1))
    top.add_column(ratio=1)
    top.add_column(ratio=1)
    top.add_row(Panel(_traffic(f), title="traffic"),
                Panel(_uplink(f), title=f"uplink ({f.trace_name})"))
    middle = Table.grid(expand=True, padding=(0, 1))
    middle.add_column(ratio=2)
    middle.add_column(ratio=3)
    middle.add_row(Panel(_decisions(f)), Panel(_by_kind(f)))
    return Group(
        Text(f"{f.header} · {_clock(f)}", style="bold"),
        top,
        middle,
        Panel(_recent(f), subtitle="topic: city/aarhus/…  expected: the model's total, local / cloud  "
              "took: arrival to result; newest first", subtitle_align="left"),
        Panel(_archive(f), title="archive: sealed segments by place", subtitle=_archive_caption(f),
              subtitle_align="left"),
        Panel(_errors(f), title="errors"),
    )


def progress_line(f: Frame) -> str:
    m = f.metrics
    placements: dict[str, int] = {}
    for (_, placement), n in f.results.count.items():
        placements[placement] = placements.get(placement, 0) + n
    where = ", ".join(f"{p} {n}" for p, n in sorted(placements.items())) or "none yet"
    estimate = m.estimates.get("uplink_mbps") if m else None
    est = f"{estimate:.2f}" if estimate is not None else "-"
    dead = sum(f.results.dead.values())
    queue = f"{m.queue_depth:.0f}" if m else "-"
    archive = (", ".join(f"{place} {m.archive_segments.get(place, 0.0):.0f}" for place, _ in ARCHIVE_PLACES)
               if m else "-")
    return (f"[{f.elapsed_s:5.0f} s] in {f.in_rate:6.1f} msg/s, out {f.out_rate:6.1f} results/s | results: {where} "
            f"| uplink {f.trace_mbps:.2f} Mbit/s (agent estimates {est}) | queue {queue} | dead letters {dead} "
            f"| archive segments: {archive}")


_OUTCOME_NOTES = {"cancelled": " (the gateway copy finished first)"}


def summary(elapsed_s: float, metrics: Metrics | None, results: ResultSnapshot, sent: dict[str, int],
            sent_bytes: int) -> str:
    def join(parts: list[str]) -> str:
        return ", ".join(parts) or "none"

    kinds = sorted(set(sent) | set(results.kinds()))
    by_kind = []
    means = []
    for kind in kinds:
        per = {p: n for (k, p), n in results.count.items() if k == kind}
        by_kind.append(f"{kind} {sum(per.values())} ({join([f'{p} {n}' for p, n in sorted(per.items())])})")
        mean = [f"{p} {_seconds(results.mean_total_s(kind, p))}" for p in sorted(per)]
        if mean:
            means.append(f"{kind}: {', '.join(mean)}")
    decisions = metrics.decisions if metrics else {}
    requests = metrics.cloud_requests if metrics else {}
    lines = [
        f"edge-agent demo: summary after {elapsed_s:.1f} s",
        f"  messages sent      {join([f'{k} {v}' for k, v in sorted(sent.items())])} ({_mbytes(sent_bytes)})",
        f"  messages received  {metrics.received:.0f}" if metrics else "  messages received  unknown",
        f"  results            {results.results}: {'; '.join(by_kind)}",
        f"  mean total time    {'; '.join(means) or 'no results'}",
        "  decisions          " + join([f"{t}/{r} {n:.0f}" for (t, r), n in sorted(decisions.items())]),
        "  cloud requests     " + join([f"{k} {v:.0f}{_OUTCOME_NOTES.get(k, '')}" for k, v in sorted(requests.items())])
        + (f" ({results.probes} probes)" if results.probes else ""),
        "  dead letters       " + join([f"{k} {v}" for k, v in sorted(results.dead.items())]),
        "  archive            " + (join([f"{place} {metrics.archive_segments.get(place, 0.0):.0f} segments "
                                         f"({_mbytes(int(metrics.archive_bytes.get(place, 0.0)))}, expected cost "
                                         f"{metrics.archive_cost.get(place, 0.0):.6f})"
                                         for place in ("gateway", "cloud")]) if metrics else "unknown"),
    ]
    return "\n".join(lines)

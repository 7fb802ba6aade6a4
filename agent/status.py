"""``edge-agent status`` and ``edge-agent explain --live``: ask the running agent over its local HTTP endpoint.

The agent serves /status and /explain on its metrics port (``EDGE_AGENT_METRICS__HOST``:``__PORT``) to clients
on the same machine; the settings file says where that is. Nothing here imports the daemon.
"""

from __future__ import annotations

import ipaddress
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from agent.config import Settings

EX_NOT_RUNNING = 3  # as `systemctl status` and LSB init scripts: the program is not running
EX_UNKNOWN = 4  # … its status cannot be known: the agent serves no endpoint to ask
TIMEOUT_S = 5.0


class AgentUnreachable(Exception):
    """The running agent could not be asked; ``exit_status`` is what the command exits with."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status


def agent_url(settings: Settings) -> str:
    """Where this machine reaches the agent's metrics server: a wildcard bind is reached on loopback."""
    if settings.metrics.port == 0:
        raise AgentUnreachable(
            "the agent serves no status: metrics are off (EDGE_AGENT_METRICS__PORT=0); set a port, "
            "e.g. EDGE_AGENT_METRICS__PORT=9108, and restart it", EX_UNKNOWN)
    address = ipaddress.ip_address(settings.metrics.host)
    if address.is_unspecified:
        address = ipaddress.ip_address("::1" if address.version == 6 else "127.0.0.1")
    host = f"[{address}]" if address.version == 6 else str(address)
    return f"http://{host}:{settings.metrics.port}"


def fetch(settings: Settings, path: str, params: dict[str, str] | None = None) -> Any:
    """GET ``path`` from the running agent as JSON, or raise :class:`AgentUnreachable` saying why not."""
    base = agent_url(settings)
    url = base + path + (f"?{urllib.parse.urlencode(params)}" if params else "")
    # The agent is on this machine: never through an http_proxy from the environment.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=TIMEOUT_S) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("error", exc.reason)
        except (ValueError, AttributeError):
            detail = exc.reason
        if exc.code == 404:
            detail = f"the agent at {base} does not serve {path} (an older version?)"
        raise AgentUnreachable(f"{detail} (HTTP {exc.code} from {base})", 1) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        why = getattr(reason, "strerror", None) or str(reason)
        raise AgentUnreachable(
            f"the agent is not running, or not at {base} ({why}); the address comes from "
            "EDGE_AGENT_METRICS__HOST and EDGE_AGENT_METRICS__PORT in the settings file (--env-file)",
            EX_NOT_RUNNING) from None
    except ValueError:
        raise AgentUnreachable(f"{base}{path} did not answer JSON: is that port the agent's?", 1) from None


# ---------------------------------------------------------------------------------------------- status


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} days"


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _rate(value: float | None) -> str:
    return "–" if value is None else f"{value:,.1f}"


def render_status(status: dict[str, Any]) -> str:
    """One screen: what an operator checks first, each line led by what it is about."""
    label = "{:<11}".format
    broker, store, backlog, estimates = status["broker"], status["store"], status["backlog"], status["estimates"]
    state = "ready" if status["ready"] else f"NOT READY: {status['ready_detail']}"
    if not status["healthy"]:
        state += f"; UNHEALTHY: {status['health_detail']}"
    lines = [f"edge-agent {status['agent_id']} (version {status['version']}, pid {status['pid']}), "
             f"up {_duration(status['uptime_s'])}: {state}"]

    scheme = "mqtts" if broker["tls"] else "mqtt"
    link = "connected" if broker["connected"] else "NOT CONNECTED"
    if not broker["connected"] and broker["last_error"]:
        link += f" ({broker['last_error']})"
    group = f", shared group {broker['shared_group']}" if broker["shared_group"] else ""
    where = broker.get("node") or f"{broker['host']}:{broker['port']}"
    nodes = broker.get("nodes") or []
    failover = ""
    if len(nodes) > 1:
        failover = (f"; node {nodes.index(where) + 1} of {len(nodes)} ({', '.join(nodes)}), "
                    f"{broker.get('failovers', 0)} failover(s)") if where in nodes else ""
    lines.append(f"{label('broker')}{scheme}://{where} (MQTT {broker['protocol']}), "
                 f"{link}; client id {broker['client_id']}{group}{failover}")

    routes = status["routes"]
    if not routes:
        lines.append(f"{label('routes')}none")
    width = max((len(f"{r['topic']} → {r['task']}") for r in routes), default=0)
    for i, route in enumerate(routes):
        name = f"{route['topic']} → {route['task']}"
        lines.append(f"{label('routes' if i == 0 else '')}{name:<{width}}  {route['placement']}, QoS {route['qos']}, "
                     f"{route['subscription']}, {route['messages']:,} message(s)")

    rates, totals = status["per_minute"], status["totals"]
    window = f"over the last {rates['window_s']:.0f} s" if rates["window_s"] else "too early to tell"
    lines.append(f"{label('per minute')}{_rate(rates['received'])} received, {_rate(rates['done'])} done, "
                 f"{_rate(rates['dead_lettered'])} dead-lettered ({window}); since start {totals['received']:,} "
                 f"received, {totals['done']:,} done, {totals['dead_lettered']:,} dead-lettered")
    lines.append(f"{label('backlog')}{backlog['queued']:,} queued, {backlog['running']:,} running; results: "
                 f"{backlog['results_unacknowledged']:,} awaiting the broker's PUBACK, "
                 f"{backlog['results_waiting']:,} waiting to be published")

    rows = f"{store['tasks']:,} row(s)"
    if store.get("pending") is not None:
        rows += f" ({store['pending']:,} pending, {store['outbox']:,} in the outbox)"
    intake = "INTAKE PAUSED (store full)" if store["intake_paused"] else "taking messages"
    lines.append(f"{label('store')}{rows}, {_size(store['bytes'])}; bounds {store['max_tasks']:,} rows, "
                 f"{_size(store['max_bytes'])}; {intake}")

    cloud = status["cloud"]
    if cloud is None:
        lines.append(f"{label('cloud')}none configured (EDGE_AGENT_CLOUD__URL unset): every task runs here")
    else:
        circuit = cloud["circuit"].replace("_", "-")
        if cloud["circuit_retry_in_s"] is not None:
            circuit = f"OPEN, trial in {cloud['circuit_retry_in_s']:.0f} s"
        leases = [f"{lease['stage']} {lease['vcpus']} vCPU ({lease['in_use']} in use"
                  + (f", expires in {_duration(lease['expires_in_s'])}" if lease["expires_in_s"] is not None else "")
                  + ")" for lease in cloud["leases"]]
        lines.append(f"{label('cloud')}{cloud['url']}: circuit {circuit}; "
                     + (f"lease {'; '.join(leases)}" if leases else "no lease"))
    uplink = (f"{label('uplink')}{estimates['uplink_mbps']:.2f} Mbit/s estimated (long-term "
              f"{estimates['uplink_baseline_mbps']:.2f}), round trip {estimates['rtt_s'] * 1000:.0f} ms, provisioning "
              f"{estimates['provisioning_s']:.1f} s")
    if cloud is None:
        uplink += " (the priors: without a cloud nothing is measured)"
    else:
        uplink += f"; {estimates['uplink_queued_bytes']:,} bytes waiting to be uploaded"
    lines.append(uplink)

    lines += _archive_lines(status.get("archive"), label)

    problems = status["problems"]
    if not problems:
        lines.append(f"{label('problems')}no warning or error since the start")
    else:
        lines.append(f"{label('problems')}warnings and errors, latest first (journalctl has them all):")
        for problem in problems[:10]:
            count = f" ×{problem['count']}" if problem["count"] > 1 else ""
            when = problem["time"][11:19] if len(problem["time"]) >= 19 else problem["time"]
            lines.append(f"  {when}Z {problem['level']:<7} {problem['event']}{count}  {problem['detail']}"[:200])
    return "\n".join(lines)


def _archive_lines(archive: dict[str, Any] | None, label: Callable[[str], str]) -> list[str]:
    """The archive's lines: none when no route keeps its inputs."""
    if archive is None:
        return []
    if archive.get("as_of") is None:
        return [f"{label('archive')}starting: its manager has not made a first pass yet"]
    disk, cloud, routes = archive["disk"], archive["cloud"], archive["routes"]
    share = 100.0 * disk["used_bytes"] / disk["budget_bytes"] if disk["budget_bytes"] else 0.0
    head = (f"{label('archive')}disk {_size(disk['used_bytes'])} of its {_size(disk['budget_bytes'])} budget "
            f"({share:.0f}%)")
    if cloud is None:
        head += "; no cloud (EDGE_AGENT_CLOUD__URL unset): every segment stays here"
    else:
        in_cloud = sum(route["bytes"]["cloud"] for route in routes)
        quota = f" of its {cloud['quota_bytes'] / 1e9:g} GB quota" if cloud["quota_bytes"] else ""
        head += (f"; cloud {_size(in_cloud)}{quota}, {'available' if cloud['available'] else 'UNAVAILABLE'}, "
                 f"{cloud['uploads']:,} upload(s), {cloud['upload_failures']:,} failed")
    if archive["uploads_pending"]:
        head += f"; {archive['uploads_pending']:,} upload(s) pending ({_size(archive['uploads_pending_bytes'])})"
    lines = [head]
    width = max((len(route["route"]) for route in routes), default=0)
    for route in routes:
        segments, held = route["segments"], route["bytes"]
        kept = f"kept {route['days']:g} days" if route["archived"] else "no longer archived, kept without retention"
        rate = ""
        if route["retrievals_per_month"] is not None:
            rate = (f"; read back ~{route['retrievals_per_month']:.2f} times a month (prior "
                    f"{route['prior_per_month']:g})")
        here = segments["gateway"] + segments["uploading"]  # an upload under way is still on the disk
        lines.append(f"{label('')}{route['route']:<{width}}  {kept}: gateway {here:,} segment(s), "
                     f"{_size(held['gateway'] + held['uploading'])}; cloud {segments['cloud']:,}, "
                     f"{_size(held['cloud'])}{rate}")
    if cloud is not None and not cloud["available"]:
        since = f" for {_duration(archive['as_of'] - cloud['down_since'])}" if cloud["down_since"] else ""
        lines.append(f"{label('')}CLOUD UNAVAILABLE{since}: {cloud['error'] or 'a cloud call failed'}"[:200])
        until = ", until retention frees room in the cloud" if cloud["reason"] == "quota_exceeded" else ""
        lines.append(f"{label('')}  segments stay on the gateway, within its disk budget{until}; tried again "
                     f"every {cloud['retry_every_s']:g} s")
    if disk["full"]:
        lines.append(f"{label('')}DISK BUDGET FULL: new inputs are not archived until segments leave or expire "
                     f"({disk['inputs_refused']:,} so far); tasks still run")
    return lines

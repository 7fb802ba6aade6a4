"""What the running agent says about itself: alive (the systemd watchdog and /healthz), ready (READY=1 and
/readyz), the systemd STATUS= line and the minutely stats line. The daemon asks; nothing here keeps state.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from agent.telemetry import get_logger

if TYPE_CHECKING:
    from agent.dispatch import Dispatcher
    from agent.egress import Publisher
    from agent.ingress import Ingress
    from agent.mqtt import Link
    from agent.store import Store

__all__ = ["STUCK_AFTER_S", "health", "log_stats", "readiness", "status_line"]

log = get_logger("agent.daemon")  # the lines the daemon has always logged, under its name

STUCK_AFTER_S = 10.0


def health(loop_age_s: float, network_alive: bool, store_healthy: bool) -> tuple[bool, str]:
    """Alive means every loop turns: the event loop, the MQTT supervisor on it and the store writer.

    It gates the systemd watchdog ping and /healthz: a stuck loop stops the pings, so systemd restarts us.
    """
    problems = []
    if loop_age_s > STUCK_AFTER_S:
        problems.append("event loop stuck")
    if not network_alive:
        problems.append("MQTT link stuck")
    if not store_healthy:
        problems.append("store writer stuck")
    return (not problems, "; ".join(problems) or "ok")


def readiness(*, stopping: bool, leaving: bool, link: Link, ingress: Ingress) -> tuple[bool, str]:
    """Ready to take messages: connected, the routes' subscriptions confirmed, intake open, not going away."""
    if stopping:
        return False, "stopping"
    if leaving:
        return False, "leaving the group"
    if not link.connected.is_set():
        return False, "not connected to the broker"
    if not link.subscribed.is_set():
        return False, "waiting for the broker to confirm the subscriptions"
    if ingress.paused:
        return False, "store full: intake paused"
    return True, "ok"


def status_line(*, leaving: bool, link: Link, ingress: Ingress, dispatcher: Dispatcher, store: Store) -> str:
    """The systemd STATUS= line (``systemctl status``)."""
    c = ingress.counters
    state = link.describe()  # connected or reconnecting; with several brokers the node and failovers
    if leaving:
        state = "leaving the group, " + state
    return (f"{state}; {c.received} received, {dispatcher.completed} done, "
            f"{c.dead_lettered + dispatcher.dead_lettered} dead-lettered, "
            f"{dispatcher.backlog} queued, {store.outstanding_rows} in store"
            + ("; intake paused (store full)" if ingress.paused else ""))


def log_stats(*, link: Link, ingress: Ingress, dispatcher: Dispatcher, store: Store, publisher: Publisher) -> None:
    """The minutely ``agent_stats`` line."""
    c = ingress.counters
    log.info("agent_stats", connected=link.connected.is_set(), received=c.received,
             accepted=c.accepted, dead_lettered=c.dead_lettered + dispatcher.dead_lettered,
             completed=dispatcher.completed, duplicates=c.duplicates, held_back=c.held_back,
             store_rows=store.outstanding_rows, queued=dispatcher.backlog,
             running=dispatcher.running, results_unconfirmed=publisher.inflight,
             intake_paused=ingress.paused, threads=threading.active_count())

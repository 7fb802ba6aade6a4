"""SIGHUP: reread the settings and apply new routes and decision settings to the running agent without a
restart; other changes are named and wait for the next start. The outcome goes to the state directory for
`edge-agent reload` (:mod:`agent.reload`).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.config import Reread, Route, Settings, split_reload
from agent.errors import ConfigError
from agent.reload import Outcome, outcome_dir, write_outcome
from agent.telemetry import get_logger

if TYPE_CHECKING:
    from agent.archive.service import ArchiveService
    from agent.decision import Policy
    from agent.ingress import Ingress
    from agent.mqtt import Link
    from agent.store import Store
    from agent.systemd import Notifier
    from agent.tasks import TaskRegistry

__all__ = ["RELOAD_SUBACK_WAIT_S", "SUBSCRIPTIONS_KEY", "Sighup"]

log = get_logger("agent.daemon")  # the lines the daemon has always logged, under its name

# The store's meta key of the filters last subscribed, so that those dropped from the routes are unsubscribed.
SUBSCRIPTIONS_KEY = "subscriptions"
# A reload reports once the broker has confirmed its routes, so that what is published after `systemctl reload`
# returns is routed by them; a broker slower than this is reported as not having confirmed them yet.
RELOAD_SUBACK_WAIT_S = 10.0


class Sighup:
    """One reload at a time, each reading its sources after its SIGHUP. ``settings``/``adopt`` read and replace
    the daemon's settings; ``reread`` is None when the agent was started without a settings file."""

    def __init__(self, *, settings: Callable[[], Settings], adopt: Callable[[Settings], None],
                 reread: Callable[[], Reread] | None, registry: TaskRegistry, policy: Policy, ingress: Ingress,
                 archive: ArchiveService | None, link: Link, store: Store, notifier: Notifier,
                 leaving: Callable[[], bool], status_line: Callable[[], str]) -> None:
        self._settings, self._adopt, self._reread = settings, adopt, reread
        self._registry, self._policy, self._ingress, self._archive = registry, policy, ingress, archive
        self._link, self._store, self._notifier = link, store, notifier
        self._leaving, self._status_line = leaving, status_line
        self._lock = asyncio.Lock()

    async def reload(self) -> None:
        async with self._lock:
            started = time.monotonic_ns()
            if self._leaving():
                log.warning("reload_ignored", reason="leaving the group: routes are no longer subscribed")
                self._report(Outcome(os.getpid(), started, "ignored",
                                     detail="the agent is leaving its group (SIGUSR1)"))
                return
            self._notifier.reloading()
            try:
                if self._reread is None:
                    raise ConfigError("SIGHUP", "this agent was started without a settings file to reload")
                reread = self._reread()
                self._registry.check_routes(reread.settings.routes)
            except ConfigError as exc:
                for variable, problem in exc.problems:  # every one, as a start would print them
                    log.error("reload_failed", variable=variable, problem=problem, kept="the running settings")
                outcome = Outcome(os.getpid(), started, "failed", problems=list(exc.problems),
                                  routes=[r.topic for r in self._settings().routes])
            else:
                waiting = self._apply(reread)
                outcome = Outcome(os.getpid(), started, "applied", needs_restart=waiting,
                                  environment_wins=reread.environment_wins,
                                  routes=[r.topic for r in self._settings().routes],
                                  subscribed=await self._routes_confirmed())
            self._report(outcome)
            self._notifier.ready(self._status_line())

    def _apply(self, reread: Reread) -> list[str]:
        old, new = self._settings(), reread.settings
        if new.routes != old.routes:
            self._apply_routes(new.routes, old.routes)
        if new.decision != old.decision:
            self._policy.reconfigure(new.decision)
        settings, waiting = split_reload(old, new)
        self._adopt(settings)
        if waiting:
            log.warning("reload_needs_restart", settings=waiting, detail="these take effect at the next start")
        if reread.environment_wins:
            log.warning("reload_environment_wins", settings=reread.environment_wins,
                        detail="changed in the env file, but the agent's environment sets them and wins")
        log.info("reload_applied", routes=[r.topic for r in new.routes],
                 decision_changed=new.decision != old.decision)
        return waiting

    async def _routes_confirmed(self) -> bool:
        link = self._link
        deadline = time.monotonic() + RELOAD_SUBACK_WAIT_S
        while link.connected.is_set() and link.subscribe_pending and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return link.connected.is_set() and not link.subscribe_pending

    def _report(self, outcome: Outcome) -> None:
        directory = outcome_dir(self._settings().state_dir)
        try:
            write_outcome(directory, outcome)
        except OSError as exc:  # `edge-agent reload` then times out and says where it looked
            log.warning("reload_outcome_not_written", path=str(directory), error=str(exc))

    def _apply_routes(self, routes: list[Route], previous: list[Route]) -> None:
        self._ingress.set_routes(routes)
        if self._archive is not None:
            self._archive.set_routes(routes)
        elif any(r.archive is not None for r in routes):
            log.warning("archive_needs_restart", detail="no route kept its inputs at the start: the archive "
                        "starts with the next start")
        kept = {r.topic for r in routes}
        self._link.set_subscriptions([(r.topic, r.qos) for r in routes],
                                     [r.topic for r in previous if r.topic not in kept])
        store = self._store
        store.call(lambda: store.set_meta(SUBSCRIPTIONS_KEY, json.dumps(sorted(kept))))

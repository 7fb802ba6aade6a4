"""Committed task → decision → execution (gateway or cloud) → result or dead letter handed to the store.

Runs on the event loop. Each task is decided when it is admitted, so the policy sees every task queued on
each side (its waits) and not only the running ones. A task sent to the cloud that does not come back for any
reason (the cloud client raised) falls back to the gateway: the cloud can delay a task, never lose it.

Words, one per step of a task here:

- **admit**: decide where the task runs and queue it there (the policy counts it on that side from now on);
- **finish** on a side: the task no longer occupies the gateway or the cloud in the policy's view, whatever
  its outcome (``Policy.task_finished``);
- **succeed** or **fail**: its output is a result message or a dead letter;
- **hand on** an output: to the publisher directly (light tasks' results) or to the store's outbox, all of one
  loop turn's together;
- **fall back**: a task the cloud failed runs on the gateway;
- **hedge**, **win**, **stop**, **loser**: see :mod:`agent.dispatch._hedging`;
- **rebind** (late binding, gateway → cloud) and **move back** (cloud → gateway before the upload): see
  :mod:`agent.dispatch._binding`.

Modules: ``_dispatcher`` (intake, the pump, running, outcomes, drain), ``_queues`` (the queues and running
tasks the others share), ``_hedging``, ``_binding``, ``_counters`` (what /metrics reads), ``_admitted`` (the
queued task and its result's ``decision`` object).
"""

from agent.dispatch._dispatcher import Dispatcher

__all__ = ["Dispatcher"]

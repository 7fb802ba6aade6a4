"""Tasks a gateway runs: built-ins ``sensor.stats`` and ``noise.spectrum`` plus user plugins (docs/design.md#tasks)."""

from agent.tasks.registry import StatefulTask, TaskFn, TaskRegistry, TaskSpec, default_registry, run_task

__all__ = ["StatefulTask", "TaskFn", "TaskRegistry", "TaskSpec", "default_registry", "run_task"]

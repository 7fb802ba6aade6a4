"""Tasks a gateway runs: built-ins ``sensor.stats`` and ``noise.spectrum`` plus user plugins (DESIGN §5)."""

from agent.tasks.registry import TaskFn, TaskRegistry, TaskSpec, default_registry, run_task

__all__ = ["TaskFn", "TaskRegistry", "TaskSpec", "default_registry", "run_task"]

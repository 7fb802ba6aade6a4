"""The values that cross the store's boundary: rows going in, committed tasks and outbox entries coming out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from agent.deadletters import DeadLetter


class NewTask(NamedTuple):
    """A message accepted by ingress, not yet committed. ``out_*`` set means it is a dead letter already."""

    task_id: str
    topic: str
    kind: str | None
    placement: str | None
    options: dict[str, Any] | None
    payload: bytes | None
    size: int
    received_at: float
    mid: int | None
    crc: int | None
    out_topic: str | None = None
    out_payload: bytes | None = None
    # The route's options as JSON, without the topic (the row has it), built once per route: what the row
    # keeps of ``options``, so the writer does not serialise a dict for every message.
    route_options: str | None = None
    dead_letter: DeadLetter | None = None  # a dead letter's copy to keep


class TaskRef(NamedTuple):
    """A committed pending task as the dispatcher sees it; ``payload`` may be None when it was spilled."""

    id: int
    task_id: str
    topic: str
    kind: str
    placement: str
    options: dict[str, Any]
    payload: bytes | None
    size: int
    received_at: float


class OutboxEntry(NamedTuple):
    id: int
    topic: str
    payload: bytes
    seq: int


@dataclass
class Committed:
    """What one group commit made durable, handed to the post-commit hook."""

    acks: list[tuple[int, int]] = field(default_factory=list)  # (mid, qos)
    tasks: list[TaskRef] = field(default_factory=list)
    outbox: list[OutboxEntry] = field(default_factory=list)
    released: int = 0
    ingested: int = 0  # rows inserted from ingress
    number: int = 0  # the commit's sequence number (Store.commits after it)


CommitHook = Callable[[Committed], None]

# A finished task's output: (row id, input size, result or dead-letter topic, its payload).
Finished = tuple[int, int, str, bytes]


def stored_size(row: NewTask) -> int:
    """Bytes a new row holds in the store: its input, or its dead letter (the input is not kept)."""
    return len(row.out_payload) if row.out_payload is not None else row.size


class Op(NamedTuple):
    """One request queued for the writer thread: a write (ingest, complete, published, stop_hand_off) applied
    in a group's transaction, or one of the :data:`BARRIERS`."""

    kind: str
    args: tuple[Any, ...]


# Run between groups, in the writer's order: reads someone waits for, and calls.
BARRIERS = frozenset({"load_pending", "load_outbox", "load_replays", "call"})

"""The durable inbox and outbox: one SQLite table in WAL mode, written by one thread that commits in groups.

A row is one task through its life::

    state 0 PENDING    input committed; the inbound QoS 1 message is acknowledged only after this commit
    state 1 OUTBOX     output (a result or a dead letter) committed, input dropped; waiting for the broker's
                       PUBACK
    state 2 PUBLISHED  tombstone: keeps the inbound (mid, topic, crc) → task_id so a redelivered message that
                       was already committed keeps its task_id instead of becoming a second task

Words, one per step: ingress **admits** a row (counts it against the bound) and **submits** it (queues it for
the writer; **ingest** does both); a finished task's output is **completed** (committed as an outbox row,
``Store.complete``) and, once the broker acknowledges it, **published** (the row becomes a tombstone); the
bytes and rows that leave the bound's count are **released**; old tombstones are **pruned**. Each commit
**hands off** its new tasks and outbox rows to their readers, which **read back** the store instead while they
have spilled.

Dead letters also leave a copy of their payload in the ``dead_letters`` table (agent/deadletters.py), written
in the same group commit as their dead-letter message and bounded on its own: **kept**, **dropped** by the
bound, **forgotten** once replayed.

A light task's result usually skips state 1: published straight away, its row goes from 0 to 2 when the broker
acknowledges it (see ``egress.Publisher.offer``).

Every write goes through the writer thread (``_writer``), which drains whatever has queued up, applies it in one
transaction (``_transitions``) and only then runs the post-commit actions (acknowledgements, hand-offs).
Modules: ``_store`` (the :class:`Store` everyone calls), ``_schema`` (tables, states, migrations), ``_rows``
(the values in and out), ``_sql`` (the multi-row statements), ``_readback`` (both sides of reading back),
``_dead_letters``.
"""

from agent.store._readback import ReadBack
from agent.store._rows import Committed, Finished, NewTask, OutboxEntry, TaskRef
from agent.store._schema import SCHEMA_VERSION, ensure_writable
from agent.store._store import Store
from agent.store._writer import GATHER_ROWS

__all__ = [
    "GATHER_ROWS",
    "SCHEMA_VERSION",
    "Committed",
    "Finished",
    "NewTask",
    "OutboxEntry",
    "ReadBack",
    "Store",
    "TaskRef",
    "ensure_writable",
]

"""Which broker of ``EDGE_AGENT_MQTT__HOSTS`` to try next, and why each one last failed.

docs/fleets.md#broker-failover has the whole story.

Pure bookkeeping over the nodes' indices, driven by ``MqttLink``: no paho, no I/O. The nodes are tried in order
of preference and the link stays on the first that answers while connected. A lost connection starts, after the
usual backoff, a round over the other nodes in order and then the one just lost; a round in which no node
answered is followed by the next backoff and a round over every node in order. A deliberate reconnect
(redelivery) goes back to the node in use first: with independent brokers the session, and what it holds,
lives there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.config import BrokerNode


class Failover:
    """The nodes, the one tried last or in use, what is left to try in this round, the round after a lost
    connection, and the node of the last accepted connection."""

    def __init__(self, nodes: tuple[BrokerNode, ...]) -> None:
        self.nodes = nodes
        self.index = 0
        self._pending: list[int] = []
        self._next_round: list[int] | None = None
        self._connected_index: int | None = None
        self.failovers = 0  # connections accepted by another node than the one before (edge_agent_mqtt_failovers)
        self._refusals: dict[int, str] = {}  # per node, why it last failed: each reason is logged once per node
        self.last_refusal: str | None = None  # why the latest attempt failed; None once a connection is accepted

    @property
    def node(self) -> BrokerNode:
        """The broker in use, or being tried."""
        return self.nodes[self.index]

    @property
    def round_over(self) -> bool:
        """No node is left to try in this round: back off before the next."""
        return not self._pending

    def next_round(self) -> None:
        """After a backoff: the round a lost connection planned, else every node in order."""
        self._pending = self._next_round or list(range(len(self.nodes)))
        self._next_round = None

    def advance(self) -> BrokerNode:
        """The node to try now (a new round over every node when this one is over)."""
        if not self._pending:
            self._pending = list(range(len(self.nodes)))
        self.index = self._pending.pop(0)
        return self.node

    def dropped(self) -> None:
        """We closed the connection ourselves (redelivery): back to the node in use, whose session holds what we
        left unacknowledged."""
        self._pending = [self.index, *self._others()]
        self._next_round = None

    def lost(self) -> None:
        """The connection was lost: after the backoff, the others in order of preference, then this one."""
        self._pending = []
        self._next_round = [*self._others(), self.index]

    def accepted(self) -> BrokerNode | None:
        """The node being tried accepted the connection; the node of the connection before, when that was
        another one (a failover)."""
        previous, self._connected_index = self._connected_index, self.index
        self._pending = []
        self._next_round = None
        self.last_refusal = None
        self._refusals.clear()
        if previous is None or previous == self.index:
            return None
        self.failovers += 1
        return self.nodes[previous]

    def refused(self, reason: str) -> bool:
        """Note why the node being tried failed; True the first time it fails for this reason since the last
        accepted connection (the reason is then logged: once per node and reason, not at every attempt)."""
        self.last_refusal = reason
        if self._refusals.get(self.index) == reason:
            return False
        self._refusals[self.index] = reason
        return True

    def describe(self, connected: bool) -> str:
        """With several nodes, the one in use (or being tried) and the failovers so far; empty with one."""
        if len(self.nodes) < 2:
            return ""
        return (f" {'to' if connected else 'trying'} {self.node} (node {self.index + 1} of {len(self.nodes)}, "
                f"{self.failovers} failover{'' if self.failovers == 1 else 's'})")

    def _others(self) -> list[int]:
        return [i for i in range(len(self.nodes)) if i != self.index]

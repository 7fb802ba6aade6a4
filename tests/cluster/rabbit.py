"""A real 3-node RabbitMQ cluster on loopback, with its MQTT plugin and MQTT sessions on quorum queues.

Debian's ``rabbitmq-server`` (3.10: MQTT 3.1.1 only, no ``$share``) started from a scratch folder: one epmd of
our own on a free port bound to 127.0.0.1, each node with its own ports, data and log folders, all started as
the current user (the packaged ``/usr/sbin`` wrappers switch to the ``rabbitmq`` user; ``/usr/lib/rabbitmq/bin``
does not). docs/fleets.md#a-rabbitmq-cluster-step-by-step is the same setup for an operator.

Each node runs in a process group of its own, so ``kill()`` takes the Erlang VM and its helpers at once, as a
power cut would; ``stop()`` is the graceful stop (SIGTERM: the wrapper runs ``rabbitmqctl stop``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from support import free_port, wait_for

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
EPMD = shutil.which("epmd") or "/usr/bin/epmd"


def installed() -> bool:
    return (RABBIT_BIN / "rabbitmq-server").exists() and Path(EPMD).exists()


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class RabbitNode:
    def __init__(self, base: Path, number: int, epmd_port: int, extra_conf: str = "") -> None:
        self.number = number
        self.name = f"rabbit{number}@localhost"
        self.dir = base / f"n{number}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.mqtt_port = free_port()
        self.amqp_port = free_port()
        self.dist_port = free_port()
        self.log = self.dir / "console.log"
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}\n"
            f"mqtt.listeners.tcp.default = 127.0.0.1:{self.mqtt_port}\n"
            "mqtt.allow_anonymous = true\n"
            # The sessions' queues replicated on a majority: a node's death loses none of them.
            "mqtt.durable_queue_type = quorum\n"
            # A test machine's disk may be nearly full; the default limit (50 MB) would block publishers.
            "disk_free_limit.absolute = 1MB\n"
            + extra_conf
        )
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))},
            "HOME": str(base),  # the .erlang.cookie every node and rabbitmqctl share
            "ERL_EPMD_PORT": str(epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_CONF_ENV_FILE": str(base / "empty.conf"),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            # The distribution listener would bind every interface otherwise.
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "pid"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """The node's MQTT listener as an EDGE_AGENT_MQTT__HOSTS entry."""
        return f"127.0.0.1:{self.mqtt_port}"

    @property
    def port(self) -> int:
        """The MQTT port, as ``Mosquitto.port``: the test helpers that make agents take either."""
        return self.mqtt_port

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ctl(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``rabbitmqctl -n <this node> …``."""
        return self.cli("rabbitmqctl", *args, timeout=timeout, check=check)

    def cli(self, tool: str, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        """One of the package's command-line tools (rabbitmqctl, rabbitmq-upgrade, …) aimed at this node."""
        done = subprocess.run([str(RABBIT_BIN / tool), "-q", "-n", self.name, *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} on {self.name} failed ({done.returncode}): "
                               f"{done.stdout}{done.stderr}")
        return done

    def start(self) -> None:
        """Start the node; ``wait_ready`` waits for it."""
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([str(RABBIT_BIN / "rabbitmq-server")], env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)

    def wait_ready(self, timeout: float = 90) -> None:
        """Booted (``await_startup``) and its MQTT listener accepting, which comes a few seconds later."""
        deadline = time.monotonic() + timeout

        def booted() -> bool:
            if not self.running:
                raise RuntimeError(f"{self.name} exited:\n{self.log_tail()}")
            left = max(1, int(deadline - time.monotonic()))
            return self.ctl("await_startup", "--timeout", str(min(5, left)), check=False, timeout=30).returncode == 0

        wait_for(booted, timeout, f"{self.name} to boot", interval=0.5)
        wait_for(lambda: listening(self.mqtt_port), max(5.0, deadline - time.monotonic()),
                 f"the MQTT listener of {self.name}", interval=0.1)

    def kill(self) -> None:
        """SIGKILL the node's whole process group: the Erlang VM dies as in a power cut."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self, timeout: float = 60) -> None:
        """The graceful stop: client connections closed, queue leadership handed over, then the VM exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        with contextlib.suppress(ProcessLookupError):  # helpers left in the group
            if self.proc is not None:
                os.killpg(self.proc.pid, signal.SIGKILL)

    def log_tail(self, n: int = 30) -> str:
        logs = sorted((self.dir / "log").glob("*.log")) if (self.dir / "log").exists() else []
        parts = [self.log, *logs]
        return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-n:])
                         for p in parts if p.exists())


class RabbitCluster:
    """Three RabbitMQ nodes clustered on loopback. ``start()`` takes 40 - 70 s on two busy cores."""

    def __init__(self, base: Path, size: int = 3, extra_conf: str = "") -> None:
        """``extra_conf``: more rabbitmq.conf lines for every node (e.g. ``mqtt.prefetch = 100``)."""
        if not installed():
            raise RuntimeError("rabbitmq-server is not installed: apt-get install rabbitmq-server")
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        (base / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        cookie = base / ".erlang.cookie"
        cookie.write_text(uuid.uuid4().hex)
        cookie.chmod(0o400)  # Erlang refuses a cookie others can read
        (base / "empty.conf").write_text("")
        self.epmd_port = free_port()
        self.epmd: subprocess.Popen[bytes] | None = None
        self.nodes = [RabbitNode(base, n, self.epmd_port, extra_conf) for n in range(1, size + 1)]

    def start(self) -> None:
        # Our own epmd, not one a node would start in its own process group (and kill() would take with it).
        self.epmd = subprocess.Popen([EPMD, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(lambda: listening(self.epmd_port), 10, "epmd")
        for node in self.nodes:
            node.start()
        first, *others = self.nodes
        first.wait_ready()
        for node in others:
            node.wait_ready()
            node.ctl("stop_app")
            node.ctl("join_cluster", first.name)
            node.ctl("start_app")
        for node in others:
            node.wait_ready()
        self.wait_members(len(self.nodes))

    def running_members(self, via: RabbitNode | None = None) -> list[str]:
        asker = via or next(n for n in self.nodes if n.running)
        done = asker.ctl("eval", "rabbit_nodes:all_running().", check=False, timeout=30)
        return sorted(part.strip(" '[]\n") for part in done.stdout.split(",") if "@" in part)

    def wait_members(self, count: int, timeout: float = 60) -> None:
        wait_for(lambda: len(self.running_members()) == count, timeout, f"{count} running cluster members",
                 interval=0.5)

    def node_at(self, address: str) -> RabbitNode:
        return next(n for n in self.nodes if n.address == address)

    def restart(self, node: RabbitNode) -> None:
        """Start a node that was stopped or killed and wait until it is back in the cluster.

        Once, on the busy shared machine, a node killed a few seconds before exited during its boot, and the
        run's logs were gone before anyone read them: a boot that exits is tried once more (what it logged goes
        to stderr), and a second failure raises with the node's log.
        """
        node.start()
        try:
            node.wait_ready()
        except RuntimeError as exc:
            print(f"{node.name} exited during its boot; starting it again. {exc}", file=sys.stderr)
            node.stop()  # whatever is left of its process group
            node.start()
            node.wait_ready()
        self.wait_members(sum(n.running for n in self.nodes))

    def await_quorum_plus_one(self, node: RabbitNode, timeout: float = 120) -> None:
        """Before stopping ``node``: wait until every quorum queue would keep its majority without it, which
        is what a rolling restart must wait for between nodes (``rabbitmq-upgrade await_online_quorum_plus_one``)."""
        node.cli("rabbitmq-upgrade", "await_online_quorum_plus_one", "-t", str(int(timeout)), timeout=timeout + 30)

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()  # the scratch folder goes with the test: nothing to save
        if self.epmd is not None and self.epmd.poll() is None:
            self.epmd.kill()
            self.epmd.wait(10)

    def log_tails(self, n: int = 20) -> str:
        return "\n".join(f"=== {node.name}\n{node.log_tail(n)}" for node in self.nodes)

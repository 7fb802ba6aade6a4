"""A real systemd (Debian's, as PID 1) in a PID namespace over a debootstrapped Debian root.

The root file system is built once with ``debootstrap --variant=minbase`` and cached under
:data:`CACHE`, keyed by the suite and the package list; each boot puts a throw-away overlay on top of it, so the
cache stays as debootstrap left it. The boot pivots into the overlay (``pivot_root``, not ``chroot``: the kernel
refuses new user namespaces to a chrooted process, which ``PrivateUsers=`` needs), makes its mounts shared (as
a container manager does: systemd then leaves propagation alone, and the credentials it mounts for a unit in a
mount namespace of its own only reach /run/credentials through it) and runs systemd there. The
network namespace stays the host's: the broker, the devcloud and the test's MQTT clients on the host's loopback
are the machine's too. Everything in the namespace dies with its PID 1 (:meth:`Machine.shutdown`).

Commands run inside with ``nsenter`` (:meth:`Machine.run`); files are reached from the host through
``/proc/<systemd's pid>/root`` (:meth:`Machine.path`).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

SUITE = "bookworm"
# What the shipped units need from a minimal Debian, and no more: procps in particular stays out, as on the
# gateways whose ExecReload=/bin/kill failed with 203/EXEC.
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv")
CACHE = Path("/var/cache/edge-agent-tests")
# The checkout's files that `deploy/install.sh` builds and installs from.
CHECKOUT_FILES = ("agent", "deploy", "systemd", "pyproject.toml", "README.md", "LICENSE")
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def missing_prerequisites() -> str | None:
    """Why this machine cannot boot one, or None."""
    if os.geteuid() != 0:
        return "needs root (unshare, mount, debootstrap): run as root, as CI does"
    for tool, package in (("debootstrap", "debootstrap"), ("unshare", "util-linux"), ("nsenter", "util-linux"),
                          ("pivot_root", "util-linux")):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is missing: apt-get install {package}"
    if mirror() is None:
        return "no Debian mirror for the root file system in /etc/apt/sources.list.d/debian.sources"
    return None


def mirror() -> str | None:
    """The Debian mirror apt already uses for SUITE on the host (deb822 sources), read at run time."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if not sources.is_file():
        return None
    for stanza in sources.read_text().split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.strip() and not line.startswith(("#", " ")) and ":" in line:
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
        if SUITE in fields.get("suites", "").split() and fields.get("uris"):
            return fields["uris"].split()[0]
    return None


def cached_root(log: Path) -> Path:
    """The debootstrapped root for SUITE and PACKAGES, built on first use (about a minute) and kept."""
    key = hashlib.sha256(f"{SUITE} minbase {','.join(sorted(PACKAGES))}".encode()).hexdigest()[:12]
    root = CACHE / f"debian-{SUITE}-{key}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be building the same root
        if (root / ".complete").exists():
            return root
        building = root.with_name(root.name + ".building")
        shutil.rmtree(building, ignore_errors=True)
        url = mirror()
        assert url is not None
        with log.open("wb") as out:
            done = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE,
                                   str(building), url], stdout=out, stderr=subprocess.STDOUT, timeout=1200)
        if done.returncode != 0:
            raise RuntimeError(f"debootstrap failed ({done.returncode}):\n{log.read_text()[-3000:]}")
        (building / ".complete").write_text(f"{SUITE} {' '.join(PACKAGES)}\n")
        shutil.rmtree(root, ignore_errors=True)
        building.rename(root)
        return root


class Machine:
    """One boot of systemd over an overlay of the cached root."""

    def __init__(self, base: Path, workdir: Path) -> None:
        self.base = base
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0

    def boot(self) -> None:
        upper, work, merged = (self.workdir / name for name in ("upper", "work", "merged"))
        for directory in (upper, work, merged):
            directory.mkdir(parents=True)
        (upper / ".host").mkdir()  # where pivot_root puts the host's root, unmounted at once
        self._carry_pip_configuration(upper)
        pip_cache = CACHE / "pip"  # wheels survive between runs: a reinstall takes seconds
        pip_cache.mkdir(parents=True, exist_ok=True)
        script = f"""set -e
mount -t overlay overlay -o lowerdir={self.base},upperdir={upper},workdir={work} {merged}
mount --rbind /dev {merged}/dev
mount -t sysfs sysfs {merged}/sys
mount -t tmpfs tmpfs {merged}/run
mount -t proc proc {merged}/proc
mkdir -p {merged}/root/.cache/pip
mount --bind {pip_cache} {merged}/root/.cache/pip
cd {merged}
pivot_root . .host
cd /
umount -l /.host
mount --make-rshared /
exec /usr/bin/env -i container=other /lib/systemd/systemd --system --log-target=journal
"""
        self.log = (self.workdir / "boot.log").open("wb")
        # If the test run dies without its teardown, unshare dies with it and takes the machine along.
        self.proc = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child=SIGKILL", "--mount", "--uts",
                                      "--ipc", "--propagation", "private", "bash", "-c", script],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 60
        while not self.pid:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"systemd did not start:\n{(self.workdir / 'boot.log').read_text()[-3000:]}")
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            for child in children.read_text().split() if children.exists() else []:
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{child}/cmdline").read_bytes().startswith(b"/lib/systemd/systemd"):
                        self.pid = int(child)
            time.sleep(0.05)
        while True:  # "degraded" is fine: units this sandbox cannot run (none of ours) may fail
            state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"systemd did not finish booting: {state}")
            time.sleep(0.2)

    @staticmethod
    def _carry_pip_configuration(upper: Path) -> None:
        """pip inside the root uses the host's configuration: root's pip.conf and the CA file in $PIP_CERT."""
        conf = Path.home() / ".config/pip/pip.conf"
        if conf.is_file():
            (upper / "root/.config/pip").mkdir(parents=True)
            shutil.copy2(conf, upper / "root/.config/pip/pip.conf")
        cert = os.environ.get("PIP_CERT", "")
        if cert and Path(cert).is_file():
            target = upper / cert.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(cert, target)

    def environment(self) -> dict[str, str]:
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
               "LANG": "C.UTF-8", "TERM": "dumb", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
        if os.environ.get("PIP_CERT"):
            env["PIP_CERT"] = os.environ["PIP_CERT"]
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside (its namespaces and root), as root."""
        done = subprocess.run(["nsenter", "-t", str(self.pid), "-p", "-m", "-u", "-i", "-r", "-w", *cmd],
                              capture_output=True, text=True, timeout=timeout, env=self.environment(), input=input,
                              check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    def start(self, *cmd: str) -> subprocess.Popen[str]:
        """Start a command inside without waiting for it."""
        return subprocess.Popen(["nsenter", "-t", str(self.pid), "-p", "-m", "-u", "-i", "-r", "-w", *cmd],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.environment())

    def path(self, inside: str) -> Path:
        """A path inside, as the host reaches it."""
        return Path(f"/proc/{self.pid}/root") / inside.lstrip("/")

    def copy_checkout(self, source: Path, inside: str) -> None:
        target = self.path(inside)
        target.mkdir(parents=True)
        for name in CHECKOUT_FILES:
            item = source / name
            if item.is_dir():
                shutil.copytree(item, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            elif item.exists():
                shutil.copy2(item, target / name)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str, *extra: str) -> list[str]:
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", unit, *extra).stdout.splitlines()

    def events(self, unit: str, name: str | None = None) -> list[dict[str, Any]]:
        """The agent's JSON events in the unit's journal (of every run), oldest first."""
        found = []
        for line in self.journal(unit):
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if name is None or event.get("event") == name:
                        found.append(event)
        return found

    def shutdown(self) -> None:
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)  # PID 1 of the namespace: everything inside dies with it
        if self.proc is not None:
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.log.close()


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def booted(base: Path, workdir: Path) -> Iterator[Machine]:
    machine = Machine(base, workdir)
    try:
        machine.boot()
        yield machine
    finally:
        machine.shutdown()


def lines_containing(lines: Sequence[str], text: str) -> list[str]:
    return [line for line in lines if text in line]

"""The systemd units: valid for systemd 252, hardened to exposure ≤ 1.5, and the agent still works inside them.

PID 1 is not systemd in CI, so the units cannot be started. What is checked instead:

- ``systemd-analyze verify`` against a throw-away root that holds the units, the unit files they depend on and
  stand-ins for the executables (verify checks that ExecStart= and ExecReload= exist and are executable).
- ``systemd-analyze security --offline=yes`` for the overall exposure.
- The directives other parts rely on, and that the template differs from the plain unit only where it must.
- The real agent, run with the restrictions reproduced outside systemd: no new privileges and no capabilities
  (setpriv), every system call the unit's SystemCallFilter= refuses made to fail with EPERM as the unit's
  SystemCallErrorNumber= does (strace fault injection), and the trace checked for what the rest of the
  sandbox would refuse: writable+executable memory, other address families, /proc beyond the processes,
  writes outside the state directory, devices beyond the pseudo devices.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cli import EX_CONFIG
from agent.config import Settings, load_settings

from support import Collector, Mosquitto, pcm_noise, publisher, wait_for

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "edge-agent.service"
TEMPLATE = ROOT / "systemd" / "edge-agent@.service"
MAX_EXPOSURE = 1.5

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is missing: apt-get install systemd (CI installs it)"
)

Unit = dict[str, dict[str, list[str]]]


def parse_unit(path: Path) -> Unit:
    """Sections → key → values in order (a key may repeat). Enough for our units: no line continuations."""
    unit: Unit = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"{path.name}: keep directives on one line: {line}"
        if line.startswith("["):
            section = line.strip("[]")
            unit.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        unit[section].setdefault(key.strip(), []).append(value.strip())
    return unit


def one(unit: Unit, key: str, section: str = "Service") -> str:
    values = unit[section].get(key, [])
    assert len(values) == 1, f"expected exactly one {key}= in [{section}], found {values}"
    return values[0]


# --- systemd-analyze verify and security ----------------------------------------------------------------


@pytest.fixture(scope="module")
def verify_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root with the units installed as install.sh installs them, systemd's own units, and stand-ins.

    verify resolves dependencies (network-online.target, sysinit.target…) and executables inside --root, so
    the root needs systemd's unit directory; the program of ExecStart= and ExecReload= only has to be executable.
    """
    root = tmp_path_factory.mktemp("verify-root")
    system_units = next(p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir())
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    program = root / "opt/edge-agent/venv/bin/edge-agent"
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    for unit in (UNIT, TEMPLATE):
        shutil.copy2(unit, unit_dir / unit.name)
    return root


@needs_systemd_analyze
@pytest.mark.parametrize("name", ["edge-agent.service", "edge-agent@north.service"])
def test_systemd_analyze_verify_is_clean(verify_root: Path, name: str) -> None:
    assert SYSTEMD_ANALYZE is not None
    done = subprocess.run([SYSTEMD_ANALYZE, "verify", f"--root={verify_root}", name],
                          capture_output=True, text=True, timeout=60)
    # verify exits 0 on unknown keys and bad values ("…, ignoring."), so any output at all is a failure.
    assert done.returncode == 0 and not done.stderr.strip() and not done.stdout.strip(), done.stderr + done.stdout


def exposure(unit_file: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    assert SYSTEMD_ANALYZE is not None
    done = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", f"--threshold={round(MAX_EXPOSURE * 10)}", str(unit_file)],
        capture_output=True, text=True, timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", done.stdout)
    assert match, f"no overall exposure in the output:\n{done.stdout}\n{done.stderr}"
    return float(match.group(1)), done


@needs_systemd_analyze
def test_unit_exposure_is_at_most_1_5() -> None:
    score, done = exposure(UNIT)
    assert score <= MAX_EXPOSURE and done.returncode == 0, done.stdout
    assert not done.stderr.strip(), done.stderr


@needs_systemd_analyze
def test_template_instance_exposure_is_at_most_1_5(tmp_path: Path) -> None:
    instance = tmp_path / "edge-agent@north.service"
    shutil.copy2(TEMPLATE, instance)
    score, done = exposure(instance)
    assert score <= MAX_EXPOSURE and done.returncode == 0, done.stdout
    assert not done.stderr.strip(), done.stderr


# --- directives other parts rely on ---------------------------------------------------------------------


def test_unit_has_the_lifecycle_the_daemon_implements() -> None:
    unit = parse_unit(UNIT)
    assert one(unit, "Type") == "notify"
    assert one(unit, "NotifyAccess") == "main"  # the worker processes must not speak for the agent
    assert one(unit, "WatchdogSec") == "30s"
    assert one(unit, "Restart") == "on-failure"
    assert one(unit, "RestartPreventExitStatus") == str(EX_CONFIG)
    # Not /bin/kill (procps is missing from minimal systems, and kill returns before the reload happened): the
    # agent's own command, which waits for the outcome and fails when the new settings are invalid.
    assert one(unit, "ExecReload") == "/opt/edge-agent/venv/bin/edge-agent reload --pid $MAINPID"
    assert one(unit, "KillMode") == "mixed"  # SIGTERM to the agent only; its workers finish the drain
    # The drain must end before systemd's SIGKILL.
    stop_s = int(one(unit, "TimeoutStopSec").removesuffix("s"))
    assert Settings.model_fields["shutdown_timeout_s"].default < stop_s


def test_unit_reads_configuration_and_state_where_the_agent_expects_them() -> None:
    unit = parse_unit(UNIT)
    # The agent alone reads the env file, at start and at each reload: EnvironmentFile= would copy it into the
    # environment once, at start, for a second parser.
    assert "EnvironmentFile" not in unit["Service"] and "Environment" not in unit["Service"]
    assert one(unit, "ExecStart") == "/opt/edge-agent/venv/bin/edge-agent run --env-file /etc/edge-agent/agent.env"
    assert one(unit, "StateDirectory") == "edge-agent"  # → $STATE_DIRECTORY, the store's default
    assert one(unit, "StateDirectoryMode") == "0750"
    assert one(unit, "ConfigurationDirectory") == "edge-agent"
    assert one(unit, "User") == one(unit, "Group") == "edge-agent"
    assert one(unit, "Documentation", "Unit") == "file:///opt/edge-agent/README.md"
    assert one(unit, "WantedBy", "Install") == "multi-user.target"


def test_unit_keeps_what_the_agent_needs() -> None:
    unit = parse_unit(UNIT)["Service"]
    assert unit["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    # The broker and the resource API are on other hosts: no network namespace, no address allow list.
    assert "PrivateNetwork" not in unit and "IPAddressDeny" not in unit
    # A refused system call returns EPERM instead of killing the agent (OpenBLAS's mbind(), see below).
    assert unit["SystemCallErrorNumber"] == ["EPERM"]
    assert unit["CapabilityBoundingSet"] == [""] and unit["AmbientCapabilities"] == [""]


def credential_ids(unit: Unit) -> dict[str, str]:
    return dict(value.split(":", 1) for value in unit["Service"]["LoadCredential"])


def test_credentials_are_optional_and_named_as_the_agent_reads_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = credential_ids(parse_unit(UNIT))
    assert set(ids) == {"EDGE_AGENT_MQTT__PASSWORD", "EDGE_AGENT_CLOUD__TOKEN"}
    # A bare name, not a path: systemd 252 looks it up in /etc/credstore/ and skips it when missing.
    assert all("/" not in source for source in ids.values()), ids
    # What systemd hands over in $CREDENTIALS_DIRECTORY, under those ids, is what the settings pick up.
    for key in list(os.environ):
        if key.startswith("EDGE_AGENT_"):
            monkeypatch.delenv(key)
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "EDGE_AGENT_MQTT__PASSWORD").write_text("broker-secret\n")
    (credentials / "EDGE_AGENT_CLOUD__TOKEN").write_text("cloud-secret")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    monkeypatch.setenv("EDGE_AGENT_STATE_DIR", str(tmp_path / "state"))
    settings = load_settings(None)
    assert settings.mqtt.password is not None and settings.mqtt.password.get_secret_value() == "broker-secret"
    assert settings.cloud.token is not None and settings.cloud.token.get_secret_value() == "cloud-secret"


# The template's lines that differ from the plain unit, each with its expected value.
TEMPLATE_ONLY = {
    "Description": ["edge-agent %i, smart-city gateway daemon (MQTT tasks, local or cloud execution)"],
    "ExecStart": ["/opt/edge-agent/venv/bin/edge-agent run --env-file /etc/edge-agent/%i.env --instance %i"],
    "LoadCredential": ["EDGE_AGENT_MQTT__PASSWORD:edge-agent@%i.mqtt-password",
                       "EDGE_AGENT_CLOUD__TOKEN:edge-agent@%i.cloud-token"],
    "StateDirectory": ["edge-agent/%i"],
}


def test_template_differs_from_the_unit_only_per_instance() -> None:
    unit, template = parse_unit(UNIT), parse_unit(TEMPLATE)
    assert unit.keys() == template.keys()
    for section in unit:
        for key in unit[section].keys() | template[section].keys():
            if key in TEMPLATE_ONLY:
                assert template[section][key] == TEMPLATE_ONLY[key], key
            else:
                assert template[section].get(key) == unit[section].get(key), f"[{section}] {key} drifted"


def test_template_makes_the_instance_name_the_agent_id_unless_the_env_file_sets_one(tmp_path: Path) -> None:
    # --instance is the agent's lowest source, so NAME.env can override it; Environment= would win over the file.
    template = parse_unit(TEMPLATE)["Service"]
    assert "Environment" not in template and "EnvironmentFile" not in template
    _program, command, *options = one(parse_unit(TEMPLATE), "ExecStart").split()
    assert command == "run"
    env_file = tmp_path / "north.env"
    args = [option.replace("/etc/edge-agent/%i.env", str(env_file)).replace("%i", "north") for option in options]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_") and k != "CREDENTIALS_DIRECTORY"}

    def agent_id() -> str:
        done = subprocess.run([sys.executable, "-m", "agent", "check-config", *args], capture_output=True,
                              text=True, timeout=60, env=env, check=True)
        return str(json.loads(done.stdout)["agent_id"])

    env_file.write_text(f"EDGE_AGENT_STATE_DIR={tmp_path / 'state'}\n")
    assert agent_id() == "north"
    env_file.write_text(env_file.read_text() + "EDGE_AGENT_AGENT_ID=gw-north-1\n")
    assert agent_id() == "gw-north-1"


# --- the real agent under the unit's restrictions -------------------------------------------------------


def syscall_group(name: str) -> set[str]:
    """A systemd system call group, nested groups expanded, as this systemd defines it."""
    assert SYSTEMD_ANALYZE is not None
    out = subprocess.run([SYSTEMD_ANALYZE, "syscall-filter", name], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    calls: set[str] = set()
    for line in out.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        calls |= syscall_group(item) if item.startswith("@") else {item}
    return calls


def allowed_syscalls(unit: Unit) -> set[str]:
    """Evaluate the unit's SystemCallFilter= lines in order: the first is an allow list, ~ lines remove."""
    allowed: set[str] = set()
    for value in unit["Service"]["SystemCallFilter"]:
        deny = value.startswith("~")
        names: set[str] = set()
        for item in value.removeprefix("~").split():
            names |= syscall_group(item) if item.startswith("@") else {item}
        allowed = allowed - names if deny else allowed | names
    return allowed


# Calls the filter refuses that the agent makes anyway, and why EPERM is harmless there.
TOLERATED_REFUSALS = {
    # OpenBLAS (inside numpy) asks for NUMA placement of its buffers and carries on when refused.
    "mbind",
    # SQLite hands new journal files to the database's owner, but only when running as uid 0 (this test);
    # as the edge-agent user it never calls fchown.
    "fchown",
}
# /proc files outside the process directories (ProcSubset=pid hides them) that are read anyway.
TOLERATED_PROC = {
    # prometheus_client reads the boot time at import for its default registry's process collector; it
    # catches the error, and the agent exposes its own registry, not that one.
    "/proc/stat",
}
ALLOWED_DEVICES = re.compile(r"/dev/(null|zero|full|random|urandom|tty|shm/.*|pts/.*)$")


class SandboxedAgent:
    """The agent under setpriv (no new privileges, no capabilities) and strace (the system call filter)."""

    def __init__(self, workdir: Path, broker_port: int) -> None:
        strace, setpriv = shutil.which("strace"), shutil.which("setpriv")
        assert strace is not None and setpriv is not None
        self.workdir = workdir
        self.agent_id = f"sandbox-{uuid.uuid4().hex[:6]}"
        self.state = workdir / "state"
        self.trace = workdir / "trace"
        self.log = workdir / "agent.log"
        env_file = workdir / "agent.env"
        env_file.write_text(
            f"EDGE_AGENT_AGENT_ID={self.agent_id}\nEDGE_AGENT_MQTT__HOST=127.0.0.1\n"
            f"EDGE_AGENT_MQTT__PORT={broker_port}\nEDGE_AGENT_STATE_DIR={self.state}\n"
            "EDGE_AGENT_METRICS__PORT=0\nEDGE_AGENT_LOCAL__WORKERS=1\nEDGE_AGENT_LOG__FORMAT=json\n"
        )
        allowed = allowed_syscalls(parse_unit(UNIT))
        # Every call outside the allow list fails with EPERM, as SystemCallErrorNumber=EPERM makes it ("?":
        # names this strace does not know are skipped rather than rejected).
        inject = "!" + ",".join(f"?{name}" for name in sorted(allowed)) + ":error=EPERM"
        # What systemd gives a service: a small environment and / as the working directory. No bytecode is
        # written (install.sh's pip compiles it ahead; ProtectSystem=strict would refuse the writes anyway).
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
        cmd = [setpriv, "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all",
               strace, "-f", "-qq", "-s", "256", "-o", str(self.trace), "-e", f"inject={inject}",
               sys.executable, "-m", "agent", "run", "--env-file", str(env_file)]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd="/")

    def logged(self, event: str) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the agent exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        return f'"event": "{event}"'.encode() in self.log.read_bytes()

    def terminate(self) -> int:
        """SIGTERM to the agent itself (strace's child; strace passes nothing on) and its exit status."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        if self.proc.poll() is None and children.exists():
            for pid in children.read_text().split():
                os.kill(int(pid), signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise

    def writable(self, path: str) -> bool:
        """Where the unit lets the agent write: the state directory, /dev/shm, a private /tmp, /dev/null."""
        target = Path(path)
        if target == self.state or target.is_relative_to(self.state):
            return True
        if target.is_relative_to(self.workdir):  # the test's own files sit in /tmp too, but are not the agent's
            return False
        return path == "/dev/null" or path.startswith(("/dev/shm/", "/tmp/"))

    def sandbox_problems(self) -> list[str]:
        """What the parts of the sandbox this test cannot enforce would have refused, read from the trace."""
        lines = self.trace.read_text(errors="replace").splitlines()
        problems: list[str] = []
        refused = {m.group(1) for line in lines if (m := re.match(r"\d+\s+(\w+)\(.*\(INJECTED\)$", line))}
        problems += [f"SystemCallFilter= refuses {name}()" for name in sorted(refused - TOLERATED_REFUSALS)]
        for line in lines:
            memory = re.match(r"\d+\s+(mmap|mprotect|pkey_mprotect)\((.*)", line)
            # systemd 252's MemoryDenyWriteExecute=: no W+X mapping, no mprotect() that asks for PROT_EXEC.
            if memory and "PROT_EXEC" in memory.group(2) and (memory.group(1) != "mmap" or "PROT_WRITE" in line):
                problems.append(f"MemoryDenyWriteExecute= refuses: {line}")
            family = re.match(r"\d+\s+socket\((AF_\w+)", line)
            if family and family.group(1) not in {"AF_INET", "AF_INET6", "AF_UNIX"}:
                problems.append(f"RestrictAddressFamilies= refuses {family.group(1)}")
            opened = re.match(r'\d+\s+open(?:at)?\((?:AT_FDCWD, |\d+, )?"([^"]*)", ([A-Z_|]+)', line)
            if opened:
                path, flags = opened.groups()
                if (path.startswith("/proc/") and not re.match(r"/proc/(self|thread-self|\d+)(/|$)", path)
                        and path not in TOLERATED_PROC):
                    problems.append(f"ProcSubset=pid hides {path}")
                if path.startswith("/dev/") and not ALLOWED_DEVICES.match(path):
                    problems.append(f"PrivateDevices= has no {path}")
                if re.search(r"O_WRONLY|O_RDWR|O_CREAT", flags) and not self.writable(path):
                    problems.append(f"ProtectSystem=strict refuses writing {path}")
            changed = re.match(
                r'\d+\s+(mkdir|mkdirat|unlink|unlinkat|rename|renameat2?|rmdir)\((?:AT_FDCWD, |\d+, )?"([^"]*)"', line)
            if changed and not self.writable(changed.group(2)):
                problems.append(f"ProtectSystem=strict refuses {changed.group(1)} {changed.group(2)}")
        return sorted(set(problems))


@pytest.fixture
def sandboxed_agent(tmp_path: Path, broker: Mosquitto) -> Iterator[SandboxedAgent]:
    if SYSTEMD_ANALYZE is None or shutil.which("strace") is None or shutil.which("setpriv") is None:
        pytest.skip("needs systemd-analyze, strace and setpriv: apt-get install systemd strace util-linux")
    (tmp_path / "sandbox").mkdir()
    agent = SandboxedAgent(tmp_path / "sandbox", broker.port)
    yield agent
    if agent.proc.poll() is None:
        agent.proc.kill()  # SIGKILL to strace: its tracees are killed with it
        agent.proc.wait(10)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(240)
def test_agent_works_under_the_units_restrictions(sandboxed_agent: SandboxedAgent, broker: Mosquitto) -> None:
    agent = sandboxed_agent
    results = Collector(broker.port, f"edge/{agent.agent_id}/results/#")
    device = publisher(broker.port)
    try:
        wait_for(lambda: agent.logged("agent_ready"), 90, "the sandboxed agent to be ready")
        # Ready comes with the CONNACK; on a client id's first start the broker keeps messages from the SUBACK on.
        wait_for(lambda: agent.logged("mqtt_subscribed"), 30, "the broker to confirm the routes")
        device.publish("city/aarhus/traffic/1/data", json.dumps({"vehicleCount": 5}), qos=1)
        device.publish("city/aarhus/noise/1/pcm", pcm_noise(1.0), qos=1)  # numpy, in a spawned worker process
        wait_for(lambda: len(results.snapshot()) >= 2, 90, "both results")
    finally:
        device.loop_stop()
        device.disconnect()
        results.close()
    kinds = sorted(json.loads(payload)["kind"] for _, payload in results.snapshot())
    assert kinds == ["noise.spectrum", "sensor.stats"]
    assert agent.terminate() == 0, agent.log.read_text()[-3000:]
    assert b'"event": "agent_stopped"' in agent.log.read_bytes()
    problems = agent.sandbox_problems()
    assert not problems, "\n".join(problems)

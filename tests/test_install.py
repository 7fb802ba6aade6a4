"""deploy/install.sh (a contract, docs/design.md#cli) into a temporary root: idempotent, keeps the operator's
files.

The venv is built once per module from a wheel of this checkout (pip resolves the dependencies from the
registry, as an operator's install does); the tests that change the tree work on copies of it.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ROOT / "deploy" / "install.sh"
UNITS = ("edge-agent.service", "edge-agent@.service")
# What install.sh uses unless PYTHON says otherwise. Not the interpreter running the tests: that may be a pyenv
# build under /root or /home, which install.sh refuses because the service could not see it.
SYSTEM_PYTHON = "/usr/bin/python3"


def run_install(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "PYTHON"} | (env or {})
    return subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, check=False)


def system_python_usable() -> bool:
    probe = "import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))"
    return Path(SYSTEM_PYTHON).exists() and subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True,
                                                           timeout=30, check=False).returncode == 0


def stand_in(path: Path, version: str, prefix: str) -> Path:
    """An interpreter's answers to install.sh's questions (version, venv, where it lives), without one."""
    path.write_text(f'#!/bin/sh\ncase "$*" in\n  *base_prefix*) echo {prefix}/bin/python3; echo {prefix} ;;\n'
                    f'  *platform*) echo {version} ;;\n  *) exit 0 ;;\nesac\n')
    path.chmod(0o755)
    return path


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under root with its mode, size and mtime (ns): what a no-op run must leave alone."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        out[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", str(ROOT), "-w", str(out)],
                   check=True, timeout=300, capture_output=True)
    (built,) = out.glob("edge_agent-*.whl")
    return built


# The tests of the installed tree share this install (a venv from a wheel, pip resolving from the registry):
# 15-20 s, so they are marked slow. The refusals and the script's lint stay in the quick loop.
@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
    if not system_python_usable():
        pytest.skip(f"{SYSTEM_PYTHON} is not Python 3.11+ with venv (apt-get install python3-venv)")
    root = tmp_path_factory.mktemp("root")
    first = run_install("--root", str(root), "--wheel", str(wheel))
    assert first.returncode == 0, first.stdout + first.stderr
    return root, first


def copy_of(root: Path, tmp_path: Path) -> Path:
    """A copy to change or uninstall. Its venv's scripts still point into the original, which is fine for that."""
    dest = tmp_path / "root"
    shutil.copytree(root, dest, symlinks=True)
    return dest


@pytest.mark.slow
def test_install_lays_out_the_tree(installed: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    root, first = installed
    assert (root / "opt/edge-agent/venv/bin/edge-agent").is_file()
    for unit in UNITS:
        assert (root / "etc/systemd/system" / unit).read_bytes() == (ROOT / "systemd" / unit).read_bytes()
    # The units' Documentation= points here.
    assert (root / "opt/edge-agent/README.md").read_bytes() == (ROOT / "README.md").read_bytes()
    env_file = root / "etc/edge-agent/agent.env"
    assert env_file.read_bytes() == (ROOT / "deploy/agent.env.example").read_bytes()
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o640
    # --root is a packaging root: no user, no state directory (systemd makes it), no systemctl.
    assert not (root / "var").exists()
    assert "systemctl" not in first.stdout


@pytest.mark.slow
def test_the_installed_package_carries_the_demo_data(installed: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    # An installed wheel's `edge-agent demo` plays the sample shipped in the package, licence included.
    root, _ = installed
    probe = ("import agent.data as d, agent.demo.options as o, argparse; "
             "a = o.build_parser(argparse.ArgumentParser()).parse_args([]); "
             "print(a.data, a.uplink, (d.DATA_DIR / 'COPYING').is_file(), "
             "len(list(a.data.glob('Aarhus*.csv'))), a.uplink.stat().st_size)")
    out = subprocess.run([str(root / "opt/edge-agent/venv/bin/python"), "-c", probe], capture_output=True, cwd=root,
                         text=True, check=True, timeout=60).stdout.split()
    site = str(root / "opt/edge-agent/venv/lib")
    assert out[0].startswith(site) and out[1].startswith(site), out
    assert out[2:] == ["True", "8", str((ROOT / "agent/data/traces/mahimahi/ATT-LTE-driving-2016.up").stat().st_size)]


@pytest.mark.slow
def test_second_run_changes_nothing(installed: tuple[Path, subprocess.CompletedProcess[str]], wheel: Path) -> None:
    root, _ = installed
    before = tree(root)
    again = run_install("--root", str(root), "--wheel", str(wheel))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing changed" in again.stdout
    assert "+ " not in again.stdout  # no change listed
    assert tree(root) == before


@pytest.mark.slow
def test_an_edited_env_file_is_never_overwritten(
    installed: tuple[Path, subprocess.CompletedProcess[str]], wheel: Path
) -> None:
    root, _ = installed
    env_file = root / "etc/edge-agent/agent.env"
    original = env_file.read_text()
    edited = original + "EDGE_AGENT_AGENT_ID=edited-gw\n"
    env_file.write_text(edited)
    env_file.chmod(0o600)
    try:
        again = run_install("--root", str(root), "--wheel", str(wheel))
        assert again.returncode == 0, again.stdout + again.stderr
        assert env_file.read_text() == edited
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600  # the operator's choice, kept
        assert "nothing changed" in again.stdout
    finally:
        env_file.write_text(original)
        env_file.chmod(0o640)


@pytest.mark.slow
def test_installed_agent_checks_the_installed_config(
    installed: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    root, _ = installed
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_") and k != "CREDENTIALS_DIRECTORY"}
    env["EDGE_AGENT_STATE_DIR"] = str(tmp_path / "state")
    done = subprocess.run(
        [str(root / "opt/edge-agent/venv/bin/edge-agent"), "check-config",
         "--env-file", str(root / "etc/edge-agent/agent.env")],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert '"host": "broker.example.net"' in done.stdout  # read from the installed example


@pytest.mark.slow
def test_a_failed_upgrade_keeps_the_previous_venv(
    installed: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    root, _ = installed
    venv = root / "opt/edge-agent/venv"
    before = tree(venv)
    broken = tmp_path / "edge_agent-9.9.9-py3-none-any.whl"
    broken.write_bytes(b"not a zip file")
    done = run_install("--root", str(root), "--wheel", str(broken))
    assert done.returncode != 0
    assert "could not build the venv" in done.stderr
    assert tree(venv) == before  # moved aside and back: the same files, untouched
    assert not (root / "opt/edge-agent/venv.previous").exists()


@pytest.mark.slow
def test_uninstall_removes_the_program_and_keeps_configuration_and_state(
    installed: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    root = copy_of(installed[0], tmp_path)
    (root / "etc/edge-agent/agent.env").write_text("EDGE_AGENT_AGENT_ID=keep-me\n")
    store = root / "var/lib/edge-agent/edge-agent.db"
    store.parent.mkdir(parents=True)
    store.write_bytes(b"state")
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir()
    (wants / "edge-agent.service").symlink_to("/etc/systemd/system/edge-agent.service")
    (wants / "edge-agent@north.service").symlink_to("/etc/systemd/system/edge-agent@.service")

    done = run_install("--root", str(root), "--uninstall")
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (root / "opt/edge-agent").exists()
    for unit in UNITS:
        assert not (root / "etc/systemd/system" / unit).exists()
    assert list(wants.iterdir()) == []  # no dangling enablement links
    assert (root / "etc/edge-agent/agent.env").read_text() == "EDGE_AGENT_AGENT_ID=keep-me\n"
    assert store.read_bytes() == b"state"
    assert f"kept {root}/etc/edge-agent" in done.stdout
    assert f"kept {root}/var/lib/edge-agent" in done.stdout

    again = run_install("--root", str(root), "--uninstall")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing removed" in again.stdout


def test_refuses_a_python_older_than_3_11(tmp_path: Path) -> None:
    # No Python 3.10 on the test machine: a stand-in that answers the version checks as 3.10 would.
    old = tmp_path / "python3.10"
    old.write_text('#!/bin/sh\ncase "$*" in *platform*) echo 3.10.12 ;; *) exit 1 ;; esac\n')
    old.chmod(0o755)
    done = run_install("--root", str(tmp_path / "root"), env={"PYTHON": str(old)})
    assert done.returncode != 0
    assert "Python 3.10.12" in done.stderr and "3.11 or newer" in done.stderr
    assert not (tmp_path / "root/opt").exists()


def test_refuses_an_interpreter_the_service_cannot_see(tmp_path: Path) -> None:
    # A pyenv build in a home directory: ProtectHome=yes hides it from the unit, so the venv's python, a link
    # to it, would fail every start while working from the installing shell.
    pyenv = stand_in(tmp_path / "python3.12", "3.12.1", "/home/alice/.pyenv/versions/3.12.1")
    done = run_install("--root", str(tmp_path / "root"), "--wheel", str(tmp_path / "absent.whl"),
                       env={"PYTHON": str(pyenv)})
    assert done.returncode != 0
    assert f"{pyenv} is /home/alice/.pyenv/versions/3.12.1/bin/python3: the service could not run it" in done.stderr
    assert "ProtectHome=yes" in done.stderr and "PYTHON=/usr/bin/python3.12" in done.stderr
    assert "no such wheel" not in done.stderr  # refused before anything else
    assert not (tmp_path / "root/opt").exists()
    for hidden in ("/root/.pyenv/versions/3.12.1", "/run/user/1000/py", "/tmp/py"):
        done = run_install("--root", str(tmp_path / "root"), env={"PYTHON": str(stand_in(
            tmp_path / "python3", "3.12.1", hidden))})
        assert done.returncode != 0 and "the service could not run it" in done.stderr, hidden


def test_the_default_interpreter_is_the_systems_not_the_first_on_path(tmp_path: Path) -> None:
    if not system_python_usable():
        pytest.skip(f"{SYSTEM_PYTHON} is not Python 3.11+ with venv")
    # A root shell with pyenv's shims first on PATH: its python3 is not the one to build the service's venv on.
    shims = tmp_path / "shims"
    shims.mkdir()
    asked = tmp_path / "asked"
    (shims / "python3").write_text(f"#!/bin/sh\ntouch {asked}\nexit 1\n")
    (shims / "python3").chmod(0o755)
    done = run_install("--root", str(tmp_path / "root"), "--wheel", str(tmp_path / "absent.whl"),
                       env={"PATH": f"{shims}:{os.environ['PATH']}"})
    assert not asked.exists()
    assert f"using {SYSTEM_PYTHON} (" in done.stdout
    assert "no such wheel" in done.stderr  # it went on past the interpreter, to the next check


def test_explains_a_missing_interpreter_and_bad_arguments(tmp_path: Path) -> None:
    missing = run_install("--root", str(tmp_path), env={"PYTHON": "/nonexistent/python3"})
    assert missing.returncode != 0 and "no Python interpreter" in missing.stderr
    unknown = run_install("--frobnicate")
    assert unknown.returncode != 0 and "unknown argument: --frobnicate" in unknown.stderr
    assert run_install("--help").returncode == 0


def test_script_is_clean_for_bash_and_shellcheck() -> None:
    subprocess.run(["bash", "-n", str(INSTALL)], check=True, timeout=30)
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    done = subprocess.run([shellcheck, str(INSTALL)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout

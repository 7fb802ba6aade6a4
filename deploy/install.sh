#!/bin/bash
# Install, upgrade or remove edge-agent as a systemd service (docs/design.md#cli; docs/operations.md).
#
#   deploy/install.sh [--root DIR] [--wheel FILE]      install or upgrade
#   deploy/install.sh [--root DIR] --uninstall         remove the program, keep configuration and state
#
# What goes where (under DIR with --root):
#   /opt/edge-agent/venv                 a virtual environment with edge-agent and its dependencies
#   /opt/edge-agent/README.md            the documentation the units' Documentation= points to
#   /etc/systemd/system/edge-agent.service, edge-agent@.service
#   /etc/edge-agent/agent.env            from deploy/agent.env.example, mode 0640, never overwritten
#   system user and group edge-agent     (not with --root)
#
# Idempotent: a second run with the same source changes nothing and says so. Everything comes from the
# checkout this script sits in; --wheel FILE installs the package from a built wheel instead of building it
# from the checkout (the units, the example env file and README.md still come from the checkout).
#
# With --root DIR the tree is staged under DIR as a packaging root does: no user is created, nothing is
# chown'ed (a package's postinst does that once the user exists: chgrp edge-agent /etc/edge-agent/agent.env),
# and systemctl is never called. The venv is built in place, so its scripts point into DIR: use it where it
# stands (tests, a chroot that runs the script itself), not copied elsewhere.
#
# Environment: PYTHON, the interpreter the venv is made from (default: /usr/bin/python3; 3.11 or newer). It must
# be one the service can see: the unit's ProtectHome= and PrivateTmp= hide /root, /home, /run/user and /tmp
# from it, so an interpreter there (pyenv, a user's own build) is refused.
set -euo pipefail

readonly NAME=edge-agent
readonly MIN_PYTHON="3.11"
SRC=$(cd "$(dirname "$0")/.." && pwd -P)
readonly SRC
# The system's interpreter, not the first python3 on PATH: under `sudo -i` or a root shell that may be a
# pyenv build in /root, which the service cannot see.
PYTHON=${PYTHON:-/usr/bin/python3}

ROOT=""
WHEEL=""
UNINSTALL=0
CHANGES=0

say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }
changed() { CHANGES=$((CHANGES + 1)); printf '  + %s\n' "$*"; }

usage() {
    cat <<EOF
usage: $0 [--root DIR] [--wheel FILE] [--uninstall]

  --root DIR     install under DIR (a packaging root or a test tree): no user, no chown, no systemctl
  --wheel FILE   install edge-agent from this wheel instead of building it from the checkout
  --uninstall    remove the venv and the units; keep /etc/edge-agent and /var/lib/edge-agent
  PYTHON=...     interpreter for the venv (default /usr/bin/python3, at least $MIN_PYTHON; not under
                 /root, /home, /run/user or /tmp, which the service cannot see)
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        --root) [ $# -ge 2 ] || die "--root needs a directory"; ROOT=$2; shift 2 ;;
        --root=*) ROOT=${1#--root=}; shift ;;
        --wheel) [ $# -ge 2 ] || die "--wheel needs a file"; WHEEL=$2; shift 2 ;;
        --wheel=*) WHEEL=${1#--wheel=}; shift ;;
        --uninstall) UNINSTALL=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

# An empty ROOT means the real system; "--root /" is the same thing.
if [ -n "$ROOT" ]; then
    mkdir -p "$ROOT" || die "cannot create $ROOT"
    ROOT=$(cd "$ROOT" && pwd -P)
    [ "$ROOT" = "/" ] && ROOT=""
fi
readonly ROOT
REAL_ROOT=0
[ -z "$ROOT" ] && REAL_ROOT=1
readonly REAL_ROOT

readonly OPT="$ROOT/opt/$NAME"
readonly VENV="$OPT/venv"
readonly STAMP="$VENV/.edge-agent-source"
readonly UNIT_DIR="$ROOT/etc/systemd/system"
readonly UNITS="edge-agent.service edge-agent@.service"
readonly CONF_DIR="$ROOT/etc/$NAME"
readonly ENV_FILE="$CONF_DIR/agent.env"
readonly STATE_DIR="$ROOT/var/lib/$NAME"

if [ "$REAL_ROOT" = 1 ] && [ "$(id -u)" != 0 ]; then
    die "installing into / needs root (sudo $0 ...); use --root DIR to stage a tree as another user"
fi

# systemd is the service manager only when PID 1 is systemd (sd_booted(3) checks this directory). In a
# container or a chroot it is not, and systemctl must not be called.
systemd_running() { [ "$REAL_ROOT" = 1 ] && [ -d /run/systemd/system ]; }

# install_file SRC DEST MODE: copy only when the content or the mode differs, so that a re-run leaves
# files (and their mtimes) alone.
install_file() {
    local src=$1 dest=$2 mode=$3
    [ -f "$src" ] || die "$src is missing from the checkout"
    if [ -f "$dest" ] && cmp -s "$src" "$dest"; then
        if [ "$(stat -c %a "$dest")" != "${mode#0}" ]; then
            chmod "$mode" "$dest"
            changed "mode $mode on $dest"
        fi
        return 0
    fi
    local what="installed"
    [ -e "$dest" ] && what="updated"
    install -D -m "$mode" "$src" "$dest"
    changed "$what $dest"
}

# ---------------------------------------------------------------------------------------------------------
uninstall() {
    say "removing $NAME${ROOT:+ from $ROOT}"
    if systemd_running; then
        # Stop and disable the plain unit and every instance of the template before their files go.
        local instances
        instances=$(systemctl list-units --all --plain --no-legend 'edge-agent@*.service' | awk '{print $1}')
        for unit in edge-agent.service $instances; do
            if systemctl is-active --quiet "$unit" || systemctl is-enabled --quiet "$unit" 2>/dev/null; then
                systemctl disable --now --quiet "$unit" && changed "stopped and disabled $unit"
            fi
        done
    fi
    # Enablement symlinks left in a staged tree (or of template instances systemd no longer lists).
    if [ -d "$UNIT_DIR" ]; then
        while IFS= read -r link; do
            rm -f "$link"
            changed "removed $link"
        done < <(find "$UNIT_DIR" -mindepth 2 -maxdepth 2 -type l \( -name 'edge-agent.service' -o -name 'edge-agent@*.service' \))
    fi
    for unit in $UNITS; do
        if [ -e "$UNIT_DIR/$unit" ]; then
            rm -f "$UNIT_DIR/$unit"
            changed "removed $UNIT_DIR/$unit"
        fi
    done
    if [ -d "$VENV" ]; then
        rm -rf "$VENV"
        changed "removed $VENV"
    fi
    if [ -e "$OPT/README.md" ]; then
        rm -f "$OPT/README.md"
        changed "removed $OPT/README.md"
    fi
    if [ -d "$OPT" ] && rmdir "$OPT" 2>/dev/null; then
        changed "removed $OPT"
    fi
    if systemd_running && [ "$CHANGES" -gt 0 ]; then
        systemctl daemon-reload
        systemctl reset-failed 'edge-agent.service' 'edge-agent@*.service' 2>/dev/null || true
    fi

    # Configuration, state and the user are the operator's: a reinstall picks them up again.
    local kept=0
    for dir in "$CONF_DIR" "$STATE_DIR" "$UNIT_DIR/edge-agent.service.d" "$UNIT_DIR/edge-agent@.service.d"; do
        if [ -e "$dir" ]; then
            say "kept $dir"
            kept=1
        fi
    done
    if [ "$REAL_ROOT" = 1 ] && getent passwd "$NAME" >/dev/null; then
        say "kept user $NAME (it owns the state)"
        kept=1
    fi
    if [ "$kept" = 1 ]; then
        local purge="rm -rf $CONF_DIR $STATE_DIR"
        [ "$REAL_ROOT" = 1 ] && purge="$purge; userdel $NAME"
        say "a reinstall uses them again; to remove them for good: $purge"
    fi
    if [ "$CHANGES" = 0 ]; then
        say "$NAME was not installed${ROOT:+ in $ROOT}: nothing removed"
    else
        say "removed ($CHANGES changes)"
    fi
}

# ---------------------------------------------------------------------------------------------------------
check_python() {
    command -v "$PYTHON" >/dev/null 2>&1 || die "no Python interpreter '$PYTHON' (set PYTHON=/path/to/python3.11 or newer)"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$PYTHON is Python $("$PYTHON" -c 'import platform; print(platform.python_version())'); edge-agent needs $MIN_PYTHON or newer (set PYTHON=...)"
    check_visible
    # Debian and Ubuntu ship venv's pip bootstrap separately.
    "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null \
        || die "$PYTHON cannot create virtual environments: install python3-venv (apt-get install python3-venv)"
}

# The venv's python is a link to this interpreter, and its standard library stays where the interpreter has
# it: both must be visible to the service. The unit's ProtectHome=yes hides /root, /home and /run/user, and
# PrivateTmp=yes gives it a /tmp of its own, so a venv built on an interpreter there fails every start with
# "No such file or directory" (status 203/EXEC), although it runs fine from the shell that installed it.
check_visible() {
    local where path
    where=$("$PYTHON" -c 'import os, sys; print(os.path.realpath(sys.executable)); print(os.path.realpath(sys.base_prefix))') \
        || die "$PYTHON could not say where it is installed"
    while IFS= read -r path; do
        case "$path/" in
            /root/*|/home/*|/run/user/*|/tmp/*|/var/tmp/*)
                die "$PYTHON is $path: the service could not run it. Its unit's ProtectHome=yes and PrivateTmp=yes hide /root, /home, /run/user and /tmp from it. Choose a system interpreter, e.g. PYTHON=/usr/bin/python3.12 $0 (default: /usr/bin/python3)" ;;
        esac
    done <<< "$where"
    say "using $PYTHON ($(head -n 1 <<< "$where"), Python $("$PYTHON" -c 'import platform; print(platform.python_version())'))"
}

# What the venv is built from: the interpreter and a hash of the package source. Equal stamps mean the
# venv already holds exactly this, and a re-run leaves it alone.
source_stamp() {
    "$PYTHON" -c 'import os, sys; print("python", os.path.realpath(sys.executable), sys.version.split()[0])'
    if [ -n "$WHEEL" ]; then
        printf 'wheel %s %s\n' "$(basename "$WHEEL")" "$(sha256sum < "$WHEEL" | cut -d' ' -f1)"
    else
        printf 'checkout %s\n' "$(cd "$SRC" && find agent pyproject.toml README.md -type f \
            ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum \
            | sha256sum | cut -d' ' -f1)"
    fi
}

install_venv() {
    local stamp
    stamp=$(source_stamp)
    if [ -x "$VENV/bin/$NAME" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$stamp" ]; then
        return 0
    fi
    local target="$SRC"
    [ -n "$WHEEL" ] && target="$WHEEL"
    say "building $VENV from $target (pip, about a minute)"
    # The venv is built where it will run (its scripts name their interpreter by absolute path). An
    # existing one is moved aside and comes back if the build fails, so a failed upgrade leaves the
    # previous version in place.
    mkdir -p "$OPT"
    rm -rf "$VENV.previous"
    [ -d "$VENV" ] && mv "$VENV" "$VENV.previous"
    if "$PYTHON" -m venv "$VENV" \
        && "$VENV/bin/python" -m pip install --quiet --no-input --disable-pip-version-check "$target"; then
        printf '%s\n' "$stamp" > "$STAMP"
        rm -rf "$VENV.previous"
        changed "installed $("$VENV/bin/$NAME" --version 2>/dev/null || echo "$NAME") into $VENV"
    else
        rm -rf "$VENV"
        [ -d "$VENV.previous" ] && mv "$VENV.previous" "$VENV"
        die "could not build the venv (pip's message above); ${VENV} is unchanged"
    fi
}

ensure_user() {
    # A static system user, not DynamicUser=: see the unit's comments.
    if ! getent group "$NAME" >/dev/null; then
        groupadd --system "$NAME" || die "groupadd failed"
        changed "created group $NAME"
    fi
    if ! getent passwd "$NAME" >/dev/null; then
        useradd --system --gid "$NAME" --home-dir "/var/lib/$NAME" --no-create-home \
            --shell /usr/sbin/nologin --comment "edge-agent daemon" "$NAME" || die "useradd failed"
        changed "created user $NAME"
    fi
}

install_config() {
    if [ ! -d "$CONF_DIR" ]; then
        install -d -m 0755 "$CONF_DIR"
        changed "created $CONF_DIR"
    fi
    if [ -e "$ENV_FILE" ]; then
        # The operator's file: never touched, but an unsafe mode is worth a word.
        case "$(stat -c %a "$ENV_FILE")" in
            *[1-7]) say "warning: $ENV_FILE is readable by other users; it may hold secrets (chmod 0640 $ENV_FILE)" ;;
        esac
        return 0
    fi
    # Owner and group only on the real system: in a staged tree the file keeps the caller's ownership.
    if [ "$REAL_ROOT" = 1 ]; then
        install -m 0640 -o root -g "$NAME" "$SRC/deploy/agent.env.example" "$ENV_FILE"
        changed "installed $ENV_FILE from deploy/agent.env.example (mode 0640, root:$NAME): edit it"
    else
        install -m 0640 "$SRC/deploy/agent.env.example" "$ENV_FILE"
        changed "installed $ENV_FILE from deploy/agent.env.example (mode 0640; owner left to the package)"
    fi
}

install_all() {
    say "installing $NAME${ROOT:+ into $ROOT}"
    check_python
    if [ -n "$WHEEL" ]; then
        [ -f "$WHEEL" ] || die "no such wheel: $WHEEL"
        WHEEL=$(cd "$(dirname "$WHEEL")" && pwd -P)/$(basename "$WHEEL")
    else
        [ -f "$SRC/pyproject.toml" ] || die "$SRC is not an edge-agent checkout (no pyproject.toml); use --wheel FILE"
    fi
    [ "$REAL_ROOT" = 1 ] && ensure_user

    install_venv
    install_file "$SRC/README.md" "$OPT/README.md" 0644
    local units_changed=$CHANGES
    for unit in $UNITS; do
        install_file "$SRC/systemd/$unit" "$UNIT_DIR/$unit" 0644
    done
    units_changed=$((CHANGES - units_changed))
    install_config

    if [ "$units_changed" -gt 0 ]; then
        if systemd_running; then
            systemctl daemon-reload
            changed "systemctl daemon-reload"
        elif [ "$REAL_ROOT" = 1 ]; then
            say "systemd is not running here (PID 1 is not systemd): skipped systemctl daemon-reload"
        fi
    fi

    if [ "$CHANGES" = 0 ]; then
        say "$NAME is installed and up to date${ROOT:+ in $ROOT}: nothing changed"
        return 0
    fi
    say "done ($CHANGES changes)"
    if systemd_running && systemctl is-active --quiet edge-agent.service; then
        say "edge-agent.service still runs the previous version: systemctl restart edge-agent"
    elif [ "$REAL_ROOT" = 1 ]; then
        say "next: edit $ENV_FILE, check it with '$VENV/bin/$NAME check-config --env-file $ENV_FILE',"
        say "      then: systemctl enable --now edge-agent"
    fi
}

if [ "$UNINSTALL" = 1 ]; then
    [ -z "$WHEEL" ] || die "--wheel makes no sense with --uninstall"
    uninstall
else
    install_all
fi

"""Command line: arguments → settings → logging → daemon. The only module that exits the process."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from agent import __version__
from agent.config import DEFAULT_ENV_FILE, Settings, load_settings, redacted
from agent.errors import ConfigError

EX_CONFIG = 78  # sysexits.h: configuration error; systemd's RestartPreventExitStatus=78 stops restart loops


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description="Smart-city gateway agent.")
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def env_file_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--env-file",
            type=Path,
            default=None,
            help=f"settings file of EDGE_AGENT_* lines (default: {DEFAULT_ENV_FILE} when it exists)",
        )

    run = sub.add_parser("run", help="run the daemon")
    env_file_option(run)
    check = sub.add_parser("check-config", help="validate the settings and print them with secrets redacted")
    env_file_option(check)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    explicit = args.env_file is not None
    from agent.tasks import default_registry  # late: entry points load only once settings parse

    settings = load_settings(args.env_file if explicit else DEFAULT_ENV_FILE, explicit=explicit)
    default_registry().check_routes(settings.routes)
    return settings


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"edge-agent: configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG

    if args.command == "check-config":
        json.dump(redacted(settings), sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return 0

    from agent import daemon, telemetry

    telemetry.configure_logging(settings)
    env_file = args.env_file if args.env_file is not None else DEFAULT_ENV_FILE
    telemetry.warn_if_world_readable(env_file, telemetry.get_logger("agent.cli"))
    try:
        # SIGHUP re-reads the same sources; a bad new value is logged and the running settings stay.
        return daemon.run(settings, reload=lambda: _settings(args))
    except ConfigError as exc:
        # Raised while opening the store or the TLS context: still before connecting anywhere.
        print(f"edge-agent: configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG


if __name__ == "__main__":
    sys.exit(main())

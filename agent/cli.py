"""Command line: arguments → settings → logging → daemon. The only module that exits the process."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agent import __version__
from agent.config import DEFAULT_ENV_FILE, Route, Settings, Sources, load_settings, redacted
from agent.errors import ConfigError

EX_CONFIG = 78  # sysexits.h: configuration error; systemd's RestartPreventExitStatus=78 stops restart loops
EX_USAGE = 2  # bad command-line input (argparse uses 2 as well)


_OWN_OPTIONS = ("devcloud", "demo", "dead-letters", "archive")  # subcommands whose modules add their options


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line (the only top-level option, --version, takes no value)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """``command``: the subcommand about to run, when known; the modules that add the options of the others
    (devcloud, demo, dead-letters) are then not imported, so `run` loads only what the daemon needs."""
    everything = command not in _COMMANDS
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

    def instance_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--instance", metavar="NAME", default=None,
                       help="the instance name of edge-agent@NAME: the agent id unless EDGE_AGENT_AGENT_ID is set")

    run = sub.add_parser(
        "run", help="run the daemon", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="signals:\n"
               "  SIGTERM, SIGINT  stop: finish running tasks, keep the rest in the store, exit 0\n"
               "  SIGHUP           reload routes and decision settings from the settings file\n"
               "  SIGUSR1          retire: unsubscribe, finish all it holds, end the broker session, exit 0",
    )
    env_file_option(run)
    instance_option(run)
    check = sub.add_parser("check-config", help="validate the settings and print them with secrets redacted")
    env_file_option(check)
    instance_option(check)
    reload = sub.add_parser(
        "reload", help="make a running agent re-read its settings (SIGHUP) and wait for the outcome",
        description="Sends SIGHUP to the agent, waits until it has read its settings again and prints what it "
        "found: every problem, and each changed setting that waits for a restart. Exit status 1 when the new "
        "settings are invalid (the agent keeps its running ones), the reload was ignored or no outcome came. "
        "The units run it as ExecReload=, so `systemctl reload` waits for it and fails with it.")
    reload.add_argument("--pid", type=_positive_int, required=True, help="the agent's process id ($MAINPID)")
    reload.add_argument("--state-dir", type=Path, default=None,
                        help="where the agent writes the outcome: its state directory (default: $STATE_DIRECTORY, "
                        "which systemd sets for ExecReload=, else /var/lib/edge-agent)")
    reload.add_argument("--timeout", type=_positive_float, default=30.0,
                        help="seconds to wait for the outcome (default 30)")

    explain = sub.add_parser(
        "explain",
        help="show both expected totals of one task, term by term, and where it would run",
        description="The settings decide as the agent would (priors, routes, cloud URL, payload bound); the "
        "figures below replace the priors. --live asks the running agent instead, with its own estimates.",
    )
    env_file_option(explain)
    explain.add_argument("--kind", help="task kind, e.g. noise.spectrum (default: the task of --topic's route)")
    explain.add_argument("--bytes", type=_non_negative_int,
                         help="input size in bytes (with --archive: the segment's, default: the route's recent ones)")
    explain.add_argument("--archive", metavar="ROUTE",
                         help="price an archive route's next segment on the gateway and in the cloud, term by term "
                         "(docs/archive.md)")
    explain.add_argument("--topic", help="a message's topic: its first matching route gives the task and placement")
    explain.add_argument("--live", action="store_true",
                         help="ask the running agent (its metrics port): its estimates, queues and lease now")
    explain.add_argument("--uplink-mbps", type=_positive_float, help="uplink bandwidth (default: the prior)")
    explain.add_argument("--downlink-mbps", type=_positive_float, help="downlink bandwidth (default: the prior)")
    explain.add_argument("--rtt-ms", type=_non_negative_float, help="round trip to the cloud (default: the prior)")
    explain.add_argument("--provisioning-s", type=_non_negative_float, help="time to start a lease")
    explain.add_argument("--warm", action="store_true", help="a ready lease exists (no provisioning term)")
    explain.add_argument("--backlog", type=_non_negative_int,
                         help="tasks of this kind and size already queued or running on the gateway (default 0)")
    explain.add_argument("--uplink-queued-bytes", type=_non_negative_int,
                         help="other inputs already waiting on the uplink (default 0)")
    explain.add_argument("--workers", type=_positive_int, help="gateway workers (default: EDGE_AGENT_LOCAL__WORKERS)")
    explain.add_argument("--placement", choices=("auto", "local", "cloud"),
                         help="instead of the route's (default: the route's with --topic, else auto)")
    explain.add_argument("--no-cloud", action="store_true", help="as if EDGE_AGENT_CLOUD__URL were unset")
    explain.add_argument("--circuit-open", action="store_true", help="as if the cloud circuit breaker were open")
    explain.add_argument("--json", action="store_true", help="print the decision and estimates as JSON")

    status = sub.add_parser(
        "status", help="one screen from the running agent: broker, routes, rates, backlog, store, cloud, errors",
        description="Asks the running agent over its metrics port (EDGE_AGENT_METRICS__HOST, __PORT in the "
        "settings file). Exit status 3 when it is not running, 4 when it serves no status (metrics off).")
    env_file_option(status)
    status.add_argument("--json", action="store_true", help="print the status as JSON")

    replay = sub.add_parser(
        "replay",
        help="replay a real bandwidth trace and a workload through the policy and baselines",
        description="Trace format is detected from the content: Mahimahi (one ms timestamp per line) or two "
        "columns 'time_s Mbps'. The decision settings are the defaults unless --env-file is given.",
    )
    replay.add_argument("--uplink", type=Path, required=True, help="uplink trace")
    replay.add_argument("--downlink", type=Path, help="downlink trace (default: the uplink's)")
    replay.add_argument("--seed", type=int, default=1, help="seed of the workload's random draws (default 1)")
    replay.add_argument("--workload", type=Path, help="workload JSON (default: the documented mix)")
    replay.add_argument("--env-file", type=Path, help="take EDGE_AGENT_DECISION__* settings from this file")
    replay.add_argument("--json", action="store_true", help="print the summary as JSON")
    replay.add_argument("--plot", type=Path, metavar="FILE.png", help="draw bandwidth and decisions (needs [plot])")

    devcloud = sub.add_parser(
        "devcloud", help="run the reference resource API server (needs the [devcloud] extra)",
        description="The resource API (docs/design.md#resource-api) for tests and demos, with knobs for "
        "provisioning delay, latency, bandwidth, errors and outages.")
    if everything or command == "devcloud":
        from agent.devcloud.cli import build_parser as devcloud_options  # imports no web framework

        devcloud_options(devcloud)

    demo = sub.add_parser(
        "demo", help="see it work: embedded broker, devcloud, simulated devices and the agent, with a live view "
        "(needs the [demo] extra)",
        description="Runs everything on this machine: an MQTT broker (amqtt, unless --broker), the devcloud, "
        "devices replaying CityPulse Aarhus rows and synthetic audio, a cloud uplink following a real bandwidth "
        "trace, and the agent as a subprocess. Ctrl-C stops it all.")
    if everything or command == "demo":
        from agent.demo.options import build_parser as demo_options  # imports neither rich nor amqtt

        demo_options(demo)

    if everything or command == "dead-letters":
        from agent.deadletter_admin import add_parser as dead_letter_options  # imports no store, no paho

        dead_letter_options(sub, env_file_option)
    if everything or command == "archive":
        from agent.archive.cli import add_parser as archive_options  # imports no S3 client, no paho

        archive_options(sub, env_file_option)
    return parser


_COMMANDS = ("run", "check-config", "reload", "explain", "status", "replay", *_OWN_OPTIONS)


def _number(kind: type[int] | type[float], minimum: float, strict: bool) -> Callable[[str], Any]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum:g}: {text!r}")
        return value

    return parse


_non_negative_int = _number(int, 0, strict=False)
_positive_int = _number(int, 0, strict=True)
_non_negative_float = _number(float, 0.0, strict=False)
_positive_float = _number(float, 0.0, strict=True)


def _sources(args: argparse.Namespace) -> Sources:
    explicit = args.env_file is not None

    def check_routes(routes: Sequence[Route]) -> list[tuple[str, str]]:
        from agent.tasks import default_registry  # late: entry points load only once the routes parse

        return default_registry().route_problems(routes)

    return Sources(args.env_file if explicit else DEFAULT_ENV_FILE, explicit=explicit, check_routes=check_routes,
                   instance=getattr(args, "instance", None))


def _config_error(exc: ConfigError) -> int:
    # One line per problem, each naming its variable, so that all of them are fixed in one go.
    for variable, problem in exc.problems:
        print(f"edge-agent: configuration error: {variable}: {problem}", file=sys.stderr)
    return EX_CONFIG


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`edge-agent explain … | head -3`): not an error worth a traceback. stdout now
        # points at /dev/null, so the interpreter's last flush at exit cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE  # what a tool killed by SIGPIPE reports


def _main(argv: list[str] | None) -> int:
    args = _parser(_command(sys.argv[1:] if argv is None else argv)).parse_args(argv)
    if args.command == "replay":
        return _replay(args)
    if args.command == "devcloud":
        from agent.devcloud.cli import run as run_devcloud

        return run_devcloud(args)
    if args.command == "demo":
        from agent.demo.run import main as run_demo

        return run_demo(args)
    if args.command == "reload":
        return _reload(args)  # reads no settings: the file it is about may be the invalid one
    if args.command == "archive" and args.archive_command == "replay":
        from agent.archive.replay import run as archive_replay  # a simulation: no settings

        return archive_replay(args)
    sources = _sources(args)
    try:
        settings = sources.load()
    except ConfigError as exc:
        return _config_error(exc)

    if args.command == "check-config":
        json.dump(redacted(settings), sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return 0
    if args.command == "explain":
        return _explain(args, settings)
    if args.command == "dead-letters":
        from agent.deadletter_admin import run as dead_letters

        try:
            return dead_letters(args, settings)
        except ConfigError as exc:  # no store there, or one a newer version wrote
            return _config_error(exc)
    if args.command == "status":
        return _status(args, settings)
    if args.command == "archive":
        from agent.archive.cli import run as archive

        return archive(args, settings)

    import faulthandler

    from agent import daemon, telemetry

    # A watchdog timeout ends us with SIGABRT: leave every thread's traceback in the journal first.
    faulthandler.enable()
    telemetry.configure_logging(settings)
    env_file = args.env_file if args.env_file is not None else DEFAULT_ENV_FILE
    telemetry.warn_if_world_readable(env_file, telemetry.get_logger("agent.cli"))
    try:
        # SIGHUP re-reads the same sources; a bad new value is logged and the running settings stay.
        return daemon.run(settings, reload=sources.reload)
    except ConfigError as exc:
        # Raised while opening the store or the TLS context: still before connecting anywhere.
        return _config_error(exc)


def _reload(args: argparse.Namespace) -> int:
    from agent.config import default_state_dir
    from agent.reload import ReloadError, describe, request

    directory = args.state_dir or default_state_dir()
    try:
        outcome = request(args.pid, directory, args.timeout)
    except ReloadError as exc:
        print(f"edge-agent reload: {exc}", file=sys.stderr)
        return 1
    lines, ok = describe(outcome)
    # Failures on stderr, the rest on stdout: under systemd both reach the journal and `systemctl status`.
    for line in lines:
        print(f"edge-agent reload: {line}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


_WHAT_IFS = ("uplink_mbps", "downlink_mbps", "rtt_ms", "provisioning_s", "warm", "backlog", "uplink_queued_bytes",
             "workers", "no_cloud", "circuit_open")


def _explain(args: argparse.Namespace, settings: Settings) -> int:
    from agent import introspect, status
    from agent.decision.explain import Scenario, render
    from agent.ingress import Router
    from agent.tasks import default_registry

    if args.archive is not None:
        from agent.archive.cli import explain as explain_archive

        return explain_archive(args, settings)
    if args.kind is None and args.topic is None:
        print("edge-agent explain: give --kind, --topic or both", file=sys.stderr)
        return EX_USAGE
    if args.bytes is None:
        print("edge-agent explain: give --bytes, the input's size", file=sys.stderr)
        return EX_USAGE
    url = None
    try:
        if args.live:
            given = [f"--{name.replace('_', '-')}" for name in _WHAT_IFS if getattr(args, name) not in (None, False)]
            if given:
                print(f"edge-agent explain: --live explains with the running agent's own figures; leave out "
                      f"{', '.join(given)}", file=sys.stderr)
                return EX_USAGE
            params = {"bytes": str(args.bytes), "kind": args.kind, "topic": args.topic, "placement": args.placement}
            url = status.agent_url(settings)
            out = status.fetch(settings, "/explain", {k: v for k, v in params.items() if v is not None})
        else:
            scenario = Scenario(
                kind=args.kind or "", in_bytes=args.bytes, uplink_mbps=args.uplink_mbps,
                downlink_mbps=args.downlink_mbps, rtt_s=None if args.rtt_ms is None else args.rtt_ms / 1000.0,
                provisioning_s=args.provisioning_s, local_backlog=args.backlog or 0,
                uplink_queued_bytes=args.uplink_queued_bytes or 0, lease_warm=args.warm,
                local_workers=args.workers or settings.local.workers, cloud_available=not args.no_cloud,
                circuit_open=args.circuit_open)
            out = introspect.explain_settings(settings, default_registry(), Router(settings.routes), scenario,
                                              kind=args.kind, topic=args.topic, placement=args.placement)
    except introspect.Unanswerable as exc:
        print(f"edge-agent explain: {exc}", file=sys.stderr)
        return EX_USAGE
    except status.AgentUnreachable as exc:
        print(f"edge-agent explain: {exc}", file=sys.stderr)
        return exc.exit_status
    for warning in out["warnings"]:
        print(f"edge-agent explain: warning: {warning}", file=sys.stderr)
    if args.json:
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(render(out, url))
    return 0


def _status(args: argparse.Namespace, settings: Settings) -> int:
    from agent import status

    try:
        out = status.fetch(settings, "/status")
    except status.AgentUnreachable as exc:
        print(f"edge-agent status: {exc}", file=sys.stderr)
        return exc.exit_status
    if args.json:
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(status.render_status(out))
    return 0


def _replay(args: argparse.Namespace) -> int:
    from agent.config import DecisionSettings
    from agent.replay import TraceError, as_json, format_table, load_workload, run_replay
    from agent.replay.workload import DEFAULT_WORKLOAD

    try:
        # Replays are comparable only with fixed settings: the defaults, unless a file is named.
        decision = load_settings(args.env_file, explicit=True).decision if args.env_file else DecisionSettings()
        workload = load_workload(args.workload) if args.workload else DEFAULT_WORKLOAD
    except ConfigError as exc:
        return _config_error(exc)
    except ValueError as exc:
        print(f"edge-agent replay: {exc}", file=sys.stderr)
        return EX_USAGE
    try:
        result = run_replay(args.uplink, args.downlink, seed=args.seed, workload=workload, settings=decision)
    except TraceError as exc:
        print(f"edge-agent replay: {exc}", file=sys.stderr)
        return EX_USAGE
    if args.json:
        json.dump(as_json(result), sys.stdout)
        sys.stdout.write("\n")
    else:
        print(format_table(result))
    if args.plot:
        from agent.replay.plot import PlotUnavailable, plot_replay

        try:
            plot_replay(result, args.plot)
        except PlotUnavailable as exc:
            print(f"edge-agent replay: {exc}", file=sys.stderr)
            return EX_USAGE
        except OSError as exc:
            print(f"edge-agent replay: cannot write {args.plot}: {exc.strerror}", file=sys.stderr)
            return EX_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())

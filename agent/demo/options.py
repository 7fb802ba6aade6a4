"""The demo's command line options; imports nothing heavy, so ``edge-agent --help`` stays fast and dependency-free."""

from __future__ import annotations

import argparse
from pathlib import Path

from agent.data import CITYPULSE_DIR, DEFAULT_UPLINK


def _broker_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return value


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--duration", type=_positive, default=None, metavar="S",
                        help="stop after S seconds (default: run until Ctrl-C)")
    parser.add_argument("--broker", type=_broker_address, default=None, metavar="HOST:PORT",
                        help="use this MQTT broker instead of the embedded one (amqtt)")
    parser.add_argument("--protocol", choices=("5", "3.1.1"), default=None,
                        help="MQTT version the agent speaks (default: 3.1.1 with the embedded broker, which knows "
                        "no other; 5 with --broker)")
    parser.add_argument("--data", type=Path, default=CITYPULSE_DIR, metavar="DIR",
                        help="CityPulse Aarhus CSVs the simulated sensors replay (default: the sample shipped "
                        "with the package)")
    parser.add_argument("--uplink", type=Path, default=DEFAULT_UPLINK, metavar="TRACE",
                        help="bandwidth trace the cloud uplink follows, Mahimahi or 'time_s Mbps' "
                        f"(default: {DEFAULT_UPLINK.parent.name}/{DEFAULT_UPLINK.name}, shipped with the package)")
    parser.add_argument("--trace-speed", type=_positive, default=1.0, metavar="X",
                        help="trace seconds played per demo second (default: 1, real time; 2 plays a 120 s trace "
                        "in 60 s)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the simulated devices (default: 1)")
    return parser

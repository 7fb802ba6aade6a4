"""``edge-agent devcloud`` / ``python -m agent.devcloud``: run the reference resource API, or export its OpenAPI."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import sys
from pathlib import Path

from pydantic import ValidationError

from agent.config import LogSettings, Settings
from agent.devcloud.knobs import Knobs

TOKEN_ENV = "EDGE_AGENT_DEVCLOUD_TOKEN"  # noqa: S105 - the variable's name, not a token
OPENAPI_PATH = Path("deploy/openapi/resource-api.json")
# The bandwidth cap is applied as the app reads a task's body, but the kernel acknowledges whatever it buffers
# for the app, and Linux grows a connection's receive buffer to megabytes: a client would see the cloud
# acknowledge its whole upload long before the cap let it through. With a small buffer the acknowledgements
# follow the capped reading, as on a real link, whose bottleneck lies before the server.
RECEIVE_BUFFER_BYTES = 16 * 1024


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The devcloud's options; pass a subparser to add them to another command line (``edge-agent devcloud``)."""
    parser = parser or argparse.ArgumentParser(prog="edge-agent devcloud",
                                               description="Reference resource API server for tests and demos.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default: 8080)")
    parser.add_argument("--token", default=None,
                        help=f"bearer token clients must send (default: ${TOKEN_ENV}, else a random one, printed)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="worker processes shared by all leases (default: CPU count)")
    parser.add_argument("--max-body-bytes", type=int, default=32 * 1024 * 1024, help="largest task input")
    parser.add_argument("--tls-cert", type=Path, default=None, metavar="PEM",
                        help="serve HTTPS with this certificate (chain) …")
    parser.add_argument("--tls-key", type=Path, default=None, metavar="PEM", help="… and this private key")
    parser.add_argument("--storage", action="store_true",
                        help="offer storage resources, on an S3-compatible server process it starts (moto)")
    knobs = parser.add_argument_group("fault and network injection (also POST /admin/knobs at run time)")
    defaults = Knobs()
    knobs.add_argument("--provisioning-delay", type=float, default=defaults.provisioning_delay_s,
                       help=f"seconds until a new lease is ready (default: {defaults.provisioning_delay_s})")
    knobs.add_argument("--latency", type=float, default=defaults.latency_s, help="seconds added to every API call")
    knobs.add_argument("--bandwidth", type=float, default=defaults.bandwidth_bytes_per_s,
                       help="cap in bytes/s on task uploads and downloads; 0 = none")
    knobs.add_argument("--error-rate", type=float, default=defaults.error_rate,
                       help="share of API calls answered 503 with Retry-After (0-1)")
    knobs.add_argument("--outage", action="store_true", help="start with every API call answered 503")
    knobs.add_argument("--retry-after", type=int, default=defaults.retry_after_s,
                       help="Retry-After seconds of injected 429/503 answers")
    knobs.add_argument("--lease-ttl", type=float, default=defaults.lease_ttl_s, help="lease lifetime in seconds")
    knobs.add_argument("--credentials-ttl", type=float, default=defaults.credentials_ttl_s,
                       help=f"lifetime of storage credentials in seconds (default: {defaults.credentials_ttl_s})")
    knobs.add_argument("--storage-gb-bytes", type=int, default=defaults.storage_gb_bytes,
                       help="bytes per GB of a storage resource's quota (default: 10^9; smaller fills it quickly)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    parser.add_argument("--access-log", action="store_true", help="log every request")
    parser.add_argument("--export-openapi", type=Path, metavar="PATH", default=None,
                        help=f"write the OpenAPI document to PATH (e.g. {OPENAPI_PATH}) and exit")
    return parser


def openapi_text() -> str:
    """The exported OpenAPI document, byte for byte as ``deploy/openapi/resource-api.json`` holds it."""
    from agent.devcloud.app import DevCloudConfig, create_app

    schema = create_app(DevCloudConfig(token="unused")).openapi()  # noqa: S106 - no server runs
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Run with parsed arguments (for a parent command line that added :func:`build_parser`'s options)."""
    # FastAPI and uvicorn belong to the optional extra: import them only when the devcloud is used.
    try:
        import uvicorn

        from agent.devcloud.app import DevCloudConfig, create_app
    except ImportError as exc:
        print(f"the devcloud needs the devcloud extra: pip install 'edge-agent[devcloud]' ({exc})", file=sys.stderr)
        return 1
    if args.export_openapi is not None:
        args.export_openapi.parent.mkdir(parents=True, exist_ok=True)
        args.export_openapi.write_text(openapi_text(), encoding="utf-8")
        return 0
    try:
        knobs = Knobs(provisioning_delay_s=args.provisioning_delay, latency_s=args.latency,
                      bandwidth_bytes_per_s=args.bandwidth, error_rate=args.error_rate, outage=args.outage,
                      retry_after_s=args.retry_after, lease_ttl_s=args.lease_ttl,
                      credentials_ttl_s=args.credentials_ttl, storage_gb_bytes=args.storage_gb_bytes)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        print(f"devcloud: {'.'.join(map(str, error['loc']))}: {error['msg']}", file=sys.stderr)
        return 2
    if args.workers < 1 or args.max_body_bytes < 1:
        print("devcloud: --workers and --max-body-bytes must be positive", file=sys.stderr)
        return 2
    if (args.tls_cert is None) != (args.tls_key is None):
        print("devcloud: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        token = secrets.token_urlsafe(24)
        print(f"devcloud token: {token}", file=sys.stderr)

    from agent.telemetry import configure_logging, register_secret

    configure_logging(Settings.model_construct(log=LogSettings(level=args.log_level)))
    register_secret(token)
    app = create_app(DevCloudConfig(token=token, workers=args.workers, max_body_bytes=args.max_body_bytes,
                                    knobs=knobs, storage=args.storage))
    config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None, access_log=args.access_log,
                            lifespan="on", timeout_graceful_shutdown=5,
                            ssl_certfile=str(args.tls_cert) if args.tls_cert else None,
                            ssl_keyfile=str(args.tls_key) if args.tls_key else None)

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            # Connections inherit the listening socket's buffer size (set before any client connects).
            for listener in self.servers:
                for sock in listener.sockets:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)

    server = Server(config)
    server.run()
    # uvicorn returns normally also when it could not bind or start the app; it says why in the log.
    return 0 if server.started else 1

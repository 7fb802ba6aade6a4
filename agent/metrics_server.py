"""The HTTP server of /metrics, /healthz, /readyz and the JSON endpoints (``agent.metrics`` says what each
answers). Its own module because http.server (with email, html and mimetypes) costs the daemon about 3 MB of
memory for its whole life: it is imported only when ``EDGE_AGENT_METRICS__PORT`` is not 0.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from agent.errors import ConfigError
from agent.metrics import AgentCollector, JsonEndpoint, is_local_client
from agent.telemetry import get_logger

if TYPE_CHECKING:
    from prometheus_client import Metric

log = get_logger(__name__)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], *, freebind: bool) -> None:
        self.address_family = socket.AF_INET6 if ipaddress.ip_address(address[0]).version == 6 else socket.AF_INET
        self._freebind = freebind
        super().__init__(address, handler)

    def server_bind(self) -> None:
        if self._freebind:
            # The address is not (yet) on any interface, e.g. a management VLAN still coming up at boot: listen
            # anyway, so the agent need not be restarted once it appears.
            self.socket.setsockopt(socket.SOL_IP, getattr(socket, "IP_FREEBIND", 15), 1)
        super().server_bind()


def _bind(host: str, port: int, handler: type[BaseHTTPRequestHandler]) -> tuple[_Server, bool]:
    """The listening server, and whether the address had to be bound before it exists on this machine."""
    try:
        return _Server((host, port), handler, freebind=False), False
    except OSError as exc:
        if exc.errno != errno.EADDRNOTAVAIL or ipaddress.ip_address(host).is_loopback:
            raise
    return _Server((host, port), handler, freebind=True), True


class MetricsServer:
    """A small threaded HTTP server: /metrics, /healthz (the agent's loops are alive), /readyz (it can work),
    and JSON endpoints for clients on this machine only."""

    def __init__(self, port: int, collector: AgentCollector, *, healthy: Callable[[], tuple[bool, str]],
                 ready: Callable[[], tuple[bool, str]], host: str = "127.0.0.1",
                 endpoints: Mapping[str, JsonEndpoint] | None = None) -> None:
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.registry import Collector

        class Scraped(Collector):
            def collect(self) -> Iterable[Metric]:
                return collector.collect()

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(Scraped())
        registry = self.registry
        json_endpoints = dict(endpoints or {})
        known = ", ".join(["/metrics", "/healthz", "/readyz", *json_endpoints])

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path, _, query = self.path.partition("?")
                if path == "/metrics":
                    self._answer(200, generate_latest(registry), "text/plain; version=0.0.4; charset=utf-8")
                elif path in ("/healthz", "/readyz"):
                    ok, detail = (healthy if path == "/healthz" else ready)()
                    self._answer(200 if ok else 503, (detail + "\n").encode(), "text/plain; charset=utf-8")
                elif path in json_endpoints:
                    if not is_local_client(self.client_address[0], self.connection.getsockname()[0]):
                        self._json(403, {"error": f"{path} answers clients on the gateway only "
                                                  "(it names the broker, the cloud and the routes)"})
                        return
                    try:
                        status, body = json_endpoints[path](dict(parse_qsl(query)))
                    except Exception as exc:  # an answer beats a dropped connection
                        log.exception("status_endpoint_failed", path=path)
                        status, body = 500, {"error": f"{type(exc).__name__}: {exc}"}
                    self._json(status, body)
                else:
                    self._answer(404, f"not found: try {known}\n".encode(), "text/plain")

            def _json(self, status: int, body: Any) -> None:
                self._answer(status, json.dumps(body).encode(), "application/json")

            def _answer(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return  # scrapes every few seconds would flood the journal

        try:
            self._server, not_here = _bind(host, port, Handler)
        except OSError as exc:
            # A port in use or reserved is the port's fault; anything else (no IPv6 here) the address's.
            variable = "PORT" if exc.errno in (errno.EADDRINUSE, errno.EACCES) else "HOST"
            raise ConfigError(f"EDGE_AGENT_METRICS__{variable}", f"cannot listen on {_url_host(host)}:{port}: "
                              f"{exc.strerror}") from exc
        self.host = host
        self.port = int(self._server.server_address[1])
        self._not_here = not_here
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.port}"

    def start(self) -> None:
        self._thread.start()
        log.info("metrics_listening", url=f"{self.url}/metrics")
        if self._not_here:
            log.warning("metrics_address_not_here", host=self.host,
                        detail="no interface has this address yet: /metrics answers once one has it "
                        "(check EDGE_AGENT_METRICS__HOST if it never does)")

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host

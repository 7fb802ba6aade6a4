"""When a task's input has crossed the uplink, seen from the kernel's send queue of its connection.

The resource API answers a task only after running it (docs/design.md#resource-api), so the answer cannot say
when the upload ended. The gateway's own kernel can: once httpcore has handed the whole body to the socket
(``http11.send_request_body.complete`` in its ``trace`` extension), the bytes not yet acknowledged by the cloud
are the socket's send queue (Linux ``ioctl(SIOCOUTQ)``: unsent plus sent-but-unacknowledged). The upload has
ended when that queue is empty: the cloud's TCP stack has every byte. The queue is polled every
:data:`POLL_S` by one task, only while some upload's tail is in the kernel.

Over TLS the queue holds TLS records, a few percent larger than the body: close enough for a bandwidth figure.
An acknowledgement reaches the gateway about one round trip after the last byte left it, which the client
nets out (see ``CloudClient.submit``).

The socket of the connection that carries a request is not in httpcore's trace events when a pooled
connection is reused, so the connections come from :class:`WatchedBackend` (httpcore's documented
``network_backend`` hook): each of its streams, when written to, hands its socket to the upload of the request
being sent (a context variable, set around the request by the client).

Where this is not possible (not Linux, a transport other than :func:`watched_transport`'s, a proxy, a socket
that closed), the upload reports nothing here and the client measures it from the answer, as before.
"""

from __future__ import annotations

import asyncio
import contextvars
import ssl
import struct
import sys
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import httpcore
import httpx

try:
    import fcntl
    import termios
except ImportError:  # not a POSIX system
    _TIOCOUTQ: int | None = None
else:
    # SIOCOUTQ == TIOCOUTQ on Linux. Other systems have a TIOCOUTQ for terminals only, or none.
    _TIOCOUTQ = getattr(termios, "TIOCOUTQ", None) if sys.platform.startswith("linux") else None

# How often the send queues of uploads whose tail is in the kernel are read. An ioctl is about a microsecond;
# the loop wakes up 200 times a second, only while an upload is ending.
POLL_S = 0.005
# The connection pool's limits: httpx's defaults for a client.
LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0)
_INT = struct.Struct("i")
_ZERO = bytes(_INT.size)


class _Socket(Protocol):
    """A socket, or asyncio's wrapper of one (what httpcore's AnyIO streams give as ``"socket"``)."""

    def fileno(self) -> int:
        ...


def send_queue(sock: _Socket) -> int | None:
    """Bytes the kernel still holds for ``sock``: not sent, or sent and not acknowledged. None: unknown."""
    if _TIOCOUTQ is None:
        return None
    fd = sock.fileno()
    if fd < 0:  # closed (the number may belong to another socket by now)
        return None
    try:
        value: int = _INT.unpack(fcntl.ioctl(fd, _TIOCOUTQ, _ZERO))[0]
    except OSError:
        return None
    return value


def supported() -> bool:
    """True where the end of an upload can be seen in the kernel (Linux)."""
    return _TIOCOUTQ is not None


class Upload:
    """One request's body on its way out: when it started, when the kernel had all of it, and ``busy_at``, the
    last poll that still found bytes in the send queue. Times are the client's clock.
    """

    __slots__ = ("busy_at", "key", "sent", "sock", "started", "watch")

    def __init__(self, watch: UploadWatch, key: object) -> None:
        self.watch = watch
        self.key = key  # what the client reports against (its submission)
        self.sock: _Socket | None = None
        self.started: float | None = None
        self.sent: float | None = None
        self.busy_at: float | None = None

    async def trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's ``trace`` extension for this request."""
        if event == "http11.send_request_body.started":
            self.watch.started(self)
        elif event == "http11.send_request_body.complete":
            self.watch.sent(self)


_CURRENT: contextvars.ContextVar[Upload | None] = contextvars.ContextVar("agent_cloud_upload", default=None)


class UploadWatch:
    """The uploads in progress on the gateway's uplink, and the moment each one ends.

    ``on_end(upload, seconds, now)`` is called once per upload whose end was seen, with its share of the
    uplink's time: the time since the later of its own start and the previous upload's end (see
    :meth:`_ended`). ``rtt`` gives the round trip to net out of an interval that began on an idle link.
    """

    def __init__(self, clock: Callable[[], float], rtt: Callable[[], float],
                 on_end: Callable[[Upload, float, float], None]) -> None:
        self._clock = clock
        self._rtt = rtt
        self._on_end = on_end
        self._active: set[Upload] = set()  # started, not yet ended or abandoned
        self._tails: set[Upload] = set()  # … of which the kernel has the whole body
        self._last_end = float("-inf")
        self._poller: asyncio.Task[None] | None = None

    def begin(self, key: object) -> tuple[Upload, contextvars.Token[Upload | None]]:
        """An upload about to be sent in the current task: pass ``upload.trace`` as the request's
        ``trace`` extension, and :meth:`end` both after the request."""
        upload = Upload(self, key)
        return upload, _CURRENT.set(upload)

    def end(self, upload: Upload, token: contextvars.Token[Upload | None], answered: bool) -> None:
        """The request is over. ``answered``: the cloud sent an answer, so it had every byte of the body: an end
        not seen yet (a fast answer, within one poll) is dated at the last poll that found bytes queued."""
        _CURRENT.reset(token)
        self._tails.discard(upload)
        if upload not in self._active:
            return
        if answered and upload.sent is not None and upload.sock is not None:
            busy_at = upload.busy_at if upload.busy_at is not None else upload.sent
            self._ended(upload, busy_at, self._clock())
        else:
            self._active.discard(upload)  # failed or cancelled while sending: nothing measured

    async def aclose(self) -> None:
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
        self._tails.clear()
        self._active.clear()

    # ------------------------------------------------------------------ events

    def started(self, upload: Upload) -> None:
        if upload.sock is None:
            return  # not one of WatchedBackend's connections
        upload.started = self._clock()
        self._active.add(upload)

    def sent(self, upload: Upload) -> None:
        if upload not in self._active or upload.sock is None:
            return
        now = self._clock()
        upload.sent = now
        queued = send_queue(upload.sock)
        if queued is None:
            self._active.discard(upload)
        elif queued == 0:
            self._ended(upload, now, now)
        else:
            upload.busy_at = now
            self._tails.add(upload)
            if self._poller is None or self._poller.done():
                self._poller = asyncio.create_task(self._poll(), name="cloud-upload-watch")

    async def _poll(self) -> None:
        while self._tails:
            await asyncio.sleep(POLL_S)
            now = self._clock()
            for upload in list(self._tails):
                assert upload.sock is not None  # only uploads with a socket become tails
                queued = send_queue(upload.sock)
                if queued is None:
                    self._tails.discard(upload)
                    self._active.discard(upload)
                elif queued == 0:
                    self._tails.discard(upload)
                    self._ended(upload, now, now)
                else:
                    upload.busy_at = now

    def _ended(self, upload: Upload, at: float, now: float) -> None:
        """Concurrent uploads share the link, so each is charged the interval since the later of the start of
        the link's busy period and the previous upload's end: the inter-completion time. Over a busy period
        these intervals add up to the time the link was busy, as on the replay's FIFO link, where an upload
        starts when the one ahead of it ends. The first interval of a busy period begins with the first byte
        sent and ends with the last acknowledgement, a round trip after the last byte left: that round trip is
        netted out; later intervals run from acknowledgement to acknowledgement."""
        busy_since = min(u.started for u in self._active if u.started is not None)
        self._active.discard(upload)
        idle_before = self._last_end < busy_since
        seconds = at - busy_since - self._rtt() if idle_before else at - self._last_end
        self._last_end = max(self._last_end, at)
        self._on_end(upload, seconds, now)


class _WatchedStream(httpcore.AsyncNetworkStream):
    """A connection that hands its socket to the upload being sent over it."""

    def __init__(self, stream: httpcore.AsyncNetworkStream) -> None:
        self._stream = stream
        sock = stream.get_extra_info("socket")
        self._sock: _Socket | None = sock if callable(getattr(sock, "fileno", None)) else None

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._stream.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        upload = _CURRENT.get()
        if upload is not None and upload.sock is None:
            upload.sock = self._sock
        await self._stream.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        return _WatchedStream(await self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class WatchedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's asyncio (AnyIO) backend, whose TCP connections are :class:`_WatchedStream`."""

    def __init__(self) -> None:
        self._backend = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        stream = await self._backend.connect_tcp(host, port, timeout, local_address, socket_options)
        return _WatchedStream(stream)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        return await self._backend.connect_unix_socket(path, timeout, socket_options)

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


class _WatchedTransport(httpx.AsyncHTTPTransport):
    def __init__(self, ssl_context: ssl.SSLContext) -> None:
        super().__init__(verify=ssl_context, limits=LIMITS)
        # httpx builds its pool without a way to pass a network backend: the same pool, with one.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=LIMITS.max_connections,
            max_keepalive_connections=LIMITS.max_keepalive_connections,
            keepalive_expiry=LIMITS.keepalive_expiry,
            network_backend=WatchedBackend(),
        )


def watched_transport(url: str, verify: ssl.SSLContext | bool) -> httpx.AsyncBaseTransport | None:
    """A transport whose uploads :class:`UploadWatch` can see end, or None where it cannot work: not Linux, or
    a proxy configured in the environment (httpx uses it only when no transport is given; it then keeps it)."""
    if not supported():
        return None
    proxies = urllib.request.getproxies()
    if httpx.URL(url).scheme in proxies or "all" in proxies:
        return None
    create_ssl_context = getattr(httpx, "create_ssl_context", None)  # public since httpx 0.28
    if create_ssl_context is None:
        return None
    return _WatchedTransport(create_ssl_context(verify=verify))

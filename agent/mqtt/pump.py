"""paho's external-loop interface driven by the asyncio event loop (docs/design.md#concurrency).

paho's socket callbacks become ``add_reader``/``add_writer`` registrations; queued packets are written on the
loop's next turn, so every packet queued until then goes out in one pass; reads go in bursts of packets. The
callbacks may come from the connect's worker thread: they hop onto the loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho

from agent.mqtt.wire import WireClient
from agent.telemetry import get_logger

log = get_logger(__name__)

READ_BUDGET = 256  # packets per turn of the event loop


class Pump:
    """Moves bytes between the broker's socket and a :class:`WireClient` on the event loop.

    ``on_broken`` runs when paho raises on a socket error: the socket is given up (``MqttLink._lose_socket``).
    """

    def __init__(self, client: WireClient, on_broken: Callable[[], None]) -> None:
        self._client = client
        self._on_broken = on_broken
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._reader_fd = -1
        self._writer_fd = -1
        self._flush_scheduled = False
        self._reading_paused = False
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write

    def pause_reading(self, paused: bool) -> None:
        """Stop (or resume) reading from the broker; TCP then holds back its messages."""
        self._reading_paused = self._client.hold_reads = paused
        assert self._loop is not None
        if not paused and self._reader_fd < 0:
            sock = self._client.socket()
            if sock is not None:
                self._watch(sock)
                self._loop.call_soon(self._readable)  # bytes already buffered raise no event
        elif paused and self._reader_fd >= 0:
            self._loop.remove_reader(self._reader_fd)
            self._reader_fd = -1

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._loop_thread = threading.get_ident()

    def _on_loop(self, fn: Callable[[], None]) -> None:
        assert self._loop is not None
        if threading.get_ident() == self._loop_thread:
            fn()
        else:  # the connect in its worker thread
            self._loop.call_soon_threadsafe(fn)

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(lambda: self._watch(sock))

    def _watch(self, sock: Any) -> None:
        assert self._loop is not None
        current = self._client.socket()
        if current is None or current is not sock or self._reader_fd >= 0 or self._reading_paused:
            return  # closed again meanwhile, already watched, or paused
        self._reader_fd = current.fileno()
        self._loop.add_reader(self._reader_fd, self._readable)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # By descriptor, since paho closes the socket as soon as this returns.
        self._on_loop(self._unwatch)

    def _unwatch(self) -> None:
        assert self._loop is not None
        if self._reader_fd >= 0:
            self._loop.remove_reader(self._reader_fd)
            self._reader_fd = -1
        if self._writer_fd >= 0:
            self._loop.remove_writer(self._writer_fd)
            self._writer_fd = -1

    def _on_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # Write on the loop's next turn: every packet queued until then goes out in the same pass.
        if not self._flush_scheduled:
            self._flush_scheduled = True
            assert self._loop is not None
            if threading.get_ident() == self._loop_thread:
                self._loop.call_soon(self._flush)
            else:
                self._loop.call_soon_threadsafe(self._flush)

    def _on_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self._writer_fd >= 0:
            self._on_loop(self._stop_writing)

    def _stop_writing(self) -> None:
        if self._writer_fd >= 0:
            assert self._loop is not None
            self._loop.remove_writer(self._writer_fd)
            self._writer_fd = -1

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._write()

    def _write(self) -> None:
        client = self._client
        if client.socket() is None:
            return
        try:
            client.loop_write()
        except Exception as exc:  # noqa: BLE001 - paho raises on some socket errors; the loop must go on
            log.warning("mqtt_write_error", error=repr(exc))
            self._on_broken()
            return
        sock = client.socket()
        if sock is not None and client.want_write() and self._writer_fd < 0:
            # The socket's buffer is full: wait until it drains.
            assert self._loop is not None
            self._writer_fd = sock.fileno()
            self._loop.add_writer(self._writer_fd, self._write)

    def _readable(self) -> None:
        client = self._client
        try:
            if not client.read_burst(READ_BUDGET):
                return
        except Exception as exc:  # noqa: BLE001 - paho raises on some socket errors; the loop must go on
            log.warning("mqtt_loop_error", error=repr(exc))
            if client.socket() is not None:
                self._on_broken()
            return
        # More is buffered (select() cannot see it): continue after the loop's other work, so commits, acks
        # and results keep pace with a broker that pushes a whole queued session at once.
        assert self._loop is not None
        self._loop.call_soon(self._readable)

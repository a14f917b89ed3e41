"""The "stream" backend over plain tcp://: a non-blocking socket per connection, zero-copy both ways.

What a link is, for every backend: one connection, seen from the loop
thread. ``write(meta, buffers)`` sends one message (from any thread); it
hands every message it reads to ``on_message(link, meta, payload)`` and its
end to ``on_closed(link, reason)``. Each link also offers ``peer``,
``bye_seen``, ``admitted`` (set by the endpoint once the handshake let an
inbound connection in), ``close()`` (after what is queued), ``abort()`` and
``finished``. A link exists only after the handshake (``backend.py``) and
reads no more than its ``max_payload`` per message (0 on an outbound
channel, which only ever receives ACKs); a frame that breaks the framing or
a bound ends it with ``Rejected``.

- ``SocketLink`` (here): plain tcp://, backend "stream" without TLS.
- ``tls.TlsLink``: tls://, backend "stream" when the cluster's Security has TLS.
- ``dask_comm.DaskLink``: a ``distributed.comm`` Comm, backend "dask".

The two stream links share ``reader.FrameReader``, which parses the wire
framing (``wire.py``) straight into pooled buffers. None of this knows about
credits or fencing (``channel.py``, ``endpoint.py``).
"""
from __future__ import annotations

import asyncio
import itertools
import socket
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from pipetrain.runtime.transport import direct, wire
from pipetrain.runtime.transport.backend import Handshake, Inbound, Outbound, contact_address, host_port
from pipetrain.runtime.transport.compact import LayoutWriter
from pipetrain.runtime.transport.handshake import SocketIO
from pipetrain.runtime.transport.direct import Readiness
from pipetrain.runtime.transport.reader import FrameReader

__all__ = ["SocketLink", "StreamBackend"]

# Private switch for side-by-side benchmarks: False makes the loop thread read
# every frame and hand it over (the path before direct.py).
DIRECT_READS = True


class StreamBackend:
    """Plain tcp://: a non-blocking listening socket read on the loop, a ``SocketLink`` per connection."""

    scheme = "tcp"

    def __init__(self) -> None:
        self.readiness: Readiness | None = None  # made on the loop thread, with the first socket
        self.direct_reads = DIRECT_READS

    def _readiness(self, loop: asyncio.AbstractEventLoop) -> Readiness | None:
        # None (without epoll, or the switch off): the loop's add_reader reads every link, as before direct.py
        if self.readiness is None and direct.available() and self.direct_reads:
            self.readiness = Readiness(loop)
        return self.readiness

    async def listen(self, host: str, port: int, inbound: Inbound) -> tuple[Any, str]:
        loop = asyncio.get_running_loop()
        self._readiness(loop)
        listening = socket.create_server((host, port), backlog=64)
        listening.setblocking(False)
        loop.add_reader(listening.fileno(), self._accept, listening, loop, inbound)
        return listening, contact_address(self.scheme, listening, host)

    def _accept(self, listening: socket.socket, loop: asyncio.AbstractEventLoop, inbound: Inbound) -> None:
        try:
            sock, where = listening.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:  # out of file descriptors, say: that connection waits in the backlog
            inbound.refuse("?", f"accept failed ({error!r})")
            return
        sock.setblocking(False)
        peer = f"{where[0]}:{where[1]}"
        inbound.spawn(inbound.admit(SocketIO(sock, loop), peer, lambda bound: SocketLink(
            sock, loop, inbound.pool, inbound.on_message, inbound.on_closed, max_payload=bound, peer=peer,
            readiness=self.readiness)))

    async def connect(self, address: str, handshake: Handshake, outbound: Outbound, *, timeout: float) -> Any:
        host, port = host_port(address)
        loop = asyncio.get_running_loop()
        family, kind, proto_number, _, where = (await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM))[0]
        sock = socket.socket(family, kind, proto_number)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, where), timeout)
        except BaseException:
            sock.close()
            raise
        await handshake(SocketIO(sock, loop))
        return SocketLink(sock, loop, outbound.pool, outbound.on_message, outbound.on_closed, max_payload=0,
                          readiness=self._readiness(loop))

    def close(self, server: socket.socket) -> None:  # on the loop thread
        asyncio.get_running_loop().remove_reader(server.fileno())
        server.close()

    def wait_reads(self) -> Readiness | None:
        """Where a thread waiting for a message reads this backend's links itself (``direct.py``)."""
        return self.readiness


class SocketLink:
    """Plain tcp:// on a non-blocking socket, zero-copy both ways.

    Reads happen in the loop thread (``add_reader``). Writes are thread-safe:
    the calling thread (the compute thread for data and acks) sends what the
    kernel takes at once, under a lock, and leaves any remainder to the loop
    (``add_writer``), still as a memoryview of the caller's array. Compared with
    handing every write to the loop, this saves a thread wake-up per message.
    """

    READS_PER_WAKEUP = 64
    FRAMES_PER_SEND = 512  # below IOV_MAX (1024 on Linux)

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop, pool: wire.BufferPool,
                 on_message: Callable, on_closed: Callable, *, max_payload: int, peer: str = "",
                 readiness: Readiness | None = None):
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.peer = peer or "{}:{}".format(*sock.getpeername()[:2])
        self.bye_seen = False
        self.admitted: Any = None  # inbound: the handshake's Admitted (sender stage, generation)
        self._sock, self._loop = sock, loop
        self._on_closed = on_closed
        self._reader = FrameReader(pool, lambda meta, payload: on_message(self, meta, payload),
                                   max_payload=max_payload)
        self._lock = threading.Lock()
        self._layouts = LayoutWriter()
        self._out: deque[memoryview] = deque()
        self._writer_armed = False
        self._close_when_flushed = False
        self._done = False
        self.fd = sock.fileno()
        self.read_lock = threading.Lock()  # whoever reads the socket (loop or a waiter) holds it
        self._readiness = readiness
        if readiness is not None:
            readiness.add(self)
        else:
            loop.add_reader(self.fd, self._readable)

    @property
    def finished(self) -> bool:
        return self._done

    # -- reading (the loop thread, or a waiter in Endpoint.get: whoever holds read_lock)
    def _readable(self) -> None:  # without epoll (direct.available() False): the loop's add_reader
        self.read_ready(limit=self.READS_PER_WAKEUP)

    def read_ready(self, *, limit: int | None) -> None:
        """Read what the kernel holds (at most ``limit`` reads), delivering every whole frame."""
        reads = 0
        try:
            while limit is None or reads < limit:
                reads += 1
                view = self._reader.buffer()
                try:
                    n = self._sock.recv_into(view)
                except (BlockingIOError, InterruptedError):
                    return
                if n == 0:
                    self._finish(None)
                    return
                self._reader.consumed(n)
                if n < len(view):
                    return  # drained the kernel buffer
        except Exception as error:  # noqa: BLE001 - reset, or a corrupt stream: the link ends, loudly
            self._finish(error)

    # -- writing (any thread)
    def write(self, meta: dict, buffers: list[np.ndarray]) -> None:
        with self._lock:  # the frames too: a layout is named (compact.py) before a frame uses it
            if self._done:
                return  # on_closed has reported it
            frames = [memoryview(frame).cast("B") for frame in self._layouts.frames(meta, buffers)]
            backlog = bool(self._out)
            self._out.extend(frames)
            if not backlog:
                self._flush_locked()

    def _flush_locked(self) -> None:
        out = self._out
        while out:
            # One gather write for all queued frames (header and leaves): one
            # syscall and, with TCP_NODELAY, no lone header segment that wakes
            # the receiver before its payload is there.
            frames = list(itertools.islice(out, self.FRAMES_PER_SEND))
            try:
                n = self._sock.sendmsg(frames)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as error:
                out.clear()
                self._loop.call_soon_threadsafe(self._finish, error)
                return
            sent_all = n == sum(len(frame) for frame in frames)
            while n and n >= len(out[0]):
                n -= len(out.popleft())
            if sent_all:
                continue
            if n:
                out[0] = out[0][n:]
            if not self._writer_armed:
                self._writer_armed = True
                self._loop.call_soon_threadsafe(self._arm_writer)
            return
        if self._close_when_flushed:
            self._loop.call_soon_threadsafe(self._finish, None)

    def _arm_writer(self) -> None:
        if not self._done:
            self._loop.add_writer(self._sock.fileno(), self._writable)

    def _writable(self) -> None:
        with self._lock:
            self._flush_locked()
            if not self._out:
                self._writer_armed = False
                self._loop.remove_writer(self._sock.fileno())

    # -- closing (loop thread)
    def close(self) -> None:
        with self._lock:
            if self._out:
                self._close_when_flushed = True
                return
        self._finish(None)

    def abort(self) -> None:
        self._finish(None)

    def _finish(self, error: Exception | None) -> None:
        """End the link (from any thread: a waiter reading it may find its end)."""
        with self._lock:
            if self._done:
                return
            self._done = True
            self._out.clear()
        if self._readiness is not None:
            self._readiness.remove(self)  # epoll is thread-safe: no more reads from either thread
            if threading.get_ident() != self._readiness.loop_thread:
                try:
                    self._loop.call_soon_threadsafe(self._close_socket)
                except RuntimeError:  # the loop is closed: nothing of it watches the socket any more
                    self._sock.close()
                self._on_closed(self, error)
                return
        self._close_socket()
        self._on_closed(self, error)

    def _close_socket(self) -> None:  # the loop thread: asyncio's writer (a send's remainder) goes first
        self._loop.remove_reader(self.fd)
        self._loop.remove_writer(self.fd)
        self._sock.close()

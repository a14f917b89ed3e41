"""The transport's byte movers: its event-loop thread and one link per connection.

``transport.Endpoint`` owns a ``LoopThread`` (an asyncio loop in a daemon
thread) and opens links on it; ``Channel`` and ``Endpoint`` add credits,
generations and the inbox on top. A link is one connection, seen from the
loop thread: ``write(meta, buffers)`` sends one message (from any thread),
and it hands every message it reads to ``on_message(link, meta, payload)``
and its end to ``on_closed(link, reason)``. Each link also offers ``peer``,
``bye_seen``, ``admitted`` (set by the endpoint once the handshake let an
inbound connection in), ``close()`` (after what is queued), ``abort()`` and
``finished``. A link exists only after the handshake (``transport_open.py``)
and reads no more than its ``max_payload`` per message (0 on an outbound
channel, which only ever receives ACKs); a frame that breaks the framing or
a bound ends it with ``Rejected``.

- ``SocketLink``: plain tcp:// (backend "stream"), non-blocking socket.
- ``TlsLink``: tls:// (backend "stream"), asyncio's SSL transport.
- ``DaskLink``: a ``distributed.comm`` Comm (backend "dask").

The two "stream" links share ``FrameReader``, which parses the wire framing
(``wire.py``) straight into pooled buffers. Kept apart from ``transport.py``
because none of this knows about credits or fencing; why there are these
backends and why the loop is our own is told in ``transport.py``'s docstring.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import socket
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from pipetrain.runtime import wire
from pipetrain.runtime.transport_errors import Rejected, TransportError

__all__ = ["DaskLink", "FrameReader", "LoopThread", "SocketLink", "TlsLink"]


# ---------------------------------------------------------------- loop thread


class LoopThread:
    """An asyncio loop running forever in a daemon thread; other threads hand it work."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Any, timeout: float | None) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def call(self, fn: Callable, *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()


# ---------------------------------------------------------------- links

_EMPTY = np.empty(0, np.uint8)  # the payload of a message that has none


class FrameReader:
    """Parses wire frames from a byte stream, payloads straight into pooled buffers.

    The owner asks ``buffer()`` where the next bytes go, reads into it, and
    reports ``consumed(n)``: headers land in a small staging area, a payload's
    bytes beyond what staging already holds are read directly into its buffer.
    Every declared size is checked before anything is allocated for it
    (``Rejected``, which ends the link): the meta against ``wire.MAX_META``
    (so it always fits in staging), the payload against ``max_payload``, the
    leaves against both (``wire.check_meta``).
    """

    STAGING = 256 * 1024
    assert STAGING >= wire.PREFIX.size + wire.MAX_META

    def __init__(self, pool: wire.BufferPool, deliver: Callable[[dict, np.ndarray], None], *, max_payload: int):
        self._pool, self._deliver = pool, deliver
        self.max_payload = max_payload
        self._staging = memoryview(bytearray(self.STAGING))
        self._filled = 0
        self._payload: np.ndarray | None = None  # message being read into its pooled buffer
        self._payload_view: memoryview | None = None
        self._payload_got = 0
        self._payload_meta: dict | None = None

    def buffer(self) -> memoryview:
        if self._payload_view is not None:
            return self._payload_view[self._payload_got :]
        return self._staging[self._filled :]

    def consumed(self, nbytes: int) -> None:
        if self._payload_view is not None:
            self._payload_got += nbytes
            if self._payload_got == len(self._payload_view):
                meta, payload = self._payload_meta, self._payload
                self._payload = self._payload_view = self._payload_meta = None
                self._deliver(meta, payload)
            return
        self._filled += nbytes
        self._parse_staging()

    def _refuse(self, magic: bytes, meta_len: int, payload_len: int) -> None:
        if magic != wire.MAGIC:
            raise Rejected(f"bad magic {bytes(magic)!r}: not a pipetrain frame")
        if meta_len > wire.MAX_META:
            raise Rejected(f"a frame declares a {meta_len}-byte meta, over the {wire.MAX_META}-byte limit")
        if payload_len > self.max_payload:
            raise Rejected(f"a frame declares a {payload_len}-byte payload, over this edge's bound of "
                           f"{self.max_payload} bytes")

    def _parse_staging(self) -> None:
        view, position = self._staging, 0
        while self._filled - position >= wire.PREFIX.size:
            magic, meta_len, payload_len = wire.PREFIX.unpack_from(view, position)
            if magic != wire.MAGIC or meta_len > wire.MAX_META or payload_len > self.max_payload:
                self._refuse(magic, meta_len, payload_len)
            head_end = position + wire.PREFIX.size + meta_len
            if head_end > self._filled:
                break  # the rest of the meta is still on its way (it fits: STAGING > MAX_META)
            try:
                meta = json.loads(bytes(view[position + wire.PREFIX.size : head_end]))
            except (ValueError, RecursionError):
                raise Rejected("a frame's meta is not valid JSON") from None
            needed = wire.check_meta(meta)
            if needed != payload_len:
                raise Rejected(f"a frame's leaves take {needed} bytes but its prefix declares {payload_len}")
            payload = self._pool.take(payload_len) if payload_len else _EMPTY
            have = min(payload_len, self._filled - head_end)
            if have:
                payload[:have] = view[head_end : head_end + have]
            position = head_end + have
            if have < payload_len:  # the rest goes straight into the pooled buffer
                self._payload, self._payload_view = payload, memoryview(payload)
                self._payload_got, self._payload_meta = have, meta
                break
            self._deliver(meta, payload)
        rest = self._filled - position
        if rest and position:
            view[:rest] = bytes(view[position : self._filled])
        self._filled = rest


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
                 on_message: Callable, on_closed: Callable, *, max_payload: int, peer: str = ""):
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
        self._out: deque[memoryview] = deque()
        self._writer_armed = False
        self._close_when_flushed = False
        self._done = False
        loop.add_reader(sock.fileno(), self._readable)

    @property
    def finished(self) -> bool:
        return self._done

    # -- reading (loop thread)
    def _readable(self) -> None:
        try:
            for _ in range(self.READS_PER_WAKEUP):
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
        frames = [memoryview(frame).cast("B") for frame in wire.frames(meta, buffers)]
        with self._lock:
            if self._done:
                return  # on_closed has reported it
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
        with self._lock:
            if self._done:
                return
            self._done = True
            self._out.clear()
        self._loop.remove_reader(self._sock.fileno())
        self._loop.remove_writer(self._sock.fileno())
        self._sock.close()
        self._on_closed(self, error)


class TlsLink(asyncio.BufferedProtocol):
    """tls:// over asyncio's SSL transport; writes go through the loop thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: wire.BufferPool, on_message: Callable,
                 on_closed: Callable, *, max_payload: int):
        self.peer = "?"
        self.bye_seen = False
        self.admitted: Any = None
        self._loop = loop
        self._on_closed = on_closed
        self._reader = FrameReader(pool, lambda meta, payload: on_message(self, meta, payload),
                                   max_payload=max_payload)
        self._transport: asyncio.Transport | None = None

    # -- writing (any thread: hops to the loop). Encryption copies the bytes
    # anyway, so the frames go to the SSL transport whole; credits bound it.
    def write(self, meta: dict, buffers: list[np.ndarray]) -> None:
        frames = wire.frames(meta, buffers)
        if threading.get_ident() == self._loop._thread_id:  # type: ignore[attr-defined]
            self._write_now(frames)
        else:
            self._loop.call_soon_threadsafe(self._write_now, frames)

    def _write_now(self, frames: list[Any]) -> None:
        if self._transport is None or self._transport.is_closing():
            return  # on_closed has reported it
        for frame in frames:
            self._transport.write(frame)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()  # after what is buffered

    @property
    def finished(self) -> bool:
        return self._transport is None

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # -- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._on_closed(self, exc)

    def eof_received(self) -> bool:
        return False

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._reader.buffer()

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self._reader.consumed(nbytes)
        except Exception as error:  # noqa: BLE001 - a corrupt stream ends the link, loudly
            if not isinstance(error, Rejected):
                error = TransportError(f"protocol error from {self.peer}: {error}")
            self._on_closed(self, error)
            self._on_closed = lambda link, exc: None
            self.abort()


class DaskLink:
    """The same link over a ``distributed.comm`` Comm (its framing and serialization)."""

    def __init__(self, comm: Any, on_message: Callable, on_closed: Callable, *, max_payload: int):
        self.comm = comm
        self.peer = comm.peer_address
        self.bye_seen = False
        self.admitted: Any = None
        self.max_payload = max_payload
        self._on_message, self._on_closed = on_message, on_closed
        self._writes: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._tasks = [asyncio.ensure_future(self._read_loop()), asyncio.ensure_future(self._write_loop())]

    def write(self, meta: dict, buffers: list[np.ndarray]) -> None:  # any thread
        if threading.get_ident() == self._loop._thread_id:  # type: ignore[attr-defined]
            self._writes.put_nowait((meta, buffers))
        else:
            self._loop.call_soon_threadsafe(self._writes.put_nowait, (meta, buffers))

    async def _write_loop(self) -> None:
        from distributed.protocol import to_serialize

        try:
            while True:
                meta, buffers = await self._writes.get()
                if meta is None:
                    await self.comm.close()
                    return
                await self.comm.write({"meta": meta, "bufs": [to_serialize(b) for b in buffers]})
        except Exception:  # noqa: BLE001 - the read loop reports the closed comm
            self.comm.abort()

    async def _read_loop(self) -> None:
        error: Exception | None = None
        try:
            while True:
                meta, bufs = self._checked(await self.comm.read())
                self._on_message(self, meta, bufs)
        except Exception as caught:  # noqa: BLE001 - CommClosedError or a protocol error
            error = caught
        self._on_closed(self, error)

    def _checked(self, message: Any) -> tuple[dict, list]:
        # distributed.comm has already read (and allocated) the message: these
        # checks keep a malformed one out of the inbox, nothing more (see transport.py)
        meta = message.get("meta") if isinstance(message, dict) else None
        needed = wire.check_meta(meta)
        bufs = list(message.get("bufs") or [])
        sizes = [np.asarray(b).nbytes for b in bufs]
        if needed > self.max_payload or sizes != [nbytes for _, _, nbytes in meta["leaves"]]:
            raise Rejected(f"a message's leaves ({sum(sizes)} bytes) do not match its meta or exceed this "
                           f"edge's bound of {self.max_payload} bytes")
        return meta, bufs

    def close(self) -> None:
        self.write(None, None)

    @property
    def finished(self) -> bool:
        return self.comm.closed()

    def abort(self) -> None:
        self.comm.abort()

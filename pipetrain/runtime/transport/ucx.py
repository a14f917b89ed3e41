"""The "ucx" backend: ucx:// through the maintained UCX bindings (``ucxx``), over tcp, shared memory or RDMA.

Chosen with ``[cluster] transport = "ucx"`` (``Endpoint.start(backend="ucx")``;
install with ``pip install 'pipetrain[ucx]'``, i.e. ``ucxx-cu12``). UCX picks
its transports itself (``UCX_TLS`` overrides): on a CPU host tcp, cma and
posix/sysv shared memory, on a GPU or InfiniBand host cuda_copy, cuda_ipc and
rc/ud as well. The wheels import and run without a GPU.

Framing. UCX's tag API moves whole messages, each received into a buffer
the receiver posts, in the order the sender posted them on an endpoint. A
wire frame (``wire.py``) with a payload of at most ``INLINE`` (64 KiB)
travels as one message, the bytes a stream carries; a larger one as its
prefix and meta (one message, at most 16 + ``wire.MAX_META`` bytes), then
each non-empty leaf as its own message, with no padding. The receiver posts
a fixed staging area for the head and exactly each leaf's size, and checks
each declared size before it allocates (magic, meta <= ``wire.MAX_META``, payload <= the edge's
bound, ``wire.check_meta``); a message longer than what was posted fails
with UCX's truncation error and ends the link. Leaves land in one pooled
buffer at the offsets ``wire.decode`` reads them from, so the endpoint sees
exactly what a stream link delivers.

The handshake (``handshake.py``) runs first, over ``UcxIO``: each record a
4-byte length message then the record, the length checked against the
largest record before anything is posted for it. Nothing else is read from
a connection before the listener's gate admits it.

What UCX itself does before our handshake, and cannot be bounded from here:
the connection request, ucxx's 16-byte tag exchange (with its own 5 s
timeout), and UCX's queue of unexpected eager messages (a peer may send
tag messages nobody has posted a receive for; UCX holds them until the gate
drops the connection, after at most ``handshake.TIMEOUT``). UCX has no
encryption either: the backend refuses a Security with TLS settings. Run
ucx:// on a fabric only the job's hosts reach; the stream backend (tls://)
is the one for an untrusted network. ucxx listens on every interface (it
takes no bind address).

Threads. ucxx runs one context per process whose completions are delivered
to the asyncio loop it was started on (its notifier thread; without it a
pending receive spins a core, see ``WAIT_ENV``). So all UCX work runs on
one process-wide loop thread (``_Ucx``) and the endpoint's loop only hands
it coroutines. A link hands each frame it reads to ``on_message`` on the UCX
loop itself (the endpoint's and the channel's handlers take their own
locks and only queue writes), which saves a thread wake-up per message;
its end reaches ``on_closed`` on the endpoint's loop, after every frame.

Device buffers: not built. Stages hand the transport host arrays
(``links.py`` converts with ``to_numpy``), so over ucx a GPU stage's
activations still go through host memory; ``device_path_available`` says
what this process's UCX could do, and ``bench/gpu_check.py`` records it.
What a link is: ``stream.py``.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import struct
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from pipetrain.errors import PipetrainError
from pipetrain.runtime.transport import wire
from pipetrain.runtime.transport.backend import Handshake, Inbound, Outbound, host_port, ssl_context
from pipetrain.runtime.transport.errors import Rejected, TransportError
from pipetrain.runtime.transport.handshake import OFFER
from pipetrain.runtime.transport.loop import LoopThread

__all__ = ["UcxBackend", "UcxIO", "UcxLink", "UcxUnavailable", "device_path_available", "ucx_available"]

# How the UCX loop learns that a receive or send completed: "notify", ucxx's notifier thread
# wakes it (idle costs nothing; a completion costs a thread wake-up, ~0.5 ms on a loaded
# 2-core host), or "spin", the loop polls every pending request (ucxx's default: about a
# fifth of the latency, and one core busy for as long as anything is pending, i.e. always).
WAIT_ENV = "PIPETRAIN_UCX_WAIT"
INSTALL_HINT = "pip install 'pipetrain[ucx]' (the ucxx-cu12 wheel; it runs without a GPU)"
_LENGTH = struct.Struct("<I")  # a handshake record's length, its own message
_EMPTY = np.empty(0, np.uint8)
_CUDA_TRANSPORTS = {"cuda_copy", "cuda_ipc", "gdr_copy"}
# A payload of at most this many bytes travels inside its head message (one UCX message, as a
# stream carries it), copied once on each side: each UCX message costs a completion and a
# thread wake-up, which outweighs copying 64 KiB. Both sides decide by the declared length.
INLINE = 64 << 10


class UcxUnavailable(PipetrainError, ImportError):
    """ucx:// cannot run in this process: ucxx does not import, another ucxx context is already
    there, or PIPETRAIN_UCX_WAIT is bad. Not retryable: a restart would fail the same way."""


def _import_ucxx() -> Any:
    # ucxx sets UCX_MEMTYPE_CACHE, which UCX 1.21 no longer reads: UCX would warn of it in every process
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    try:
        import ucxx
    except Exception as error:  # noqa: BLE001 - ImportError, or a wheel whose native libraries do not load
        raise UcxUnavailable(f"the 'ucx' transport backend (cluster.transport = \"ucx\") needs the ucxx package, "
                             f"which does not import here ({error!r}): {INSTALL_HINT}") from error
    return ucxx


def ucx_available() -> str | None:
    """None when ucxx imports in this process, else why not (for tests' skip reasons)."""
    try:
        _import_ucxx()
    except UcxUnavailable as error:
        return str(error)
    return None


class _Ucx:
    """The process's one UCX context, on its own loop thread (see the docstring's Threads)."""

    _instance: _Ucx | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.ucxx = _import_ucxx()
        self.io = LoopThread("pipetrain-ucx")
        try:
            self.io.run(self._start(), 60)
        except BaseException:
            self.io.stop()
            raise

    async def _start(self) -> None:
        from ucxx import core

        wait = os.environ.get(WAIT_ENV, "notify")
        if wait not in ("notify", "spin"):
            raise UcxUnavailable(f"{WAIT_ENV}={wait!r}: must be 'notify' (the default) or 'spin'")
        if core._ctx is not None:
            raise UcxUnavailable("ucxx was already initialised in this process (by distributed-ucxx?); the 'ucx' "
                                 "transport backend needs its own context, bound to its loop")
        self.ucxx.init(enable_python_future=wait == "notify")

    @classmethod
    def get(cls) -> _Ucx:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.io.loop

    async def call(self, coro: Any) -> Any:
        """Run ``coro`` on the UCX loop from another loop (cancelling this cancels it there)."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.io.loop))


def device_path_available() -> dict:
    """What this process's UCX offers for device buffers: its active transports, and whether any moves
    CUDA memory (cuda_copy/cuda_ipc/gdr_copy). The transport itself sends host arrays (see the docstring)."""
    ucx = _Ucx.get()
    transports = sorted(ucx.io.run(_on_loop(ucx.ucxx.get_active_transports), 30))
    return {"ucx_version": ".".join(map(str, ucx.ucxx.get_ucx_version())), "transports": transports,
            "cuda_transports": sorted(_CUDA_TRANSPORTS & set(transports))}


async def _on_loop(fn: Callable) -> Any:
    return fn()


class UcxBackend:
    """ucx://: a ucxx listener, a ``UcxLink`` per connection once the handshake is done."""

    scheme = "ucx"

    def __init__(self, security: Any = None):
        if ssl_context(security, "listen") is not None:
            raise TransportError("the 'ucx' transport backend has no encryption, and this cluster's Security has "
                                 "TLS settings for the workers: use transport 'stream' (tls://) or drop TLS")
        self._ucx = _Ucx.get()
        self._accepted = itertools.count()

    async def listen(self, host: str, port: int, inbound: Inbound) -> tuple[Any, str]:
        endpoint_loop = asyncio.get_running_loop()
        ucx = self._ucx

        def on_connection(ucx_endpoint: Any) -> None:  # on the UCX loop, once ucxx has its tags
            peer = f"ucx connection #{next(self._accepted)} to port {port_number}"
            io = UcxIO(ucx, ucx_endpoint)
            endpoint_loop.call_soon_threadsafe(inbound.spawn, inbound.admit(io, peer, lambda bound: UcxLink(
                ucx, ucx_endpoint, endpoint_loop, inbound.pool, inbound.on_message, inbound.on_closed,
                max_payload=bound, peer=peer)))

        async def create() -> Any:
            return ucx.ucxx.create_listener(on_connection, port=port)

        listener = await ucx.call(create())
        port_number = listener.port
        if host in ("", "0.0.0.0", "::"):
            from distributed.utils import get_ip

            host = get_ip()
        return listener, f"ucx://{host}:{port_number}"

    async def connect(self, address: str, handshake: Handshake, outbound: Outbound, *, timeout: float) -> Any:
        host, port = host_port(address)
        ucx = self._ucx
        ucx_endpoint = await asyncio.wait_for(
            ucx.call(ucx.ucxx.create_endpoint(host, port, connect_timeout=timeout)), timeout)
        await handshake(UcxIO(ucx, ucx_endpoint))
        return UcxLink(ucx, ucx_endpoint, asyncio.get_running_loop(), outbound.pool, outbound.on_message,
                       outbound.on_closed, max_payload=0, peer=address)

    def close(self, server: Any) -> None:
        self._ucx.loop.call_soon_threadsafe(server.close)


class UcxIO:
    """A ucxx endpoint during the handshake: records as (4-byte length, record) message pairs."""

    def __init__(self, ucx: _Ucx, ucx_endpoint: Any):
        self._ucx, self._ep = ucx, ucx_endpoint
        self._buffer = b""

    async def recv(self, n: int) -> bytes:
        return await self._ucx.call(_as_connection_error(self._recv(n)))

    async def _recv(self, n: int) -> bytes:
        while len(self._buffer) < n:
            length = np.empty(_LENGTH.size, np.uint8)
            await _received(self._ep.recv(length), "a handshake record's length")
            (size,) = _LENGTH.unpack(length.tobytes())
            if not 0 < size <= OFFER.size - len(self._buffer):
                raise Rejected(f"not a pipetrain handshake (a record of {size} bytes)")
            record = np.empty(size, np.uint8)
            await _received(self._ep.recv(record), "a handshake record")
            self._buffer += record.tobytes()
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    async def send(self, data: bytes) -> None:
        await self._ucx.call(_as_connection_error(self._send(data)))

    async def _send(self, data: bytes) -> None:
        await self._ep.send(np.frombuffer(_LENGTH.pack(len(data)), np.uint8))
        await self._ep.send(np.frombuffer(data, np.uint8))

    def close(self) -> None:
        self._ucx.loop.call_soon_threadsafe(self._ep.abort)


async def _as_connection_error(coro: Any) -> Any:
    """UCX's errors during the handshake (the peer closed, or was refused) as the ConnectionError
    the handshake's two sides expect of any I/O adaptor."""
    try:
        return await coro
    except (Rejected, asyncio.CancelledError):
        raise
    except Exception as error:  # noqa: BLE001 - UCXError and ucxx's C++ errors share no base we can name
        raise ConnectionError(f"the ucx connection closed ({type(error).__name__}: {error})") from None


async def _received(receive: Any, what: str) -> None:
    """Await a posted receive; UCX's truncation error (the peer sent more than was posted) is a refusal."""
    from ucxx.exceptions import UCXMessageTruncatedError

    try:
        await receive
    except UCXMessageTruncatedError:
        raise Rejected(f"the peer sent more than {what} may take") from None


class UcxLink:
    """One admitted ucx:// connection: reads on the UCX loop, writes from any thread (queued there in order)."""

    def __init__(self, ucx: _Ucx, ucx_endpoint: Any, endpoint_loop: asyncio.AbstractEventLoop,
                 pool: wire.BufferPool, on_message: Callable, on_closed: Callable, *, max_payload: int, peer: str):
        self.peer = peer
        self.bye_seen = False
        self.admitted: Any = None  # inbound: the handshake's Admitted
        self.max_payload = max_payload
        self._ucx, self._ep, self._endpoint_loop, self._pool = ucx, ucx_endpoint, endpoint_loop, pool
        self._on_message, self._on_closed = on_message, on_closed
        self._sending: set[asyncio.Task] = set()
        self._close_when_sent = False
        self._done = False
        # The first frame read reaches on_message through the endpoint's loop, after the
        # admit that made this link (and adopted it) has returned there.
        ucx.loop.call_soon_threadsafe(self._start_reading)

    @property
    def finished(self) -> bool:
        return self._done

    # -- reading (UCX loop)
    def _start_reading(self) -> None:
        if not self._done:
            self._reader = asyncio.ensure_future(self._read_loop())

    async def _read_loop(self) -> None:
        # The head message (prefix + meta, with the payload when it is INLINE at most) lands in
        # a fixed staging area: UCX takes a message shorter than the posted buffer, and refuses
        # (truncation) one longer. A larger payload's leaves' receives and the next head's are
        # posted together, in order, as soon as the meta says what comes, so UCX can land them
        # without waiting for this loop.
        staging = np.empty(wire.PREFIX.size + wire.MAX_META + INLINE, np.uint8)
        try:
            head = self._post_receive(staging)
            while True:
                await _received(head, "a frame's prefix and meta")
                meta, payload_len, head_end = self._parse_head(staging)
                payload = self._pool.take(payload_len) if payload_len else _EMPTY
                if payload_len <= INLINE:  # it came in the head message, as a stream carries it
                    payload[:] = staging[head_end : head_end + payload_len]
                    head = self._post_receive(staging)
                    self._on_message(self, meta, payload)
                    continue
                offsets, _ = wire.leaf_offsets(meta)
                leaves = [self._post_receive(payload[offset : offset + nbytes])
                          for offset, (_, _, nbytes) in zip(offsets, meta["leaves"]) if nbytes]
                head = self._post_receive(staging)  # the meta is parsed: staging is free
                for leaf in leaves:
                    await _received(leaf, "a leaf of the size its meta declares")
                self._on_message(self, meta, payload)  # thread-safe (see the docstring's Threads)
        except asyncio.CancelledError:
            self._finish(None)
        except Exception as error:  # noqa: BLE001 - the peer closed (UCX says so with an error), or a bad frame
            self._finish(error if isinstance(error, Rejected) else _closed_error(error))

    def _post_receive(self, buffer: np.ndarray) -> asyncio.Task:
        # ucxx posts the receive at the task's first step: tasks made in order post in order
        task = asyncio.ensure_future(self._ep.recv(buffer))
        task.add_done_callback(_retrieve)  # one left posted when the link ends fails quietly
        return task

    def _parse_head(self, staging: np.ndarray) -> tuple[dict, int, int]:
        """The head's meta, its payload length and where the meta ends in staging."""
        magic, meta_len, payload_len = wire.PREFIX.unpack_from(staging)
        self._check_prefix(magic, meta_len, payload_len)
        head_end = wire.PREFIX.size + meta_len
        try:
            meta = json.loads(staging[wire.PREFIX.size : head_end].tobytes())
        except (ValueError, RecursionError):
            raise Rejected("a frame's meta is not valid JSON") from None
        needed = wire.check_meta(meta)
        if needed != payload_len:
            raise Rejected(f"a frame's leaves take {needed} bytes but its prefix declares {payload_len}")
        return meta, payload_len, head_end

    def _check_prefix(self, magic: bytes, meta_len: int, payload_len: int) -> None:
        if magic != wire.MAGIC:
            raise Rejected(f"bad magic {magic!r}: not a pipetrain frame")
        if not 0 < meta_len <= wire.MAX_META:
            raise Rejected(f"a frame declares a {meta_len}-byte meta, outside 1..{wire.MAX_META}")
        if payload_len > self.max_payload:
            raise Rejected(f"a frame declares a {payload_len}-byte payload, over this edge's bound of "
                           f"{self.max_payload} bytes")

    # -- writing (any thread)
    def write(self, meta: dict, buffers: list[np.ndarray]) -> None:
        frames = wire.frames(meta, buffers)  # checks the meta's size; frames[0] is prefix + meta
        if wire.PREFIX.unpack_from(frames[0])[2] <= INLINE:  # the declared payload length
            messages = [np.frombuffer(b"".join(frames), np.uint8)]  # one message: a copy costs less than a wake-up
        else:
            messages = [np.frombuffer(frames[0], np.uint8)] + [buffer for buffer in buffers if buffer.nbytes]
        self._ucx.loop.call_soon_threadsafe(self._post, messages)

    def _post(self, messages: list[np.ndarray]) -> None:  # UCX loop
        if self._done:
            return  # on_closed has reported it
        for message in messages:
            # Each task posts its send at its first step, in creation order: UCX keeps that order.
            task = asyncio.ensure_future(self._ep.send(message))
            self._sending.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task) -> None:
        self._sending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._finish(_closed_error(task.exception()))
        elif self._close_when_sent and not self._sending:
            self._finish(None)

    # -- closing (any thread: hops to the UCX loop)
    def close(self) -> None:
        self._ucx.loop.call_soon_threadsafe(self._close)

    def _close(self) -> None:
        if self._sending:
            self._close_when_sent = True
        else:
            self._finish(None)

    def abort(self) -> None:
        self._ucx.loop.call_soon_threadsafe(self._finish, None)

    def _finish(self, error: Exception | None) -> None:  # UCX loop
        if self._done:
            return
        self._done = True
        reader = getattr(self, "_reader", None)
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        for task in list(self._sending):
            task.cancel()
        self._ep.abort()
        self._endpoint_loop.call_soon_threadsafe(self._on_closed, self, error)


def _retrieve(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()


def _closed_error(error: BaseException) -> Exception:
    return TransportError(f"the ucx connection ended ({type(error).__name__}: {error})")

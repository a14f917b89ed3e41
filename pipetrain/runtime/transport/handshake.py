"""The stage-port handshake: a connection proves it belongs to this job, this edge and this generation.

Before the endpoint reads a single frame from a connection, the two sides
run a challenge-response on the job's secret (``StageJob.secret``, made per
job by the driver and handed to the stages through Dask; it never crosses a
stage port)::

    listener -> connector  HELLO    36 bytes: "PTH1", listener nonce (32 random bytes)
    connector -> listener  OFFER   100 bytes: "PTA1", job tag (16), generation (u64),
                                   sender stage (u32), receiver stage (u32),
                                   connector nonce (32),
                                   HMAC-SHA256(secret, "pipetrain/offer" + listener nonce + the fields before)
    listener -> connector  CONFIRM  36 bytes: "PTC1", HMAC-SHA256(secret, "pipetrain/confirm" + the whole OFFER)

The listener checks the MAC first (``hmac.compare_digest``): only then are
the fields worth a precise reason (wrong job, wrong generation, wrong edge).
The listener's fresh nonce makes a recorded OFFER useless on another
connection; the CONFIRM, over the connector's own fresh nonce, tells the
connector it reached a holder of the secret rather than something that
answers on a recycled port. The job tag is the first 16 bytes of
SHA-256(job id): fixed size, whatever the id.

Bounds: every record has a fixed size, and the listener reads the OFFER's
4-byte magic on its own first, so random bytes or a wire frame (whose magic
is "PTW1") are refused at once. A connection has ``timeout`` seconds to
finish (a client that connects and stalls is dropped); at most
``Gate.MAX_PENDING`` handshakes wait at once, and a newer connection evicts
the oldest, so stalled clients cannot hold the port shut and a real peer's
handshake (a millisecond) is never the oldest for long. It all runs on the
endpoint's loop as coroutines: nothing here blocks another connection.

Over tls:// the handshake runs inside the TLS session (mutual TLS first,
with the cluster's certificates, then this). The three I/O adaptors below
let the same two coroutines run over a plain socket, an asyncio SSL
transport, or a ``distributed.comm`` Comm.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from pipetrain.runtime.transport.errors import Rejected

__all__ = ["Admitted", "CommIO", "Credentials", "Gate", "HandshakeProtocol", "SocketIO", "accept", "offer"]

HELLO = struct.Struct("<4s32s")
OFFER = struct.Struct("<4s16sQII32s32s")
CONFIRM = struct.Struct("<4s32s")
HELLO_MAGIC, OFFER_MAGIC, CONFIRM_MAGIC = b"PTH1", b"PTA1", b"PTC1"
NONCE = 32
MIN_SECRET = 16  # bytes: 128 bits, the least an HMAC key should carry
TIMEOUT = 5.0  # seconds a connection has for the whole handshake

log = logging.getLogger("pipetrain.transport")


@dataclass(frozen=True)
class Credentials:
    """What a stage proves itself with: the job's secret and id."""

    secret: bytes = field(repr=False)
    job_id: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.secret, (bytes, bytearray)) or len(self.secret) < MIN_SECRET:
            raise ValueError(f"the transport secret must be at least {MIN_SECRET} bytes "
                             "(a job's StageJob.secret; tests: secrets.token_bytes(32))")

    @property
    def job_tag(self) -> bytes:
        return hashlib.sha256(self.job_id.encode()).digest()[:16]

    def mac(self, label: bytes, *parts: bytes) -> bytes:
        return hmac.new(bytes(self.secret), b"".join((label, *parts)), hashlib.sha256).digest()


@dataclass(frozen=True)
class Admitted:
    """A connection that passed the handshake: who sent it, for which generation."""

    sender: int
    generation: int


async def accept(io: Any, credentials: Credentials, *, stage: int, generation: int,
                 senders: tuple[int, ...] | None = None) -> Admitted:
    """The listener's side. Raises ``Rejected`` naming why. ``senders``: the stages this one
    hears from (default its pipeline neighbours, stage - 1 and stage + 1)."""
    senders = (stage - 1, stage + 1) if senders is None else senders
    nonce = os.urandom(NONCE)
    await io.send(HELLO.pack(HELLO_MAGIC, nonce))
    magic = await io.recv(4)
    if magic != OFFER_MAGIC:
        raise Rejected(f"not a pipetrain handshake (first bytes {magic!r})")
    record = magic + await io.recv(OFFER.size - 4)
    _, tag, their_generation, sender, receiver, _, mac = OFFER.unpack(record)
    if not hmac.compare_digest(mac, credentials.mac(b"pipetrain/offer", nonce, record[:-32])):
        raise Rejected("the handshake's MAC is wrong (not this job's secret)")
    if tag != credentials.job_tag:
        raise Rejected("the handshake is for another job")
    if their_generation != generation:
        raise Rejected(f"the handshake is for generation {their_generation}, this endpoint is at {generation}")
    if receiver != stage or sender not in senders:
        raise Rejected(f"the handshake is for the edge stage {sender} -> stage {receiver}; "
                       f"this is stage {stage}, which hears only from stages "
                       f"{', '.join(map(str, senders[:-1]))} and {senders[-1]}")
    await io.send(CONFIRM.pack(CONFIRM_MAGIC, credentials.mac(b"pipetrain/confirm", record)))
    return Admitted(sender=sender, generation=generation)


async def offer(io: Any, credentials: Credentials, *, stage: int, peer_stage: int, generation: int) -> None:
    """The connector's side. Raises ``Rejected`` when the peer does not prove it holds the secret."""
    magic, their_nonce = HELLO.unpack(await io.recv(HELLO.size))
    if magic != HELLO_MAGIC:
        raise Rejected(f"the peer is not a pipetrain stage port (it said {magic!r})")
    fields = struct.pack("<4s16sQII32s", OFFER_MAGIC, credentials.job_tag, generation, stage, peer_stage,
                         os.urandom(NONCE))
    record = fields + credentials.mac(b"pipetrain/offer", their_nonce, fields)
    await io.send(record)
    try:
        magic, mac = CONFIRM.unpack(await io.recv(CONFIRM.size))
    except OSError as error:  # closed (ConnectionError), or a Comm's CommClosedError
        raise Rejected(f"the peer refused the handshake ({error}): wrong job, generation, edge or secret") from None
    if magic != CONFIRM_MAGIC or not hmac.compare_digest(mac, credentials.mac(b"pipetrain/confirm", record)):
        raise Rejected("the peer did not prove it holds this job's secret")


# ---------------------------------------------------------------- the listener's gate


class Gate:
    """Runs ``accept`` for every inbound connection: bounded in time and in number."""

    MAX_PENDING = 64

    def __init__(self, credentials: Credentials, *, stage: int, generation: Callable[[], int], timeout: float,
                 on_rejected: Callable[[str, str], None], senders: tuple[int, ...] | None = None):
        self.credentials, self.stage, self.timeout, self.senders = credentials, stage, timeout, senders
        self._generation, self._on_rejected = generation, on_rejected
        self._pending: dict[asyncio.Task, Any] = {}  # in arrival order: the first is the oldest
        self._evicted: set[asyncio.Task] = set()
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    def spawn(self, coro: Any) -> None:
        """Run ``coro`` on the loop, keeping it referenced until it ends."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def screen(self, io: Any, peer: str) -> Admitted | None:
        """The peer's credentials, or None (logged and counted) when it fails or runs out of time."""
        task = asyncio.current_task()
        if len(self._pending) >= self.MAX_PENDING:
            oldest = next(iter(self._pending))
            self._evicted.add(oldest)
            oldest.cancel()
        self._pending[task] = io
        started = time.monotonic()
        try:
            return await asyncio.wait_for(
                accept(io, self.credentials, stage=self.stage, generation=self._generation(), senders=self.senders),
                self.timeout)
        except Rejected as error:
            reason = str(error)
        except asyncio.TimeoutError:
            reason = f"no handshake within {self.timeout:g} s"
        except asyncio.CancelledError:
            io.close()
            if task not in self._evicted:
                raise  # the endpoint is closing
            self._evicted.discard(task)
            task.uncancel()  # it goes on, to report why it ended
            reason = f"dropped after {time.monotonic() - started:.1f} s: {self.MAX_PENDING} newer handshakes waiting"
        except (ConnectionError, OSError) as error:
            reason = f"closed during the handshake ({error!r})"
        finally:
            self._pending.pop(task, None)
        io.close()
        if not self._closed:
            self._on_rejected(peer, reason)
        return None

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True
        for task in list(self._pending) + list(self._tasks):
            task.cancel()


# ---------------------------------------------------------------- I/O adaptors: recv(n) exactly, send(data)


class SocketIO:
    """A non-blocking plain socket, through the loop's sock_* calls."""

    def __init__(self, sock: Any, loop: asyncio.AbstractEventLoop):
        self.sock, self._loop = sock, loop

    async def recv(self, n: int) -> bytes:
        buffer = bytearray(n)
        view, got = memoryview(buffer), 0
        while got < n:
            read = await self._loop.sock_recv_into(self.sock, view[got:])
            if read == 0:
                raise ConnectionError("the peer closed the connection")
            got += read
        return bytes(buffer)

    async def send(self, data: bytes) -> None:
        await self._loop.sock_sendall(self.sock, data)

    def close(self) -> None:
        self.sock.close()


class HandshakeProtocol(asyncio.Protocol):
    """A tls:// connection during the handshake; ``hand_over`` then gives the transport to the link."""

    LIMIT = OFFER.size  # the most a peer may have sent before the handshake is over

    def __init__(self, on_made: Callable[[HandshakeProtocol], None] | None = None):
        self._on_made = on_made
        self.transport: Any = None
        self.peer = "?"
        self._buffer = bytearray()
        self._waiter: asyncio.Future | None = None
        self._error: Exception | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        if self._on_made is not None:
            self._on_made(self)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > self.LIMIT:
            self._fail(Rejected(f"sent {len(self._buffer)} bytes before the handshake was over"))
            self.transport.abort()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"the connection closed during the handshake ({exc!r})"))

    def _fail(self, error: Exception) -> None:
        self._error = self._error or error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def recv(self, n: int) -> bytes:
        while len(self._buffer) < n:
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    async def send(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def hand_over(self, link: Any) -> None:
        """From now on the link is the transport's protocol (bytes already here included)."""
        self.transport.set_protocol(link)
        link.connection_made(self.transport)
        rest = memoryview(bytes(self._buffer))
        while len(rest):
            view = link.get_buffer(len(rest))
            n = min(len(view), len(rest))
            view[:n] = rest[:n]
            link.buffer_updated(n)
            rest = rest[n:]


class CommIO:
    """A ``distributed.comm`` Comm: each record is one message of bytes."""

    def __init__(self, comm: Any):
        self.comm = comm
        self._buffer = b""

    async def recv(self, n: int) -> bytes:
        while len(self._buffer) < n:
            message = await self.comm.read()
            if not isinstance(message, bytes) or len(self._buffer) + len(message) > OFFER.size:
                raise Rejected("not a pipetrain handshake message")
            self._buffer += message
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    async def send(self, data: bytes) -> None:
        await self.comm.write(data)

    def close(self) -> None:
        self.comm.abort()

"""``Endpoint``: a stage process's transport, and the choice of its backend.

What an endpoint guarantees (who may talk to its port, flow control,
fencing, losses) is told in the package's docstring (``__init__.py``); how
its backends open connections, in ``backend.py``.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any

from pipetrain.runtime.transport import wire
from pipetrain.runtime.transport.acks import AckBook
from pipetrain.runtime.transport.backend import Backend, Inbound, Outbound, check_address, ssl_context
from pipetrain.runtime.transport.channel import Channel
from pipetrain.runtime.transport.budget import WarningBudget
from pipetrain.runtime.transport.dask_comm import DaskCommBackend
from pipetrain.runtime.transport.errors import PeerLost, Rejected, TransportError, TransportTimeout
from pipetrain.runtime.transport.handshake import TIMEOUT as HANDSHAKE_TIMEOUT, Admitted, Credentials, Gate, offer
from pipetrain.runtime.transport.inbox import Inbox
from pipetrain.runtime.transport.loop import LoopThread
from pipetrain.runtime.transport.stream import StreamBackend
from pipetrain.runtime.transport.tls import TlsBackend
from pipetrain.runtime.transport.wire import Message, MessageKind, check_boundary

__all__ = ["BACKENDS", "DEFAULT_MAX_PAYLOAD", "Endpoint", "choose_backend"]

log = logging.getLogger("pipetrain.transport")

# The payload bound of an edge nobody described (tests, benchmarks, a stage
# without boundary specs): large enough for any one micro-batch's tensors we
# have met, small enough that a corrupt length is refused, not allocated.
DEFAULT_MAX_PAYLOAD = 1 << 30

# Private switch for side-by-side benchmarks: False sends every ack as its own
# frame at once (the path before acks.py).
DEFER_ACKS = True


def _stream(security: Any) -> Backend:
    """tls:// when the cluster's Security has TLS settings for the worker role, else plain tcp://."""
    context = ssl_context(security, "listen")
    return StreamBackend() if context is None else TlsBackend(context, ssl_context(security, "connect"))


def _ucx(security: Any) -> Backend:
    from pipetrain.runtime.transport.ucx import UcxBackend  # ucxx is optional: imported only when chosen

    return UcxBackend(security)


BACKENDS = {"stream": _stream, "dask": DaskCommBackend, "ucx": _ucx}


def choose_backend(name: str, security: Any) -> Backend:
    """The backend object for ``backend=name`` with this Security (chosen once, per endpoint)."""
    if name not in BACKENDS:
        raise ValueError(f"transport backend must be one of {sorted(BACKENDS)}, got {name!r}")
    if security is not None and security.require_encryption and ssl_context(security, "listen") is None:
        raise TransportError("security requires encryption but has no TLS certificate for the 'worker' role")
    return BACKENDS[name](security)


# ---------------------------------------------------------------- endpoint


class Endpoint:
    """A stage process's transport: listens at ``address``, receives into an inbox."""

    _live: weakref.WeakSet = weakref.WeakSet()

    def __init__(self, *, stage: int, secret: bytes, job_id: str, security: Any, backend: str, credits: int,
                 generation: int, max_payload: int | Mapping[int, int], handshake_timeout: float,
                 replica_peers: tuple[int, ...] = (), senders: tuple[int, ...] | None = None):
        self.backend = choose_backend(backend, security)
        self.stage = stage
        # Replicated pipelines: the stage's replicas (their endpoint ids), whose connections carry
        # only REPLICA_PART; ``senders``: every stage this one hears from (None: stage - 1 and + 1).
        self.replica_peers = tuple(replica_peers)
        self.senders = None if senders is None and not replica_peers else (
            tuple(senders) if senders is not None else (stage - 1, stage + 1, *replica_peers))
        self.credits = credits
        self.security = security
        self.credentials = Credentials(secret, job_id)
        self.handshake_timeout = handshake_timeout
        self.max_payload = max_payload
        self.address = ""
        self._generation = generation
        self._io = LoopThread(f"pipetrain-transport-stage{stage}")
        self._pool = wire.BufferPool()
        self._cond = threading.Condition()
        self._inbox = Inbox()
        self._lost: list[str] = []
        self._closed = False
        self._gate: Gate | None = None
        self._server: Any = None  # the backend's, once listening
        self._links: set = set()  # admitted inbound connections
        self._channels: list[Channel] = []
        self._channel_to: dict[tuple[int, int], Channel] = {}  # (peer stage, generation) -> channel: acks ride in
        self._acks = AckBook()
        self.defer_acks = DEFER_ACKS
        self._warnings = WarningBudget(log)
        self.stats = {"sent": 0, "bytes_sent": 0, "received": 0, "bytes_received": 0, "dropped_stale": 0,
                      "rejected_connections": 0, "rejected_frames": 0}

    # -- lifecycle

    @classmethod
    def start(
        cls,
        *,
        stage: int,
        secret: bytes,
        job_id: str = "",
        host: str = "127.0.0.1",
        port: int = 0,
        security: Any = None,
        backend: str = "stream",
        credits: int = 2,
        generation: int = 0,
        timeout: float = 30,
        max_payload: int | Mapping[int, int] = DEFAULT_MAX_PAYLOAD,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        replica_peers: tuple[int, ...] = (),
        senders: tuple[int, ...] | None = None,
    ) -> Endpoint:
        """Start the loop thread and listen. ``secret``: the job's key (at least 16 bytes),
        which every peer must prove it holds; ``security`` is a
        ``distributed.security.Security`` (tls:// when it has TLS settings, else tcp://);
        ``backend``: a name in ``BACKENDS`` ("stream", or "dask" on loopback for benchmarks);
        ``max_payload``: the most bytes one message's arrays may take, for every
        sender or per sending stage (a mapping; stages it omits get DEFAULT_MAX_PAYLOAD);
        ``replica_peers``: the endpoints of this stage's replicas (replicated pipelines), which
        send it only their parts of the gradient sums (``MessageKind.REPLICA_PART``);
        ``senders``: every endpoint allowed to connect (None: stage - 1, stage + 1 and the peers)."""
        endpoint = cls(stage=stage, secret=secret, job_id=job_id, security=security, backend=backend,
                       credits=credits, generation=generation, max_payload=max_payload,
                       handshake_timeout=handshake_timeout, replica_peers=replica_peers, senders=senders)
        try:
            endpoint._io.run(endpoint._listen(host, port), timeout)
        except BaseException:
            endpoint._io.stop()
            raise
        cls._live.add(endpoint)
        return endpoint

    @classmethod
    def live(cls) -> list[Endpoint]:
        """The endpoints of this process that are open (for diagnostics: their stats)."""
        return [endpoint for endpoint in list(cls._live) if not endpoint._closed]

    def close(self, *, timeout: float = 5) -> None:
        """Say goodbye on every channel, stop listening, stop the loop thread."""
        if self._closed:
            return
        self.flush_acks()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        try:
            self._io.run(self._shutdown(), timeout)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass
        self._io.stop()

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def payload_bound(self, sender: int) -> int:
        """The most payload bytes a message from stage ``sender`` may declare."""
        if isinstance(self.max_payload, Mapping):
            return self.max_payload.get(sender, DEFAULT_MAX_PAYLOAD)
        return self.max_payload

    # -- generation fencing

    @property
    def generation(self) -> int:
        return self._generation

    def set_generation(self, generation: int) -> int:
        """Fence older generations: drop (and acknowledge) buffered messages older than
        ``generation``, forget lost peers and the ids taken. Returns how many messages were dropped."""
        with self._cond:
            self._generation = generation
            self._lost.clear()
            stale = self._inbox.fence(generation)
            self.stats["dropped_stale"] += len(stale)
        for _, _, link, seq in stale:
            self._send_ack(link, seq)
        return len(stale)

    # -- sending and receiving (compute thread)

    def connect(self, address: str, *, peer_stage: int, credits: int | None = None, timeout: float = 30) -> Channel:
        """Open a channel to stage ``peer_stage``'s endpoint listening at ``address``
        (the handshake proves both sides hold the job's secret)."""
        check_address(address, scheme=self.backend.scheme, security=self.security, stage=self.stage)
        channel = Channel(self, address, credits or self.credits, self._generation, peer_stage=peer_stage)
        try:
            channel._link = self._io.run(self._open(address, peer_stage, channel, timeout), timeout + 1)
        except (TimeoutError, OSError, concurrent.futures.TimeoutError, Rejected) as error:
            raise TransportError(f"stage {self.stage}: cannot connect to {address}: {error!r}") from error
        self._channels.append(channel)
        self._channel_to[peer_stage, channel.generation] = channel
        return channel

    def get(
        self,
        kind: MessageKind,
        k: int | None = None,
        *,
        timeout: float | None = None,
        expect: Any = None,
    ) -> Message:
        """The message of ``kind`` for micro-batch ``k`` (or the earliest of that kind when
        k is None); others arriving meanwhile stay buffered. Taking it returns the sender a
        credit. ``expect``: a pytree of TensorSpec the tree must match (see check_boundary)."""
        if type(kind) is not MessageKind:  # (MessageKind(kind) costs half a microsecond even when it is one)
            kind = MessageKind(kind)
        self.flush_acks()  # what the last get owed waits at most until this call (acks.py)
        with self._cond:
            item = self._inbox.take(kind, k)
        if item is None:
            item = self._wait(kind, k, timeout)
        _, message, link, seq = item
        if self.defer_acks and (link.admitted.sender, link.admitted.generation) in self._channel_to:
            self._acks.owe(link, seq)  # rides on our next message to that peer, if it comes first (acks.py)
        else:
            self._send_ack(link, seq)
        if expect is not None:
            check_boundary(expect, message.tree, sender_stage=message.stage, receiver_stage=self.stage)
        return message

    # A waiter reading the sockets itself re-checks closing and losses this often.
    WAIT_SLICE = 0.05

    def _wait(self, kind: MessageKind, k: int | None, timeout: float | None) -> tuple:
        """Block until (kind, k) is in the inbox and take it. Where the backend lets it, this
        thread reads the links itself meanwhile (``direct.py``); else the loop thread files
        what it reads and wakes this one."""
        readiness = self._wait_reads()
        claimed = readiness.claim(kind) if readiness is not None else None
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                with self._cond:
                    item = self._inbox.take(kind, k)
                    if item is not None:
                        return item
                    remaining = self._check_waiting(kind, k, timeout, deadline)
                    if claimed is None:
                        self._cond.wait(remaining)
                        continue
                readiness.pump(claimed, self.WAIT_SLICE if remaining is None else min(remaining, self.WAIT_SLICE))
        finally:
            if claimed is not None:
                readiness.release(claimed)

    def _wait_reads(self) -> Any:
        """The backend's ``direct.Readiness`` when a waiting thread may read its links, else None."""
        reads = getattr(self.backend, "wait_reads", None)
        return reads() if reads is not None else None

    def _check_waiting(self, kind: MessageKind, k: int | None, timeout: float | None,
                       deadline: float | None) -> float | None:
        """Raise what a wait for (kind, k) has come to, if anything; else the seconds left (under the lock)."""
        if self._closed:
            raise TransportError(f"stage {self.stage}: endpoint closed while waiting for {kind.name} k={k}")
        if self._lost:
            raise PeerLost(f"stage {self.stage}: waiting for {kind.name} k={k}, but {'; '.join(self._lost)}")
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            buffered = sorted(f"{key[0].name} k={key[1]}" for key in self._inbox.keys())
            raise TransportTimeout(f"stage {self.stage}: no {kind.name} k={k} within {timeout}s "
                                   f"(buffered: {buffered or 'nothing'})")
        return remaining

    def has(self, kind: MessageKind, k: int) -> bool:
        """Whether ``get(kind, k)`` would return at once (never blocks)."""
        with self._cond:
            return (kind if type(kind) is MessageKind else MessageKind(kind), k) in self._inbox

    def flush_acks(self) -> None:
        """Send every ack owed as its own frame (before blocking or closing, see acks.py)."""
        for link, seqs in self._acks.take_all():
            self._send_acks(link, seqs)

    def _acks_riding(self, channel: Channel) -> tuple[Any, list[int]] | None:
        """(link, seqs): the acks to put in ``channel``'s next message's meta; all others owed leave now."""
        riding, rest = self._acks.take_for(channel.peer_stage, channel.generation)
        for link, seqs in rest:
            self._send_acks(link, seqs)
        return riding

    def _send_acks(self, link: Any, seqs: list[int]) -> None:
        for seq in seqs:
            self._send_ack(link, seq)

    def _count_sent(self, nbytes: int) -> None:
        with self._cond:  # one lock round per message
            self.stats["sent"] += 1
            self.stats["bytes_sent"] += nbytes

    def _count(self, name: str, amount: int) -> None:
        with self._cond:
            self.stats[name] += amount

    # -- loop thread

    async def _listen(self, host: str, port: int) -> None:
        self._gate = Gate(self.credentials, stage=self.stage, generation=lambda: self.generation,
                          timeout=self.handshake_timeout, on_rejected=self._reject_connection, senders=self.senders)
        inbound = Inbound(gate=self._gate, pool=self._pool, on_message=self._on_message, on_closed=self._on_closed,
                          bound=self.payload_bound, adopt=self._adopt, refuse=self._reject_connection)
        self._server, self.address = await self.backend.listen(host, port, inbound)

    async def _open(self, address: str, peer_stage: int, channel: Channel, timeout: float) -> Any:
        """A link to the endpoint at ``address`` (stage ``peer_stage``), handshake done."""
        async def handshake(io: Any) -> None:
            try:
                await asyncio.wait_for(offer(io, self.credentials, stage=self.stage, peer_stage=peer_stage,
                                             generation=channel.generation), timeout)
            except BaseException:
                io.close()
                raise

        outbound = Outbound(pool=self._pool, on_message=channel._on_message, on_closed=channel._on_closed)
        return await self.backend.connect(address, handshake, outbound, timeout=timeout)

    def _adopt(self, link: Any, admitted: Admitted) -> None:
        link.admitted = admitted
        if admitted.sender in self.replica_peers:  # another replica of this stage: its gradient parts only
            link.carries = (MessageKind.REPLICA_PART, MessageKind.CONTROL)
            self._links.add(link)
            return
        # What this edge carries: activations from s - 1, gradients from s + 1 (CONTROL from either);
        # eval activations (forward-only evaluation) from s - 1 only.
        link.carries = (MessageKind.ACTIVATION if admitted.sender == self.stage - 1 else MessageKind.GRADIENT,
                         MessageKind.CONTROL)
        if admitted.sender == self.stage - 1:
            link.carries += (MessageKind.EVAL_ACTIVATION,)
        # Clipping's scalars (schedule/norms.py): the total from s - 1, partial sums from s + 1.
        link.carries += (MessageKind.NORM_TOTAL,) if admitted.sender == self.stage - 1 else (MessageKind.NORM_PARTIAL,)
        self._links.add(link)

    def _reject_connection(self, peer: str, reason: str) -> None:
        # Logged before counted: whoever sees the count can find the warning.
        self._warnings.warn("stage %d: refused a connection from %s: %s", self.stage, peer, reason)
        self._count("rejected_connections", 1)

    def _edge_problem(self, link: Any, meta: dict) -> str | None:
        """Why a frame may not come on this connection, or None."""
        admitted = link.admitted
        kind, sender = meta["kind"], admitted.sender
        if kind in link.carries and meta["s"] == sender and meta["g"] == admitted.generation:
            return None  # the common case, in one test
        if kind not in link.carries:
            return (f"{MessageKind(kind).name} on the connection from stage {sender}, which carries "
                    f"{link.carries[0].name} (and CONTROL) only")
        if meta["s"] != sender:
            return f"it claims to come from stage {meta['s']}"
        return f"it is of generation {meta['g']} on a connection of generation {admitted.generation}"

    def _on_message(self, link: Any, meta: dict, payload: Any) -> None:
        kind = meta["kind"]
        if kind == MessageKind.BYE:
            link.bye_seen = True
            return
        if kind == MessageKind.ACK:
            return  # acks only travel on outbound channels
        acks = meta.get("acks")
        if acks:  # credits for our channel back to this peer (checked by wire.check_meta), whatever the frame
            channel = self._channel_to.get((link.admitted.sender, link.admitted.generation))
            if channel is not None:
                for seq in acks:
                    channel._acked(seq)
        problem = self._edge_problem(link, meta)
        message = stale = None
        if problem is None:
            try:
                message = wire.decode(meta, payload)
            except Exception as error:  # noqa: BLE001 - a malformed tree: drop it, keep the loop
                problem = f"its tree does not decode ({error!r})"
        with self._cond:
            if problem is None:
                stale = message.generation < self._generation
                problem = None if stale else self._inbox.file(message, link, meta["seq"])
            if problem is None:
                self.stats["received"] += 1
                self.stats["bytes_received"] += message.nbytes
                if stale:
                    self.stats["dropped_stale"] += 1
                else:
                    self._cond.notify_all()
        if problem is not None:
            self._warnings.warn("stage %d: dropped a frame (%s k=%s) from %s: %s", self.stage,
                                MessageKind(kind).name, meta["k"], link.peer, problem)
            self._count("rejected_frames", 1)
        if problem is not None or stale:
            self._send_ack(link, meta["seq"])  # the sender's credit comes back all the same

    def _on_closed(self, link: Any, error: Exception | None) -> None:
        self._links.discard(link)
        if isinstance(error, Rejected):  # we ended it for a broken frame: dropped, not lost
            self._warnings.warn("stage %d: closed the connection from %s: %s", self.stage, link.peer, error)
            self._count("rejected_frames", 1)
            return
        if link.bye_seen or self._closed:
            return
        with self._cond:
            self._lost.append(f"the connection from {link.peer} dropped without goodbye ({error!r})")
            self._cond.notify_all()

    def _send_ack(self, link: Any, seq: int) -> None:
        link.write(wire.control_meta(MessageKind.ACK, seq, self._generation, self.stage), [])

    async def _shutdown(self) -> None:
        links = [channel._link for channel in self._channels] + list(self._links)
        for channel in self._channels:
            channel._goodbye()
        for link in list(self._links):  # inbound
            link.close()
        if self._gate is not None:
            self._gate.close()
        if self._server is not None:
            self.backend.close(self._server)
        deadline = time.monotonic() + 2
        while not all(link.finished for link in links) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # goodbyes and queued frames flush
        for link in links:
            if not link.finished:
                link.abort()
        await asyncio.sleep(0)

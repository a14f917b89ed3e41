"""Stage-to-stage transport: authenticated, bounded stage ports with credit flow control, over tcp:// or tls://.

One ``Endpoint`` per stage process listens on an address and opens one
outbound ``Channel`` per peer it sends to. Messages (``wire.Message``) carry
``(generation, stage, kind, k, version)`` and a pytree of host arrays.
The API faces the stage's compute thread and blocks there; an asyncio event
loop in a background thread of the endpoint only moves bytes::

    ep = Endpoint.start(stage=1, secret=job.secret, job_id=job.job_id)  # ep.address -> peers
    to_next = ep.connect(address_of_stage_2, peer_stage=2)   # once per peer: the handshake
    x = ep.get(Kind.ACTIVATION, k, timeout=60).tree      # blocks, any arrival order
    to_next.put(Kind.ACTIVATION, k, y, version=v)        # blocks while out of credit

Who may talk to a stage port: a connection is admitted only after the
handshake (``handshake.py``) proved, with an HMAC on the job's secret, that
it comes from this job, this generation and a neighbouring stage; nothing
else is read from it before. Then it may carry only what its edge carries:
stage s takes ACTIVATION only from stage s - 1's connection and GRADIENT only
from s + 1's (CONTROL from either); every frame's declared sizes are checked
before anything is allocated (``wire.MAX_META`` for the meta,
``max_payload`` for the payload, per sending stage; the runtime derives it
from the partition's boundary specs, see ``links.py``). A second message for
a (kind, k) that is buffered, or for one already taken in this generation,
is a protocol violation. Whatever fails a check is dropped, logged (a
warning naming the peer and why, rate-limited) and counted
(``stats["rejected_connections"]``, ``stats["rejected_frames"]``); it never
becomes a peer loss and never displaces a real message. Only an admitted
peer whose connection drops without a goodbye is lost.

Flow control: a channel has ``credits`` messages in flight at most; ``put``
blocks in the compute thread until the receiver's ``get`` of an earlier one
returns a credit (an ACK frame). The channel keeps every sent tree until its
ACK, so no send buffer is reused early; ``put`` returns a future that
resolves on that ACK for callers that recycle buffers. A dropped frame is
acknowledged too, so a sender's credit never leaks.

Fencing: the owner sets the generation (``set_generation``, bumped by the
runtime on recovery). A connection belongs to the generation it shook hands
for; messages older than the endpoint's are dropped, counted in
``stats["dropped_stale"]``, and acknowledged at once so the old sender's
credit still comes back. New connections for another generation are refused.

Failures never hang: a peer whose connection drops without a goodbye makes
``get`` (when its message is not already there) and ``put`` raise
``PeerLost``; every wait takes a timeout and raises ``TransportTimeout``
naming the stage and what it waited for.

Backends (same interface, ``backend=``):

- ``"stream"`` (default): the wire framing (``wire.py``). Plain tcp:// runs
  on a non-blocking socket: the calling thread sends what the kernel takes
  at once (a memoryview of the caller's arrays, under a lock), the loop
  thread sends any remainder and reads straight into pooled buffers; leaves
  are numpy views on them. tls:// runs on asyncio's SSL transport with the
  cluster's ``Security`` contexts (``get_listen_args("worker")`` /
  ``get_connection_args("worker")``), mutual TLS first, then the handshake
  inside it; same framing and receive path.
- ``"dask"``: ``distributed.comm`` connect/listen (its tcp/tls framing and
  serialization); the baseline, and a way to distributed's other comms. It
  runs the same handshake, but distributed.comm reads a whole message (and
  allocates what its prefix declares, and unpickles what it says is pickled)
  before any code of ours can refuse it, so no check on top can protect it.
  It therefore listens on loopback only, for benchmarks; the runtime always
  uses "stream".

Why "stream" is the default: ``bench/transport.py``, two processes on
loopback, 2-core VM under other load, two runs (ratio = GB/s over a plain
blocking socket pair's in the same run):

    payload   streaming, credits=4        ping-pong (2 x payload / RTT)
              stream      dask comm       stream      dask comm
    1 MiB     0.78-0.87   0.52-0.58       0.43-0.56   0.31-0.34
    16 MiB    1.03-1.25   0.54-0.83       0.80-1.02   0.38-0.88
    64 MiB    1.34-1.48   0.85-1.11       1.23-1.35   0.20-0.40
    4 KiB RTT 0.17-0.25 ms (socket pair 0.03 ms; dask comm 0.57-0.59 ms)

The stream transport clears the 0.7 bar from 1 MiB up in streaming, the
way a pipeline uses an edge; distributed.comm does not at 1 MiB. A lone
1 MiB ping-pong stays below 0.7: each message costs a fixed ~0.1 ms more
than a bare socket, the wake-up of the thread that waits in ``get``, which
credits overlap in a pipeline. (Ratios above 1: the blocking socket pair
wakes per arriving segment; it is a reference, not a ceiling.) tls:// moves
0.5-0.7 GB/s at 16-64 MiB, bound by encryption in asyncio's SSL layer. The
handshake costs one round trip per connection, never per message.

Why a loop thread of our own rather than the Dask worker's loop: the worker's
loop carries heartbeats and the scheduler stream; reading a 64 MiB activation
or encrypting it on that loop would stall both, and a private loop lets the
same code run in tests, benchmarks and the reference executor with no worker.
The cost is the thread wake-up above.

Layout: this module holds ``Endpoint`` (fencing, the rules a frame must
pass, losses) and is the one to import; ``Channel`` (credits) is in
``transport_channel.py``, the inbox in ``transport_inbox.py``, opening
connections (listen, connect, per backend) in ``transport_open.py``, the
handshake in ``handshake.py``, the loop thread and the links that move bytes
in ``transport_links.py``, the errors in ``transport_errors.py`` (re-exported
here).
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

from pipetrain.runtime import wire
from pipetrain.runtime.handshake import TIMEOUT as HANDSHAKE_TIMEOUT, Admitted, Credentials
from pipetrain.runtime.transport_errors import (
    PeerLost,
    Rejected,
    TransportError,
    TransportTimeout,
)
from pipetrain.runtime.transport_channel import Channel
from pipetrain.runtime.transport_inbox import Inbox
from pipetrain.runtime.transport_links import LoopThread
from pipetrain.runtime.transport_open import Listener, connect as open_link
from pipetrain.runtime.wire import BoundaryMismatch, Kind, Message, check_boundary

__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "BoundaryMismatch",
    "Channel",
    "Endpoint",
    "Kind",
    "Message",
    "PeerLost",
    "Rejected",
    "TransportError",
    "TransportTimeout",
    "check_boundary",
]

log = logging.getLogger("pipetrain.transport")

# The payload bound of an edge nobody described (tests, benchmarks, a stage
# without boundary specs): large enough for any one micro-batch's tensors we
# have met, small enough that a corrupt length is refused, not allocated.
DEFAULT_MAX_PAYLOAD = 1 << 30


class _WarningBudget:
    """At most ``burst`` warnings at once, then one per ``every`` seconds: a flood of
    junk connections must not flood the worker's log too (the counters see all)."""

    def __init__(self, burst: int = 20, every: float = 1.0):
        self.burst, self.every = burst, every
        self.tokens, self.last, self.suppressed = float(burst), time.monotonic(), 0

    def warn(self, text: str, *args: Any) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) / self.every)
        self.last = now
        if self.tokens < 1:
            self.suppressed += 1
            return
        self.tokens -= 1
        if self.suppressed:
            text += f" ({self.suppressed} more rejections since the last warning, counted in stats only)"
            self.suppressed = 0
        log.warning(text, *args)


# ---------------------------------------------------------------- endpoint


class Endpoint:
    """A stage process's transport: listens at ``address``, receives into an inbox."""

    _live: weakref.WeakSet = weakref.WeakSet()

    def __init__(self, *, stage: int, secret: bytes, job_id: str, security: Any, backend: str, credits: int,
                 generation: int, max_payload: int | Mapping[int, int], handshake_timeout: float):
        if backend not in ("stream", "dask"):
            raise ValueError(f"transport backend must be 'stream' or 'dask', got {backend!r}")
        self.stage = stage
        self.backend = backend
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
        self._listener: Listener | None = None
        self._links: set = set()  # admitted inbound connections
        self._channels: list[Channel] = []
        self._warnings = _WarningBudget()
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
    ) -> Endpoint:
        """Start the loop thread and listen. ``secret``: the job's key (at least 16 bytes),
        which every peer must prove it holds; ``security`` is a
        ``distributed.security.Security`` (tls:// when it has TLS settings, else tcp://);
        ``max_payload``: the most bytes one message's arrays may take, for every
        sender or per sending stage (a mapping; stages it omits get DEFAULT_MAX_PAYLOAD)."""
        endpoint = cls(stage=stage, secret=secret, job_id=job_id, security=security, backend=backend,
                       credits=credits, generation=generation, max_payload=max_payload,
                       handshake_timeout=handshake_timeout)
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
        channel = Channel(self, address, credits or self.credits, self._generation)
        try:
            channel._link = self._io.run(
                open_link(self, address, peer_stage=peer_stage, generation=channel.generation, timeout=timeout,
                          on_message=channel._on_message, on_closed=channel._on_closed),
                timeout + 1)
        except (TimeoutError, OSError, concurrent.futures.TimeoutError, Rejected) as error:
            raise TransportError(f"stage {self.stage}: cannot connect to {address}: {error!r}") from error
        self._channels.append(channel)
        return channel

    def get(
        self,
        kind: Kind,
        k: int | None = None,
        *,
        timeout: float | None = None,
        expect: Any = None,
    ) -> Message:
        """The message of ``kind`` for micro-batch ``k`` (or the earliest of that kind when
        k is None); others arriving meanwhile stay buffered. Taking it returns the sender a
        credit. ``expect``: a pytree of TensorSpec the tree must match (see check_boundary)."""
        if type(kind) is not Kind:  # (Kind(kind) costs half a microsecond even when it is one)
            kind = Kind(kind)
        with self._cond:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                item = self._inbox.take(kind, k)
                if item is not None:
                    break
                if self._closed:
                    raise TransportError(f"stage {self.stage}: endpoint closed while waiting for {kind.name} k={k}")
                if self._lost:
                    raise PeerLost(
                        f"stage {self.stage}: waiting for {kind.name} k={k}, but {'; '.join(self._lost)}"
                    )
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    buffered = sorted(f"{key[0].name} k={key[1]}" for key in self._inbox.keys())
                    raise TransportTimeout(
                        f"stage {self.stage}: no {kind.name} k={k} within {timeout}s "
                        f"(buffered: {buffered or 'nothing'})"
                    )
                self._cond.wait(remaining)
        _, message, link, seq = item
        self._send_ack(link, seq)
        if expect is not None:
            check_boundary(expect, message.tree, sender_stage=message.stage, receiver_stage=self.stage)
        return message

    def has(self, kind: Kind, k: int) -> bool:
        """Whether ``get(kind, k)`` would return at once (never blocks)."""
        with self._cond:
            return (kind if type(kind) is Kind else Kind(kind), k) in self._inbox

    def _count(self, name: str, amount: int) -> None:
        with self._cond:
            self.stats[name] += amount

    # -- loop thread

    async def _listen(self, host: str, port: int) -> None:
        self._listener = Listener(self)
        self.address = await self._listener.start(host, port)

    def _adopt(self, link: Any, admitted: Admitted) -> None:
        link.admitted = admitted
        # What this edge carries: activations from s - 1, gradients from s + 1 (CONTROL from either).
        link.carries = (Kind.ACTIVATION if admitted.sender == self.stage - 1 else Kind.GRADIENT, Kind.CONTROL)
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
            return (f"{Kind(kind).name} on the connection from stage {sender}, which carries "
                    f"{link.carries[0].name} (and CONTROL) only")
        if meta["s"] != sender:
            return f"it claims to come from stage {meta['s']}"
        return f"it is of generation {meta['g']} on a connection of generation {admitted.generation}"

    def _on_message(self, link: Any, meta: dict, payload: Any) -> None:
        kind = meta["kind"]
        if kind == Kind.BYE:
            link.bye_seen = True
            return
        if kind == Kind.ACK:
            return  # acks only travel on outbound channels
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
                                Kind(kind).name, meta["k"], link.peer, problem)
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
        link.write(wire.control_meta(Kind.ACK, seq, self._generation, self.stage), [])

    async def _shutdown(self) -> None:
        links = [channel._link for channel in self._channels] + list(self._links)
        for channel in self._channels:
            channel._goodbye()
        for link in list(self._links):  # inbound
            link.close()
        if self._listener is not None:
            self._listener.close()
        deadline = time.monotonic() + 2
        while not all(link.finished for link in links) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # goodbyes and queued frames flush
        for link in links:
            if not link.finished:
                link.abort()
        await asyncio.sleep(0)

"""Stage-to-stage transport: authenticated, bounded stage ports with credit flow control, over tcp://, tls:// or ucx://.

One ``Endpoint`` per stage process listens on an address and opens one
outbound ``Channel`` per peer it sends to. Messages (``wire.Message``) carry
``(generation, stage, kind, k, version)`` and a pytree of host arrays.
The API faces the stage's compute thread and blocks there. Over plain
tcp:// the thread that waits in ``get`` reads the sockets itself, straight
into pooled buffers, and sends go out from the calling thread; an asyncio
event loop in a background thread of the endpoint reads only while nobody
waits, finishes sends the kernel did not take at once, and runs handshakes
and TLS (``direct.py``)::

    ep = Endpoint.start(stage=1, secret=job.secret, job_id=job.job_id)  # ep.address -> peers
    to_next = ep.connect(address_of_stage_2, peer_stage=2)   # once per peer: the handshake
    x = ep.get(MessageKind.ACTIVATION, k, timeout=60).tree  # blocks, any arrival order
    to_next.put(MessageKind.ACTIVATION, k, y, version=v)    # blocks while out of credit

Who may talk to a stage port: a connection is admitted only after the
handshake (``handshake.py``) proved, with an HMAC on the job's secret, that
it comes from this job, this generation and a neighbouring stage; nothing
else is read from it before. Then it may carry only what its edge carries:
stage s takes ACTIVATION only from stage s - 1's connection and GRADIENT only
from s + 1's (CONTROL from either); every frame's declared sizes are checked
before anything is allocated (``wire.MAX_META`` for the meta,
``max_payload`` for the payload, per sending stage; the runtime derives it
from the partition's boundary specs, see ``runtime/links.py``). A second message for
a (kind, k) that is buffered, or for one already taken in this generation,
is a protocol violation. Whatever fails a check is dropped, logged (a
warning naming the peer and why, rate-limited) and counted
(``stats["rejected_connections"]``, ``stats["rejected_frames"]``); it never
becomes a peer loss and never displaces a real message. Only an admitted
peer whose connection drops without a goodbye is lost.

Flow control: a channel has ``credits`` messages in flight at most; ``put``
blocks in the compute thread until the receiver's ``get`` of an earlier one
returns a credit: an ACK frame, or, on an edge the receiver also sends back
on, the sequence number riding in its next message's meta (``acks.py``: it
waits at most until the receiver's next transport call, and never while the
receiver blocks). The channel keeps every sent tree until its
ACK, so no send buffer is reused early; ``put`` returns a ``Delivery``
(``done()``, ``result(timeout)``, like a Future) that is done on that ACK,
for callers that recycle buffers. A dropped frame is
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

Backends: ``Endpoint.start(backend=...)`` picks one object once
(``endpoint.choose_backend``) that listens, connects and stops listening;
nothing else in the transport asks which it is (the interface:
``backend.py``). Each runs the same handshake, and the endpoint applies the
same rules to what its links deliver.

- ``"stream"`` (default): the wire framing (``wire.py``). Without TLS,
  ``StreamBackend`` (``stream.py``): plain tcp:// on a non-blocking socket;
  the calling thread sends what the kernel takes at once (a memoryview of
  the caller's arrays, under a lock), the loop thread sends any remainder;
  reads go straight into pooled buffers, in the waiting thread or the loop
  (``direct.py``); leaves are numpy views on them. A link names each tree
  layout (structure, dtypes, shapes) once in a JSON meta and then sends its
  messages with 40-byte binary metas checked against it (``compact.py``).
  When the ``Security`` has TLS settings for the worker role,
  ``TlsBackend`` (``tls.py``): tls:// on asyncio's SSL transport with the
  cluster's contexts (``get_listen_args("worker")`` /
  ``get_connection_args("worker")``), mutual TLS first, then the handshake
  inside it; same framing and receive path.
- ``"dask"``: ``DaskCommBackend`` (``dask_comm.py``), ``distributed.comm``
  connect/listen (its tcp/tls framing and serialization); the baseline, and
  a way to distributed's other comms. distributed.comm reads a whole
  message (and allocates what its prefix declares, and unpickles what it
  says is pickled) before any code of ours can refuse it, so no check on top
  can protect it. It therefore listens on loopback only, for benchmarks; the
  runtime never uses it.
- ``"ucx"``: ``UcxBackend`` (``ucx.py``), ucx:// through ucxx (the optional
  ``ucx`` extra), chosen by a job's ``[cluster] transport = "ucx"``: the same
  handshake and frame checks, each frame one or a few UCX tag messages.
  No encryption (refused with a TLS Security); see its docstring for what
  UCX does before the handshake.

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
than a bare socket, which credits overlap in a pipeline. (These figures
predate ``direct.py`` and ``acks.py``, which took the loop-to-compute
thread hand-off and the ACK frame off a round trip; the README's transport
section has the side-by-side figures.) (Ratios above 1: the blocking socket pair
wakes per arriving segment; it is a reference, not a ceiling.) tls:// moves
0.5-0.7 GB/s at 16-64 MiB, bound by encryption in asyncio's SSL layer. The
handshake costs one round trip per connection, never per message.

Why a loop thread of our own rather than the Dask worker's loop: the worker's
loop carries heartbeats and the scheduler stream; reading a 64 MiB activation
or encrypting it on that loop would stall both, and a private loop lets the
same code run in tests, benchmarks and the reference executor with no worker.
Over tcp:// it is off the common path: a stage that waits reads for itself.

Layout of this package (import from the package itself):
``endpoint.py`` ``Endpoint`` (fencing, the rules a frame must pass, losses,
the choice of backend); ``channel.py`` ``Channel`` (credits); ``acks.py``
credits riding on data; ``direct.py`` who reads a tcp:// link (the loop or
the waiting thread); ``inbox.py`` the inbox; ``handshake.py`` the
handshake; ``wire.py`` the framing and ``MessageKind``; ``backend.py`` the
backends' interface and what they share; ``stream.py``, ``tls.py``,
``dask_comm.py``, ``ucx.py`` one backend each, with its link;
``reader.py`` the frame parser the two stream links share; ``compact.py``
tcp://'s binary metas for layouts a link named; ``loop.py`` the
loop thread; ``errors.py`` the errors.
"""
from __future__ import annotations

from pipetrain.runtime.transport.endpoint import DEFAULT_MAX_PAYLOAD, Endpoint, choose_backend
from pipetrain.runtime.transport.channel import Channel
from pipetrain.runtime.transport.errors import PeerLost, Rejected, TransportError, TransportTimeout
from pipetrain.runtime.transport.wire import BoundaryMismatch, Message, MessageKind, check_boundary

__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "BoundaryMismatch",
    "Channel",
    "Endpoint",
    "Message",
    "MessageKind",
    "PeerLost",
    "Rejected",
    "TransportError",
    "TransportTimeout",
    "check_boundary",
    "choose_backend",
]

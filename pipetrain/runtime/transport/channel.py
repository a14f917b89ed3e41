"""The sending side of one edge: ``Channel``, with its credits and unacknowledged trees.

``Endpoint.connect`` makes one per peer (after the handshake) and is where
users get it; see the package's docstring for flow control and fencing.
A channel belongs to the generation it shook hands for and stamps it on
every message, whatever its endpoint's generation later becomes.
"""
from __future__ import annotations

import itertools
import threading
from typing import Any

from pipetrain.runtime.transport import wire
from pipetrain.runtime.transport.errors import PeerLost, TransportError, TransportTimeout
from pipetrain.runtime.transport.wire import Message, MessageKind

__all__ = ["Channel", "Delivery"]


class Delivery:
    """What ``put`` returns: done when the receiver has taken the message (its ack came back),
    or failed with the channel's loss. A ``concurrent.futures.Future``'s ``done`` and ``result``,
    without a Future's own Condition per message: it waits on its channel's."""

    __slots__ = ("_channel", "_done", "_error")

    def __init__(self, channel: "Channel"):
        self._channel, self._done, self._error = channel, False, None

    def done(self) -> bool:
        return self._done

    def result(self, timeout: float | None = None) -> None:
        cond = self._channel._cond
        with cond:
            if not cond.wait_for(lambda: self._done, timeout):
                raise TimeoutError(f"message to {self._channel.peer} not taken within {timeout}s")
        if self._error is not None:
            raise self._error


class Channel:
    """The sending side of one edge, to one peer endpoint. Use from the compute thread."""

    def __init__(self, endpoint: Any, peer: str, credits: int, generation: int, *, peer_stage: int = -1):
        self.peer = peer
        self.peer_stage = peer_stage
        self.credits = credits
        self.generation = generation  # the one it shook hands for: every message carries it
        self._endpoint = endpoint
        self._link: Any = None
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._unacked: dict[int, tuple[Delivery, Any]] = {}
        self._error: TransportError | None = None
        self._closing = False

    @property
    def in_flight(self) -> int:
        return len(self._unacked)

    def put(
        self,
        kind: MessageKind,
        k: int,
        tree: Any = None,
        *,
        version: int = 0,
        info: Any = None,
        timeout: float | None = None,
    ) -> Delivery:
        """Send one message; block while ``credits`` messages are unacknowledged.

        Returns a ``Delivery`` (``done()``, ``result(timeout)``), done when the receiver has taken the message
        (its ``get`` returned); the channel keeps ``tree`` alive until then.
        """
        ep = self._endpoint
        message = Message(kind=kind if type(kind) is MessageKind else MessageKind(kind), k=k, tree=tree,
                          version=version, stage=ep.stage, generation=self.generation, info=info)
        if len(self._unacked) >= self.credits:
            # About to block on credit: never while our peer waits on ours. (The loop reads the
            # acks meanwhile: reading them here, as get reads, cost streaming throughput.)
            ep.flush_acks()
        with self._cond:
            ok = (not self._error and len(self._unacked) < self.credits  # the common case, without a wait
                  or self._cond.wait_for(lambda: self._error or len(self._unacked) < self.credits, timeout))
            if self._error:
                raise self._error
            if not ok:
                raise TransportTimeout(
                    f"stage {ep.stage}: no credit back from {self.peer} within {timeout}s to send {kind.name} k={k}: "
                    f"{len(self._unacked)} messages unacknowledged (the receiver has not taken them)"
                )
            seq = next(self._seq)
            done = Delivery(self)
            self._unacked[seq] = (done, tree)
        riding = None
        try:
            meta, buffers = wire.encode(message, seq)  # in this thread: the loop only moves bytes
            riding = ep._acks_riding(self)
            if riding is not None:
                meta["acks"] = riding[1]  # credits for the peer's channel to us (acks.py)
            self._link.write(meta, buffers)  # thread-safe; plain tcp sends from this thread
        except (TypeError, ValueError):  # not sendable (dtype, too many leaves): nothing went out
            with self._cond:
                self._unacked.pop(seq, None)
            if riding is not None:
                ep._send_acks(*riding)  # the credits leave on their own
            raise
        ep._count_sent(sum(b.nbytes for b in buffers))
        return done

    def wait_acked(self, *, timeout: float | None = None) -> None:
        """Block until every message sent on this channel has been taken by the receiver."""
        self._endpoint.flush_acks()
        with self._cond:
            if not self._cond.wait_for(lambda: self._error or not self._unacked, timeout):
                raise TransportTimeout(f"stage {self._endpoint.stage}: {len(self._unacked)} messages to {self.peer} "
                                       f"unacknowledged after {timeout}s")
            if self._error and self._unacked:
                raise self._error

    def close(self) -> None:
        """Say goodbye and close (after what is queued has been written)."""
        if self._link is not None:
            self._endpoint._io.call(self._goodbye)

    # -- loop thread
    def _goodbye(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._link.write(wire.control_meta(MessageKind.BYE, -1, self.generation, self._endpoint.stage), [])
        self._link.close()

    def _on_message(self, link: Any, meta: dict, payload: Any) -> None:
        if meta["kind"] == MessageKind.ACK:
            self._acked(meta["seq"])

    def _on_closed(self, link: Any, error: Exception | None) -> None:
        if self._closing:
            self._lost("this channel was closed")
        elif not self._endpoint._closed:
            self._lost(repr(error) if error else "closed by peer")

    def _acked(self, seq: int) -> None:
        with self._cond:
            done, _ = self._unacked.pop(seq, (None, None))
            if done is not None:
                done._done = True
            self._cond.notify_all()

    def _lost(self, reason: str) -> None:
        with self._cond:
            self._error = PeerLost(
                f"stage {self._endpoint.stage}: connection to {self.peer} lost ({reason}); "
                f"{len(self._unacked)} messages unacknowledged"
            )
            for done, _ in self._unacked.values():
                if not done._done:
                    done._done, done._error = True, self._error
            self._cond.notify_all()

"""The transport's errors, in a module of their own.

The backends and their links, the handshake, the framing (``wire``) and the
channel and endpoint built on them all raise these; keeping them apart lets
each import them without importing the others. Users import them from
``pipetrain.runtime.transport``.
"""
from __future__ import annotations

from pipetrain.errors import RetryableError

__all__ = ["PeerLost", "Rejected", "TransportError", "TransportTimeout"]


class TransportError(RetryableError, RuntimeError):
    """The transport cannot deliver: closed endpoint, bad address, protocol error.
    Retryable: the machinery around the stage failed, not its computation."""


class PeerLost(TransportError):
    """A peer's connection dropped without saying goodbye."""


class TransportTimeout(TransportError, TimeoutError):
    """A get or put waited longer than its timeout."""


class Rejected(TransportError):
    """A connection or a frame failed a check (handshake, size bound, protocol rule).

    The endpoint drops it, logs why and counts it; it is never a peer loss.
    """

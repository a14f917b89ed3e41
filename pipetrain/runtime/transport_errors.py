"""The transport's errors, in a module of their own.

The links that move bytes (``transport_links``) and the channel and endpoint
built on them (``transport``) both raise these; keeping them apart lets both
import them without importing each other. Users import them from
``pipetrain.runtime.transport``.
"""
from __future__ import annotations

__all__ = ["PeerLost", "TransportError", "TransportTimeout"]


class TransportError(RuntimeError):
    """The transport cannot deliver: closed endpoint, bad address, protocol error."""


class PeerLost(TransportError):
    """A peer's connection dropped without saying goodbye."""


class TransportTimeout(TransportError, TimeoutError):
    """A get or put waited longer than its timeout."""

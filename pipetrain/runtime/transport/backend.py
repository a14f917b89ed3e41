"""What every transport backend offers the endpoint, and what backends share.

A backend is how a stage port's bytes travel: plain tcp:// on non-blocking
sockets (``stream.StreamBackend``), tls:// on asyncio's SSL transport
(``tls.TlsBackend``), ``distributed.comm`` (``dask_comm.DaskCommBackend``),
or ucx:// through ucxx (``ucx.UcxBackend``).
The endpoint picks one when it is made (``endpoint.choose_backend``: "stream"
is tls:// exactly when the cluster's ``Security`` has TLS settings for the
worker role) and from then on only calls, on its loop thread::

    backend.scheme                          "tcp", "tls" or "ucx": what its addresses start with
    await backend.listen(host, port, inbound) -> (server, the address peers connect to)
    await backend.connect(address, handshake, outbound, timeout=t) -> a link, handshake done
    backend.close(server)                   stop listening

A backend decides nothing about who may talk. An inbound connection becomes
a link only through ``Inbound.admit``: the handshake's gate
(``handshake.Gate``) screens it on the backend's I/O adaptor before a single
frame is read, the link is made bounded by what its sender's edge may carry
(``Endpoint.payload_bound``) and handed to the endpoint before any byte
reaches it. An outbound connection becomes a link only once ``handshake``
(the connector's side, ``handshake.offer``) has seen the listener prove it
holds the job's secret. Before that, nothing is read but the handshake's
fixed-size records. What a link is: ``stream.py``'s docstring.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pipetrain.runtime.transport import wire
from pipetrain.runtime.transport.errors import TransportError
from pipetrain.runtime.transport.handshake import Admitted, Gate

__all__ = ["Backend", "Inbound", "Outbound", "check_address", "contact_address", "host_port", "is_loopback",
           "ssl_context"]

# The connector's side of the handshake on a backend's I/O adaptor; closes it when it fails.
Handshake = Callable[[Any], Awaitable[None]]


@dataclass(frozen=True)
class Inbound:
    """The endpoint's side of its listening port, as its backend sees it."""

    gate: Gate
    pool: wire.BufferPool
    on_message: Callable  # (link, meta, payload): every frame an admitted link reads
    on_closed: Callable  # (link, error)
    bound: Callable[[int], int]  # the sending stage -> the most payload bytes one of its messages may declare
    adopt: Callable[[Any, Admitted], None]  # takes an admitted link in, before any byte reaches it
    refuse: Callable[[str, str], None]  # (peer, reason): a connection that failed before it reached the gate

    def spawn(self, coro: Any) -> None:
        """Run ``coro`` (an ``admit``) on the loop, referenced until it ends."""
        self.gate.spawn(coro)

    async def admit(self, io: Any, peer: str, make_link: Callable[[int], Any]) -> Any:
        """The link for a new connection (``make_link(its payload bound)``, adopted), or
        None when the gate refused it (closed, logged and counted there)."""
        admitted = await self.gate.screen(io, peer)
        if admitted is None:
            return None
        if self.gate.closed:
            # The endpoint closed while this handshake finished (asyncio.wait_for can return a result it
            # was cancelled for): adopted now, the link would outlive the close, its peer never told.
            io.close()
            return None
        link = make_link(self.bound(admitted.sender))
        self.adopt(link, admitted)
        return link


@dataclass(frozen=True)
class Outbound:
    """What a channel's link is made with. It reads at most ACKs (a max_payload of 0)."""

    pool: wire.BufferPool
    on_message: Callable
    on_closed: Callable


class Backend(Protocol):
    scheme: str

    async def listen(self, host: str, port: int, inbound: Inbound) -> tuple[Any, str]: ...

    async def connect(self, address: str, handshake: Handshake, outbound: Outbound, *, timeout: float) -> Any: ...

    def close(self, server: Any) -> None: ...


def ssl_context(security: Any, purpose: str) -> Any:
    """The cluster's TLS context for the "worker" role (None: plain tcp://)."""
    if security is None:
        return None
    args = security.get_listen_args("worker") if purpose == "listen" else security.get_connection_args("worker")
    return args.get("ssl_context")


def check_address(address: str, *, scheme: str, security: Any, stage: int) -> None:
    """Refuse (``TransportError``) an address an endpoint speaking ``scheme`` may not or cannot reach."""
    theirs, _, location = address.partition("://")
    if scheme == "ucx" or theirs == "ucx":  # ucx:// only ever reaches ucx:// (its own backend, ucx.py)
        if theirs != scheme or not location:
            raise TransportError(f"stage {stage}: address {address!r} is not {scheme}://host:port, "
                                 f"what this endpoint's transport backend speaks")
        return
    if theirs not in ("tcp", "tls") or not location:
        raise TransportError(f"stage {stage}: address {address!r} is not tcp://host:port or tls://host:port")
    if theirs == "tls" and scheme != "tls":
        raise TransportError(f"stage {stage}: {address} needs TLS "
                             "but this endpoint has no Security with TLS settings")
    if theirs == "tcp" and security is not None and security.require_encryption:
        raise TransportError(f"stage {stage}: security requires encryption but {address} is plain tcp://")
    if theirs != scheme:
        raise TransportError(f"stage {stage}: {address} is plain tcp://, but this endpoint speaks tls:// only")


def host_port(address: str) -> tuple[str, int]:
    """``tcp://host:port`` or ``tls://[v6]:port`` (checked by check_address) as (host, port)."""
    host, port = address.partition("://")[2].rsplit(":", 1)
    return host.strip("[]"), int(port)


def contact_address(scheme: str, listening: Any, host: str) -> str:
    """The address peers reach a listening socket at (this host's IP when it listens on all)."""
    bound_host, bound_port = listening.getsockname()[:2]
    if host in ("", "0.0.0.0", "::"):
        from distributed.utils import get_ip

        bound_host = get_ip()
    return f"{scheme}://{bound_host}:{bound_port}"


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False

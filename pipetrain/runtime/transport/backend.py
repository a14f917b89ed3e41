"""How a stage port's connections open: listen and connect per backend, each through the handshake.

``transport.Endpoint`` starts a ``Listener`` and opens its channels with
``connect``; both run on the endpoint's loop thread. An inbound connection
becomes a link only once ``handshake.Gate`` has admitted it (and is then
bounded by what its edge may carry: ``Endpoint.payload_bound``); an outbound
one only once the listener has proved it holds the job's secret. Before
that, nothing is read but the handshake's fixed-size records.

Kept apart from ``transport.py`` (credits, fencing, the inbox) and from
``transport_links.py`` (moving bytes on an open link).
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any, Callable

from pipetrain.runtime.handshake import CommIO, Gate, HandshakeProtocol, SocketIO, offer
from pipetrain.runtime.transport_errors import TransportError
from pipetrain.runtime.transport_links import DaskLink, SocketLink, TlsLink

__all__ = ["Listener", "connect", "ssl_context"]


def ssl_context(security: Any, purpose: str) -> Any:
    """The cluster's TLS context for the "worker" role (None: plain tcp://)."""
    if security is None:
        return None
    args = security.get_listen_args("worker") if purpose == "listen" else security.get_connection_args("worker")
    return args.get("ssl_context")


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Listener:
    """An endpoint's listening socket: every connection goes through the gate first."""

    def __init__(self, endpoint: Any):
        self.endpoint = endpoint
        self.gate = Gate(endpoint.credentials, stage=endpoint.stage, generation=lambda: endpoint.generation,
                         timeout=endpoint.handshake_timeout, on_rejected=endpoint._reject_connection)
        self._server: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self, host: str, port: int) -> str:
        """Listen; returns the address peers connect to."""
        ep = self.endpoint
        self._loop = loop = asyncio.get_running_loop()
        context = ssl_context(ep.security, "listen")
        scheme = "tls" if context is not None else "tcp"
        if ep.security is not None and ep.security.require_encryption and context is None:
            raise TransportError("security requires encryption but has no TLS certificate for the 'worker' role")
        if ep.backend == "dask":
            return await self._start_dask(f"{scheme}://{host}:{port}", host)
        if context is not None:
            self._server = await loop.create_server(
                lambda: HandshakeProtocol(on_made=lambda proto: self.gate.spawn(self._admit_tls(proto))),
                host, port, ssl=context, ssl_handshake_timeout=ep.handshake_timeout)
            listening = self._server.sockets[0]
        else:
            listening = socket.create_server((host, port), backlog=64)
            listening.setblocking(False)
            self._server = listening
            loop.add_reader(listening.fileno(), self._accept)
        bound_host, bound_port = listening.getsockname()[:2]
        if host in ("", "0.0.0.0", "::"):
            from distributed.utils import get_ip

            bound_host = get_ip()
        return f"{scheme}://{bound_host}:{bound_port}"

    def _accept(self) -> None:
        try:
            sock, where = self._server.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:  # out of file descriptors, say: that connection waits in the backlog
            self.endpoint._reject_connection("?", f"accept failed ({error!r})")
            return
        sock.setblocking(False)
        self.gate.spawn(self._admit_socket(sock, f"{where[0]}:{where[1]}"))

    async def _admit_socket(self, sock: socket.socket, peer: str) -> None:
        ep = self.endpoint
        admitted = await self.gate.screen(SocketIO(sock, self._loop), peer)
        if admitted is not None:
            link = SocketLink(sock, self._loop, ep._pool, ep._on_message, ep._on_closed,
                              max_payload=ep.payload_bound(admitted.sender), peer=peer)
            ep._adopt(link, admitted)

    async def _admit_tls(self, proto: HandshakeProtocol) -> None:
        ep = self.endpoint
        admitted = await self.gate.screen(proto, proto.peer)
        if admitted is not None:
            link = TlsLink(self._loop, ep._pool, ep._on_message, ep._on_closed,
                           max_payload=ep.payload_bound(admitted.sender))
            ep._adopt(link, admitted)  # before any byte reaches it
            proto.hand_over(link)

    async def _start_dask(self, address: str, host: str) -> str:
        # distributed.comm reads a whole message, allocating whatever size its
        # frame prefix declares and unpickling what it says is pickled, before
        # our handler sees a byte: no handshake on top can bound that. So this
        # baseline backend runs the handshake too, but listens on loopback only.
        from distributed.comm import listen

        ep = self.endpoint
        if not _is_loopback(host):
            raise TransportError(f"stage {ep.stage}: the 'dask' transport backend listens on loopback only "
                                 f"(asked for {host!r}): distributed.comm reads and deserializes a message "
                                 "before any handshake can refuse it; use the default 'stream' backend")

        async def handle(comm: Any) -> None:
            admitted = await self.gate.screen(CommIO(comm), comm.peer_address)
            if admitted is not None:
                link = DaskLink(comm, ep._on_message, ep._on_closed, max_payload=ep.payload_bound(admitted.sender))
                ep._adopt(link, admitted)
                await asyncio.gather(*link._tasks, return_exceptions=True)

        listen_args = ep.security.get_listen_args("worker") if ep.security else {}
        self._server = listen(address, handle, **listen_args)
        await self._server.start()
        return self._server.contact_address

    def close(self) -> None:
        self.gate.close()
        if self._server is None:
            return
        if self.endpoint.backend == "dask":
            self._server.stop()
        elif isinstance(self._server, socket.socket):
            self._loop.remove_reader(self._server.fileno())
            self._server.close()
        else:
            self._server.close()


async def connect(ep: Any, address: str, *, peer_stage: int, generation: int, timeout: float,
                  on_message: Callable, on_closed: Callable) -> Any:
    """A link to the endpoint at ``address`` (stage ``peer_stage``), handshake done."""
    scheme, _, location = address.partition("://")
    if scheme not in ("tcp", "tls") or not location:
        raise TransportError(f"stage {ep.stage}: address {address!r} is not tcp://host:port or tls://host:port")
    context = ssl_context(ep.security, "connect")
    if scheme == "tls" and context is None:
        raise TransportError(f"stage {ep.stage}: {address} needs TLS "
                             "but this endpoint has no Security with TLS settings")
    if scheme == "tcp" and ep.security is not None and ep.security.require_encryption:
        raise TransportError(f"stage {ep.stage}: security requires encryption but {address} is plain tcp://")

    async def handshake(io: Any) -> None:
        try:
            await asyncio.wait_for(offer(io, ep.credentials, stage=ep.stage, peer_stage=peer_stage,
                                         generation=generation), timeout)
        except BaseException:
            io.close()
            raise

    if ep.backend == "dask":
        from distributed.comm import connect as comm_connect

        args = ep.security.get_connection_args("worker") if ep.security else {}
        comm = await comm_connect(address, timeout=timeout, **args)
        await handshake(CommIO(comm))
        return DaskLink(comm, on_message, on_closed, max_payload=0)  # it receives only ACKs
    host, port = location.rsplit(":", 1)
    host = host.strip("[]")
    loop = asyncio.get_running_loop()
    if context is not None:
        _, proto = await asyncio.wait_for(
            loop.create_connection(HandshakeProtocol, host, int(port), ssl=context, server_hostname=host), timeout)
        await handshake(proto)
        link = TlsLink(loop, ep._pool, on_message, on_closed, max_payload=0)
        proto.hand_over(link)
        return link
    family, kind, proto_number, _, where = (await loop.getaddrinfo(host, int(port), type=socket.SOCK_STREAM))[0]
    sock = socket.socket(family, kind, proto_number)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, where), timeout)
    except BaseException:
        sock.close()
        raise
    await handshake(SocketIO(sock, loop))
    return SocketLink(sock, loop, ep._pool, on_message, on_closed, max_payload=0)

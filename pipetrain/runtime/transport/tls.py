"""The "stream" backend over tls://: asyncio's SSL transport with the cluster's certificates.

Chosen for backend "stream" when the cluster's ``Security`` has TLS
settings for the worker role (``get_listen_args("worker")`` /
``get_connection_args("worker")``): mutual TLS first, then the handshake
inside the TLS session (``handshake.HandshakeProtocol`` holds the
connection until then), then the same framing and receive path as plain
tcp:// (``reader.FrameReader``). What a link is: ``stream.py``.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from pipetrain.runtime.transport import wire
from pipetrain.runtime.transport.backend import Handshake, Inbound, Outbound, contact_address, host_port
from pipetrain.runtime.transport.errors import Rejected, TransportError
from pipetrain.runtime.transport.handshake import HandshakeProtocol
from pipetrain.runtime.transport.reader import FrameReader

__all__ = ["TlsBackend", "TlsLink"]


class TlsBackend:
    """tls://: an asyncio SSL server, a ``TlsLink`` per connection once the handshake is done."""

    scheme = "tls"

    def __init__(self, listen_context: Any, connect_context: Any):
        if listen_context is None or connect_context is None:
            raise TransportError("the Security has no TLS context for the 'worker' role to "
                                 f"{'listen' if listen_context is None else 'connect'} with")
        self.listen_context, self.connect_context = listen_context, connect_context

    async def listen(self, host: str, port: int, inbound: Inbound) -> tuple[Any, str]:
        loop = asyncio.get_running_loop()

        async def admit(proto: HandshakeProtocol) -> None:
            link = await inbound.admit(proto, proto.peer, lambda bound: TlsLink(
                loop, inbound.pool, inbound.on_message, inbound.on_closed, max_payload=bound))
            if link is not None:
                proto.hand_over(link)  # adopted before any byte reaches it

        server = await loop.create_server(
            lambda: HandshakeProtocol(on_made=lambda proto: inbound.spawn(admit(proto))),
            host, port, ssl=self.listen_context, ssl_handshake_timeout=inbound.gate.timeout)
        return server, contact_address(self.scheme, server.sockets[0], host)

    async def connect(self, address: str, handshake: Handshake, outbound: Outbound, *, timeout: float) -> Any:
        host, port = host_port(address)
        loop = asyncio.get_running_loop()
        _, proto = await asyncio.wait_for(
            loop.create_connection(HandshakeProtocol, host, port, ssl=self.connect_context, server_hostname=host),
            timeout)
        await handshake(proto)
        link = TlsLink(loop, outbound.pool, outbound.on_message, outbound.on_closed, max_payload=0)
        proto.hand_over(link)
        return link

    def close(self, server: Any) -> None:
        server.close()


class TlsLink(asyncio.BufferedProtocol):
    """tls:// over asyncio's SSL transport; writes go through the loop thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: wire.BufferPool, on_message: Callable,
                 on_closed: Callable, *, max_payload: int):
        self.peer = "?"
        self.bye_seen = False
        self.admitted: Any = None
        self._loop = loop
        self._on_closed = on_closed
        self._reader = FrameReader(pool, lambda meta, payload: on_message(self, meta, payload),
                                   max_payload=max_payload)
        self._transport: asyncio.Transport | None = None

    # -- writing (any thread: hops to the loop). Encryption copies the bytes
    # anyway, so the frames go to the SSL transport whole; credits bound it.
    def write(self, meta: dict, buffers: list[np.ndarray]) -> None:
        frames = wire.frames(meta, buffers)
        if threading.get_ident() == self._loop._thread_id:  # type: ignore[attr-defined]
            self._write_now(frames)
        else:
            self._loop.call_soon_threadsafe(self._write_now, frames)

    def _write_now(self, frames: list[Any]) -> None:
        if self._transport is None or self._transport.is_closing():
            return  # on_closed has reported it
        for frame in frames:
            self._transport.write(frame)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()  # after what is buffered

    @property
    def finished(self) -> bool:
        return self._transport is None

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # -- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._on_closed(self, exc)

    def eof_received(self) -> bool:
        return False

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._reader.buffer()

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self._reader.consumed(nbytes)
        except Exception as error:  # noqa: BLE001 - a corrupt stream ends the link, loudly
            if not isinstance(error, Rejected):
                error = TransportError(f"protocol error from {self.peer}: {error}")
            self._on_closed(self, error)
            self._on_closed = lambda link, exc: None
            self.abort()

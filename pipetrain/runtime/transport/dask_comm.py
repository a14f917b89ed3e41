"""The "dask" backend: ``distributed.comm`` connect/listen, its tcp/tls framing and serialization.

The baseline ``bench/transport.py`` measures the stream backend against, and
a way to distributed's other comms. It runs the same handshake (over
``handshake.CommIO``), but distributed.comm reads a whole message, allocating
whatever size its frame prefix declares and unpickling what it says is
pickled, before any code of ours can refuse it: no check on top can protect
it. So it listens on loopback only; the runtime always uses "stream".
What a link is: ``stream.py``.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from pipetrain.runtime.transport import wire
from pipetrain.runtime.transport.backend import Handshake, Inbound, Outbound, is_loopback, ssl_context
from pipetrain.runtime.transport.errors import Rejected, TransportError
from pipetrain.runtime.transport.handshake import CommIO

__all__ = ["DaskCommBackend", "DaskLink"]


class DaskCommBackend:
    """distributed.comm with the cluster's Security (tls:// when it has TLS settings, else tcp://)."""

    def __init__(self, security: Any = None):
        self.scheme = "tcp" if ssl_context(security, "listen") is None else "tls"
        self.listen_args = security.get_listen_args("worker") if security is not None else {}
        self.connection_args = security.get_connection_args("worker") if security is not None else {}

    async def listen(self, host: str, port: int, inbound: Inbound) -> tuple[Any, str]:
        from distributed.comm import listen

        if not is_loopback(host):
            raise TransportError(f"stage {inbound.gate.stage}: the 'dask' transport backend listens on loopback "
                                 f"only (asked for {host!r}): distributed.comm reads and deserializes a message "
                                 "before any handshake can refuse it; use the default 'stream' backend")

        async def handle(comm: Any) -> None:
            link = await inbound.admit(CommIO(comm), comm.peer_address, lambda bound: DaskLink(
                comm, inbound.on_message, inbound.on_closed, max_payload=bound))
            if link is not None:
                await asyncio.gather(*link._tasks, return_exceptions=True)

        server = listen(f"{self.scheme}://{host}:{port}", handle, **self.listen_args)
        await server.start()
        return server, server.contact_address

    async def connect(self, address: str, handshake: Handshake, outbound: Outbound, *, timeout: float) -> Any:
        from distributed.comm import connect

        comm = await connect(address, timeout=timeout, **self.connection_args)
        await handshake(CommIO(comm))
        return DaskLink(comm, outbound.on_message, outbound.on_closed, max_payload=0)  # it receives only ACKs

    def close(self, server: Any) -> None:
        server.stop()


class DaskLink:
    """The same link over a ``distributed.comm`` Comm (its framing and serialization)."""

    def __init__(self, comm: Any, on_message: Callable, on_closed: Callable, *, max_payload: int):
        self.comm = comm
        self.peer = comm.peer_address
        self.bye_seen = False
        self.admitted: Any = None
        self.max_payload = max_payload
        self._on_message, self._on_closed = on_message, on_closed
        self._writes: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._tasks = [asyncio.ensure_future(self._read_loop()), asyncio.ensure_future(self._write_loop())]

    def write(self, meta: dict, buffers: list[np.ndarray]) -> None:  # any thread
        if threading.get_ident() == self._loop._thread_id:  # type: ignore[attr-defined]
            self._writes.put_nowait((meta, buffers))
        else:
            self._loop.call_soon_threadsafe(self._writes.put_nowait, (meta, buffers))

    async def _write_loop(self) -> None:
        from distributed.protocol import to_serialize

        try:
            while True:
                meta, buffers = await self._writes.get()
                if meta is None:
                    await self.comm.close()
                    return
                await self.comm.write({"meta": meta, "bufs": [to_serialize(b) for b in buffers]})
        except Exception:  # noqa: BLE001 - the read loop reports the closed comm
            self.comm.abort()

    async def _read_loop(self) -> None:
        error: Exception | None = None
        try:
            while True:
                meta, bufs = self._checked(await self.comm.read())
                self._on_message(self, meta, bufs)
        except Exception as caught:  # noqa: BLE001 - CommClosedError or a protocol error
            error = caught
        self._on_closed(self, error)

    def _checked(self, message: Any) -> tuple[dict, list]:
        # distributed.comm has already read (and allocated) the message: these
        # checks keep a malformed one out of the inbox, nothing more (see above)
        meta = message.get("meta") if isinstance(message, dict) else None
        needed = wire.check_meta(meta)
        bufs = list(message.get("bufs") or [])
        sizes = [np.asarray(b).nbytes for b in bufs]
        if needed > self.max_payload or sizes != [nbytes for _, _, nbytes in meta["leaves"]]:
            raise Rejected(f"a message's leaves ({sum(sizes)} bytes) do not match its meta or exceed this "
                           f"edge's bound of {self.max_payload} bytes")
        return meta, bufs

    def close(self) -> None:
        self.write(None, None)

    @property
    def finished(self) -> bool:
        return self.comm.closed()

    def abort(self) -> None:
        self.comm.abort()

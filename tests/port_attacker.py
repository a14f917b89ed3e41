"""What an attacker's script on the same network does to a stage port: a plain
blocking socket, the real handshake's connector side over it, raw wire bytes.
Shared by the transport's unit tests and the attack on a real training run."""
from __future__ import annotations

import socket

from pipetrain.runtime.transport import wire


def connect_raw(address: str) -> socket.socket:
    host, port = address.split("://")[1].rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


class BlockingIO:
    """handshake.offer's connection interface over a blocking socket; ``sent`` records what went out."""

    def __init__(self, sock: socket.socket, sent: list | None = None):
        self.sock, self.sent = sock, sent if sent is not None else []

    async def recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    async def send(self, data: bytes) -> None:
        self.sent.append(data)
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


def frame_bytes(message: wire.Message) -> bytes:
    """``message`` as the wire carries it, well-formed, sequence number 0."""
    return b"".join(bytes(frame) for frame in wire.frames(*wire.encode(message, 0)))

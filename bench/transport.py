"""One hop between two processes: pipetrain's transport next to a plain TCP socket pair.

Latency: ping-pong, the client sends a payload, the echo process sends it
back, the client times the round trip. Throughput: streaming, the client sends
messages back to back (pipetrain under its credit flow control, credits=4)
and the echo process answers the last one; GB/s = bytes / time.
Every transport runs against its own echo process (multiprocessing spawn) in
the same run, interleaved, best of ``--repeats`` rounds, so background load
hits them alike. The pipetrain endpoints share a secret made here, as a job's
stages do, and run the stage-port handshake once per connection, never per
message; the echo endpoint's default payload bound (1 GiB) covers 64 MiB.

    .venv/bin/python bench/transport.py [--repeats 3] [--seconds 0.25] [--tls] [--no-ucx]

With ucxx installed (``pipetrain[ucx]``) the ucx:// backend runs as one more
column, and the JSON gains "ucx": its RTTs and streaming rates with the
stream backend's and the socket pair's from the same run.

Prints a table, then the last line JSON:
{"throughput_ratio_vs_tcp": {"1MiB": ..., "16MiB": ..., "64MiB": ...}, "pingpong_ratio_vs_tcp": {...},
 "small_message_rtt_ms": ...}   (the default "stream" backend's figures).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import secrets
import socket
import struct
import time

import numpy as np

SIZES = {"4KiB": 4 << 10, "64KiB": 64 << 10, "1MiB": 1 << 20, "16MiB": 16 << 20, "64MiB": 64 << 20}
LENGTH = struct.Struct("<Q")
CREDITS = 4  # unacknowledged messages per edge while streaming (pipeline depth)
NO_ECHO = 1 << 62  # length flag: streaming, do not echo
LAST = 1 << 61  # length flag: last of a stream, reply one byte


# ------------------------------------------------------------- plain TCP


def _recv_exactly(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed")
        got += n


def tcp_echo(queue: mp.Queue) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    queue.put(f"{server.getsockname()[0]}:{server.getsockname()[1]}")
    sock, _ = server.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = memoryview(bytearray(max(SIZES.values())))
    head = memoryview(bytearray(LENGTH.size))
    while True:
        _recv_exactly(sock, head)
        (n,) = LENGTH.unpack(head)
        if n == 0:
            return
        size = n & ~(NO_ECHO | LAST)
        _recv_exactly(sock, buffer[:size])
        if n & LAST:
            sock.sendall(b"k")
        elif not n & NO_ECHO:
            sock.sendall(head)
            sock.sendall(buffer[:size])


class TcpClient:
    def __init__(self, address: str):
        host, port = address.split(":")
        self.sock = socket.create_connection((host, int(port)))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.back = memoryview(bytearray(max(SIZES.values())))
        self.head = memoryview(bytearray(LENGTH.size))

    def round_trip(self, payload: np.ndarray) -> None:
        data = memoryview(payload).cast("B")
        self.sock.sendall(LENGTH.pack(len(data)))
        self.sock.sendall(data)
        _recv_exactly(self.sock, self.head)
        _recv_exactly(self.sock, self.back[: LENGTH.unpack(self.head)[0]])

    def stream(self, payload: np.ndarray, count: int) -> None:
        data = memoryview(payload).cast("B")
        for i in range(count):
            self.sock.sendall(LENGTH.pack(len(data) | (LAST if i == count - 1 else NO_ECHO)))
            self.sock.sendall(data)
        _recv_exactly(self.sock, self.head[:1])

    def close(self) -> None:
        self.sock.sendall(LENGTH.pack(0))
        self.sock.close()


# ------------------------------------------------------------- pipetrain


def _security(tls_dir: str | None):
    if tls_dir is None:
        return None
    from distributed.security import Security

    return Security(
        tls_ca_file=f"{tls_dir}/ca.pem",
        tls_worker_cert=f"{tls_dir}/cert.pem",
        tls_worker_key=f"{tls_dir}/key.pem",
        require_encryption=True,
    )


def pipetrain_echo(to_client: mp.Queue, from_client: mp.Queue, backend: str, tls_dir: str | None,
                   secret: bytes) -> None:
    from pipetrain.runtime.transport import Endpoint, MessageKind

    with Endpoint.start(stage=1, secret=secret, backend=backend, security=_security(tls_dir),
                        credits=CREDITS) as endpoint:
        to_client.put(endpoint.address)
        back = endpoint.connect(queue_get(from_client), peer_stage=0)
        while True:
            message = endpoint.get(MessageKind.ACTIVATION, None, timeout=120)
            if message.tree is None:
                break
            if message.info == "last":
                back.put(MessageKind.CONTROL, message.k, timeout=120)
            elif message.info != "no-echo":
                back.put(MessageKind.GRADIENT, message.k, message.tree, timeout=120)
        back.wait_acked(timeout=30)


def queue_get(queue: mp.Queue) -> str:
    return queue.get(timeout=60)


class PipetrainClient:
    def __init__(self, address: str, to_echo: mp.Queue, backend: str, tls_dir: str | None, secret: bytes):
        from pipetrain.runtime.transport import Endpoint, MessageKind

        self.kind = MessageKind
        self.endpoint = Endpoint.start(stage=0, secret=secret, backend=backend, security=_security(tls_dir),
                                       credits=CREDITS)
        self.channel = self.endpoint.connect(address, peer_stage=1)  # the handshake, once per connection
        to_echo.put(self.endpoint.address)
        self.k = 0

    def round_trip(self, payload: np.ndarray) -> None:
        self.k += 1
        self.channel.put(self.kind.ACTIVATION, self.k, payload, timeout=60)
        self.endpoint.get(self.kind.GRADIENT, self.k, timeout=60)

    def stream(self, payload: np.ndarray, count: int) -> None:
        """``count`` messages back to back under credit flow control (credits=4)."""
        for i in range(count):
            self.k += 1
            self.channel.put(self.kind.ACTIVATION, self.k, payload, info="last" if i == count - 1 else "no-echo",
                             timeout=60)
        self.endpoint.get(self.kind.CONTROL, self.k, timeout=60)

    def close(self) -> None:
        self.k += 1
        self.channel.put(self.kind.ACTIVATION, self.k, None)
        self.channel.wait_acked(timeout=30)
        self.endpoint.close()


# ------------------------------------------------------------- driver


def best_rtt(client, payload: np.ndarray, seconds: float) -> float:
    client.round_trip(payload)  # warm: buffers, pools, page faults
    client.round_trip(payload)
    rtts: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(rtts) < 3:
        t0 = time.perf_counter()
        client.round_trip(payload)
        rtts.append(time.perf_counter() - t0)
    rtts.sort()
    return rtts[len(rtts) // 4]  # a low quantile: robust to the neighbours' load, not a lucky outlier


def best_stream_rate(client, payload: np.ndarray, seconds: float) -> float:
    count = max(8, min(2000, int(seconds * 2e9 / payload.nbytes)))
    client.stream(payload, 8)  # warm: the receiver's pool fills up to the credit window
    t0 = time.perf_counter()
    client.stream(payload, count)
    return count * payload.nbytes / (time.perf_counter() - t0)


def make_tls_dir() -> str:
    import subprocess
    import tempfile

    directory = tempfile.mkdtemp(prefix="pipetrain-bench-tls-")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=pipetrain",
         "-keyout", f"{directory}/key.pem", "-out", f"{directory}/cert.pem"],
        check=True, capture_output=True,
    )
    with open(f"{directory}/cert.pem") as src, open(f"{directory}/ca.pem", "w") as dst:
        dst.write(src.read())
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=0.25, help="per size, per transport, per repeat")
    parser.add_argument("--tls", action="store_true", help="also run the stream backend over tls://")
    parser.add_argument("--no-dask", action="store_true", help="skip the distributed.comm backend")
    parser.add_argument("--no-ucx", action="store_true", help="skip the ucx:// backend (run when ucxx imports)")
    args = parser.parse_args()

    ctx = mp.get_context("spawn")
    secret = secrets.token_bytes(32)  # what a job's stages share (StageJob.secret)
    variants = [("tcp socket pair", "tcp", None), ("pipetrain stream", "stream", None)]
    if not args.no_dask:
        variants.append(("pipetrain dask-comm", "dask", None))
    if args.tls:
        variants.append(("pipetrain stream tls", "stream", make_tls_dir()))
    if not args.no_ucx:
        from pipetrain.runtime.transport.ucx import ucx_available

        missing = ucx_available()
        if missing is None:
            variants.append(("pipetrain ucx", "ucx", None))
        else:
            print(f"(no ucx column: {missing})")

    clients, processes = {}, []
    for name, backend, tls_dir in variants:
        to_client, to_echo = ctx.Queue(), ctx.Queue()
        if backend == "tcp":
            process = ctx.Process(target=tcp_echo, args=(to_client,), daemon=True)
            process.start()
            clients[name] = TcpClient(queue_get(to_client))
        else:
            process = ctx.Process(target=pipetrain_echo, args=(to_client, to_echo, backend, tls_dir, secret),
                                  daemon=True)
            process.start()
            clients[name] = PipetrainClient(queue_get(to_client), to_echo, backend, tls_dir, secret)
        processes.append(process)

    payloads = {label: np.random.default_rng(0).random(size // 4, dtype=np.float32) for label, size in SIZES.items()}
    best: dict[tuple[str, str], float] = {}
    rate: dict[tuple[str, str], float] = {}
    for _ in range(args.repeats):
        for label, payload in payloads.items():
            for name, client in clients.items():
                rtt = best_rtt(client, payload, args.seconds / 2)
                best[name, label] = min(rtt, best.get((name, label), float("inf")))
                rate[name, label] = max(best_stream_rate(client, payload, args.seconds / 2),
                                        rate.get((name, label), 0.0))
    for client in clients.values():
        client.close()
    for process in processes:
        process.join(timeout=30)

    names = list(clients)
    print("ping-pong RTT (latency) and streaming GB/s (one direction, back to back, credits=4):")
    print(f"{'payload':>8} | " + " | ".join(f"{n:>36}" for n in names))
    print(f"{'':>8} | " + " | ".join(f"{'RTT ms':>9} {'pp x tcp':>8} {'GB/s':>7} {'x tcp':>8}" for _ in names))
    for label in SIZES:
        cells = []
        for name in names:
            pingpong_ratio = best["tcp socket pair", label] / best[name, label]
            stream_ratio = rate[name, label] / rate["tcp socket pair", label]
            cells.append(f"{best[name, label] * 1e3:>9.3f} {pingpong_ratio:>8.2f} "
                         f"{rate[name, label] / 1e9:>7.2f} {stream_ratio:>8.2f}")
        print(f"{label:>8} | " + " | ".join(cells))
    print("pp x tcp: ping-pong throughput (2 x payload / RTT) relative to the socket pair; x tcp: streaming.")

    large = ("1MiB", "16MiB", "64MiB")
    ours = "pipetrain stream"
    print(json.dumps({
        "throughput_ratio_vs_tcp": {label: round(rate[ours, label] / rate["tcp socket pair", label], 3)
                                    for label in large},
        "pingpong_ratio_vs_tcp": {label: round(best["tcp socket pair", label] / best[ours, label], 3)
                                  for label in large},
        "small_message_rtt_ms": round(best[ours, "4KiB"] * 1e3, 3),
        **({"ucx": ucx_figures(best, rate)} if "pipetrain ucx" in clients else {}),
    }))


def ucx_figures(best: dict, rate: dict) -> dict:
    """The ucx:// column beside the stream backend's and the socket pair's, from one run."""
    columns = {"ucx": "pipetrain ucx", "stream": "pipetrain stream", "tcp": "tcp socket pair"}
    return {
        "rtt_ms": {label: {key: round(best[name, label] * 1e3, 3) for key, name in columns.items()}
                   for label in ("4KiB", "64KiB")},
        "stream_gbps": {label: {key: round(rate[name, label] / 1e9, 3) for key, name in columns.items()}
                        for label in ("64KiB", "1MiB")},
    }


if __name__ == "__main__":
    main()

"""The stage-to-stage transport over real sockets (and a real second process)."""
from __future__ import annotations

import gc
import multiprocessing as mp
import secrets
import subprocess
import threading
import time

import ml_dtypes
import numpy as np
import pytest

from pipetrain.runtime import wire
from pipetrain.runtime.transport import (
    BoundaryMismatch,
    Endpoint,
    Kind,
    PeerLost,
    Rejected,
    TransportError,
    TransportTimeout,
    check_boundary,
)
from pipetrain.stages.base import TensorSpec

BACKENDS = ["stream", "dask"]
SECRET = secrets.token_bytes(32)  # a job's StageJob.secret


def start(stage: int, **kwargs) -> Endpoint:
    return Endpoint.start(stage=stage, secret=kwargs.pop("secret", SECRET), **kwargs)


@pytest.fixture
def pair(request):
    backend = getattr(request, "param", "stream")
    credits = 2
    sender = start(0, backend=backend, credits=credits)
    receiver = start(1, backend=backend, credits=credits)
    channel = sender.connect(receiver.address, peer_stage=1)
    yield sender, receiver, channel
    sender.close()
    receiver.close()


def wait_until(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def sample_tree(rows: int) -> dict:
    return {
        "h": np.arange(rows * 3, dtype=np.float32).reshape(rows, 3),
        "mask": (np.ones((rows,), ml_dtypes.bfloat16) * 1.5, np.int32(rows)),
        "ids": [np.arange(rows, dtype=np.int32)[::-1].copy(), None],
        "empty": np.zeros((0, 4), np.float32),
    }


def assert_trees_equal(got, want) -> None:
    got_leaves, got_structure = wire.flatten(got)
    want_leaves, want_structure = wire.flatten(want)
    assert got_structure == want_structure
    for g, w in zip(got_leaves, want_leaves):
        w = np.asarray(w)
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g.reshape(-1).view(np.uint8), w.reshape(-1).view(np.uint8))


@pytest.mark.parametrize("pair", BACKENDS, indirect=True)
def test_round_trip_of_pytrees_with_varying_shapes(pair):
    _, receiver, channel = pair
    for k, rows in enumerate([5, 1, 17]):  # shape travels with each message
        channel.put(Kind.ACTIVATION, k, sample_tree(rows), version=k + 10)
        message = receiver.get(Kind.ACTIVATION, k, timeout=10)
        assert (message.k, message.version, message.stage, message.kind) == (k, k + 10, 0, Kind.ACTIVATION)
        assert_trees_equal(message.tree, sample_tree(rows))
    channel.put(Kind.CONTROL, 99, None, info={"stop": True})
    assert receiver.get(Kind.CONTROL, timeout=10).info == {"stop": True}


def test_leaves_are_aligned_views_on_one_reused_buffer(pair):
    _, receiver, channel = pair
    tree = (np.ones(1000, np.float32), np.ones(3, np.int8), np.ones(1000, ml_dtypes.bfloat16))
    for k in range(6):
        channel.put(Kind.ACTIVATION, k, tree)
        leaves = receiver.get(Kind.ACTIVATION, k, timeout=10).tree
        assert all(leaf.ctypes.data % wire.ALIGN == 0 for leaf in leaves)
        assert leaves[0].base is leaves[2].base  # one receive buffer, no per-leaf copies
        del leaves
        gc.collect()
    assert receiver._pool.reused >= 4 and receiver._pool.allocated <= 2



def test_messages_larger_than_the_socket_buffers_arrive_whole(pair):
    """Several multi-leaf messages of megabytes, written while the receiver is
    not reading: the gather writes end part-way through a frame and the loop
    writes the rest; every leaf must arrive intact and in place."""
    _, receiver, channel = pair
    channel.credits = 4
    rng = np.random.default_rng(0)
    trees = [(rng.standard_normal(1_000_003).astype(np.float32), np.arange(7, dtype=np.int8),
              rng.standard_normal((513, 1025)).astype(np.float32)) for _ in range(4)]
    for k, tree in enumerate(trees):
        channel.put(Kind.ACTIVATION, k, tree, timeout=10)
    for k, tree in enumerate(trees):
        assert_trees_equal(receiver.get(Kind.ACTIVATION, k, timeout=10).tree, tree)

def test_out_of_order_get_buffers_other_arrivals(pair):
    _, receiver, channel = pair
    channel.credits = 3
    for k in range(3):
        channel.put(Kind.ACTIVATION, k, np.full(4, k, np.float32))
    assert receiver.get(Kind.ACTIVATION, 2, timeout=10).tree[0] == 2
    assert receiver.get(Kind.ACTIVATION, 0, timeout=10).tree[0] == 0
    assert receiver.get(Kind.ACTIVATION, None, timeout=10).k == 1
    channel.put(Kind.CONTROL, 3, None)
    with pytest.raises(TransportTimeout, match="no GRADIENT k=3"):
        receiver.get(Kind.GRADIENT, 3, timeout=0.2)  # another kind with the same k is not it
    assert receiver.get(Kind.CONTROL, 3, timeout=10).k == 3


@pytest.mark.parametrize("pair", BACKENDS, indirect=True)
def test_credit_flow_control_blocks_the_sender_until_the_receiver_takes(pair):
    _, receiver, channel = pair  # credits=2
    acks = [channel.put(Kind.ACTIVATION, k, np.zeros(8)) for k in range(2)]
    with pytest.raises(TransportTimeout, match="no credit back"):
        channel.put(Kind.ACTIVATION, 2, np.zeros(8), timeout=0.3)
    assert channel.in_flight == 2 and not any(a.done() for a in acks)

    sent = threading.Event()
    sender = threading.Thread(target=lambda: (channel.put(Kind.ACTIVATION, 2, np.zeros(8), timeout=10), sent.set()))
    sender.start()
    time.sleep(0.3)
    assert not sent.is_set()  # still blocked: nothing consumed
    receiver.get(Kind.ACTIVATION, 0, timeout=10)
    assert sent.wait(10)  # one get returned one credit
    acks[0].result(10)
    assert not acks[1].done()
    sender.join()
    receiver.get(Kind.ACTIVATION, 1, timeout=10)
    receiver.get(Kind.ACTIVATION, 2, timeout=10)
    channel.wait_acked(timeout=10)


@pytest.mark.parametrize("pair", BACKENDS, indirect=True)
def test_old_generation_is_dropped_and_its_credit_returned(pair):
    sender, receiver, channel = pair
    channel.put(Kind.ACTIVATION, 0, np.zeros(3))  # buffered, generation 0
    wait_until(lambda: receiver.stats["received"] == 1)
    assert receiver.set_generation(1) == 1  # recovery: the buffered one is fenced
    stale = channel.put(Kind.ACTIVATION, 1, np.zeros(3))  # a stage still at generation 0
    stale.result(10)  # acknowledged although dropped: no credit leaks
    assert receiver.stats["dropped_stale"] == 2
    with pytest.raises(TransportError, match="refused the handshake"):
        sender.connect(receiver.address, peer_stage=1)  # no new connection for generation 0
    sender.set_generation(1)
    fresh = sender.connect(receiver.address, peer_stage=1)  # a connection belongs to its generation
    fresh.put(Kind.ACTIVATION, 1, np.ones(3))
    message = receiver.get(Kind.ACTIVATION, 1, timeout=10)
    assert message.generation == 1 and message.tree[0] == 1
    with pytest.raises(TransportTimeout):
        receiver.get(Kind.ACTIVATION, 0, timeout=0.2)


def test_check_boundary_names_both_stages_and_the_tensor():
    specs = {"h": TensorSpec((None, 3), "float32"), "mask": TensorSpec((4,), "bfloat16")}
    good = {"h": np.zeros((7, 3), np.float32), "mask": np.zeros(4, ml_dtypes.bfloat16)}
    check_boundary(specs, good, sender_stage=1, receiver_stage=2)  # None: any length
    bad_dtype = {**good, "mask": np.zeros(4, np.float32)}
    with pytest.raises(BoundaryMismatch, match=r"stage 1 -> stage 2: tensor \['mask'\] is float32\[4\] "
                                               r"but stage 2 expects bfloat16\[4\]"):
        check_boundary(specs, bad_dtype, sender_stage=1, receiver_stage=2)
    with pytest.raises(BoundaryMismatch, match=r"tensor \['h'\] is float32\[7,4\]"):
        check_boundary(specs, {**good, "h": np.zeros((7, 4), np.float32)}, sender_stage=1, receiver_stage=2)
    with pytest.raises(BoundaryMismatch, match="leaves"):
        check_boundary(specs, {"h": good["h"]}, sender_stage=1, receiver_stage=2)


def test_get_checks_the_expected_spec(pair):
    _, receiver, channel = pair
    channel.put(Kind.ACTIVATION, 0, (np.zeros((2, 5), np.float32),))
    with pytest.raises(BoundaryMismatch, match=r"stage 0 -> stage 1: tensor \[0\] is float32\[2,5\]"):
        receiver.get(Kind.ACTIVATION, 0, timeout=10, expect=(TensorSpec((2, 4), "float32"),))


def test_non_numeric_leaves_are_refused_by_name(pair):
    _, _, channel = pair
    with pytest.raises(TypeError, match=r"tensor \['bad'\]"):
        channel.put(Kind.ACTIVATION, 0, {"bad": np.array(["a"])})


@pytest.mark.parametrize("pair", BACKENDS, indirect=True)
def test_a_closed_peer_is_a_clear_error_not_a_hang(pair):
    _, receiver, channel = pair
    channel.put(Kind.ACTIVATION, 0, np.zeros(3))
    receiver.close()
    with pytest.raises(PeerLost, match="connection to .* lost"):
        for k in range(1, 10):  # the loss is noticed within a put or two
            channel.put(Kind.ACTIVATION, k, np.zeros(3), timeout=5)
            time.sleep(0.1)


def _sender_then_die(address: str, secret: bytes) -> None:
    from pipetrain.runtime.transport import Endpoint, Kind

    endpoint = Endpoint.start(stage=0, secret=secret)
    endpoint.connect(address, peer_stage=1).put(Kind.ACTIVATION, 0, np.zeros(3))
    time.sleep(0.5)
    import os

    os._exit(1)  # no goodbye: a crashed worker


def test_a_crashed_sender_makes_get_raise():
    with start(1) as receiver:
        process = mp.get_context("spawn").Process(target=_sender_then_die, args=(receiver.address, SECRET))
        process.start()
        assert receiver.get(Kind.ACTIVATION, 0, timeout=60).k == 0
        process.join(60)
        started = time.monotonic()
        with pytest.raises(PeerLost, match="dropped without goodbye"):
            receiver.get(Kind.ACTIVATION, 1, timeout=30)
        assert time.monotonic() - started < 5
        receiver.set_generation(1)  # recovery forgets the lost peer
        with pytest.raises(TransportTimeout):
            receiver.get(Kind.ACTIVATION, 1, timeout=0.1)


def test_connect_errors_are_clear():
    with start(3) as endpoint:
        with pytest.raises(TransportError, match="stage 3: address 'ucx://x:1'"):
            endpoint.connect("ucx://x:1", peer_stage=4)
        with pytest.raises(TransportError, match="needs TLS"):
            endpoint.connect("tls://127.0.0.1:1", peer_stage=4)
        with pytest.raises(TransportError, match="cannot connect to tcp://127.0.0.1:1"):
            endpoint.connect("tcp://127.0.0.1:1", peer_stage=4, timeout=5)


@pytest.fixture(scope="module")
def security(tmp_path_factory):
    from distributed.security import Security

    directory = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=pipetrain",
         "-keyout", str(directory / "key.pem"), "-out", str(directory / "cert.pem")],
        check=True, capture_output=True,
    )
    cert = str(directory / "cert.pem")
    return Security(tls_ca_file=cert, tls_worker_cert=cert, tls_worker_key=str(directory / "key.pem"),
                    require_encryption=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tls_round_trip(security, backend):
    with start(0, security=security, backend=backend) as sender, \
            start(1, security=security, backend=backend) as receiver:
        assert receiver.address.startswith("tls://")
        channel = sender.connect(receiver.address, peer_stage=1)
        big = np.random.default_rng(0).random(300_000).astype(np.float32)  # spans many TLS records
        channel.put(Kind.ACTIVATION, 0, {"x": big, "b": np.ones(3, ml_dtypes.bfloat16)})
        assert_trees_equal(receiver.get(Kind.ACTIVATION, 0, timeout=10).tree,
                           {"x": big, "b": np.ones(3, ml_dtypes.bfloat16)})
        with pytest.raises(TransportError, match="requires encryption"):
            sender.connect("tcp://" + receiver.address.split("://")[1], peer_stage=1)
        with start(2) as plain:  # no certificate: the TLS server refuses it
            with pytest.raises(TransportError):
                plain.connect(receiver.address, peer_stage=1)
        with start(2, security=security, backend=backend, secret=secrets.token_bytes(32)) as stranger:
            with pytest.raises(TransportError, match="refused the handshake"):  # TLS, but not this job
                stranger.connect(receiver.address, peer_stage=1)
        wait_until(lambda: receiver.stats["rejected_connections"] == 1)


def _echo(to_parent: mp.Queue, from_parent: mp.Queue, secret: bytes) -> None:
    from pipetrain.runtime.transport import Endpoint, Kind

    with Endpoint.start(stage=1, secret=secret) as endpoint:
        to_parent.put(endpoint.address)
        back = endpoint.connect(from_parent.get(timeout=60), peer_stage=0)
        while True:
            message = endpoint.get(Kind.ACTIVATION, None, timeout=60)
            if message.tree is None:
                break
            back.put(Kind.GRADIENT, message.k, message.tree, version=message.version)
        back.wait_acked(timeout=30)


def test_two_processes_exchange_activations_and_gradients():
    ctx = mp.get_context("spawn")
    to_parent, from_parent = ctx.Queue(), ctx.Queue()
    process = ctx.Process(target=_echo, args=(to_parent, from_parent, SECRET))
    process.start()
    try:
        with start(0) as endpoint:
            channel = endpoint.connect(to_parent.get(timeout=60), peer_stage=1)
            from_parent.put(endpoint.address)
            rng = np.random.default_rng(1)
            for k, rows in enumerate([3, 64, 1, 2048]):
                tree = {"x": rng.random((rows, 256), dtype=np.float32),
                        "b": rng.random(rows).astype(ml_dtypes.bfloat16)}
                channel.put(Kind.ACTIVATION, k, tree, version=k)
                message = endpoint.get(Kind.GRADIENT, k, timeout=30)
                assert message.stage == 1 and message.version == k
                assert_trees_equal(message.tree, tree)
            channel.put(Kind.ACTIVATION, 99, None)
            channel.wait_acked(timeout=30)
    finally:
        process.join(30)
    assert process.exitcode == 0


# ---------------------------------------------------------------- a stage port under attack
#
# Each attack must leave the endpoint healthy (the real sender's next message
# gets through, no PeerLost) and allocate nothing near what it declared.

ATTACK_TIMEOUT = 0.5  # the endpoint's handshake timeout in these tests


@pytest.fixture
def guarded():
    sender, receiver = start(0), start(1, handshake_timeout=ATTACK_TIMEOUT)
    channel = sender.connect(receiver.address, peer_stage=1)
    yield sender, receiver, channel
    sender.close()
    receiver.close()


@pytest.fixture
def bounded_memory():
    """Fails the test if Python and numpy together allocated more than 4 MiB at any time."""
    import tracemalloc

    tracemalloc.start()
    yield
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 << 20, f"{peak} bytes allocated at the peak of the attack"


def assert_healthy(receiver, channel, k: int = 100) -> None:
    channel.put(Kind.ACTIVATION, k, np.full(3, k, np.float32))
    assert receiver.get(Kind.ACTIVATION, k, timeout=10).tree[0] == k  # would raise PeerLost
    assert receiver._lost == []


def raw(address: str):
    import socket

    host, port = address.split("://")[1].rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


class BlockingIO:  # handshake.offer over a plain blocking socket, as an attacker's script would run it
    def __init__(self, sock, sent: list | None = None):
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


def authenticated(address: str, *, stage: int = 0, peer_stage: int = 1, sent: list | None = None):
    """A raw socket past the handshake, as stage ``stage`` of this job (it holds the secret)."""
    import asyncio

    from pipetrain.runtime.handshake import Credentials, offer

    sock = raw(address)
    asyncio.run(offer(BlockingIO(sock, sent), Credentials(SECRET), stage=stage, peer_stage=peer_stage, generation=0))
    return sock


def forged_gradient_frame() -> bytes:
    message = wire.Message(kind=Kind.GRADIENT, k=7, tree=np.ones(4, np.float32), stage=2, generation=0)
    return b"".join(bytes(frame) for frame in wire.frames(*wire.encode(message, 0)))


def _replayed_offer(address: str) -> bytes:
    recorded: list = []
    with authenticated(address, sent=recorded) as sock:  # a real stage's handshake, overheard
        sock.sendall(b"".join(bytes(f) for f in wire.frames(wire.control_meta(Kind.BYE, -1, 0, 0), [])))
    return recorded[0]


PRE_AUTH = {  # what an attacker without the secret throws at the port
    "bare connect/close": lambda address: b"",
    "bad magic": lambda address: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(100),
    "random bytes": lambda address: np.random.default_rng(0).bytes(4096),
    "huge declared payload": lambda address: wire.PREFIX.pack(wire.MAGIC, 2, 1 << 40) + b"{}",
    "huge declared header": lambda address: wire.PREFIX.pack(wire.MAGIC, 1 << 31, 0) + bytes(1000),
    "forged frame": lambda address: forged_gradient_frame(),
    "replayed handshake": _replayed_offer,
}


@pytest.mark.parametrize("attack", list(PRE_AUTH))
def test_unauthenticated_connections_are_refused_never_lost(guarded, bounded_memory, caplog, attack):
    _, receiver, channel = guarded
    before = receiver.stats["rejected_connections"]
    payload = PRE_AUTH[attack](receiver.address)
    for _ in range(5):  # more than the 3 restarts a job allows
        with raw(receiver.address) as sock:
            sock.sendall(payload)
    wait_until(lambda: receiver.stats["rejected_connections"] == before + 5)
    assert_healthy(receiver, channel)
    assert receiver.stats["received"] == 1 and not receiver.has(Kind.GRADIENT, 7)
    assert "refused a connection from 127.0.0.1:" in caplog.text


POST_AUTH = {  # what a peer holding the secret could still get wrong: the stream breaks, the link ends
    "huge declared payload": (wire.PREFIX.pack(wire.MAGIC, 2, 1 << 40) + b"{}", "over this edge's bound"),
    "huge declared header": (wire.PREFIX.pack(wire.MAGIC, 1 << 31, 0), "over the 65536-byte limit"),
    "bad magic": (b"XXXX" + bytes(12), "bad magic"),
    "leaves disagree with the payload": (
        b"".join(wire.frames({**wire.control_meta(Kind.ACTIVATION, 0), "leaves": [["float32", [4], 8]]},
                             [np.zeros(8, np.uint8)])), "declares 8 bytes, but float32[4] takes 16"),
}


@pytest.mark.parametrize("leaves,why", [
    ([["object", [2], 16]], "unknown dtype|not a numeric"),
    ([["float32", [-1, 4], -16]], "not a list of sizes"),
    ([["float32", "ab", 8]], "not a list of sizes"),
    ([["float32", [1 << 40, 1 << 40], 64]], "takes"),
    ([["float32", [4]]], "not a header"),
    ("float32", "not a header"),
])
def test_a_meta_must_describe_its_leaves_exactly(leaves, why):
    with pytest.raises(Rejected, match=why):
        wire.check_meta({**wire.control_meta(Kind.ACTIVATION, 0), "leaves": leaves})
    with pytest.raises(Rejected, match="not a header"):
        wire.check_meta({"kind": 1})
    assert wire.check_meta({**wire.control_meta(Kind.ACTIVATION, 0),
                            "leaves": [["float32", [3], 12], ["bfloat16", [2, 2], 8]]}) == 64 + 8


@pytest.mark.parametrize("attack", list(POST_AUTH))
def test_a_broken_frame_ends_its_connection_without_allocating(guarded, bounded_memory, caplog, attack):
    _, receiver, channel = guarded
    data, reason = POST_AUTH[attack]
    allocated = receiver._pool.allocated
    with authenticated(receiver.address) as sock:
        sock.sendall(data)
        assert sock.recv(1) == b""  # the endpoint closed it
    wait_until(lambda: receiver.stats["rejected_frames"] == 1)
    assert reason in caplog.text
    assert_healthy(receiver, channel)
    assert receiver._pool.allocated <= allocated + 1  # the healthy message's buffer, nothing declared


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("who,overrides", [
    ("wrong secret", dict(stage=0, secret=secrets.token_bytes(32))),
    ("wrong job", dict(stage=0, job_id="another-job")),
    ("wrong generation", dict(stage=0, generation=1)),
    ("wrong edge", dict(stage=3)),
])
def test_real_endpoints_that_do_not_belong_are_refused(who, overrides, backend, caplog):
    with start(0, backend=backend) as sender, start(1, backend=backend) as receiver:
        channel = sender.connect(receiver.address, peer_stage=1)
        with start(backend=backend, **overrides) as intruder:
            with pytest.raises(TransportError, match="refused the handshake"):
                intruder.connect(receiver.address, peer_stage=1)
        wait_until(lambda: receiver.stats["rejected_connections"] == 1)
        assert who.split()[1] in caplog.text or "MAC" in caplog.text
        assert_healthy(receiver, channel)


def test_a_connector_must_name_the_stage_it_reaches(guarded):
    sender, receiver, channel = guarded
    with pytest.raises(TransportError, match="refused the handshake"):
        sender.connect(receiver.address, peer_stage=2)
    assert_healthy(receiver, channel)


def test_frames_outside_the_edge_or_repeated_are_dropped_and_acknowledged(guarded, caplog):
    sender, receiver, channel = guarded
    channel.put(Kind.GRADIENT, 1, np.zeros(3)).result(10)  # stage 1 hears gradients only from stage 2
    assert not receiver.has(Kind.GRADIENT, 1)
    channel.put(Kind.ACTIVATION, 2, np.ones(3))
    channel.put(Kind.ACTIVATION, 2, np.zeros(3)).result(10)  # a second one while the first waits
    assert receiver.get(Kind.ACTIVATION, 2, timeout=10).tree[0] == 1  # the first one, not displaced
    channel.put(Kind.ACTIVATION, 2, np.zeros(3)).result(10)  # and once taken, never again
    with pytest.raises(TransportTimeout):
        receiver.get(Kind.ACTIVATION, 2, timeout=0.2)
    assert receiver.stats["rejected_frames"] == 3
    for text in ("which carries ACTIVATION", "while the first is buffered", "already taken"):
        assert text in caplog.text
    channel.wait_acked(timeout=10)  # every dropped frame gave its credit back
    assert_healthy(receiver, channel)


def test_a_stalled_client_is_dropped_without_blocking_anyone(caplog):
    stall = 2.0
    with start(1, handshake_timeout=stall) as receiver, start(0) as sender:
        with raw(receiver.address) as silent, raw(receiver.address) as slow:
            slow.sendall(b"PT")  # half a magic, then nothing
            started = time.monotonic()
            channel = sender.connect(receiver.address, peer_stage=1)  # while both stall
            channel.put(Kind.ACTIVATION, 5, np.ones(2))
            assert receiver.get(Kind.ACTIVATION, 5, timeout=10).k == 5
            assert receiver.stats["rejected_connections"] == 0, "the real peer waited for the stalled ones"
            wait_until(lambda: receiver.stats["rejected_connections"] == 2)
            assert time.monotonic() - started >= stall * 0.9
            assert silent.recv(64)[:4] == b"PTH1" and silent.recv(1) == b""  # greeted, then dropped
        assert f"no handshake within {stall:g} s" in caplog.text
        assert_healthy(receiver, channel)


def test_the_oldest_pending_handshake_makes_room(guarded, monkeypatch):
    from pipetrain.runtime.handshake import Gate

    sender, receiver, channel = guarded
    monkeypatch.setattr(Gate, "MAX_PENDING", 3)
    sockets = [raw(receiver.address) for _ in range(5)]
    wait_until(lambda: receiver.stats["rejected_connections"] >= 2)
    assert_healthy(receiver, channel)
    for sock in sockets:
        sock.close()


def test_a_secret_is_required_and_the_dask_backend_stays_on_loopback():
    with pytest.raises(TypeError):
        Endpoint.start(stage=0)
    with pytest.raises(ValueError, match="at least 16 bytes"):
        Endpoint.start(stage=0, secret=b"short")
    with pytest.raises(TransportError, match="loopback only"):
        start(0, backend="dask", host="0.0.0.0")


def test_a_sender_is_told_when_its_meta_is_too_large(pair):
    _, receiver, channel = pair
    with pytest.raises(ValueError, match="over the wire's 65536-byte limit"):
        channel.put(Kind.ACTIVATION, 0, [np.zeros(1, np.float32)] * 3000)
    assert channel.in_flight == 0
    channel.put(Kind.ACTIVATION, 0, np.ones(1))
    assert receiver.get(Kind.ACTIVATION, 0, timeout=10).k == 0


def test_each_inbound_edge_is_bounded_by_what_it_carries(monkeypatch):
    from types import SimpleNamespace

    from pipetrain.runtime.links import FREE_POSITIONS, MAX_BOUND, MIN_BOUND, edge_bounds, payload_bound
    from pipetrain.stages.base import StageSpec

    monkeypatch.delenv("PIPETRAIN_MAX_MESSAGE_BYTES", raising=False)
    wide = {"h": TensorSpec((None, None, 768), "float32"), "ids": TensorSpec((None,), "int32")}
    assert payload_bound(wide) == 768 * 4 * FREE_POSITIONS + 4 * FREE_POSITIONS + 2 * wire.ALIGN
    assert payload_bound(TensorSpec((None, 3), "bfloat16")) == MIN_BOUND
    assert payload_bound(TensorSpec((None, 1 << 20), "float64")) == MAX_BOUND
    job = SimpleNamespace(spec=StageSpec(index=1, num_stages=3, start=1, end=2), input_specs=wide,
                          output_specs=TensorSpec((None, 3), "float32"))
    assert edge_bounds(job) == {0: payload_bound(wide), 2: MIN_BOUND}  # activations from 0, gradients from 2
    monkeypatch.setenv("PIPETRAIN_MAX_MESSAGE_BYTES", "12345")
    assert edge_bounds(job) == {0: 12345, 2: 12345}

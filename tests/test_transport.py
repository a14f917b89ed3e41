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

from pipetrain.runtime.transport import (
    BoundaryMismatch,
    Endpoint,
    MessageKind,
    PeerLost,
    TransportError,
    TransportTimeout,
    check_boundary,
    wire,
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
        channel.put(MessageKind.ACTIVATION, k, sample_tree(rows), version=k + 10)
        message = receiver.get(MessageKind.ACTIVATION, k, timeout=10)
        assert (message.k, message.version, message.stage, message.kind) == (k, k + 10, 0, MessageKind.ACTIVATION)
        assert_trees_equal(message.tree, sample_tree(rows))
    channel.put(MessageKind.CONTROL, 99, None, info={"stop": True})
    assert receiver.get(MessageKind.CONTROL, timeout=10).info == {"stop": True}


def test_leaves_are_aligned_views_on_one_reused_buffer(pair):
    _, receiver, channel = pair
    tree = (np.ones(1000, np.float32), np.ones(3, np.int8), np.ones(1000, ml_dtypes.bfloat16))
    for k in range(6):
        channel.put(MessageKind.ACTIVATION, k, tree)
        leaves = receiver.get(MessageKind.ACTIVATION, k, timeout=10).tree
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
        channel.put(MessageKind.ACTIVATION, k, tree, timeout=10)
    for k, tree in enumerate(trees):
        assert_trees_equal(receiver.get(MessageKind.ACTIVATION, k, timeout=10).tree, tree)

def test_out_of_order_get_buffers_other_arrivals(pair):
    _, receiver, channel = pair
    channel.credits = 3
    for k in range(3):
        channel.put(MessageKind.ACTIVATION, k, np.full(4, k, np.float32))
    assert receiver.get(MessageKind.ACTIVATION, 2, timeout=10).tree[0] == 2
    assert receiver.get(MessageKind.ACTIVATION, 0, timeout=10).tree[0] == 0
    assert receiver.get(MessageKind.ACTIVATION, None, timeout=10).k == 1
    channel.put(MessageKind.CONTROL, 3, None)
    with pytest.raises(TransportTimeout, match="no GRADIENT k=3"):
        receiver.get(MessageKind.GRADIENT, 3, timeout=0.2)  # another kind with the same k is not it
    assert receiver.get(MessageKind.CONTROL, 3, timeout=10).k == 3


@pytest.mark.parametrize("pair", BACKENDS, indirect=True)
def test_credit_flow_control_blocks_the_sender_until_the_receiver_takes(pair):
    _, receiver, channel = pair  # credits=2
    acks = [channel.put(MessageKind.ACTIVATION, k, np.zeros(8)) for k in range(2)]
    with pytest.raises(TransportTimeout, match="no credit back"):
        channel.put(MessageKind.ACTIVATION, 2, np.zeros(8), timeout=0.3)
    assert channel.in_flight == 2 and not any(a.done() for a in acks)

    sent = threading.Event()
    sender = threading.Thread(
        target=lambda: (channel.put(MessageKind.ACTIVATION, 2, np.zeros(8), timeout=10), sent.set()))
    sender.start()
    time.sleep(0.3)
    assert not sent.is_set()  # still blocked: nothing consumed
    receiver.get(MessageKind.ACTIVATION, 0, timeout=10)
    assert sent.wait(10)  # one get returned one credit
    acks[0].result(10)
    assert not acks[1].done()
    sender.join()
    receiver.get(MessageKind.ACTIVATION, 1, timeout=10)
    receiver.get(MessageKind.ACTIVATION, 2, timeout=10)
    channel.wait_acked(timeout=10)


@pytest.mark.parametrize("pair", BACKENDS, indirect=True)
def test_old_generation_is_dropped_and_its_credit_returned(pair):
    sender, receiver, channel = pair
    channel.put(MessageKind.ACTIVATION, 0, np.zeros(3))  # buffered, generation 0
    wait_until(lambda: receiver.stats["received"] == 1)
    assert receiver.set_generation(1) == 1  # recovery: the buffered one is fenced
    stale = channel.put(MessageKind.ACTIVATION, 1, np.zeros(3))  # a stage still at generation 0
    stale.result(10)  # acknowledged although dropped: no credit leaks
    assert receiver.stats["dropped_stale"] == 2
    with pytest.raises(TransportError, match="refused the handshake"):
        sender.connect(receiver.address, peer_stage=1)  # no new connection for generation 0
    sender.set_generation(1)
    fresh = sender.connect(receiver.address, peer_stage=1)  # a connection belongs to its generation
    fresh.put(MessageKind.ACTIVATION, 1, np.ones(3))
    message = receiver.get(MessageKind.ACTIVATION, 1, timeout=10)
    assert message.generation == 1 and message.tree[0] == 1
    with pytest.raises(TransportTimeout):
        receiver.get(MessageKind.ACTIVATION, 0, timeout=0.2)


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
    channel.put(MessageKind.ACTIVATION, 0, (np.zeros((2, 5), np.float32),))
    with pytest.raises(BoundaryMismatch, match=r"stage 0 -> stage 1: tensor \[0\] is float32\[2,5\]"):
        receiver.get(MessageKind.ACTIVATION, 0, timeout=10, expect=(TensorSpec((2, 4), "float32"),))


def test_non_numeric_leaves_are_refused_by_name(pair):
    _, _, channel = pair
    with pytest.raises(TypeError, match=r"tensor \['bad'\]"):
        channel.put(MessageKind.ACTIVATION, 0, {"bad": np.array(["a"])})


@pytest.mark.parametrize("pair", BACKENDS, indirect=True)
def test_a_closed_peer_is_a_clear_error_not_a_hang(pair):
    _, receiver, channel = pair
    channel.put(MessageKind.ACTIVATION, 0, np.zeros(3))
    delivery = channel.put(MessageKind.ACTIVATION, 1, np.zeros(3))  # never taken: the receiver closes
    receiver.close()
    with pytest.raises(PeerLost, match="connection to .* lost"):
        for k in range(2, 10):  # the loss is noticed within a put or two
            channel.put(MessageKind.ACTIVATION, k, np.zeros(3), timeout=5)
            time.sleep(0.1)
    assert delivery.done()
    with pytest.raises(PeerLost, match="connection to .* lost"):
        delivery.result(timeout=1)  # what was never taken fails with the loss, at once


def _sender_then_die(address: str, secret: bytes) -> None:
    from pipetrain.runtime.transport import Endpoint, MessageKind

    endpoint = Endpoint.start(stage=0, secret=secret)
    endpoint.connect(address, peer_stage=1).put(MessageKind.ACTIVATION, 0, np.zeros(3))
    time.sleep(0.5)
    import os

    os._exit(1)  # no goodbye: a crashed worker


def test_a_crashed_sender_makes_get_raise():
    with start(1) as receiver:
        process = mp.get_context("spawn").Process(target=_sender_then_die, args=(receiver.address, SECRET))
        process.start()
        assert receiver.get(MessageKind.ACTIVATION, 0, timeout=60).k == 0
        process.join(60)
        started = time.monotonic()
        with pytest.raises(PeerLost, match="dropped without goodbye"):
            receiver.get(MessageKind.ACTIVATION, 1, timeout=30)
        assert time.monotonic() - started < 5
        receiver.set_generation(1)  # recovery forgets the lost peer
        with pytest.raises(TransportTimeout):
            receiver.get(MessageKind.ACTIVATION, 1, timeout=0.1)


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
        channel.put(MessageKind.ACTIVATION, 0, {"x": big, "b": np.ones(3, ml_dtypes.bfloat16)})
        assert_trees_equal(receiver.get(MessageKind.ACTIVATION, 0, timeout=10).tree,
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


def test_each_backend_is_one_object_chosen_once(security):
    from distributed.security import Security

    from pipetrain.runtime.transport import choose_backend
    from pipetrain.runtime.transport.dask_comm import DaskCommBackend
    from pipetrain.runtime.transport.stream import StreamBackend
    from pipetrain.runtime.transport.tls import TlsBackend

    assert type(choose_backend("stream", None)) is StreamBackend and StreamBackend.scheme == "tcp"
    assert type(choose_backend("stream", security)) is TlsBackend and TlsBackend.scheme == "tls"
    assert type(choose_backend("dask", security)) is DaskCommBackend
    assert (choose_backend("dask", None).scheme, choose_backend("dask", security).scheme) == ("tcp", "tls")
    with pytest.raises(ValueError, match="transport backend must be one of"):
        choose_backend("udp", None)
    with pytest.raises(TransportError, match="no TLS certificate"):
        choose_backend("stream", Security(require_encryption=True))
    optional = Security(tls_ca_file=security.tls_ca_file, tls_worker_cert=security.tls_worker_cert,
                        tls_worker_key=security.tls_worker_key, require_encryption=False)  # TLS, not required
    with start(0, security=optional) as endpoint:
        assert endpoint.address.startswith("tls://")
        with pytest.raises(TransportError, match="plain tcp://, but this endpoint speaks tls:// only"):
            endpoint.connect("tcp://127.0.0.1:1", peer_stage=1)


def _echo(to_parent: mp.Queue, from_parent: mp.Queue, secret: bytes) -> None:
    from pipetrain.runtime.transport import Endpoint, MessageKind

    with Endpoint.start(stage=1, secret=secret) as endpoint:
        to_parent.put(endpoint.address)
        back = endpoint.connect(from_parent.get(timeout=60), peer_stage=0)
        while True:
            message = endpoint.get(MessageKind.ACTIVATION, None, timeout=60)
            if message.tree is None:
                break
            back.put(MessageKind.GRADIENT, message.k, message.tree, version=message.version)
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
                channel.put(MessageKind.ACTIVATION, k, tree, version=k)
                message = endpoint.get(MessageKind.GRADIENT, k, timeout=30)
                assert message.stage == 1 and message.version == k
                assert_trees_equal(message.tree, tree)
            channel.put(MessageKind.ACTIVATION, 99, None)
            channel.wait_acked(timeout=30)
    finally:
        process.join(30)
    assert process.exitcode == 0


def test_a_sender_is_told_when_its_meta_is_too_large(pair):
    _, receiver, channel = pair
    with pytest.raises(ValueError, match="over the wire's 65536-byte limit"):
        channel.put(MessageKind.ACTIVATION, 0, [np.zeros(1, np.float32)] * 3000)
    assert channel.in_flight == 0
    channel.put(MessageKind.ACTIVATION, 0, np.ones(1))
    assert receiver.get(MessageKind.ACTIVATION, 0, timeout=10).k == 0

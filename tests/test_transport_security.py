"""A stage port under attack: what is refused, dropped and counted, never a peer loss (the transport's checks).

Connections without the job's secret, broken frames from a peer that holds
it, endpoints of another job, generation or edge, frames outside what an
edge carries, stalled clients, and the bounds on what one message may
declare. The end-to-end version, against a running job, is
tests/reliability/test_port_attacks.py.
"""
from __future__ import annotations

import secrets
import time

import numpy as np
import pytest

from pipetrain.runtime.transport import Endpoint, MessageKind, Rejected, TransportError, TransportTimeout, wire
from pipetrain.stages.base import TensorSpec
from port_attacker import BlockingIO, connect_raw, frame_bytes

BACKENDS = ["stream", "dask"]
SECRET = secrets.token_bytes(32)  # a job's StageJob.secret


def start(stage: int, **kwargs) -> Endpoint:
    return Endpoint.start(stage=stage, secret=kwargs.pop("secret", SECRET), **kwargs)


def wait_until(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


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
    channel.put(MessageKind.ACTIVATION, k, np.full(3, k, np.float32))
    assert receiver.get(MessageKind.ACTIVATION, k, timeout=10).tree[0] == k  # would raise PeerLost
    assert receiver._lost == []


def authenticated(address: str, *, stage: int = 0, peer_stage: int = 1, sent: list | None = None):
    """A raw socket past the handshake, as stage ``stage`` of this job (it holds the secret)."""
    import asyncio

    from pipetrain.runtime.transport.handshake import Credentials, offer

    sock = connect_raw(address)
    asyncio.run(offer(BlockingIO(sock, sent), Credentials(SECRET), stage=stage, peer_stage=peer_stage, generation=0))
    return sock


def forged_gradient_frame() -> bytes:
    return frame_bytes(wire.Message(kind=MessageKind.GRADIENT, k=7, tree=np.ones(4, np.float32), stage=2,
                                    generation=0))


def _replayed_offer(address: str) -> bytes:
    recorded: list = []
    with authenticated(address, sent=recorded) as sock:  # a real stage's handshake, overheard
        sock.sendall(b"".join(bytes(f) for f in wire.frames(wire.control_meta(MessageKind.BYE, -1, 0, 0), [])))
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
        with connect_raw(receiver.address) as sock:
            sock.sendall(payload)
    wait_until(lambda: receiver.stats["rejected_connections"] == before + 5)
    assert_healthy(receiver, channel)
    assert receiver.stats["received"] == 1 and not receiver.has(MessageKind.GRADIENT, 7)
    assert "refused a connection from 127.0.0.1:" in caplog.text


POST_AUTH = {  # what a peer holding the secret could still get wrong: the stream breaks, the link ends
    "huge declared payload": (wire.PREFIX.pack(wire.MAGIC, 2, 1 << 40) + b"{}", "over this edge's bound"),
    "huge declared header": (wire.PREFIX.pack(wire.MAGIC, 1 << 31, 0), "over the 65536-byte limit"),
    "bad magic": (b"XXXX" + bytes(12), "bad magic"),
    "leaves disagree with the payload": (
        b"".join(wire.frames({**wire.control_meta(MessageKind.ACTIVATION, 0), "leaves": [["float32", [4], 8]]},
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
        wire.check_meta({**wire.control_meta(MessageKind.ACTIVATION, 0), "leaves": leaves})
    with pytest.raises(Rejected, match="not a header"):
        wire.check_meta({"kind": 1})
    assert wire.check_meta({**wire.control_meta(MessageKind.ACTIVATION, 0),
                            "leaves": [["float32", [3], 12], ["bfloat16", [2, 2], 8]]}) == 64 + 8


def assert_broken_frame_ends_its_link(receiver, channel, caplog, data: bytes, reason: str, *, buffers: int) -> None:
    """``data`` from a peer past the handshake ends its connection with ``reason`` logged, the endpoint
    stays healthy, and the pool grew by at most ``buffers`` (the real messages', nothing declared)."""
    allocated = receiver._pool.allocated
    with authenticated(receiver.address) as sock:
        sock.sendall(data)
        assert sock.recv(1) == b""  # the endpoint closed it
    wait_until(lambda: receiver.stats["rejected_frames"] == 1)
    assert reason in caplog.text
    assert_healthy(receiver, channel)
    assert receiver._pool.allocated <= allocated + buffers


@pytest.mark.parametrize("attack", list(POST_AUTH))
def test_a_broken_frame_ends_its_connection_without_allocating(guarded, bounded_memory, caplog, attack):
    _, receiver, channel = guarded
    data, reason = POST_AUTH[attack]
    assert_broken_frame_ends_its_link(receiver, channel, caplog, data, reason, buffers=1)  # the healthy message's


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
    channel.put(MessageKind.GRADIENT, 1, np.zeros(3)).result(10)  # stage 1 hears gradients only from stage 2
    assert not receiver.has(MessageKind.GRADIENT, 1)
    channel.put(MessageKind.ACTIVATION, 2, np.ones(3))
    channel.put(MessageKind.ACTIVATION, 2, np.zeros(3)).result(10)  # a second one while the first waits
    assert receiver.get(MessageKind.ACTIVATION, 2, timeout=10).tree[0] == 1  # the first one, not displaced
    channel.put(MessageKind.ACTIVATION, 2, np.zeros(3)).result(10)  # and once taken, never again
    with pytest.raises(TransportTimeout):
        receiver.get(MessageKind.ACTIVATION, 2, timeout=0.2)
    assert receiver.stats["rejected_frames"] == 3
    for text in ("which carries ACTIVATION", "while the first is buffered", "already taken"):
        assert text in caplog.text
    channel.wait_acked(timeout=10)  # every dropped frame gave its credit back
    assert_healthy(receiver, channel)


def test_a_stalled_client_is_dropped_without_blocking_anyone(caplog):
    stall = 2.0
    with start(1, handshake_timeout=stall) as receiver, start(0) as sender:
        with connect_raw(receiver.address) as silent, connect_raw(receiver.address) as slow:
            slow.sendall(b"PT")  # half a magic, then nothing
            started = time.monotonic()
            channel = sender.connect(receiver.address, peer_stage=1)  # while both stall
            channel.put(MessageKind.ACTIVATION, 5, np.ones(2))
            assert receiver.get(MessageKind.ACTIVATION, 5, timeout=10).k == 5
            assert receiver.stats["rejected_connections"] == 0, "the real peer waited for the stalled ones"
            wait_until(lambda: receiver.stats["rejected_connections"] == 2)
            assert time.monotonic() - started >= stall * 0.9
            assert silent.recv(64)[:4] == b"PTH1" and silent.recv(1) == b""  # greeted, then dropped
        assert f"no handshake within {stall:g} s" in caplog.text
        assert_healthy(receiver, channel)


def test_the_oldest_pending_handshake_makes_room(guarded, monkeypatch):
    from pipetrain.runtime.transport.handshake import Gate

    sender, receiver, channel = guarded
    monkeypatch.setattr(Gate, "MAX_PENDING", 3)
    sockets = [connect_raw(receiver.address) for _ in range(5)]
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

"""The ucx:// backend (runtime/transport/ucx.py): the same messages, handshake and bounds as tcp://.

Runs for real where ucxx imports (the pipetrain[ucx] extra; no GPU needed:
UCX moves the bytes over tcp and shared memory here), and is skipped with
the reason otherwise. The attacks are the ones tests/test_transport_security.py
throws at a tcp:// port, sent as UCX messages from a raw ucxx endpoint of the
attacker's own: before the handshake (no secret) and after it (a peer that
holds the secret and sends broken frames).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import struct
import sys
import time

import ml_dtypes
import numpy as np
import pytest

from pipetrain.config import ClusterConfig, ConfigError
from pipetrain.runtime.transport import Endpoint, MessageKind, TransportError, wire
from pipetrain.runtime.transport.ucx import INLINE, UcxUnavailable, ucx_available

MISSING = ucx_available()
needs_ucx = pytest.mark.skipif(MISSING is not None, reason=f"ucxx does not import: {MISSING}")
SECRET = secrets.token_bytes(32)


def start(stage: int, **kwargs) -> Endpoint:
    return Endpoint.start(stage=stage, secret=kwargs.pop("secret", SECRET), backend="ucx", **kwargs)


def wait_until(condition, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


_fresh_k = itertools.count(100)  # the module's endpoints live across tests: each check its own micro-batch


def assert_healthy(receiver: Endpoint, channel) -> None:
    k = next(_fresh_k)
    channel.put(MessageKind.ACTIVATION, k, np.full(3, k, np.float32))
    assert receiver.get(MessageKind.ACTIVATION, k, timeout=15).tree[0] == k  # would raise PeerLost
    assert receiver._lost == []


@pytest.fixture(scope="module")
def guarded():
    sender, receiver = start(0), start(1, handshake_timeout=2.0)
    channel = sender.connect(receiver.address, peer_stage=1, credits=8)
    yield sender, receiver, channel
    sender.close()
    receiver.close()


# ------------------------------------------------------------- without ucxx, and choosing it


def test_without_ucxx_the_error_names_what_is_missing_and_is_not_retried(monkeypatch):
    from pipetrain.runtime.transport import ucx

    monkeypatch.setitem(sys.modules, "ucxx", None)  # what `import ucxx` does where it is not installed
    with pytest.raises(UcxUnavailable, match=r"needs the ucxx package.*pipetrain\[ucx\]") as caught:
        ucx._import_ucxx()
    assert not caught.value.retryable  # a restart would fail the same way


@needs_ucx
def test_a_second_ucx_context_or_a_bad_wait_mode_is_refused_not_retried(guarded, monkeypatch):
    from pipetrain.runtime.transport.ucx import WAIT_ENV, _Ucx

    with pytest.raises(UcxUnavailable, match="already initialised in this process") as caught:
        _Ucx()  # the guarded endpoints' context is this process's one
    assert not caught.value.retryable
    monkeypatch.setenv(WAIT_ENV, "busy")
    with pytest.raises(UcxUnavailable, match="PIPETRAIN_UCX_WAIT='busy': must be 'notify'"):
        _Ucx()


def test_the_transport_is_chosen_in_the_cluster_section(tmp_path):
    from pipetrain import config

    path = tmp_path / "job.toml"
    path.write_text('[model]\nentry = "models.mlp:build"\n[data]\ntrain = "models.mlp:source"\n'
                    '[cluster]\ntransport = "ucx"\n')
    assert config.load(path).cluster.transport == "ucx"
    assert ClusterConfig().transport == "stream"
    with pytest.raises(ConfigError, match="cluster.transport: 'rdma' is not one of stream, ucx"):
        ClusterConfig(transport="rdma")
    from pipetrain.jobspec import JobSpec

    assert JobSpec.from_settings(transport="ucx").cluster.transport == "ucx"


# ------------------------------------------------------------- messages


@needs_ucx
def test_messages_cross_bit_for_bit_in_any_order(guarded):
    _, receiver, channel = guarded
    rng = np.random.default_rng(0)
    trees = {k: {"x": rng.random((k + 1, 7), dtype=np.float32), "ids": np.arange(k, dtype=np.int64),
                 "b": rng.random(5).astype(ml_dtypes.bfloat16), "empty": np.zeros((0, 3), np.float32),
                 "scalar": np.float64(k)} for k in range(4)}
    trees[4] = {"big": rng.random(3 << 20, dtype=np.float32)}  # 12 MiB: UCX's rendezvous path
    # payloads of INLINE bytes (one UCX message) and just over (head, then one message per leaf)
    trees[5] = {"at": rng.integers(0, 255, INLINE, dtype=np.uint8)}
    trees[6] = {"over": rng.integers(0, 255, INLINE + 1, dtype=np.uint8), "x": np.ones(3, np.float32)}
    for k, tree in trees.items():
        channel.put(MessageKind.ACTIVATION, k, tree)
    for k in reversed(range(7)):
        got = receiver.get(MessageKind.ACTIVATION, k, timeout=30).tree
        assert got.keys() == trees[k].keys()
        for name, leaf in trees[k].items():
            assert np.asarray(got[name]).dtype == np.asarray(leaf).dtype and np.array_equal(got[name], leaf), name
            assert np.asarray(got[name]).tobytes() == np.asarray(leaf).tobytes(), name
    channel.wait_acked(timeout=15)  # every get returned its credit over ucx
    channel.put(MessageKind.CONTROL, 9, None, info={"stop": True})
    assert receiver.get(MessageKind.CONTROL, 9, timeout=15).info == {"stop": True}


@needs_ucx
def test_addresses_of_another_scheme_are_refused(guarded):
    sender, receiver, _ = guarded
    assert receiver.address.startswith("ucx://127.0.0.1:")
    with pytest.raises(TransportError, match="is not ucx://host:port"):
        sender.connect("tcp://" + receiver.address.split("://")[1], peer_stage=1)
    with Endpoint.start(stage=0, secret=SECRET) as plain:
        with pytest.raises(TransportError, match="is not tcp://host:port"):
            plain.connect(receiver.address, peer_stage=1)


def test_ucx_refuses_a_security_that_asks_for_tls(tmp_path):
    import subprocess

    from distributed.security import Security

    from pipetrain.runtime.transport import choose_backend

    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=p",
                    "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
                   check=True, capture_output=True)
    cert = str(tmp_path / "cert.pem")
    security = Security(tls_ca_file=cert, tls_worker_cert=cert, tls_worker_key=str(tmp_path / "key.pem"))
    with pytest.raises(TransportError, match="'ucx' transport backend has no encryption"):
        choose_backend("ucx", security)


# ------------------------------------------------------------- who may talk


@needs_ucx
@pytest.mark.parametrize("who,overrides", [
    ("wrong secret", dict(stage=0, secret=secrets.token_bytes(32))),
    ("wrong job", dict(stage=0, job_id="another-job")),
    ("wrong generation", dict(stage=0, generation=1)),
    ("wrong edge", dict(stage=3)),
])
def test_endpoints_that_do_not_belong_are_refused(guarded, who, overrides, caplog):
    _, receiver, channel = guarded
    before = receiver.stats["rejected_connections"]
    with start(**overrides) as intruder:
        with pytest.raises(TransportError, match="refused the handshake"):
            intruder.connect(receiver.address, peer_stage=1, timeout=10)
    wait_until(lambda: receiver.stats["rejected_connections"] == before + 1)
    assert who.split()[1] in caplog.text or "MAC" in caplog.text
    assert_healthy(receiver, channel)


class RawUcx:
    """An attacker's own ucxx endpoint to a stage port: it sends whatever UCX messages it likes."""

    def __init__(self, address: str):
        from pipetrain.runtime.transport.ucx import _Ucx

        self.ucx = _Ucx.get()
        host, port = address.split("://")[1].rsplit(":", 1)
        self.ep = self.ucx.io.run(self.ucx.ucxx.create_endpoint(host, int(port)), 20)

    def send(self, *messages: bytes) -> None:
        async def send_all():
            for message in messages:
                await self.ep.send(np.frombuffer(message, np.uint8))

        self.ucx.io.run(send_all(), 20)

    def handshake(self, secret: bytes = SECRET) -> None:
        """The connector's side of the real handshake: this attacker holds the job's secret."""
        from pipetrain.runtime.transport.handshake import Credentials, offer
        from pipetrain.runtime.transport.ucx import UcxIO

        io = UcxIO(self.ucx, self.ep)  # it hands each record to the UCX loop itself
        asyncio.run(offer(io, Credentials(secret), stage=0, peer_stage=1, generation=0))

    def close(self) -> None:
        self.ucx.io.call(self.ep.abort)


def record(data: bytes) -> list[bytes]:
    return [struct.pack("<I", len(data)), data]


PRE_AUTH = {  # UCX messages from a peer without the secret, where the port expects a handshake record
    "random bytes": [np.random.default_rng(0).bytes(4096)],
    "a record longer than any": record(bytes(4096)),
    "a huge declared record": [struct.pack("<I", 1 << 31)],
    "a forged frame": [b"".join(bytes(f) for f in wire.frames(*wire.encode(wire.Message(
        kind=MessageKind.ACTIVATION, k=7, tree=np.ones(4, np.float32), stage=0), 0)))],
    "an offer with a wrong MAC": record(b"PTA1" + bytes(96)),
}


@needs_ucx
@pytest.mark.parametrize("attack", list(PRE_AUTH))
def test_unauthenticated_connections_are_refused_never_lost(guarded, caplog, attack):
    _, receiver, channel = guarded
    before, allocated = receiver.stats["rejected_connections"], receiver._pool.allocated
    attacker = RawUcx(receiver.address)
    try:
        attacker.send(*PRE_AUTH[attack])
        wait_until(lambda: receiver.stats["rejected_connections"] == before + 1)
    finally:
        attacker.close()
    assert "refused a connection from ucx connection" in caplog.text
    assert_healthy(receiver, channel)
    assert not receiver.has(MessageKind.ACTIVATION, 7)
    assert receiver._pool.allocated <= allocated + 1  # the healthy message's buffer, nothing declared


@needs_ucx
def test_a_stalled_client_is_dropped_by_the_gate(guarded, caplog):
    _, receiver, channel = guarded
    before = receiver.stats["rejected_connections"]
    attacker = RawUcx(receiver.address)  # connects, then says nothing
    try:
        assert_healthy(receiver, channel)  # the real peer does not wait for it
        wait_until(lambda: receiver.stats["rejected_connections"] == before + 1)
    finally:
        attacker.close()
    assert "no handshake within 2 s" in caplog.text


def head(leaves: list, payload_len: int | None = None) -> bytes:
    """A frame's head message (prefix + meta) declaring ``leaves``, its payload length as given."""
    meta = json.dumps({**wire.control_meta(MessageKind.ACTIVATION, 0), "leaves": leaves},
                      separators=(",", ":")).encode()
    return wire.PREFIX.pack(wire.MAGIC, len(meta), 16 if payload_len is None else payload_len) + meta


POST_AUTH = {  # what a peer holding the secret could still get wrong: the link ends, nothing is allocated
    "huge declared payload": ([wire.PREFIX.pack(wire.MAGIC, 2, 1 << 40) + b"{}"], "over this edge's bound"),
    "huge declared header": ([wire.PREFIX.pack(wire.MAGIC, 1 << 31, 0)], "outside 1..65536"),
    "bad magic": ([b"XXXX" + bytes(12)], "bad magic"),
    "a head longer than any": ([bytes(wire.PREFIX.size + wire.MAX_META + INLINE + 1)], "sent more than"),
    "leaves disagree with the payload": ([head([["float32", [4], 8]], 8)], "declares 8 bytes, but float32[4] takes 16"),
    "a leaf longer than declared": ([head([["uint8", [INLINE + 1], INLINE + 1]], INLINE + 1), bytes(1 << 20)],
                                    "sent more than a leaf"),
}


@needs_ucx
@pytest.mark.parametrize("attack", list(POST_AUTH))
def test_a_broken_frame_ends_its_connection_without_allocating(guarded, caplog, attack):
    _, receiver, channel = guarded
    messages, reason = POST_AUTH[attack]
    before, allocated = receiver.stats["rejected_frames"], receiver._pool.allocated
    attacker = RawUcx(receiver.address)
    try:
        attacker.handshake()
        attacker.send(*messages)
        wait_until(lambda: receiver.stats["rejected_frames"] == before + 1)
    finally:
        attacker.close()
    assert reason in caplog.text
    assert_healthy(receiver, channel)
    assert receiver._pool.allocated <= allocated + 2  # the declared leaf's (64 KiB + 1) and the healthy message's


def _peer_process(address: str, secret: bytes) -> None:
    with Endpoint.start(stage=0, secret=secret, backend="ucx") as endpoint:
        channel = endpoint.connect(address, peer_stage=1)
        channel.put(MessageKind.ACTIVATION, 0, np.ones(4, np.float32))
        time.sleep(600)  # until killed


@needs_ucx
def test_a_killed_peer_process_is_lost_not_awaited_forever():
    import multiprocessing
    import os
    import signal

    from pipetrain.runtime.transport import PeerLost

    with start(1) as receiver:
        process = multiprocessing.get_context("spawn").Process(target=_peer_process, args=(receiver.address, SECRET))
        process.start()
        try:
            assert receiver.get(MessageKind.ACTIVATION, 0, timeout=60).tree[0] == 1
            os.kill(process.pid, signal.SIGKILL)
            started = time.monotonic()
            with pytest.raises(PeerLost, match="dropped without goodbye"):
                receiver.get(MessageKind.ACTIVATION, 1, timeout=60)
            assert time.monotonic() - started < 30
        finally:
            process.kill()
            process.join(10)


@needs_ucx
@pytest.mark.parametrize("seed", range(8))
def test_random_messages_after_the_handshake_end_the_link_and_nothing_else(guarded, seed):
    """Fuzz: a peer holding the secret sends random UCX messages (some opening with a valid prefix
    whose sizes are random too); each connection ends as a rejected frame, the real edge goes on."""
    _, receiver, channel = guarded
    rng = np.random.default_rng(seed)
    before, allocated = receiver.stats["rejected_frames"], receiver._pool.allocated
    messages = []
    for _ in range(3):
        body = rng.bytes(int(rng.integers(1, 200_000 if rng.random() < 0.3 else 2_000)))  # some over staging
        if rng.random() < 0.7:  # a valid magic, then sizes that are huge or plausible (the meta is junk JSON)
            meta_len = int(rng.integers(0, 1 << 32) if rng.random() < 0.3 else rng.integers(1, len(body) + 1))
            body = wire.PREFIX.pack(wire.MAGIC, meta_len, int(rng.integers(0, 1 << 63 if rng.random() < 0.3
                                                                           else 1 << 16))) + body
        messages.append(body)
    attacker = RawUcx(receiver.address)
    try:
        attacker.handshake()
        try:
            attacker.send(*messages)
        except Exception:  # noqa: BLE001 - the port closed the connection at the first bad message
            pass
        wait_until(lambda: receiver.stats["rejected_frames"] == before + 1)
    finally:
        attacker.close()
    assert_healthy(receiver, channel)
    assert receiver._pool.allocated <= allocated + 2

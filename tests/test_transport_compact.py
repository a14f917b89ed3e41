"""Compact frame headers on tcp:// (transport/compact.py): what they carry, when they are
not used, and what a peer holding the secret cannot make the receiver accept with them."""
from __future__ import annotations

import numpy as np
import pytest

from pipetrain.runtime.transport import Endpoint, MessageKind, compact, wire
from test_transport_security import (SECRET, assert_broken_frame_ends_its_link, authenticated,  # noqa: F401
                                     guarded, wait_until)


def start(stage: int) -> Endpoint:
    return Endpoint.start(stage=stage, secret=SECRET)


def writer_of(channel) -> compact.LayoutWriter:
    return channel._link._layouts


def test_one_layout_is_named_once_then_every_message_goes_compact_with_its_acks():
    with start(0) as first, start(1) as second:
        forward = first.connect(second.address, peer_stage=1)
        back = second.connect(first.address, peer_stage=0)
        heads = []
        original = compact.LayoutWriter.frames

        def spy(self, meta, buffers):
            out = original(self, meta, buffers)
            _, _, payload_len = wire.PREFIX.unpack_from(out[0])
            if payload_len:  # a data message, not an ACK frame
                heads.append(bytes(out[0][wire.PREFIX.size: wire.PREFIX.size + 1]))
            return out

        compact.LayoutWriter.frames = spy
        try:
            for k in range(6):  # a ping-pong: every message back carries the credit of the one before
                tree = {"x": np.full((2, 3), k, np.float32), "mask": np.arange(4, dtype=np.int64) + k}
                forward.put(MessageKind.ACTIVATION, k, tree, version=k * 3)
                got = second.get(MessageKind.ACTIVATION, k, timeout=10)
                assert got.version == k * 3 and got.tree["x"].shape == (2, 3)
                np.testing.assert_array_equal(got.tree["mask"], np.arange(4) + k)
                back.put(MessageKind.GRADIENT, k, np.full(5, -k, np.float64))
                assert first.get(MessageKind.GRADIENT, k, timeout=10).tree[0] == -k
        finally:
            compact.LayoutWriter.frames = original
        # Each direction names its layout in its first message (JSON), then sends 40-byte heads.
        assert heads.count(b"{") == 2 and heads.count(bytes([compact.TAG])) == 10 and len(heads) == 12
        assert len(writer_of(forward)._ids) == len(writer_of(back)._ids) == 1
        forward.wait_acked(timeout=10)  # the credits that rode on compact frames were applied
        assert first._lost == second._lost == []


def test_control_messages_huge_integers_and_too_many_layouts_go_as_json():
    with start(0) as sender, start(1) as receiver:
        channel = sender.connect(receiver.address, peer_stage=1)
        for n in range(compact.MAX_SCHEMAS + 5):  # a new shape every time: the table fills, then JSON
            channel.put(MessageKind.ACTIVATION, n, np.zeros(n + 1, np.float32))
            assert receiver.get(MessageKind.ACTIVATION, n, timeout=10).tree.shape == (n + 1,)
        channel.put(MessageKind.ACTIVATION, 1 << 70, np.zeros(1, np.float32))  # beyond i64: JSON
        channel.put(MessageKind.CONTROL, 5, np.zeros(1, np.float32), info={"stop": True})
        assert receiver.get(MessageKind.ACTIVATION, 1 << 70, timeout=10).tree.shape == (1,)
        assert receiver.get(MessageKind.CONTROL, 5, timeout=10).info == {"stop": True}
        assert len(writer_of(channel)._ids) == compact.MAX_SCHEMAS


def _named(kind=MessageKind.ACTIVATION, schema=0, k=0) -> bytes:
    meta, buffers = wire.encode(wire.Message(kind=kind, k=k, tree=np.ones(4, np.float32), stage=0), 0)
    return b"".join(bytes(f) for f in wire.frames({**meta, "schema": schema}, buffers))


def _compact(schema=0, *, kind=MessageKind.ACTIVATION, k=1, acks=(), declared_acks=None, payload=16,
             tag=compact.TAG) -> bytes:
    head = compact.COMPACT.pack(tag, kind, 0, 0, k, 0, 1, schema, len(acks) if declared_acks is None
                                else declared_acks) + b"".join(int(a).to_bytes(8, "little") for a in acks)
    return wire.PREFIX.pack(wire.MAGIC, len(head), payload) + head + bytes(payload)


COMPACT_ATTACKS = {  # a peer past the handshake; each ends the link, nothing declared is allocated
    "a layout never named": (_compact(schema=3), "never named"),
    "a layout id beyond the bound": (_named(schema=compact.MAX_SCHEMAS), f"not an id below {compact.MAX_SCHEMAS}"),
    "a layout id that is not an integer": (_named(schema="0"), "not an id below"),
    "acks the meta does not hold": (_named() + _compact(acks=(1,), declared_acks=3), "bytes for 3 acks"),
    "more acks than a frame may carry": (_named() + _compact(declared_acks=wire.MAX_ACKS + 1), "bytes for"),
    "a payload its layout does not take": (_named() + _compact(payload=32), "takes 16 bytes but its prefix says 32"),
    "an unknown kind": (_named() + _compact(kind=99), "kind 99"),
    "a scalar kind with a tensor's layout": (_named() + _compact(kind=MessageKind.NORM_TOTAL),
                                             "must hold one float64 scalar"),
    "a truncated header": (wire.PREFIX.pack(wire.MAGIC, 8, 0) + bytes([compact.TAG]) + bytes(7), "under the header"),
}


@pytest.mark.parametrize("attack", list(COMPACT_ATTACKS))
def test_a_compact_frame_is_checked_against_the_layout_its_link_named(guarded, caplog, attack):  # noqa: F811
    _, receiver, channel = guarded
    data, reason = COMPACT_ATTACKS[attack]
    # the named message's buffer and the healthy one's
    assert_broken_frame_ends_its_link(receiver, channel, caplog, data, reason, buffers=2)


def test_layouts_are_per_link_a_second_connection_cannot_use_the_firsts(guarded, caplog):  # noqa: F811
    _, receiver, channel = guarded
    with authenticated(receiver.address) as first:
        first.sendall(_named() + _compact(k=1))
        wait_until(lambda: receiver.has(MessageKind.ACTIVATION, 1))
        with authenticated(receiver.address) as second:
            second.sendall(_compact(k=2))
            assert second.recv(1) == b""
    wait_until(lambda: receiver.stats["rejected_frames"] == 1)
    assert "never named" in caplog.text and not receiver.has(MessageKind.ACTIVATION, 2)
    np.testing.assert_array_equal(receiver.get(MessageKind.ACTIVATION, 1, timeout=5).tree, np.zeros(4, np.float32))

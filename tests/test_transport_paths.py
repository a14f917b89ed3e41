"""The tcp:// receive path (direct.py: the waiting thread reads its links) and credits riding on data (acks.py),
over real sockets."""
from __future__ import annotations

import secrets
import threading
import time

import numpy as np
import pytest

from pipetrain.runtime.transport import Endpoint, MessageKind, PeerLost, endpoint as endpoint_module, stream, wire
from pipetrain.runtime.transport.errors import Rejected

SECRET = secrets.token_bytes(32)


def start(stage: int, **kwargs) -> Endpoint:
    return Endpoint.start(stage=stage, secret=SECRET, **kwargs)


@pytest.fixture
def two_way():
    """Stage 0 and stage 1, each with a channel to the other (as neighbouring stages are)."""
    a, b = start(0, credits=2), start(1, credits=2)
    a_to_b = a.connect(b.address, peer_stage=1)
    b_to_a = b.connect(a.address, peer_stage=0)
    yield a, b, a_to_b, b_to_a
    a.close()
    b.close()


def wait_until(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def filing_threads(endpoint: Endpoint) -> list[int]:
    """Spy (not a mock: the real inbox still files) on which thread files each message."""
    threads: list[int] = []
    real_file = endpoint._inbox.file

    def file(message, link, seq):
        threads.append(threading.get_ident())
        return real_file(message, link, seq)

    endpoint._inbox.file = file
    return threads


def ack_frames(endpoint: Endpoint) -> list[int]:
    """Spy on the standalone ACK frames ``endpoint`` sends (their seqs)."""
    sent: list[int] = []
    real_send = endpoint._send_ack

    def send_ack(link, seq):
        sent.append(seq)
        real_send(link, seq)

    endpoint._send_ack = send_ack
    return sent


def test_a_waiting_get_reads_the_socket_in_its_own_thread(two_way):
    a, b, a_to_b, _ = two_way
    threads = filing_threads(b)
    got = {}
    waiter = threading.Thread(target=lambda: got.update(
        me=threading.get_ident(), m=b.get(MessageKind.ACTIVATION, 0, timeout=10)))
    waiter.start()
    time.sleep(0.2)  # the waiter is in get, polling its links, before anything is sent
    a_to_b.put(MessageKind.ACTIVATION, 0, np.arange(1000, dtype=np.float32))
    waiter.join(10)
    np.testing.assert_array_equal(got["m"].tree, np.arange(1000, dtype=np.float32))
    assert threads == [got["me"]]  # filed by the thread that waited: no hand-off from the loop thread


def test_a_waiter_claims_only_the_links_that_carry_what_it_waits_for():
    """Stage 1 waits for an activation (the link from stage 0 only); a gradient arriving from
    stage 2 meanwhile is the loop's to read, and the activation is still the waiter's."""
    with start(0) as s0, start(1) as s1, start(2) as s2:
        to_1_from_0 = s0.connect(s1.address, peer_stage=1)
        to_1_from_2 = s2.connect(s1.address, peer_stage=1)
        to_1_from_2.put(MessageKind.GRADIENT, 9, np.zeros(2, np.float32))  # both links admitted first
        s1.get(MessageKind.GRADIENT, 9, timeout=10)
        threads = filing_threads(s1)
        got = {}
        waiter = threading.Thread(target=lambda: got.update(m=s1.get(MessageKind.ACTIVATION, 0, timeout=10)))
        waiter.start()
        time.sleep(0.2)  # the waiter is in get, polling the link from stage 0 only
        to_1_from_2.put(MessageKind.GRADIENT, 3, np.ones(2, np.float32))
        wait_until(lambda: s1.has(MessageKind.GRADIENT, 3))  # filed while the waiter still waits
        assert waiter.is_alive() and threads[0] != waiter.ident
        to_1_from_0.put(MessageKind.ACTIVATION, 0, np.arange(5, dtype=np.float32))
        waiter.join(10)
        np.testing.assert_array_equal(got["m"].tree, np.arange(5, dtype=np.float32))
        assert threads[1:] == [waiter.ident]  # the activation: read by the thread that waited for it
        assert s1.get(MessageKind.GRADIENT, 3, timeout=1).tree.tolist() == [1, 1]


def test_while_nobody_waits_the_loop_reads(two_way):
    """A message arriving while the stage computes is read meanwhile (a large activation overlaps
    compute), and the loop stops reading once a waiter claims the links, and reads again after."""
    a, b, a_to_b, _ = two_way
    threads = filing_threads(b)
    big = np.random.default_rng(0).random(4 << 20, dtype=np.float32)  # 16 MiB: more than the socket buffers
    a_to_b.put(MessageKind.ACTIVATION, 0, big)
    wait_until(lambda: b.has(MessageKind.ACTIVATION, 0))  # has() never reads: the loop did
    assert threads and threads[0] != threading.get_ident()
    np.testing.assert_array_equal(b.get(MessageKind.ACTIVATION, 0, timeout=10).tree, big)
    a_to_b.put(MessageKind.ACTIVATION, 1, big[:10])
    wait_until(lambda: b.has(MessageKind.ACTIVATION, 1))  # released after the get: the loop reads again


def test_the_old_loop_path_still_works(monkeypatch):
    """The private switches the benchmarks use to run the paths before direct.py/acks.py side by side."""
    monkeypatch.setattr(stream, "DIRECT_READS", False)
    monkeypatch.setattr(endpoint_module, "DEFER_ACKS", False)
    with start(0) as a, start(1) as b:
        a_to_b = a.connect(b.address, peer_stage=1)
        b_to_a = b.connect(a.address, peer_stage=0)
        threads, acks = filing_threads(b), ack_frames(b)
        for k in range(3):
            a_to_b.put(MessageKind.ACTIVATION, k, np.full(3, k, np.int32))
            assert b.get(MessageKind.ACTIVATION, k, timeout=10).tree.tolist() == [k] * 3
            b_to_a.put(MessageKind.GRADIENT, k, np.full(2, k, np.int32))
            assert a.get(MessageKind.GRADIENT, k, timeout=10).tree.tolist() == [k] * 2
        assert threading.get_ident() not in threads and acks == [0, 1, 2]
        a_to_b.wait_acked(timeout=10)


def test_the_credit_rides_on_the_message_back(two_way):
    a, b, a_to_b, b_to_a = two_way
    acks = ack_frames(b)
    done = a_to_b.put(MessageKind.ACTIVATION, 0, np.ones(4, np.float32))
    assert b.get(MessageKind.ACTIVATION, 0, timeout=10).k == 0
    assert a_to_b.in_flight == 1  # owed, not yet sent: b may send to a next
    b_to_a.put(MessageKind.GRADIENT, 0, np.ones(4, np.float32))
    assert a.get(MessageKind.GRADIENT, 0, timeout=10).k == 0
    done.result(timeout=10)  # a's credit came back, in b's gradient's meta
    assert a_to_b.in_flight == 0 and acks == []  # no ACK frame of its own


def test_an_owed_credit_leaves_at_the_receivers_next_call_at_the_latest(two_way):
    a, b, a_to_b, b_to_a = two_way
    acks = ack_frames(b)
    done = a_to_b.put(MessageKind.ACTIVATION, 0, np.ones(4, np.float32))
    b.get(MessageKind.ACTIVATION, 0, timeout=10)
    assert not done.done()
    with pytest.raises(Exception, match="no ACTIVATION k=1"):  # b's next call (here a get that waits)
        b.get(MessageKind.ACTIVATION, 1, timeout=0.2)
    done.result(timeout=10)
    assert acks == [0]
    # a send to another peer sends it too (here: b's own channel is to a, so it rides; a put to a
    # third stage would not): a get owed, then b.close() flushes it
    done = a_to_b.put(MessageKind.ACTIVATION, 1, np.ones(4, np.float32))
    b.get(MessageKind.ACTIVATION, 1, timeout=10)
    b.close()
    done.result(timeout=10)


def test_a_receiver_without_a_channel_back_acks_at_once():
    with start(0) as a, start(1) as b:
        a_to_b = a.connect(b.address, peer_stage=1)
        done = a_to_b.put(MessageKind.ACTIVATION, 0, np.ones(4, np.float32))
        b.get(MessageKind.ACTIVATION, 0, timeout=10)
        done.result(timeout=10)  # nothing goes back on that edge: the credit does not wait


def test_with_the_switch_off_every_credit_is_an_ack_frame_at_once(monkeypatch):
    monkeypatch.setattr(endpoint_module, "DEFER_ACKS", False)
    with start(0) as a, start(1) as b:
        b.connect(a.address, peer_stage=0)  # a channel back: with the switch on, the ack would wait
        a_to_b = a.connect(b.address, peer_stage=1)
        acks = ack_frames(b)
        done = a_to_b.put(MessageKind.ACTIVATION, 0, np.ones(4, np.float32))
        b.get(MessageKind.ACTIVATION, 0, timeout=10)
        assert acks == [0]
        done.result(timeout=10)


def test_withheld_credits_never_deadlock_two_stages():
    """Both stages send to each other with one credit each, in their own threads; each takes the
    other's messages while owing. A stage about to block on credit sends what it owes first."""
    a, b = start(0, credits=1), start(1, credits=1)
    a_to_b, b_to_a = a.connect(b.address, peer_stage=1), b.connect(a.address, peer_stage=0)
    n, errors = 200, []

    def run(me, channel, kind_out, kind_in):
        try:
            for k in range(n):
                channel.put(kind_out, k, np.full(8, k, np.int64), timeout=10)
                assert me.get(kind_in, k, timeout=10).tree[0] == k
            channel.wait_acked(timeout=10)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(a, a_to_b, MessageKind.ACTIVATION, MessageKind.GRADIENT)),
               threading.Thread(target=run, args=(b, b_to_a, MessageKind.GRADIENT, MessageKind.ACTIVATION))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    a.close()
    b.close()
    assert not errors and not any(t.is_alive() for t in threads)


def test_a_peer_dying_while_a_get_reads_directly_is_peer_lost(two_way):
    a, b, a_to_b, b_to_a = two_way
    outcome = {}

    def wait():
        t0 = time.monotonic()
        try:
            b.get(MessageKind.ACTIVATION, 0, timeout=20)
        except PeerLost as error:
            outcome["error"], outcome["after"] = error, time.monotonic() - t0

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.2)
    a_to_b._link._sock.close()  # a crash, not a goodbye: the connection just drops
    waiter.join(20)
    assert "dropped without goodbye" in str(outcome["error"]) and outcome["after"] < 5


@pytest.mark.parametrize("acks", [[1, "2"], "7", [1.5], list(range(2000))])
def test_riding_acks_are_checked_before_use(acks):
    meta = wire.control_meta(MessageKind.CONTROL, 0) | {"acks": acks}
    with pytest.raises(Rejected, match="acks"):
        wire.check_meta(meta)
    assert wire.check_meta(wire.control_meta(MessageKind.CONTROL, 0) | {"acks": [3, 4]}) == 0

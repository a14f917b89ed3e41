"""Whatever an outsider throws at a stage's port during a real run, it costs no rollback.

A 2-stage job of sleeping numpy layers trains on a real LocalCluster (worker
processes under nannies). While both stages run, an attacker thread reads
their transport addresses from the scheduler's metadata, where the stages
publish them for each other (anyone with a client can read them), and
throws at both ports: bare connect-and-close (four of these used to end the
job: "gave up after 3 restart(s)"), random bytes, prefixes declaring a
2^40-byte payload and a 2^31-byte meta, a well-formed GRADIENT frame for a
future micro-batch without the secret (it used to move the final loss),
the same frame after a handshake with a guessed secret, and clients that
connect and stall. The run must end bit-identical to the reference
executor's, with no recovery; both endpoints must have refused and counted
every attack connection; no worker's peak RSS may grow.
"""
from __future__ import annotations

import asyncio
import os
import secrets
import threading
import time

import numpy as np
import pytest

from models.synthetic import SleepData, SleepSequential
from pipetrain.api import fit
from pipetrain.optim import Optimizer
from pipetrain.partitioning import partition
from pipetrain.runtime.transport import wire
from pipetrain.runtime.transport.handshake import Credentials, offer
from pipetrain.runtime.links import payload_bound
from pipetrain.runtime.transport import DEFAULT_MAX_PAYLOAD
from pipetrain.stages.base import TensorSpec
from port_attacker import BlockingIO, connect_raw, frame_bytes

pytestmark = [pytest.mark.reliability, pytest.mark.slow, pytest.mark.cluster]

STAGES, M, STEPS = 2, 4, 8
DATA = SleepData(nbytes=4096)
JOB_ID = "portattack"
SLEEP_SCALE = 40  # F 80 ms, B 160 ms: the run lasts ~8 s, long enough for every attack and the stalls' timeout
MAX_RSS_GROWTH = 64 << 20  # the huge declared sizes used to cost GiBs (or a MemoryError and a recovery)


def model(sleep_scale: float = 1.0) -> SleepSequential:
    return SleepSequential(STAGES, forward_ms=2 * sleep_scale, backward_ms=4 * sleep_scale, seed=7)


def job_kwargs() -> dict:
    return dict(schedule="1f1b", microbatches=M, steps=STEPS, optimizer=Optimizer("sgd", lr=0.05), progress=False)


def _forged_gradient() -> bytes:
    """A GRADIENT for micro-batch 20, from "stage 1", well-formed per wire.py."""
    return frame_bytes(wire.Message(kind=wire.MessageKind.GRADIENT, k=20, tree=np.full(DATA.shape, 1e6, np.float32),
                                    stage=1))


def _send_and_close(address: str, data: bytes) -> None:
    with connect_raw(address) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass  # the port hung up first: that is the point


def _guessed_secret_then_frame(address: str) -> None:
    with connect_raw(address) as sock:
        try:
            asyncio.run(offer(BlockingIO(sock), Credentials(secrets.token_bytes(32), JOB_ID),
                              stage=1, peer_stage=0, generation=0))
            sock.sendall(_forged_gradient())  # not reached: the port refuses the handshake
        except (OSError, Exception):  # noqa: BLE001 - refused, as it must be
            pass


ATTACKS = {
    "bare connect/close": lambda address: _send_and_close(address, b""),
    "random bytes": lambda address: _send_and_close(address, np.random.default_rng(1).bytes(64 << 10)),
    "huge declared payload": lambda address: _send_and_close(address, wire.PREFIX.pack(wire.MAGIC, 2, 1 << 40)),
    "huge declared header": lambda address: _send_and_close(address, wire.PREFIX.pack(wire.MAGIC, 1 << 31, 0)),
    "forged gradient": lambda address: _send_and_close(address, _forged_gradient()),
    "guessed secret": _guessed_secret_then_frame,
}
ROUNDS = 3  # each attack, against each port


def _port_stats(client) -> dict[str, dict]:
    """Transport address -> stats of every open endpoint on the workers (and its bound per neighbour)."""
    def stats() -> list:
        from pipetrain.runtime.transport import Endpoint

        return [(e.address, {**e.stats, "bounds": [e.payload_bound(e.stage - 1), e.payload_bound(e.stage + 1)]})
                for e in Endpoint.live()]

    return {address: s for found in client.run(stats).values() for address, s in found}


def _peak_rss(client) -> dict[str, int]:
    def peak() -> int:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    return client.run(peak)


class Attacker(threading.Thread):
    def __init__(self, client, run_done: threading.Event):
        super().__init__(name="attacker", daemon=True)
        self.client, self.run_done = client, run_done
        self.report: dict = {}
        self.error: BaseException | None = None

    def addresses(self, timeout: float = 60.0) -> list[str]:
        keys = [["pipetrain", f"pipetrain/{JOB_ID}/g0/address/{s}"] for s in range(STAGES)]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [self.client.get_metadata(key, default=None) for key in keys]
            if all(found):
                return found
            time.sleep(0.05)
        raise TimeoutError("the stages never published their addresses")

    def run(self) -> None:
        try:
            self._attack()
        except BaseException as error:  # noqa: BLE001 - reported to the test
            self.error = error

    def _attack(self) -> None:
        report = self.report
        addresses = self.addresses()
        report["rss_before"] = _peak_rss(self.client)
        stalled = [connect_raw(address) for address in addresses for _ in range(3)]  # connect, then nothing
        stalled[0].sendall(b"PTA")  # and one that stops mid-magic
        report["started_while_running"] = not self.run_done.is_set()
        for _ in range(ROUNDS):
            for attack in ATTACKS.values():
                for address in addresses:
                    attack(address)
        # Every attack connection refused and counted, stalled ones included
        # (5 s handshake timeout), while the run is still going.
        expected = ROUNDS * len(ATTACKS) + 3
        deadline = time.monotonic() + 30
        while True:
            stats = _port_stats(self.client)
            report["stats"] = {address: stats.get(address) for address in addresses}
            if all(s and s["rejected_connections"] >= expected for s in report["stats"].values()):
                break
            if time.monotonic() > deadline or self.run_done.is_set():
                break
            time.sleep(0.1)
        report["expected_rejections"] = expected
        report["finished_while_running"] = not self.run_done.is_set()
        report["rss_after"] = _peak_rss(self.client)
        for sock in stalled:
            sock.close()


def test_attacks_on_the_stage_ports_cost_nothing(client, tmp_path):
    part = partition(model(SLEEP_SCALE), STAGES, method="uniform", example_input=DATA.inputs(0))
    run_done = threading.Event()
    attacker = Attacker(client, run_done)
    attacker.start()
    try:
        result = fit(part, DATA, client=client, job_id=JOB_ID, run_dir=str(tmp_path / "run"),
                     checkpoint_dir=str(tmp_path / "checkpoints"), checkpoint_every=8, placement_timeout=30.0,
                     **job_kwargs())
    finally:
        run_done.set()
        attacker.join(60)
    if attacker.error is not None:
        raise attacker.error
    report = attacker.report

    assert result.recoveries == [], result.recoveries
    assert report["started_while_running"] and report["finished_while_running"], "the run ended mid-attack"
    boundary = payload_bound(TensorSpec((None, DATA.shape[1]), "float32"))  # what crosses, both ways
    assert boundary != DEFAULT_MAX_PAYLOAD
    for s, (address, stats) in enumerate(report["stats"].items()):
        assert stats is not None, f"no open endpoint at {address}"
        assert stats["rejected_connections"] >= report["expected_rejections"], (address, stats)
        assert stats["rejected_frames"] == 0, (address, stats)  # nothing got as far as a frame
        # stage 0 hears gradients from stage 1, stage 1 activations from stage 0: both bounded by the boundary
        assert stats["bounds"][1 - s] == boundary, (address, stats)
    for worker, before in report["rss_before"].items():
        grown = report["rss_after"][worker] - before
        assert grown < MAX_RSS_GROWTH, f"{worker}: peak RSS grew by {grown >> 20} MiB during the attack"

    reference = fit(partition(model(), STAGES, method="uniform", example_input=DATA.inputs(0)), DATA,
                    executor="reference", **job_kwargs())
    assert sorted(result.losses) == list(range(M * STEPS)), "a micro-batch loss is missing"
    for k in range(M * STEPS):
        assert result.losses[k] == reference.losses[k], f"loss of micro-batch {k} differs"
    for s, (got, want) in enumerate(zip(result.states, reference.states, strict=True)):
        assert got.keys() == want.keys()
        for name in want:
            assert np.array_equal(got[name], want[name]), f"stage {s}: {name} differs"
    assert os.environ.get("PIPETRAIN_MAX_MESSAGE_BYTES") is None  # the default bounds were under test

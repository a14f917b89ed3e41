"""Checkpoints that cannot be written fail the job at once, with the place named.

A restart cannot cure a location the workers cannot write, so none of these
is retried: the job stops with one error naming the worker (or the driver)
and the path, and ``fit`` raises before any restart.
"""
import os
import threading
from pathlib import Path

import pytest
from distributed import Client

from pipetrain.api import fit
from pipetrain.partitioning import partition
from pipetrain.runtime.driver import JobFailed
from reliability import jobs
from reliability.jobs import run
from reliability.processes import process_cluster, read_only_prefix, wait_until

pytestmark = [pytest.mark.reliability, pytest.mark.slow, pytest.mark.cluster]


def test_workers_that_cannot_write_the_checkpoint_location_fail_the_job_at_once(tmp_path):
    """As with docs/cluster.md's containers before they mounted the run
    directory: the driver can write it, the workers cannot."""
    shared = tmp_path / "shared"
    (shared / "checkpoints").mkdir(parents=True)
    prefix = read_only_prefix(str(shared))
    if prefix is None:
        pytest.skip("needs root and unshare --mount to give the workers a read-only view")
    part = partition(jobs.model(), jobs.STAGES, method="uniform", example_input=jobs.DATA.inputs(0))
    with process_cluster(jobs.STAGES, worker_prefix=prefix) as cluster:
        with Client(cluster.address, timeout=30) as client:
            client.wait_for_workers(jobs.STAGES, timeout=60)
            with pytest.raises(JobFailed) as failure:
                fit(part, jobs.DATA, client=client, checkpoint_dir=str(shared / "checkpoints"),
                    checkpoint_every=jobs.EVERY, run_dir=str(tmp_path / "run"), **jobs.job_kwargs("1f1b"))
            workers = set(client.scheduler_info()["workers"])
    message = str(failure.value)
    assert "cannot write the checkpoint location" in message and str(shared / "checkpoints") in message
    assert any(w in message for w in workers), f"no worker named in: {message}"
    assert "a restart would fail the same way" in message
    log = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"type": "recovery"' not in log, "an unwritable location was retried"
    assert not any(p.name.startswith(".pipetrain-probe") for p in (shared / "checkpoints").iterdir())


def _block_after_first_commit(checkpoints: Path, block) -> threading.Thread:
    def go() -> None:
        wait_until(lambda: (checkpoints / f"step-{jobs.EVERY:010d}" / "COMMITTED").exists(), timeout=60,
                   what="the first checkpoint", poll=0.005)
        block(checkpoints / f"step-{2 * jobs.EVERY:010d}")

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("where", ["stage-shard", "driver-commit"])
def test_a_checkpoint_write_that_fails_mid_run_stops_the_job(client, tmp_path, where):
    checkpoints = tmp_path / "checkpoints"
    # A directory where a file must go, made whether or not the stages have made the step's
    # directory yet (a plain file in its place raced them: under load they could be first).
    # Stage 0 reaches cut 16 last, so its shard is not written before the block: the block has
    # stage 0's next 8 micro-batches after the first commit (sleep_scale 10: ~0.5 s). At 3
    # (~0.15 s, less the commit's own latency) a loaded CI machine once lost that race: the shard
    # was there first (FileExistsError in the blocking thread, and the job finished).
    blocked = "stage-0.safetensors" if where == "stage-shard" else "manifest.json"
    _block_after_first_commit(checkpoints, lambda step: (step / blocked).mkdir(parents=True))
    with pytest.raises(JobFailed) as failure:
        run(client, tmp_path, "1f1b", [], sleep_scale=10)
    message = str(failure.value)
    assert "a checkpoint could not be written" in message
    assert str(checkpoints) in message
    expected = "could not write its checkpoint shard" if where == "stage-shard" else "could not commit checkpoint"
    assert expected in message
    assert f"micro-batch {jobs.EVERY}" in message, "the last good checkpoint is not named"
    assert '"type": "recovery"' not in (tmp_path / "run" / "metrics.jsonl").read_text()


def test_resume_with_every_checkpoint_corrupt_stops_and_keeps_them(client, tmp_path):
    result, checkpoints = run(client, tmp_path, "pipedream", [])
    steps = sorted(p for p in checkpoints.iterdir() if p.name.startswith("step-"))
    assert len(steps) >= 2
    for step in steps:
        shard = step / "stage-1.safetensors"
        data = bytearray(shard.read_bytes())
        data[-1] ^= 0xFF
        shard.write_bytes(bytes(data))
    before = {p: os.path.getsize(p) for step in steps for p in step.iterdir()}
    with pytest.raises(JobFailed) as failure:
        run(client, tmp_path, "pipedream", [], resume=True)
    message = str(failure.value)
    assert "no checkpoint" in message and "can be used" in message and "--overwrite" in message
    for step in steps:
        assert str(step) in message and "sha256" in message
    assert {p: os.path.getsize(p) for step in steps for p in step.iterdir()} == before, "checkpoints were touched"

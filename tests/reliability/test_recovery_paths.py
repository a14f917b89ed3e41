"""Recovery beyond one clean kill: corrupt checkpoints, two workers at once, a
failure during recovery itself, and the restart bound."""
import os
import signal
import threading
import time

import pytest

from pipetrain.runtime.driver import JobFailed
from reliability.chaos import Fault
from reliability.jobs import assert_bit_identical, assert_exactly_once, run

pytestmark = [pytest.mark.reliability, pytest.mark.slow, pytest.mark.cluster]

CORRUPTIONS = {
    "truncate": "has 1",           # "... has N bytes, the manifest says M (truncated or replaced)"
    "flip": "sha256",              # "... has sha256 ..., the manifest says ... (corrupted or replaced)"
    "manifest": "does not match",  # the marker's sha256 no longer vouches for the manifest
    "marker": "not committed",     # the marker is gone
}


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_corrupt_newest_checkpoint_is_never_loaded(client, tmp_path, how):
    # Stage 1 damages checkpoint 16 (committed) and dies; recovery must pass
    # over it, say why, and go back to checkpoint 8.
    fault = Fault(1, "B", 21, action=f"corrupt-{how}", after_commit=16)
    result, checkpoints = run(client, tmp_path, "pipedream", [fault])

    (recovery,) = result.recoveries
    assert recovery["rollback_to"] == 8
    (skipped,) = recovery["skipped_checkpoints"]
    assert skipped["cut"] == 16 and CORRUPTIONS[how].split()[0] in skipped["why"], skipped
    assert_bit_identical(result, "pipedream")
    assert_exactly_once(result)
    log = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"skipped_checkpoints": [{"cut": 16' in log


def _stage_workers(client, job_prefix="pipetrain-"):
    """stage -> worker address of the running stage tasks, from the scheduler."""
    out = {}
    for address, keys in client.processing().items():
        for key in keys:
            if str(key).startswith(job_prefix) and "-g0-" in str(key):
                out[int(str(key).rsplit("stage", 1)[1])] = address
    return out


def test_two_workers_killed_at_once(client, tmp_path):
    # Killed from outside, like a host going down: stages 0 and 2 together,
    # once checkpoint 8 is committed. The spare takes one stage; the other
    # waits for a nanny to bring a worker back.
    pids = client.run(os.getpid)
    killed = []

    def killer():
        deadline = time.time() + 30
        while time.time() < deadline and not (tmp_path / "checkpoints" / "step-0000000008" / "COMMITTED").exists():
            time.sleep(0.005)
        placed = _stage_workers(client)
        for s in (0, 2):
            os.kill(pids[placed[s]], signal.SIGKILL)
            killed.append(placed[s])

    thread = threading.Thread(target=killer)
    thread.start()
    # Slower stages so the kill lands mid-run.
    result, _ = run(client, tmp_path, "pipedream", [], sleep_scale=4)
    thread.join()

    assert len(killed) == 2
    assert len(result.recoveries) >= 1
    first = result.recoveries[0]
    assert set(killed) <= set(first["workers"]) | {r["worker"] for r in result.recoveries}
    assert not set(killed) & set(result.recoveries[-1]["workers_after"].values())
    assert_bit_identical(result, "pipedream")
    assert_exactly_once(result)


def test_failure_during_recovery(client, tmp_path):
    # Stage 1 dies in a forward; while generation 1 loads checkpoint 8, stage 2
    # dies too. Generation 2 rolls back again and finishes.
    faults = [Fault(1, "F", 13, after_commit=8), Fault(2, "L", 0)]
    result, _ = run(client, tmp_path, "1f1b", faults)

    assert [r["generation"] for r in result.recoveries] == [1, 2]
    assert [r["stage"] for r in result.recoveries] == [1, 2]
    assert [r["rollback_to"] for r in result.recoveries] == [8, 8]
    assert_bit_identical(result, "1f1b")
    assert_exactly_once(result)


def test_restart_bound_fails_with_what_died_and_the_checkpoint(client, tmp_path):
    faults = [Fault(1, "F", 13, after_commit=8), Fault(2, "L", 0)]
    with pytest.raises(JobFailed) as failure:
        run(client, tmp_path, "pipedream", faults, max_restarts=1)
    message = str(failure.value)
    assert "stage 2 on worker tcp://" in message and "gave up after 1 restart" in message
    assert str(tmp_path / "checkpoints" / "step-0000000008") in message

"""The Dask scheduler itself is killed mid-run (a real `dask scheduler` process).

Wanted: the driver says within seconds that the scheduler was lost and how
to resume (not a raw OSError after the client's 30 s reconnect), the stages
stop writing, and the checkpoint directory holds exactly the committed
checkpoints a resume will use: nothing beyond ``keep``, nothing uncommitted.
"""
import threading
import time

import pytest
from distributed import Client

from pipetrain.api import fit
from pipetrain.checkpoint.store import CheckpointStore
from pipetrain.partitioning import partition
from pipetrain.runtime.driver import JobFailed
from reliability import jobs
from reliability.processes import process_cluster, wait_until

pytestmark = [pytest.mark.reliability, pytest.mark.slow, pytest.mark.cluster]

KEEP = 2


def test_scheduler_killed_mid_run(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    part = partition(jobs.model(sleep_scale=5), jobs.STAGES, method="uniform", example_input=jobs.DATA.inputs(0))
    with process_cluster(jobs.STAGES) as cluster:
        client = Client(cluster.address, timeout=30)
        client.wait_for_workers(jobs.STAGES, timeout=60)
        killed_at: list[float] = []

        def kill_after_two_commits() -> None:
            wait_until(lambda: (checkpoints / "step-0000000016" / "COMMITTED").exists(), timeout=120,
                       what="checkpoint 16")
            killed_at.append(time.monotonic())
            cluster.kill_scheduler()

        killer = threading.Thread(target=kill_after_two_commits, daemon=True)
        killer.start()
        with pytest.raises(JobFailed) as failure:
            fit(part, jobs.DATA, client=client, checkpoint_dir=str(checkpoints), checkpoint_every=jobs.EVERY,
                keep_checkpoints=KEEP, run_dir=str(tmp_path / "run"),
                **{**jobs.job_kwargs("pipedream"), "steps": 200})
        noticed = time.monotonic() - killed_at[0]
        client.close(timeout=2)

    message = str(failure.value)
    assert "lost the Dask scheduler" in message
    assert f"pipetrain resume {tmp_path / 'run'}" in message
    assert noticed < 20, f"the driver took {noticed:.1f} s to notice (the client's reconnect alone is 30 s)"
    listing = sorted(p.name for p in checkpoints.iterdir())
    time.sleep(4)  # anything still running would have written its next shard by now
    assert sorted(p.name for p in checkpoints.iterdir()) == listing, "something wrote after the driver gave up"
    found = CheckpointStore(str(checkpoints)).list()
    assert found and all(c.status == "committed" for c in found), [(c.path, c.reason) for c in found]
    assert len(found) <= KEEP, [c.path for c in found]
    assert "failed" in (tmp_path / "run" / "metrics.jsonl").read_text()

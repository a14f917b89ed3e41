"""Kill the driver process, then `pipetrain resume`: same result as the uninterrupted run.

`pipetrain train CONFIG --scheduler ADDR` runs as a subprocess against the
test's cluster and is SIGKILLed once checkpoint 16 is committed. Its stage
tasks are orphans then: the scheduler releases them with the driver's
client, and their threads stop on their own; a resume would also tell them to
stop (their generation's stop flag), fences them out of the checkpoint
directory (a new generation), and continues from checkpoint 16. The loss
history before the cut comes back from the checkpoint manifest.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipetrain.detached import running_tasks
from pipetrain.job import resume_run
from reliability.jobs import STEPS, assert_bit_identical, assert_exactly_once, job_toml
from reliability.processes import wait_until

pytestmark = [pytest.mark.reliability, pytest.mark.slow, pytest.mark.cluster]

ROOT = Path(__file__).resolve().parents[2]


def test_driver_killed_then_resumed(client, tmp_path):
    run_dir = tmp_path / "run"
    driver = start_driver_until_committed(client, tmp_path, cut=16)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert not (run_dir / "summary.json").exists()
    # Its client gone, the scheduler releases the stage tasks; their threads, which Dask
    # cannot kill, notice (StageControl._task_released) and stop on their own.
    job_id = json.loads((run_dir / "job.json").read_text())["job_id"]
    wait_until(lambda: not running_tasks(client, job_id), timeout=30, what="the orphaned stages to stop")

    result = resume_run(str(run_dir), scheduler=client.scheduler.address, progress=False)

    assert_bit_identical(result, "pipedream")
    assert_exactly_once(result)
    assert [h["step"] for h in result.history] == list(range(STEPS))
    log = (run_dir / "metrics.jsonl").read_text()
    assert '"type": "resume"' in log and '"rollback_to": 16' in log


def _wait_for_release(marker: str) -> str:
    """A task that waits, as a stage does, for its control plane to say stop."""
    from pathlib import Path as P

    from pipetrain.runtime.control import ControlNames, StageControl

    control = StageControl(ControlNames("orphan", 0))
    P(marker).write_text("started")
    stopped = control.wait_stopped(60)
    control.close()
    P(marker).write_text(f"{stopped}: {control.lost_reason}")
    return "done"


def test_a_stage_whose_driver_client_is_gone_stops_on_its_own(client, tmp_path):
    from distributed import Client

    marker = tmp_path / "marker"
    with Client(client.scheduler.address) as driver_client:  # the driver's own client, as `pipetrain train` has
        future = driver_client.submit(_wait_for_release, str(marker), pure=False)
        wait_until(lambda: marker.exists(), timeout=30, what="the task to start")
        del future
    wait_until(lambda: marker.read_text() != "started", timeout=15, what="the orphaned task to notice")
    assert marker.read_text().startswith("True: its Dask task was released"), marker.read_text()


def start_driver_until_committed(client, tmp_path, *, cut: int) -> subprocess.Popen:
    """`pipetrain train` of the reliability job against ``client``'s cluster, as a
    subprocess, returned once its checkpoint at ``cut`` is committed."""
    run_dir, config = tmp_path / "run", tmp_path / "job.toml"
    config.write_text(job_toml(run_dir))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    driver = subprocess.Popen([sys.executable, "-m", "pipetrain", "train", str(config), "--scheduler",
                               client.scheduler.address, "-q"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    committed = run_dir / "checkpoints" / f"step-{cut:010d}" / "COMMITTED"
    deadline = time.time() + 120
    while not committed.exists() and driver.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert driver.poll() is None, f"the driver ended before checkpoint {cut}: {driver.stderr.read().decode()}"
    return driver

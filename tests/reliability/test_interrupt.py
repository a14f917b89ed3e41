"""Ctrl-C or SIGTERM on `pipetrain train`: the stages stop, the user is told where to resume.

The driver runs as a subprocess against the test's cluster and gets SIGINT
(what Ctrl-C sends) or SIGTERM (what `docker stop`, Kubernetes and `scancel`
send) once checkpoint 16 is committed. Wanted: one line on
stderr that says it was interrupted and how to resume, no traceback, no
stage task left running on the cluster, and a resume that ends exactly
where the uninterrupted run ends.
"""
import signal

import pytest

from pipetrain.job import resume_run
from reliability.jobs import assert_bit_identical, assert_exactly_once
from reliability.processes import wait_until
from reliability.test_driver_kill import start_driver_until_committed

pytestmark = [pytest.mark.reliability, pytest.mark.slow, pytest.mark.cluster]


def _stage_tasks(client) -> list:
    return [key for keys in client.processing().values() for key in keys if "pipetrain-" in str(key)]


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_stops_the_stages_and_says_how_to_resume(client, tmp_path, signum, code):
    run_dir = tmp_path / "run"
    driver = start_driver_until_committed(client, tmp_path, cut=16)
    assert _stage_tasks(client), "no stage task is running"
    driver.send_signal(signum)
    stderr = driver.communicate(timeout=60)[1].decode()

    assert driver.returncode == code, stderr
    assert "Traceback" not in stderr, stderr
    assert "interrupted" in stderr and f"pipetrain resume {run_dir}" in stderr, stderr
    wait_until(lambda: not _stage_tasks(client), timeout=15, what="the stage tasks to end")
    assert '"type": "interrupted"' in (run_dir / "metrics.jsonl").read_text()

    result = resume_run(str(run_dir), scheduler=client.scheduler.address, progress=False)
    assert_bit_identical(result, "pipedream")
    assert_exactly_once(result)

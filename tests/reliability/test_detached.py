"""Detached jobs on a real cluster: `pipetrain submit` runs the driver as a Dask task.

The job is the reliability job (jobs.py) as a config, so every run is held
to the reference executor: the final checkpoint (cut N, every job's last cut)
holds each stage's final state and every micro-batch's loss, repr-exact, and
both must equal the uninterrupted reference run bit for bit.
"""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from distributed import Client, LocalCluster

from pipetrain.checkpoint.store import CheckpointStore
from pipetrain.detached import running_tasks, task_state
from pipetrain.detached_driver import DRIVER_RESOURCE
from pipetrain.runtime.local import single_thread_env
from reliability.jobs import N, job_toml, uninterrupted
from reliability.processes import wait_until

pytestmark = [pytest.mark.reliability, pytest.mark.slow, pytest.mark.cluster]

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}



def _cluster(n_workers: int, *, driver_worker: bool) -> LocalCluster:
    cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, memory_limit=0,
                           dashboard_address=":0", env=single_thread_env(), silence_logs=50)
    if driver_worker:  # one more worker, under a nanny like the others, that declares the driver resource
        (_, spec), = cluster.new_worker_spec().items()
        spec["options"] = {**spec["options"], "resources": {DRIVER_RESOURCE: 1}}
        cluster.worker_spec["driver"] = spec
        cluster.scale(len(cluster.worker_spec))
    return cluster


@pytest.fixture(scope="module")
def driver_cluster():
    """Three workers for the three stages, and a driver worker."""
    cluster = _cluster(3, driver_worker=True)
    yield cluster
    cluster.close()


@pytest.fixture
def client(driver_cluster):
    with Client(driver_cluster) as c:
        c.wait_for_workers(4, timeout=60)
        yield c


def _pipetrain(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipetrain", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def _submit(client, tmp_path: Path, *, forward_ms: int = 40, backward_ms: int = 80) -> tuple[str, Path]:
    run_dir, config = tmp_path / "run", tmp_path / "job.toml"
    config.write_text(job_toml(run_dir, forward_ms=forward_ms, backward_ms=backward_ms, keep=8))
    proc = _pipetrain("submit", str(config), "--scheduler", client.scheduler.address)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_id = re.search(r"^job (\w+) submitted", proc.stdout, re.M).group(1)
    return job_id, run_dir


def _driver_worker(client, job_id: str) -> str:
    """The worker the job's driver task runs on, as the scheduler says."""
    for worker, keys in client.processing().items():
        if any(str(k).startswith(f"pipetrain-{job_id}-driver") for k in keys):
            return worker
    raise AssertionError(f"no worker processes the driver of job {job_id}: {client.processing()}")


def _assert_final_checkpoint_is_the_reference(run_dir: Path) -> None:
    reference = uninterrupted("pipedream")
    store = CheckpointStore(str(run_dir / "checkpoints"))
    latest = store.latest()
    assert latest is not None and latest.cut == N, f"the final checkpoint is missing: {store.cuts()}"
    losses = {int(k): v for k, v in latest.manifest["losses"].items()}
    assert losses == reference.losses, "the micro-batch losses differ from the reference run"
    for s, want in enumerate(reference.states):
        got = store.load_shard(N, s)
        assert got.keys() == want.keys(), f"stage {s}: state names differ"
        for name in want:
            assert np.array_equal(got[name], want[name]), f"stage {s}: {name} differs"


def _driver_states(run_dir: Path) -> list[str]:
    return re.findall(r"  driver: (\w+)", (run_dir / "driver.log").read_text())


def _placements(run_dir: Path) -> list[set[str]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [set(r["workers"].values()) for r in records if r["type"] == "placement"]


def test_submitted_job_finishes_after_its_client_and_process_are_gone(tmp_path):
    """No driver worker: the driver runs on one of the four workers, the stages on the other three."""
    cluster = _cluster(4, driver_worker=False)
    try:
        with Client(cluster) as client:
            client.wait_for_workers(4, timeout=60)
            job_id, run_dir = _submit(client, tmp_path)  # the process and its client have exited
            assert not (run_dir / "summary.json").exists(), "the job ended before its submitter did"
            worker = _driver_worker(client, job_id)
            wait_until(lambda: (run_dir / "summary.json").exists(), timeout=60, what="the job to finish")
            key = client.get_metadata(["pipetrain", "jobs", job_id])["task"]
            wait_until(lambda: task_state(client, key)[0] is None, timeout=10,
                       what="the scheduler to forget the driver task")
        _assert_final_checkpoint_is_the_reference(run_dir)
        assert _driver_states(run_dir) == ["submitted", "started", "finished"]
        assert all(worker not in placed for placed in _placements(run_dir)), "a stage ran on the driver's worker"
    finally:
        cluster.close()


def test_driver_worker_killed_then_the_driver_resumes_elsewhere(client, tmp_path):
    job_id, run_dir = _submit(client, tmp_path)
    committed = run_dir / "checkpoints" / "step-0000000016" / "COMMITTED"
    wait_until(committed.exists, timeout=60, what="checkpoint 16", poll=0.005)
    worker = _driver_worker(client, job_id)
    assert client.sync(client.scheduler.identity, n_workers=-1)["workers"][worker]["resources"] == {
        DRIVER_RESOURCE: 1}, "the driver is not on the driver worker"
    pid = client.run(os.getpid, workers=[worker])[worker]
    os.kill(pid, signal.SIGKILL)
    assert not (run_dir / "summary.json").exists(), "the job ended before its driver could be killed"

    wait_until(lambda: (run_dir / "summary.json").exists(), timeout=90, what="the restarted driver to finish")
    _assert_final_checkpoint_is_the_reference(run_dir)
    assert _driver_states(run_dir) == ["submitted", "started", "started", "finished"]
    log = (run_dir / "metrics.jsonl").read_text()
    assert '"type": "resume"' in log and re.search(r'"rollback_to": (16|24)', log)
    assert all(worker not in placed for placed in _placements(run_dir))


def test_status_logs_and_cancel_leave_a_resumable_run(client, tmp_path):
    job_id, run_dir = _submit(client, tmp_path, forward_ms=100, backward_ms=200)
    at = ["--scheduler", client.scheduler.address]
    wait_until((run_dir / "checkpoints" / "step-0000000008" / "COMMITTED").exists, timeout=60, what="checkpoint 8")

    status = _pipetrain("status", job_id, *at)
    assert status.returncode == 0, status.stderr
    assert re.search(rf"^job\s+{job_id} ", status.stdout, re.M) and "running: its driver is on worker" in status.stdout
    logs = _pipetrain("logs", str(run_dir))
    assert "placement (generation 0)" in logs.stdout and "checkpoint committed at micro-batch 8" in logs.stdout
    assert "step 1/8  loss" in logs.stdout and "driver: started" in logs.stdout

    cancel = _pipetrain("cancel", job_id, *at)
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    assert "its driver and its stages have stopped" in cancel.stdout
    assert running_tasks(client, job_id) == {}, "a task of the cancelled job still runs"
    assert _driver_states(run_dir)[-1] == "cancelled" and not (run_dir / "summary.json").exists()
    status = _pipetrain("status", str(run_dir), *at)
    assert "cancelled; resumable: `pipetrain submit --resume" in status.stdout

    resumed = _pipetrain("submit", "--resume", str(run_dir), *at)
    assert resumed.returncode == 0, resumed.stderr
    follow = _pipetrain("logs", job_id, *at, "-f", timeout=90)  # returns once the driver finished
    assert "resumed as generation 1" in follow.stdout and follow.stdout.rstrip().endswith(
        f"driver: finished: {run_dir / 'summary.json'}")
    _assert_final_checkpoint_is_the_reference(run_dir)


class _FakeClient:
    """The two scheduler calls the detached driver makes: the worker list and the cancel request."""

    scheduler = SimpleNamespace(identity=None)

    def __init__(self, *, cancel: bool = False):
        self.cancel = cancel

    def sync(self, fn, **kwargs):
        return {"workers": {"tcp://me:1": {}, "tcp://drivers:2": {"resources": {DRIVER_RESOURCE: 2}},
                            "tcp://gpu:3": {"resources": {"GPU": 1}}}}

    def get_metadata(self, keys, default=None):
        return self.cancel if keys[-1] == "cancel" else default


def _supervisor(monkeypatch, client):
    import distributed

    from pipetrain.detached_driver import _DriverTaskSupervisor

    monkeypatch.setattr(distributed, "get_worker", lambda: SimpleNamespace(address="tcp://me:1"))
    return _DriverTaskSupervisor(client, "j1")


def _driver_with(supervisor):
    from pipetrain.runtime.driver import Driver

    driver = object.__new__(Driver)  # no cluster: only placement and the poll's stop check are exercised
    driver.plan = SimpleNamespace(job_id="j1", supervisor=supervisor, partition=SimpleNamespace(stages=[]), poll=0.0,
                                  scheduler_timeout=1.0, num_stages=0, replicas=1,
                                  spec=SimpleNamespace(cluster=SimpleNamespace(resource="GPU", placement_timeout=1)))
    driver.client, driver.progress, driver._stop_asked = None, SimpleNamespace(note=lambda text: None), False
    driver._needs = []  # no stages, so no memory estimate to make
    return driver


def test_the_detached_drivers_placement_spares_its_own_worker_and_every_driver_worker(monkeypatch):
    from pipetrain.runtime import core_events as ev
    from pipetrain.runtime import placement

    asked = []

    def wait_for_placement(client, needs, *, resource, timeout, exclude):
        asked.append(frozenset(exclude))
        return SimpleNamespace(stage_workers={}, spares=())

    monkeypatch.setattr(placement, "wait_for_placement", wait_for_placement)
    supervisor = _supervisor(monkeypatch, _FakeClient())
    assert supervisor.reserved_workers() == {"tcp://me:1", "tcp://drivers:2"}
    _driver_with(supervisor)._place(ev.Place(exclude=frozenset({"tcp://dead:4"}), previous={}))
    assert asked == [frozenset({"tcp://dead:4", "tcp://me:1", "tcp://drivers:2"})]


def test_a_cancel_request_reaches_the_core_once_as_an_interrupt(monkeypatch):
    from pipetrain.runtime import core_events as ev

    assert not _supervisor(monkeypatch, _FakeClient()).stop_requested()
    driver = _driver_with(_supervisor(monkeypatch, _FakeClient(cancel=True)))
    driver.futures, driver._ended, driver._unreachable_since = {}, set(), None
    driver.core = SimpleNamespace(generation=0)
    monkeypatch.setattr(driver, "_check_scheduler", lambda: None, raising=False)
    monkeypatch.setattr(driver, "_control", lambda g: SimpleNamespace(drain=lambda **kw: []), raising=False)
    monkeypatch.setattr(driver, "_alive", lambda: set(), raising=False)
    first = driver._poll(include_members=True)
    assert [type(e) for e in first] == [ev.WorkersChanged, ev.Interrupted, ev.Tick]
    assert [type(e) for e in driver._poll(include_members=True)] == [ev.WorkersChanged, ev.Tick]

"""The container image, built and run: a Dask cluster of containers trains a job, and a killed
worker container costs a rollback, not the job.

Opt-in, because it needs a Docker engine and a built image, which CI has not
(``tests/test_dockerfile.py`` checks the Dockerfile there without one)::

    docker build -t pipetrain:dev .
    PIPETRAIN_TEST_IMAGE=pipetrain:dev .venv/bin/python -m pytest tests/test_container_image.py

Each container has its own address on a Docker network of the test's own: the
scheduler, the workers and the driver are separate hosts to Dask and to the
stages' transport. The run directory is a host folder mounted into the workers
and the driver at the same path, as ``docs/cluster.md`` tells users to do.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from reliability.processes import wait_until
from test_dockerfile import is_pip_install, pip_install_specs, run_commands

IMAGE = os.environ.get("PIPETRAIN_TEST_IMAGE", "")
CONFIG = "/opt/pipetrain/models/configs/demo.toml"  # COPY models ./models puts it there
# The flagship, cut into 2 stages, short: a checkpoint every 4 steps (8 micro-batches each).
JOB = ["--set", "partition.stages=2", "--set", "schedule.steps=16", "--set", "checkpoint.every=32"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not IMAGE, reason="set PIPETRAIN_TEST_IMAGE to a built image (see the module docstring)"),
    pytest.mark.skipif(shutil.which("docker") is None, reason="no docker command"),
]


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def image() -> str:
    if docker("image", "inspect", IMAGE, check=False).returncode != 0:
        pytest.fail(f"PIPETRAIN_TEST_IMAGE={IMAGE!r} names no image the Docker engine has")
    return IMAGE


class Hosts:
    """Containers on one Docker network of their own, all removed at the end."""

    def __init__(self, image: str, runs: Path):
        self.image, self.runs = image, runs
        self.tag = f"pt-{uuid.uuid4().hex[:8]}"
        self.network = self.tag
        docker("network", "create", self.network)
        self.names: list[str] = []

    def start(self, name: str, *command: str) -> str:
        full = f"{self.tag}-{name}"
        docker("run", "--detach", f"--name={full}", f"--network={self.network}", f"--volume={self.runs}:/runs",
               "--env=JAX_PLATFORMS=cpu", self.image, *command)
        self.names.append(full)
        return full

    def cluster(self, run: str, *, workers: int) -> str:
        """A scheduler and ``workers`` worker containers (one thread each); the scheduler's address."""
        sched = self.start(f"{run}-sched", "dask", "scheduler", "--port", "8786", "--no-dashboard")
        for w in range(workers):
            self.start(f"{run}-w{w}", "dask", "worker", f"tcp://{sched}:8786", "--nthreads", "1",
                       "--name", f"{run}-w{w}", "--no-dashboard")
        return f"tcp://{sched}:8786"

    def address(self, name: str) -> str:
        return docker("inspect", "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                      name).stdout.strip()

    def wait(self, name: str, timeout: float) -> tuple[int, str]:
        code = int(docker("wait", name, timeout=timeout).stdout.strip())
        logs = docker("logs", name)
        return code, logs.stdout + logs.stderr

    def close(self) -> None:
        if self.names:
            docker("rm", "--force", *self.names, check=False)
        docker("network", "rm", self.network, check=False)


@pytest.fixture
def hosts(image, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    runs.chmod(0o777)  # the containers run as uid 1000
    h = Hosts(image, runs)
    yield h
    h.close()


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_the_image_runs_as_its_user_under_dumb_init_with_the_pinned_frameworks(image):
    help_text = docker("run", "--rm", image).stdout
    assert "usage: pipetrain" in help_text, help_text
    uid, pid1 = docker("run", "--rm", image, "sh", "-c", "id -u; cat /proc/1/comm").stdout.split()
    assert (uid, pid1) == ("1000", "dumb-init")
    listed = docker("run", "--rm", image, "python", "-m", "pip", "list", "--format=json").stdout
    installed = {d["name"].lower(): d["version"] for d in json.loads(listed)}
    pins = dict(spec.split("==") for command in filter(is_pip_install, run_commands())
                for spec in pip_install_specs(command) if "==" in spec)
    for name in ("jax", "torch", "dask", "distributed"):
        assert installed[name].split("+")[0] == pins[name], f"the image has {name} {installed[name]}"
    # One CUDA for both frameworks: torch's wheels are CUDA 13, so JAX's must be too.
    torch_cuda = docker("run", "--rm", image, "python", "-c", "import torch; print(torch.version.cuda)").stdout
    assert torch_cuda.strip().startswith("13.") and "jax-cuda13-plugin" in installed, torch_cuda
    assert not [name for name in installed if name.endswith("-cu12")], "a CUDA 12 stack beside CUDA 13"


def train(hosts: Hosts, run: str, *, workers: int, kill_after_step: int | None = None) -> tuple[str, dict]:
    """``pipetrain train`` in a driver container against a scheduler and ``workers`` worker
    containers; with ``kill_after_step``, the container of stage 1's worker is killed
    (SIGKILL) once that step and a checkpoint are recorded."""
    scheduler = hosts.cluster(run, workers=workers)
    driver = hosts.start(f"{run}-driver", "pipetrain", "train", CONFIG, "--scheduler", scheduler,
                         "--set", f"run_dir=/runs/{run}", *JOB)
    if kill_after_step is not None:
        def step_and_checkpoint_seen() -> bool:
            seen = records(hosts.runs / run)
            steps = [r["step"] for r in seen if r["type"] == "step"]
            return bool(steps) and max(steps) >= kill_after_step and any(r["type"] == "checkpoint" for r in seen)

        wait_until(step_and_checkpoint_seen, timeout=300, poll=0.2, what=f"step {kill_after_step} and a checkpoint")
        stage1_host = next(r for r in records(hosts.runs / run) if r["type"] == "placement")["hosts"]["1"]
        docker("kill", next(n for n in hosts.names if "-w" in n and hosts.address(n) == stage1_host))
    code, logs = hosts.wait(driver, timeout=600)
    assert code == 0, f"the driver exited {code}:\n{logs[-4000:]}"
    summary = json.loads((hosts.runs / run / "summary.json").read_text())
    return logs, summary


def test_a_cluster_of_containers_trains_and_a_killed_worker_container_costs_a_rollback(hosts):
    logs, clean = train(hosts, "clean", workers=2)
    assert clean["recoveries"] == 0 and clean["steps_run"] == 16, logs[-3000:]
    assert clean["heldout_loss_after"] < clean["heldout_loss_before"] - 1.0
    hosts_of_stages = next(r for r in records(hosts.runs / "clean") if r["type"] == "placement")["hosts"]
    assert len(set(hosts_of_stages.values())) == 2, "the two stages shared a container"
    committed = sorted(p.name for p in (hosts.runs / "clean" / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert committed == ["step-0000000096", "step-0000000128"], committed  # keep = 2

    # Three workers: a spare for the one killed after step 6 (the last checkpoint: step 4's cut).
    logs, recovered = train(hosts, "killed", workers=3, kill_after_step=6)
    assert recovered["recoveries"] == 1, logs[-3000:]
    kinds = [r["type"] for r in records(hosts.runs / "killed")]
    assert "recovery" in kinds and "recovered" in kinds
    # The rollback is bit-identical: every step's loss and the held-out loss as in the clean run.
    # (A step run again after the rollback is recorded again: the last record of each step counts.)
    by_step = {run: {r["step"]: r["loss"] for r in records(hosts.runs / run) if r["type"] == "step"}
               for run in ("clean", "killed")}
    assert sorted(by_step["clean"]) == list(range(16)) and by_step["killed"] == by_step["clean"]
    assert recovered["heldout_loss_after"] == clean["heldout_loss_after"]


def test_docker_stop_on_the_driver_stops_the_job_and_a_resume_container_finishes_it(hosts):
    scheduler = hosts.cluster("job", workers=2)
    driver = hosts.start("driver", "pipetrain", "train", CONFIG, "--scheduler", scheduler,
                         "--set", "run_dir=/runs/job", *JOB)
    wait_until(lambda: any(r["type"] == "checkpoint" for r in records(hosts.runs / "job")), timeout=300, poll=0.2,
               what="a checkpoint")
    docker("stop", "--time", "30", driver)  # SIGTERM through dumb-init, SIGKILL after 30 s
    code, logs = hosts.wait(driver, timeout=60)
    assert code == 143, logs[-3000:]
    assert "pipetrain train (SIGTERM): interrupted" in logs and "pipetrain resume /runs/job" in logs, logs[-3000:]
    assert any(r["type"] == "interrupted" for r in records(hosts.runs / "job"))

    resumed = hosts.start("resume", "pipetrain", "resume", "/runs/job", "--scheduler", scheduler)
    code, logs = hosts.wait(resumed, timeout=600)
    assert code == 0, logs[-3000:]
    summary = json.loads((hosts.runs / "job" / "summary.json").read_text())
    assert summary["resumed_from_step"] > 0 and summary["steps"] == 16, summary

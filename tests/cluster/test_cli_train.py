"""`pipetrain train` as users run it: a subprocess, a config file, and either
the embedded cluster or a Dask scheduler and workers started separately."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _train(config: str, run_dir: Path, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "pipetrain"), "train", str(ROOT / config), "--set", f'run_dir="{run_dir}"', *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_mixed_framework_config_trains_on_the_embedded_cluster(tmp_path):
    proc = _train("models/configs/mixed.toml", tmp_path / "run", "--set", "schedule.steps=6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stages"] == 3 and summary["executor"] == "dask"
    assert summary["heldout_loss_after"] < summary["heldout_loss_before"]
    assert "3-stage 'pipedream' pipeline" in proc.stdout and "held-out loss" in proc.stdout
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["type"] == "step"] == list(range(6))


def test_train_submits_to_a_running_scheduler(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    scheduler_file = tmp_path / "scheduler.json"
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--scheduler-file", str(scheduler_file),
                               "--no-dashboard", "--port", "0"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.time() + 60
        while not scheduler_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        for _ in range(2):
            procs.append(subprocess.Popen([str(BIN / "dask"), "worker", "--scheduler-file", str(scheduler_file),
                                           "--nthreads", "1", "--no-dashboard", "--resources", "GPU=1"],
                                          cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        proc = _train("models/configs/mixed.toml", tmp_path / "run", "--scheduler-file", str(scheduler_file),
                      "--set", "schedule.steps=3", "--set", "partition.stages=3",
                      "--set", "cluster.placement_timeout=5")
        # Two GPU workers for three stages: the placement says what it found and what it needed.
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "pipetrain train: error:" in proc.stderr and "Traceback" not in proc.stderr
        assert "stage 2" in proc.stderr and "GPU" in proc.stderr, proc.stderr[-2000:]
        procs.append(subprocess.Popen([str(BIN / "dask"), "worker", "--scheduler-file", str(scheduler_file),
                                       "--nthreads", "1", "--no-dashboard", "--resources", "GPU=1"],
                                      cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        proc = _train("models/configs/mixed.toml", tmp_path / "run", "--scheduler-file", str(scheduler_file),
                      "--set", "schedule.steps=3", "--set", "cluster.placement_timeout=60")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "Dask (" in proc.stdout and "summary" in proc.stdout
    finally:
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)

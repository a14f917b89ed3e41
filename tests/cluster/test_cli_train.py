"""`pipetrain train` as users run it: a subprocess, a config file, and either
the embedded cluster or a Dask scheduler and workers started separately."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from job_configs import sleep_job_toml

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




def _sleep_config(run_dir: Path, schedule: str = "1f1b") -> str:
    return sleep_job_toml(run_dir, model_kwargs="num_layers = 2, forward_ms = 1, backward_ms = 2, seed = 3",
                          nbytes=256, schedule=schedule, extra=(
                              '[optimizer]\nname = "sgd"\nlr = 0.05\n[checkpoint]\nevery = 2\n'
                              "[cluster]\nplacement_timeout = 30\n"))


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("schedule", ["1f1b", "pipedream"])
def test_resume_of_a_finished_run_does_nothing_and_steps_trains_it_further(client, tmp_path, capsys, schedule):
    from pipetrain.cli import main

    run_dir, config = tmp_path / "run", tmp_path / "job.toml"
    config.write_text(_sleep_config(run_dir, schedule))
    at = ["--scheduler", client.scheduler.address, "-q"]
    assert main(["train", str(config), *at]) == 0
    capsys.readouterr()
    log = (run_dir / "metrics.jsonl").read_text()

    # Finished: today's code started stages from the final cut (TransportError) and logged a recovery.
    assert main(["resume", str(run_dir), *at]) == 0
    assert f"{run_dir} is complete: it trained all 3 steps" in capsys.readouterr().out
    assert (run_dir / "metrics.jsonl").read_text() == log

    # pipedream: the final checkpoint holds only the newest version (a KeyError on the stages before)
    assert main(["resume", str(run_dir), *at, "--steps", "5"]) == 0
    out = capsys.readouterr().out
    assert "trained        2 steps (resumed at step 3 of 5, from the checkpoint at micro-batch 6), 4 samples" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["steps"], summary["steps_run"], summary["resumed_from_step"], summary["samples"]) == (5, 2, 3, 4)
    recorded = json.loads((run_dir / "job.json").read_text())["config"]["schedule"]
    assert (recorded["steps"], recorded["restart_at"]) == (5, 6)
    records = _metrics(run_dir)
    assert [r["step"] for r in records if r["type"] == "step"] == list(range(5))
    assert [r["rollback_to"] for r in records if r["type"] == "resume"] == [6]
    assert not [r for r in records if r["type"] in ("recovery", "failed")]
    assert records[-1]["type"] == "end" and (records[-1]["steps"], records[-1]["steps_run"]) == (5, 2)

    # The continuation is the same training as one run of 5 steps (the reference executor's): for
    # 1f1b with or without the restart (a flush ends every step); pipedream's pipeline fills again at 6.
    reference_dir = tmp_path / "reference"
    restart = ["--set", "schedule.restart_at=6"] if schedule == "pipedream" else []
    assert main(["train", str(config), "--executor", "reference", "-q", "--set", f'run_dir="{reference_dir}"',
                 "--set", "schedule.steps=5", *restart]) == 0
    losses = {r["step"]: r["loss"] for r in _metrics(run_dir) if r["type"] == "step"}
    assert losses == {r["step"]: r["loss"] for r in _metrics(reference_dir) if r["type"] == "step"}


def _readme_python_example() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### From Python"):readme.index("### From the command line")]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_python_example_runs_as_a_script(tmp_path):
    # As written it trains 60 steps (minutes here); 4 show the same thing. It runs
    # as a script: the embedded cluster's spawned workers re-import it (__main__ guard).
    code = _readme_python_example()
    assert 'if __name__ == "__main__":' in code and "steps=60," in code
    script = tmp_path / "example.py"
    script.write_text(code.replace("steps=60,", "steps=4,"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'type': 'step', 'step': 3" in proc.stdout
    assert (tmp_path / "runs" / "x" / "checkpoints" / "step-0000000032" / "COMMITTED").exists()


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


def test_the_configs_cluster_scheduler_is_where_the_job_runs(client, tmp_path, capsys):
    """[cluster] scheduler in the TOML (it used to be read by nothing): no --scheduler needed."""
    from pipetrain.cli import main

    run_dir, config = tmp_path / "run", tmp_path / "job.toml"
    config.write_text(_sleep_config(run_dir).replace(
        "[cluster]\n", f'[cluster]\nscheduler = "{client.scheduler.address}"\n'))
    assert main(["train", str(config), "-q"]) == 0
    assert f"on Dask ({client.scheduler.address})" in capsys.readouterr().out
    placed = [r for r in _metrics(run_dir) if r["type"] == "placement"]
    assert placed and set(placed[0]["workers"].values()) <= set(client.scheduler_info()["workers"])

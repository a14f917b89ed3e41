"""The command line: simulate, partition, and errors a user can act on."""
import subprocess
import sys
from pathlib import Path

import pytest

from pipetrain.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_simulate_prints_the_grid_and_the_formula_bubble(capsys):
    assert main(["simulate", "--stages", "4", "--microbatches", "8", "--schedule", "1f1b"]) == 0
    out = capsys.readouterr().out
    assert "stage 3" in out and "F0 B0" in out.replace("  ", " ")
    assert "27.3% simulated, 27.3% by formula (p-1)/(m+p-1) = 3/11" in out


def test_simulate_shows_a_split_backward(capsys):
    assert main(["simulate", "--stages", "2", "--microbatches", "4", "--steps", "2", "--backward-cost", "2",
                 "--split-backward", "auto", "--weight-cost", "1"]) == 0
    out = capsys.readouterr().out
    assert "split backward auto (weight part 1)" in out and "W3" in out and "W7" in out
    assert "14.3% simulated" in out  # 20.0% without the split (the formula's)


def test_simulate_async_schedule_reports_weight_versions(capsys):
    assert main(["simulate", "--stages", "3", "--microbatches", "6", "--schedule", "2bw", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "weight versions" in out and "2bw" in out


def test_unknown_schedule_is_a_clear_error(capsys):
    assert main(["simulate", "--schedule", "zb"]) == 2
    err = capsys.readouterr().err
    assert "unknown schedule 'zb'" in err and "gpipe, 1f1b, pipedream, 2bw" in err


def test_partition_of_a_model_named_by_import_path(capsys):
    assert main(["partition", "models.gpt:build", "--stages", "3", "--method", "params",
                 "--kwargs", '{"n_layers": 4}']) == 0
    out = capsys.readouterr().out
    assert "6 layers in 3 stages" in out and "block3" in out and "share" in out


def test_partition_with_bad_boundaries_names_the_problem(capsys):
    assert main(["partition", "models.gpt:build", "--stages", "3", "--boundaries", "4,2"]) == 2
    assert "increasing" in capsys.readouterr().err


def test_bad_config_field_names_the_field_and_the_file(tmp_path, capsys):
    config = tmp_path / "job.toml"
    config.write_text('[model]\nentry = "models.gpt:build"\n[data]\ntrain = "models.text:CharWindows"\n'
                      '[schedule]\nmicrobatches = 0\n')
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert str(config) in err and "schedule.microbatches: must be >= 1" in err


def test_bad_set_arguments_are_one_line_errors_naming_the_field(tmp_path, capsys):
    config = tmp_path / "job.toml"
    config.write_text('[model]\nentry = "models.gpt:build"\n[data]\ntrain = "models.text:CharWindows"\n'
                      '[schedule]\nsteps = 2\n')
    cases = [("schedule", "--set schedule: expected FIELD=VALUE, e.g. --set schedule.steps=20"),
             ("=3", "--set =3: expected FIELD=VALUE"),
             ("schedule..steps=3", "'schedule..steps' is not a field name"),
             ("schedule.steps.x=1", f"--set schedule.steps.x: {config}: schedule.steps is a value, not a table"),
             ("schedule.foo=1", f"{config}: schedule.foo: unknown field; known: accumulate, ")]
    for item, expected in cases:
        assert main(["train", str(config), "--set", item]) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_console_script_and_module_entry_points_work():
    for cmd in ([str(Path(sys.executable).parent / "pipetrain"), "--help"],
                [sys.executable, "-m", "pipetrain", "--help"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert proc.returncode == 0 and "simulate" in proc.stdout


def test_import_pipetrain_imports_no_framework():
    code = ("import sys, pipetrain; pipetrain.Optimizer; "
            "print(sorted(m for m in ('jax', 'torch', 'tensorflow', 'distributed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60).stdout
    assert out.strip() == "[]"


def test_train_into_a_run_directory_with_checkpoints_needs_overwrite(tmp_path, capsys):
    from pipetrain.checkpoint.store import CheckpointStore

    config = tmp_path / "job.toml"
    run_dir = tmp_path / "run"
    config.write_text(f'run_dir = "{run_dir}"\n[model]\nentry = "models.gpt:build"\n'
                      'kwargs = { context = 8, d_model = 16, n_heads = 2, n_layers = 1 }\n'
                      '[data]\ntrain = "models.text:CharWindows"\nkwargs = { context = 8, microbatch_size = 4 }\n'
                      '[partition]\nstages = 2\n[schedule]\nmicrobatches = 2\nsteps = 2\n'
                      '[checkpoint]\nevery = 2\n')
    train = ["train", str(config), "--executor", "reference", "--quiet"]
    assert main(train) == 0
    assert main(train) == 0  # the earlier run left no checkpoints (reference executor): replaced
    first_job = (run_dir / "job.json").read_text()
    store = CheckpointStore(str(run_dir / "checkpoints"))  # as a Dask run of this job would have left it
    store.begin_generation(0)
    record = store.write_shard(2, 0, {"w": __import__("numpy").zeros(2)}, generation=0)
    store.commit(2, records=[record], generation=0, num_stages=1)
    assert main(train) == 2
    err = capsys.readouterr().err
    assert f"{run_dir} holds the checkpoints of an earlier run" in err
    assert f"pipetrain resume {run_dir}" in err and "--overwrite" in err
    assert (run_dir / "job.json").read_text() == first_job and store.cuts() == [2]  # refused before touching anything
    assert main([*train, "--overwrite"]) == 0
    assert (run_dir / "job.json").read_text() != first_job and store.cuts() == []


def test_a_top_level_seed_is_refused_as_unknown_since_nothing_would_read_it(tmp_path):
    from pipetrain.config import ConfigError, from_dict

    raw = {"run_dir": str(tmp_path), "seed": 3, "model": {"entry": "models.mlp:build"},
           "data": {"train": "models.mlp:train_source"}}
    with pytest.raises(ConfigError, match="seed: unknown field"):
        from_dict(raw, origin="job.toml")


# ---------------------------------------------------------------- detached jobs (submit, status, logs, cancel)

def test_detached_subcommands_parse():
    from pipetrain.cli import parser

    args = parser().parse_args(["submit", "job.toml", "--scheduler", "tcp://h:8786", "--set", "schedule.steps=3",
                                "--overwrite"])
    assert (args.config, args.scheduler, args.set, args.overwrite, args.resume) == (
        "job.toml", "tcp://h:8786", ["schedule.steps=3"], True, False)
    assert parser().parse_args(["submit", "runs/x", "--scheduler-file", "s.json", "--resume"]).resume
    assert parser().parse_args(["logs", "runs/x", "-f"]).follow
    assert parser().parse_args(["status", "1a2b3c"]).scheduler is None
    assert parser().parse_args(["cancel", "1a2b3c", "--scheduler", "tcp://h:8786"]).job == "1a2b3c"


@pytest.mark.parametrize("argv", [["submit", "job.toml"], ["cancel", "1a2b3c"],
                                  ["submit", "job.toml", "--scheduler", "a", "--scheduler-file", "b"]])
def test_submit_and_cancel_need_one_scheduler(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and "--scheduler" in capsys.readouterr().err


def test_submit_refuses_a_job_without_checkpoints_before_contacting_the_cluster(tmp_path, capsys):
    config = tmp_path / "job.toml"
    config.write_text(f'run_dir = "{tmp_path / "run"}"\n[model]\nentry = "models.gpt:build"\n'
                      '[data]\ntrain = "models.text:CharWindows"\n')
    assert main(["submit", str(config), "--scheduler", "tcp://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.every and checkpoint.seconds are 0" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    assert main(["submit", str(tmp_path), "--resume", "--set", "a=1", "--scheduler", "tcp://127.0.0.1:9"]) == 2
    assert "--set and --overwrite are for a new job" in capsys.readouterr().err


def test_a_job_id_needs_a_scheduler(capsys):
    assert main(["status", "1a2b3c"]) == 2
    assert "1a2b3c: no such run directory (a job id needs --scheduler" in capsys.readouterr().err


def _detached_run(run_dir: Path) -> None:
    """A run directory as a cancelled detached job leaves it."""
    import json

    from pipetrain import rundir
    from pipetrain.driver_log import DriverLog

    rundir.write_job(run_dir, {"job_id": "1a2b3c", "source": "job.toml", "config": {"run_dir": str(run_dir)}})
    log = DriverLog(run_dir)
    log.state("submitted", "job 1a2b3c to tcp://h:8786")
    log.state("started", "attempt 1 on worker tcp://w:1, training from the beginning")
    records = [{"type": "start", "stages": 2, "schedule": "1f1b", "steps": 4, "microbatches": 2, "heldout_loss": None},
               {"type": "step", "step": 0, "loss": 2.5, "samples_per_s": 1234.0, "busy": [0.5, 0.75]},
               {"type": "checkpoint", "cut": 2, "generation": 0, "commit_seconds": 0.01},
               {"type": "interrupted", "generation": 0, "checkpoint": "run/checkpoints/step-0000000002"}]
    with (run_dir / rundir.METRICS_FILE).open("w") as f:
        f.writelines(json.dumps({"time": 1.0e9 + i, **r}) + "\n" for i, r in enumerate(records))
    log.write("[##......] step 1/4  loss 2.5000")  # the progress line, as the driver printed it
    log.state("cancelled", "interrupted; the stages were stopped")


def test_status_and_logs_of_a_run_directory_need_no_scheduler(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _detached_run(run_dir)
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "1a2b3c (from job.toml)" in out and "step 1 of 4, loss 2.5000" in out
    assert f"cancelled; resumable: `pipetrain submit --resume {run_dir} --scheduler ADDR`" in out
    assert "latest at micro-batch 2 (generation 0)" in out and "0 of the driver" in out
    assert main(["logs", str(run_dir), "-f"]) == 0  # returns at once: the driver's last state is final
    lines = [line.split("  ", 1)[1] for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == "start: 2-stage '1f1b' pipeline, 4 steps of 2 micro-batches"
    assert "step 1/4  loss 2.5000  1,234 samples/s  busy 50% 75%" in lines
    assert "checkpoint committed at micro-batch 2 (generation 0)" in lines
    assert lines[-1] == "driver: cancelled: interrupted; the stages were stopped"
    assert not any(line.startswith("[##") for line in lines), "the progress line repeats the step records"


def test_partition_with_replicas_shows_each_stages_gradient_exchange(capsys):
    gpt = ["partition", "models.gpt:build", "--stages", "2", "--replicas", "4",
           "--kwargs", '{"n_layers": 4, "d_model": 256}']  # about 6 MiB of float32 gradients per stage
    assert main(gpt) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("gradient exchange"))
    assert "(auto;" in line and line.count("scatter") == 2  # 2 (d - 1) / d of 6.2 MiB each
    assert main([*gpt, "--reduce-exchange", "direct"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("gradient exchange"))
    assert "stage 0 direct, 18.5 MiB" in line  # d - 1 = 3 whole parts
    assert main(["partition", "models.gpt:build", "--stages", "2", "--replicas", "4",
                 "--kwargs", '{"n_layers": 2, "d_model": 32}']) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("gradient exchange"))
    assert line.count("direct") == 2  # small stages: the second hop would cost more than it saves

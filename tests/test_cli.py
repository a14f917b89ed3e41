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

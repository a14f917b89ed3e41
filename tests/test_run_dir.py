"""The run directory as `pipetrain train` and `resume` treat it: what they refuse,
replace and delete, and the one-line errors before any work.

Real files in tmp_path and real CLI invocations with the reference executor
(one process, a numpy model: each run takes well under a second).
"""
import json

import numpy as np
import pytest

from pipetrain.checkpoint.store import CheckpointStore
from pipetrain.cli import main
from job_configs import sleep_job_toml


# A model builder that leaves a trace when it is called: "before any work"
# means before this runs.
WATCHED_MODEL = """
from pathlib import Path
from models.synthetic import SleepSequential

def build(**kwargs):
    Path(__file__).with_name("model-was-built").touch()
    return SleepSequential(**kwargs)

def interrupted(**kwargs):
    raise KeyboardInterrupt

def job_interrupted(**kwargs):
    from pipetrain.errors import JobInterrupted
    raise JobInterrupted("interrupted; the stages were stopped; `pipetrain resume RUN` continues")
"""


@pytest.fixture
def job(tmp_path, monkeypatch):
    """A config file factory: job(every=2, model=...) -> (config path, run dir)."""
    (tmp_path / "watched.py").write_text(WATCHED_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))

    def make(*, every: int = 2, model: str = "watched:build", run_dir=None):
        run_dir = run_dir or tmp_path / "run"
        config = tmp_path / "job.toml"
        config.write_text(sleep_job_toml(run_dir, model=model, extra=f"[checkpoint]\nevery = {every}"))
        return config, run_dir

    return make


def train(config, *extra):
    return main(["train", str(config), "--executor", "reference", "-q", *extra])


def committed_store(root) -> CheckpointStore:
    """A checkpoint store as a Dask run of the job leaves it: generation 0, cut 2 committed."""
    store = CheckpointStore(str(root))
    store.begin_generation(0)
    record = store.write_shard(2, 0, {"w": np.zeros(2)}, generation=0)
    store.commit(2, records=[record], generation=0, num_stages=1)
    return store


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


# -- section 1: data loss -------------------------------------------------------

def test_checkpoint_dir_of_someone_elses_files_is_refused_and_kept(job, tmp_path, capsys):
    config, _ = job()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("years of work")
    for extra in ([], ["--overwrite"]):
        assert train(config, "--set", f'checkpoint.dir="{mine}"', *extra) == 2
        err = one_error_line(capsys)
        assert f"checkpoint.dir: {mine}" in err and "precious.txt" in err
        assert (mine / "precious.txt").read_text() == "years of work"
    assert not (tmp_path / "model-was-built").exists()


def test_run_dir_with_other_files_is_refused_even_with_overwrite(job, tmp_path, capsys):
    config, run_dir = job()
    assert train(config) == 0
    first_job = (run_dir / "job.json").read_text()
    (run_dir / "notes.txt").write_text("mine")
    (run_dir / "events").mkdir()
    (run_dir / "events" / "plot-data.csv").write_text("mine too")
    (tmp_path / "model-was-built").unlink()
    for extra in ([], ["--overwrite"]):
        assert train(config, *extra) == 2
        err = one_error_line(capsys)
        assert f"run_dir: {run_dir}" in err and "notes.txt" in err and "events/plot-data.csv" in err
    assert (run_dir / "notes.txt").exists() and (run_dir / "events" / "plot-data.csv").exists()
    assert (run_dir / "job.json").read_text() == first_job and (run_dir / "summary.json").exists()
    assert not (tmp_path / "model-was-built").exists()


def test_files_named_like_pipetrains_without_its_job_record_are_not_deleted(job, capsys):
    config, run_dir = job()
    run_dir.mkdir()
    (run_dir / "summary.json").write_text('{"mine": true}')
    (run_dir / "loss.png").write_bytes(b"my plot")
    assert train(config, "--overwrite") == 2
    err = one_error_line(capsys)
    assert "loss.png" in err and "summary.json" in err and "job.json is missing" in err
    assert (run_dir / "summary.json").read_text() == '{"mine": true}'


def test_an_earlier_run_without_checkpoints_is_replaced_file_by_file(job, capsys):
    config, run_dir = job()
    assert train(config) == 0
    first_id = json.loads((run_dir / "job.json").read_text())["job_id"]
    for name in ("trace.json", "gantt.png"):  # what `pipetrain trace` adds
        (run_dir / name).write_text("{}")
    (run_dir / "events").mkdir(exist_ok=True)
    np.save(run_dir / "events" / "stage-0.npy", np.zeros(3))
    CheckpointStore(str(run_dir / "checkpoints")).begin_generation(0)  # a Dask run that never checkpointed
    assert train(config) == 0
    assert json.loads((run_dir / "job.json").read_text())["job_id"] != first_id
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "job.json", "metrics.jsonl", "summary.json"]
    assert CheckpointStore(str(run_dir / "checkpoints")).current_generation() is None


def test_overwrite_deletes_a_custom_checkpoint_dir_that_holds_only_checkpoints(job, tmp_path, capsys):
    config, _ = job()
    store = committed_store(tmp_path / "ckpt")
    assert train(config, "--set", f'checkpoint.dir="{store.root}"') == 2
    err = one_error_line(capsys)
    assert f"checkpoint.dir {store.root} holds the checkpoints of an earlier run" in err
    assert store.cuts() == [2]
    assert train(config, "--set", f'checkpoint.dir="{store.root}"', "--overwrite") == 0
    assert store.cuts() == [] and (tmp_path / "ckpt").is_dir()


def test_refusal_says_what_is_known_and_never_none(job, capsys):
    config, run_dir = job()
    store = committed_store(run_dir / "checkpoints")  # a run whose job.json is gone
    assert train(config) == 2
    err = one_error_line(capsys)
    assert "None" not in err and f"its job is unknown: {run_dir / 'job.json'} is missing" in err
    assert "micro-batch 2" in err and "pipetrain resume" not in err  # resume needs the job.json
    assert train(config, "--overwrite") == 0 and store.cuts() == []
    # With the job record there, the refusal names the job and its config file.
    committed_store(run_dir / "checkpoints")
    assert train(config) == 2
    job_id = json.loads((run_dir / "job.json").read_text())["job_id"]
    err = one_error_line(capsys)
    assert f"job {job_id}, from {config}" in err and f"pipetrain resume {run_dir} --steps N" in err


# -- section 4: one-line errors before any work -----------------------------------

def test_unwritable_or_impossible_locations_name_the_field_before_any_work(job, tmp_path, capsys):
    config, _ = job()
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    cases = [(["--set", "checkpoint.dir=/proc/pipetrain-x"], "checkpoint.dir: cannot create /proc/pipetrain-x"),
             (["--set", f'run_dir="{a_file}"'], f"run_dir: {a_file} is a file, not a directory"),
             (["--set", f'run_dir="{a_file}/run"'], f"run_dir: {a_file}/run cannot be created: {a_file} is a file"),
             (["--set", f'checkpoint.dir="{tmp_path / "run"}"'], "is the run directory itself")]
    for extra, expected in cases:
        assert train(config, *extra) == 2
        assert expected in one_error_line(capsys)
    assert not (tmp_path / "model-was-built").exists()


def test_string_inputs_in_a_data_source_name_the_field(job, tmp_path, monkeypatch, capsys):
    (tmp_path / "textdata.py").write_text(
        "import numpy as np\nfrom pipetrain.data import ArraySource\n\n"
        "def array_source(**_):\n"
        "    return ArraySource(np.array([f'sample {i}' for i in range(8)]), np.zeros((8, 1)), microbatch_size=2)\n\n"
        "class Custom:\n"
        "    microbatch_size = 2\n"
        "    def inputs(self, k): return np.zeros((2, 4), np.float32)\n"
        "    def targets(self, k): return np.array(['a', 'b'], dtype=object)\n")
    config, _ = job()
    assert train(config, "--set", 'data.train="textdata:array_source"') == 2
    err = one_error_line(capsys)
    assert "data.train: textdata:array_source: ArraySource inputs holds dtype <U8 (text)" in err
    assert train(config, "--set", 'data.train="textdata:Custom"', "--set", "data.kwargs={}") == 2
    assert "data.train: textdata:Custom: targets(0) holds dtype object (objects)" in one_error_line(capsys)


def test_run_dir_that_is_a_file_on_resume(tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert main(["resume", str(a_file)]) == 2
    assert f"{a_file}: is a file, not a run directory" in one_error_line(capsys)


def test_garbage_generation_record_on_resume_is_one_line_naming_it(job, capsys):
    config, run_dir = job()
    assert train(config) == 0
    (run_dir / "summary.json").unlink()  # as if its driver had been killed
    (run_dir / "metrics.jsonl").unlink()
    generation = run_dir / "checkpoints" / "GENERATION"
    generation.parent.mkdir()
    generation.write_bytes(b"\x00garbage")
    assert main(["resume", str(run_dir), "-q"]) == 2
    assert f"{generation} (the generation record) is not valid JSON" in one_error_line(capsys)


def test_ctrl_c_says_how_to_resume_and_exits_130(job, tmp_path, capsys):
    config, run_dir = job(model="watched:interrupted")
    assert train(config) == 130
    err = one_error_line(capsys)
    assert err.startswith("pipetrain train: interrupted") and f"`pipetrain resume {run_dir}`" in err
    config, run_dir = job(model="watched:interrupted", every=0, run_dir=tmp_path / "run2")
    assert train(config) == 130
    assert f"no checkpoints, so `pipetrain train {config} --overwrite` starts it over" in one_error_line(capsys)
    config, run_dir = job(model="watched:job_interrupted", run_dir=tmp_path / "run3")
    assert train(config) == 130
    assert one_error_line(capsys).startswith("pipetrain train: interrupted; the stages were stopped")


# -- section 5 and 3: truthful output, a finished run --------------------------------

def test_quiet_hides_the_progress_line_but_not_the_summary(job, capsys):
    config, _ = job()
    assert train(config) == 0
    out = capsys.readouterr().out
    assert "summary" in out and "3 steps, 6 samples" in out and "step 1/3" not in out


def test_resume_of_a_finished_run_says_so_and_does_nothing(job, capsys):
    config, run_dir = job()
    assert train(config) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    for extra in ([], ["--steps", "3"], ["--steps", "2"]):
        assert main(["resume", str(run_dir), *extra]) == 0
        out = capsys.readouterr().out
        assert f"{run_dir} is complete: it trained all 3 steps" in out and "--steps N" in out
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
    # The metrics log's "end" record says so as well when summary.json is gone.
    (run_dir / "summary.json").unlink()
    assert main(["resume", str(run_dir)]) == 0 and "is complete" in capsys.readouterr().out


def test_resume_steps_must_reach_past_the_last_checkpoint(job, capsys):
    config, run_dir = job()
    assert train(config) == 0
    (run_dir / "summary.json").unlink()
    (run_dir / "metrics.jsonl").unlink()
    store = committed_store(run_dir / "checkpoints")
    record = store.write_shard(4, 0, {"w": np.zeros(2)}, generation=0)  # cut 4: two steps of 2 micro-batches
    store.commit(4, records=[record], generation=0, num_stages=1)
    assert main(["resume", str(run_dir), "--steps", "1"]) == 2
    assert "--steps 1: the run's last checkpoint" in one_error_line(capsys)


def test_claim_checkpoints_is_the_one_rule_for_a_store_in_use(tmp_path):
    """A new run may not start over another's step directories; a lone generation record is cleared."""
    import numpy as np

    from pipetrain.checkpoint.store import CheckpointStore
    from pipetrain.errors import CheckpointDirInUse
    from pipetrain.rundir import claim_checkpoints

    store = CheckpointStore(str(tmp_path / "ck"))
    store.begin_generation(0)
    claim_checkpoints(store)
    assert store.current_generation() is None, "a run that never checkpointed is not in use"
    store.begin_generation(0)
    store.write_shard(8, 0, {"w": np.zeros(2, np.float32)}, generation=0)
    with pytest.raises(CheckpointDirInUse, match="already belongs to a run .*checkpoints up to micro-batch 8"):
        claim_checkpoints(store)
    assert store.cuts() == [8], "a refusal touches nothing"

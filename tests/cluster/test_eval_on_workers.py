"""Evaluation during training on real Dask workers (schedule/evaluation.py).

- The eval losses of a Dask run equal the reference executor's bit for bit,
  for a flush schedule and the async ones, and so do the final states, which
  the result reads from the run's last checkpoint stage by stage.
- The driver process builds no stage: a model that records the process of
  every ``build_stage`` sees only the workers (one build per stage).
- The eval records reach metrics.jsonl, the progress line and ``pipetrain report``.
"""
import os
import re
import uuid
from pathlib import Path

import numpy as np
import pytest

from models import mlp
from pipetrain.api import fit
from pipetrain.observe.records import EndRecord, EvalRecord, read_records, records_of
from pipetrain.optim import Optimizer
from pipetrain.partitioning import partition
from pipetrain.runtime.plan import StoredStates

pytestmark = [pytest.mark.cluster]

SOURCE = mlp.source(1024, microbatch_size=16, seed=1)
HELDOUT = mlp.source(256, microbatch_size=16, seed=7)


class BuildRecorder:
    """A model that writes a file naming the process and the stage of every ``build_stage``
    (shipped to the workers with the stage tasks; the files land in ``directory``)."""

    def __init__(self, inner, directory):
        self.inner, self.directory = inner, str(directory)

    def __getattr__(self, name):
        if name in ("inner", "directory") or name.startswith("__"):
            raise AttributeError(name)  # (while unpickling, before __dict__ is back)
        return getattr(self.inner, name)

    def build_stage(self, spec, *, optimizer):
        Path(self.directory, f"{os.getpid()}-stage{spec.index}-{uuid.uuid4().hex[:6]}").touch()
        return self.inner.build_stage(spec, optimizer=optimizer)


def _builds(directory):
    return sorted((int(p.name.split("-")[0]), int(p.name.split("-")[1][len("stage"):])) for p in directory.iterdir())


def _assert_same_states(a, b):
    assert len(a) == len(b)
    for s, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x.keys() == y.keys(), f"stage {s}"
        for name in x:
            assert np.array_equal(x[name], y[name]), f"stage {s}: {name} differs"


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["1f1b", "pipedream", "2bw"])
def test_eval_on_the_workers_equals_the_reference_and_the_driver_builds_no_stage(client, tmp_path, schedule, capsys):
    builds = tmp_path / "builds"
    builds.mkdir()
    part = partition(BuildRecorder(mlp.build(sizes=(32, 32)), builds), 3, example_input=SOURCE.inputs(0))
    kwargs = dict(schedule=schedule, microbatches=4, steps=4, optimizer=Optimizer("adam", lr=3e-3), eval_every=2,
                  eval_microbatches=3)
    dask_run = fit(part, SOURCE, heldout=HELDOUT, client=client, run_dir=str(tmp_path / "run"),
                   checkpoint_every=8, **kwargs)
    shown = capsys.readouterr().out
    driver_builds = [pid for pid, _ in _builds(builds) if pid == os.getpid()]
    assert driver_builds == [] and sorted(s for _, s in _builds(builds)) == [0, 1, 2]

    reference = fit(partition(mlp.build(sizes=(32, 32)), 3, example_input=SOURCE.inputs(0)), SOURCE,
                    heldout=HELDOUT, executor="reference", progress=False, **kwargs)
    assert sorted(dask_run.evals) == [0, 2, 4]
    assert dask_run.evals == reference.evals  # bit for bit
    assert (dask_run.heldout_before, dask_run.heldout_after) == (reference.evals[0], reference.evals[4])
    assert dask_run.losses == reference.losses
    assert isinstance(dask_run.states, StoredStates)  # read from the checkpoint store, stage by stage
    _assert_same_states(dask_run.states, reference.states)

    records = read_records(tmp_path / "run" / "metrics.jsonl")
    assert [(r.step, r.heldout_loss) for r in records_of(records, EvalRecord)] == sorted(reference.evals.items())
    assert records_of(records, EndRecord)[0].heldout_loss == reference.evals[4]
    assert f"held-out loss {reference.evals[0]:.4f} before training" in shown
    assert f"held-out loss {reference.evals[4]:.4f} after step 4" in shown
    # Step lines show the latest eval heard by then (when it arrives is the workers' timing).
    on_step_lines = re.findall(r"held-out (\d+\.\d{4}) \(step (\d+)\)", shown)
    assert on_step_lines and all(value == f"{reference.evals[int(t)]:.4f}" for value, t in on_step_lines)

    from pipetrain.observe.report import summary

    assert f"held-out loss {reference.evals[0]:.4g} -> {reference.evals[4]:.4g} (3 evaluations" in summary(
        tmp_path / "run")


def test_a_run_without_checkpoints_returns_its_states_and_gpipe_evaluates_bit_for_bit(client):
    part = partition(mlp.build(sizes=(16,)), 2, example_input=SOURCE.inputs(0))
    kwargs = dict(schedule="gpipe", microbatches=2, steps=3, optimizer=Optimizer("sgd", lr=0.1), eval_every=1,
                  eval_microbatches=2, progress=False)
    dask_run = fit(part, SOURCE, heldout=HELDOUT, client=client, **kwargs)
    reference = fit(part, SOURCE, heldout=HELDOUT, executor="reference", **kwargs)
    assert sorted(dask_run.evals) == [0, 1, 2, 3] and dask_run.evals == reference.evals
    assert isinstance(dask_run.states, list)
    _assert_same_states(dask_run.states, reference.states)

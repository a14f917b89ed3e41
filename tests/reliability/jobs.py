"""The small job every reliability test runs, and the checks they share.

Three stages of sleeping numpy layers (models/synthetic.py): cheap, no
framework, and still real maths with weight versions, so a recovered run can
be compared bit for bit with the uninterrupted one (the reference executor,
which the cluster tests prove equal to an uninterrupted Dask run).
"""
from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

import numpy as np

from job_configs import sleep_job_toml
from models.synthetic import SleepData, SleepSequential
from pipetrain.api import fit
from pipetrain.optim import Optimizer
from pipetrain.partitioning import partition
from reliability.chaos import ChaosModel, Fault

STAGES, M, STEPS, EVERY = 3, 4, 8, 8
N = M * STEPS  # micro-batch ids 0..31; checkpoints at cuts 8, 16, 24
DATA = SleepData(nbytes=4096)


def model(sleep_scale: float = 1.0) -> SleepSequential:
    # The sleeps set the pace only; the numbers do not depend on them.
    return SleepSequential(STAGES, forward_ms=2 * sleep_scale, backward_ms=4 * sleep_scale, seed=7)


def job_kwargs(schedule: str) -> dict:
    return dict(schedule=schedule, microbatches=M, steps=STEPS, optimizer=Optimizer("sgd", lr=0.05),
                progress=False)


def run(client, tmp_path: Path, schedule: str, faults: list[Fault], *, sleep_scale: float = 1.0, **overrides):
    """Run the job with ``faults`` on ``client``; returns (FitResult, checkpoint dir)."""
    checkpoints = tmp_path / "checkpoints"
    markers = tmp_path / "markers"
    markers.mkdir(exist_ok=True)
    chaos = ChaosModel(model(sleep_scale), faults=faults, marker_dir=str(markers), checkpoint_dir=str(checkpoints))
    part = partition(chaos, STAGES, method="uniform", example_input=DATA.inputs(0))
    kwargs = {**job_kwargs(schedule), "checkpoint_dir": str(checkpoints), "checkpoint_every": EVERY,
              "run_dir": str(tmp_path / "run"), "placement_timeout": 30.0, **overrides}
    return fit(part, DATA, client=client, **kwargs), checkpoints


@functools.lru_cache(maxsize=None)
def uninterrupted(schedule: str):
    part = partition(model(), STAGES, method="uniform", example_input=DATA.inputs(0))
    return fit(part, DATA, executor="reference", **job_kwargs(schedule))


def assert_bit_identical(result, schedule: str) -> None:
    reference = uninterrupted(schedule)
    assert sorted(result.losses) == list(range(N)), "a micro-batch loss is missing"
    for k in range(N):
        assert result.losses[k] == reference.losses[k], f"loss of micro-batch {k} differs"
    for s, (got, want) in enumerate(zip(result.states, reference.states, strict=True)):
        assert got.keys() == want.keys(), f"stage {s}: state names differ"
        for name in want:
            assert np.array_equal(got[name], want[name]), f"stage {s}: {name} differs"


def assert_exactly_once(result) -> None:
    """Every micro-batch id reached every stage's weights exactly once."""
    for s in range(STAGES):
        counts = Counter(result.applied_ids(s))
        twice = sorted(k for k, c in counts.items() if c > 1)
        missing = sorted(set(range(N)) - set(counts))
        assert not twice and not missing, f"stage {s}: applied twice {twice}, never {missing}"
        assert result.ledgers[s]["pending"] == [], f"stage {s}: gradients left unapplied"


def job_toml(run_dir, *, forward_ms: float = 20, backward_ms: float = 40, keep: int = 3) -> str:
    """This job (pipedream, the same model and data) as a `pipetrain train` config: what
    ``uninterrupted("pipedream")`` computes, whatever the sleeps."""
    return sleep_job_toml(
        run_dir, model_kwargs=f"num_layers = 3, forward_ms = {forward_ms}, backward_ms = {backward_ms}, seed = 7",
        nbytes=4096, stages=STAGES, schedule="pipedream", microbatches=M, steps=STEPS,
        extra=(f'[optimizer]\nname = "sgd"\nlr = 0.05\n[checkpoint]\nevery = {EVERY}\nkeep = {keep}\n'
               "[cluster]\nplacement_timeout = 30\n"))

"""SIGKILL a stage's worker in a pipeline with a delay correction; the recovered
run equals the uninterrupted one bit for bit. Weight prediction is the hard
case: the forwards in flight at the rollback cut run again later than the
first time, so the prediction must depend only on what the checkpoint holds
(the version read, its delay, and the step that made that version)."""
import pytest

from models import mlp
from pipetrain.api import fit
from pipetrain.optim import Optimizer
from pipetrain.partitioning import partition
from reliability.chaos import ChaosModel, ChaosStage, Fault, fired
from reliability.jobs import assert_exactly_once

pytestmark = [pytest.mark.reliability, pytest.mark.slow, pytest.mark.cluster]

DATA = mlp.source(2048, microbatch_size=16, seed=1)
M, STEPS, EVERY = 4, 8, 8  # micro-batches 0..31, checkpoints at cuts 8, 16, 24


class CorrectedChaosStage(ChaosStage):
    """ChaosStage passing the delay on (its own forward does not know it)."""

    @property
    def correction(self) -> str:
        return self.inner.correction

    def forward(self, k, inputs, *, version, targets=None, delay=None):
        self._reach("F", k)
        return self.inner.forward(k, inputs, version=version, targets=targets, delay=delay)


class CorrectedChaosModel(ChaosModel):
    def build_stage(self, spec, *, optimizer):
        mine = [f for f in self.faults if f.stage == spec.index]
        return CorrectedChaosStage(self.model.build_stage(spec, optimizer=optimizer), mine, self.marker_dir,
                                   self.checkpoint_dir)


def _kwargs(correction):
    return dict(schedule="pipedream", microbatches=M, steps=STEPS, correction=correction,
                optimizer=Optimizer("adam", lr=3e-3), progress=False)


@pytest.mark.parametrize("correction", ["predict", "dcasgd-a"])
def test_killed_worker_recovers_bit_identical_with_a_correction(client, tmp_path, correction):
    # Stage 1 dies in the forward of micro-batch 13, after cut 8 committed: the
    # rollback to 8 re-runs forwards 8-9 that stage 1 had run before the cut.
    fault = Fault(1, "F", 13, after_commit=8)
    markers = tmp_path / "markers"
    markers.mkdir()
    chaos = CorrectedChaosModel(mlp.build(sizes=(32, 32)), faults=[fault], marker_dir=str(markers),
                                checkpoint_dir=str(tmp_path / "checkpoints"))
    part = partition(chaos, 3, method="uniform", example_input=DATA.inputs(0))
    result = fit(part, DATA, client=client, checkpoint_dir=str(tmp_path / "checkpoints"), checkpoint_every=EVERY,
                 run_dir=str(tmp_path / "run"), placement_timeout=30.0, job_id=f"corr-{correction}",
                 **_kwargs(correction))
    assert fired(markers, fault) is not None
    assert [r["rollback_to"] for r in result.recoveries] == [8]

    plain = partition(mlp.build(sizes=(32, 32)), 3, method="uniform", example_input=DATA.inputs(0))
    reference = fit(plain, DATA, executor="reference", **_kwargs(correction))
    assert result.losses == reference.losses
    for s, (got, want) in enumerate(zip(result.states, reference.states, strict=True)):
        assert got.keys() == want.keys() and any(n.startswith("corr/") for n in got), f"stage {s}"
        for name in want:
            assert (got[name] == want[name]).all(), f"stage {s}: {name} differs"
    assert_exactly_once(result)

"""SIGKILL a stage's worker in a pipeline that clips by global norm (its stages
exchange norm scalars before every update); the recovered run equals the
uninterrupted one bit for bit, and its step records log the same lr and
grad_norm (the norms of the updates re-run after the rollback are reported again
and the book takes them once)."""
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
OPT = Optimizer("momentum", lr=0.2, clip_norm=0.05, schedule="cosine", warmup=2, decay_steps=8)


class ClippingChaosStage(ChaosStage):
    """ChaosStage passing the clipping protocol on (grad_sq_norm, update's grad_scale)."""

    @property
    def clip_norm(self):
        return self.inner.clip_norm

    def grad_sq_norm(self) -> float:
        return self.inner.grad_sq_norm()

    def update(self, *, new_version: int, grad_scale: float = 1.0) -> None:
        self.inner.update(new_version=new_version, grad_scale=grad_scale)


class ClippingChaosModel(ChaosModel):
    def build_stage(self, spec, *, optimizer):
        mine = [f for f in self.faults if f.stage == spec.index]
        return ClippingChaosStage(self.model.build_stage(spec, optimizer=optimizer), mine, self.marker_dir,
                                  self.checkpoint_dir)


@pytest.mark.parametrize("schedule", ["1f1b", "2bw"])
def test_killed_worker_recovers_bit_identical_with_clipping(client, tmp_path, schedule):
    fault = Fault(1, "B", 13, after_commit=8)
    markers = tmp_path / "markers"
    markers.mkdir()
    chaos = ClippingChaosModel(mlp.build(sizes=(32, 32)), faults=[fault], marker_dir=str(markers),
                               checkpoint_dir=str(tmp_path / "checkpoints"))
    part = partition(chaos, 3, method="uniform", example_input=DATA.inputs(0))
    kwargs = dict(schedule=schedule, microbatches=M, steps=STEPS, optimizer=OPT, progress=False)
    result = fit(part, DATA, client=client, checkpoint_dir=str(tmp_path / "checkpoints"), checkpoint_every=EVERY,
                 run_dir=str(tmp_path / "run"), placement_timeout=30.0, job_id=f"clip-{schedule}", **kwargs)
    assert fired(markers, fault) is not None
    assert [r["rollback_to"] for r in result.recoveries] == [8]

    plain = partition(mlp.build(sizes=(32, 32)), 3, method="uniform", example_input=DATA.inputs(0))
    reference = fit(plain, DATA, executor="reference", **kwargs)
    assert result.losses == reference.losses
    for s, (got, want) in enumerate(zip(result.states, reference.states, strict=True)):
        assert got.keys() == want.keys(), f"stage {s}"
        for name in want:
            assert (got[name] == want[name]).all(), f"stage {s}: {name} differs"
    assert_exactly_once(result)

    def figures(run):
        return [(h["step"], h["lr"], h["grad_norm"]) for h in run.history if h.get("grad_norm") is not None]

    # each step logged once (the steps re-run after the rollback are not logged again), as the reference logs it
    assert figures(result) == figures(reference) and [t for t, _, _ in figures(result)] == list(range(STEPS))

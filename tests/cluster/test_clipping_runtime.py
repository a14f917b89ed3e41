"""Clipping by global norm and an LR schedule on real worker processes: the
norm scalars cross the stage connections (NORM_PARTIAL down, NORM_TOTAL up), and
the Dask run equals the reference executor bit for bit (losses and every state
entry), for a JAX pipeline under 1f1b and 2bw and a JAX -> torch -> Keras one
under 1f1b."""
import pytest

from models import mixed, mlp
from pipetrain.api import fit
from pipetrain.optim import Optimizer, lr_at
from pipetrain.partitioning import partition
from stage_helpers import assert_runs_equal

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


OPT = Optimizer("momentum", lr=0.3, clip_norm=0.05, schedule="cosine", warmup=1, decay_steps=4, min_lr=0.01)


@pytest.mark.parametrize("schedule", ["1f1b", "2bw"])
def test_clipped_jax_pipeline_equals_reference_bit_for_bit(client, schedule):
    source = mlp.source(1024, microbatch_size=16, seed=1)
    part = partition(mlp.build(sizes=(32, 32, 32)), 3, method="params", example_input=source.inputs(0))
    kwargs = dict(schedule=schedule, microbatches=4, steps=4, optimizer=OPT, progress=False)
    dask_run = fit(part, source, client=client, **kwargs)
    reference = fit(part, source, executor="reference", **kwargs)
    assert_runs_equal(dask_run, reference)
    # every step record logs the LR its update used and the global norm it clipped by, the same in both
    steps = [[(h["step"], h["lr"], h["grad_norm"]) for h in run.history if "grad_norm" in h]
             for run in (dask_run, reference)]
    assert steps[0] == steps[1] and [t for t, _, _ in steps[0]] == [0, 1, 2, 3]
    assert all(lr == lr_at(OPT, t) and norm > OPT.clip_norm for t, lr, norm in steps[0])
    unclipped = fit(part, source, executor="reference", **{**kwargs, "optimizer": Optimizer("momentum", lr=0.3)})
    assert dask_run.losses != unclipped.losses  # the clipping took part


def test_clipped_mixed_pipeline_equals_reference_bit_for_bit(client):
    pytest.importorskip("tensorflow")
    source = mixed.train_source(n=512, microbatch_size=16)
    part = partition(mixed.build(), 3, boundaries=[2, 4], example_input=source.inputs(0))
    kwargs = dict(schedule="1f1b", microbatches=4, steps=3, optimizer=OPT, progress=False)
    assert_runs_equal(fit(part, source, client=client, **kwargs), fit(part, source, executor="reference", **kwargs))

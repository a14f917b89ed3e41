"""SIGKILL a stage's worker in a bf16 pipeline (bfloat16 boundaries, float32
masters, clipping by global norm): the recovered run equals the uninterrupted
reference run bit for bit, every micro-batch applied exactly once."""
import numpy as np
import pytest

from models import mlp
from pipetrain.api import fit
from pipetrain.partitioning import partition
from pipetrain.stages.precision import with_precision
from reliability.chaos import Fault, fired
from reliability.jobs import assert_exactly_once
from reliability.test_clipping_kills import DATA, EVERY, M, OPT, STEPS, ClippingChaosModel

pytestmark = [pytest.mark.reliability, pytest.mark.slow, pytest.mark.cluster]


class PrecisionChaosModel(ClippingChaosModel):
    @property
    def precision(self):  # what the partition reads to give the boundaries their wire dtype
        return self.model.precision


def test_killed_worker_recovers_a_bf16_run_bit_identical(client, tmp_path):
    fault = Fault(1, "B", 13, after_commit=8)
    markers = tmp_path / "markers"
    markers.mkdir()
    chaos = PrecisionChaosModel(with_precision(mlp.build(sizes=(32, 32)), "bf16"), faults=[fault],
                                marker_dir=str(markers), checkpoint_dir=str(tmp_path / "checkpoints"))
    part = partition(chaos, 3, method="uniform", example_input=DATA.inputs(0))
    assert part.precision == "bf16" and part.stages[0].output_specs.dtype == "bfloat16"
    kwargs = dict(schedule="1f1b", microbatches=M, steps=STEPS, optimizer=OPT, progress=False)
    result = fit(part, DATA, client=client, checkpoint_dir=str(tmp_path / "checkpoints"), checkpoint_every=EVERY,
                 run_dir=str(tmp_path / "run"), placement_timeout=30.0, job_id="bf16-kill", **kwargs)
    assert fired(markers, fault) is not None
    # The kill's rollback to cut 8. The local cluster's own churn can add a recovery (a stage's
    # worker leaving again near the end: seen in fp32 runs of test_clipping_kills as well), which
    # must change no number either.
    assert 8 in [r["rollback_to"] for r in result.recoveries]

    plain = partition(mlp.build(sizes=(32, 32)), 3, method="uniform", example_input=DATA.inputs(0),
                      precision="bf16")
    reference = fit(plain, DATA, executor="reference", **kwargs)
    assert result.losses == reference.losses
    for s, (got, want) in enumerate(zip(result.states, reference.states, strict=True)):
        assert got.keys() == want.keys(), f"stage {s}"
        for name in want:
            assert np.array_equal(got[name], want[name]), f"stage {s}: {name} differs"
            assert not name.startswith("v") or got[name].dtype == np.float32, f"stage {s}: {name}"
    assert_exactly_once(result)

"""SIGKILL the relay stage of a tied GPT (its token table tied across stages 0 and 2,
the sums relayed through stage 1 before every update); the recovered run equals the
uninterrupted reference bit for bit, the copies included, and every micro-batch
reached the weights once. Under pipedream (the tie riding on each micro-batch's F/B
messages, runtime/tie_carry.py) the same, killing the relay or the head's stage, and
killing the Keras head of the mixed MLP's tie with a torch owner."""
import pytest

from models import gpt
from pipetrain.api import fit
from pipetrain.optim import Optimizer
from pipetrain.partitioning import partition
from reliability.chaos import ChaosModel, Fault, fired
from reliability.test_clipping_kills import ClippingChaosStage
from test_ties import SIZE, Tokens
from stage_helpers import assert_runs_equal

pytestmark = [pytest.mark.reliability, pytest.mark.slow, pytest.mark.cluster]

M, STEPS, EVERY = 4, 6, 8  # micro-batches 0..23, checkpoints at cuts 8, 16, 24
OPT = Optimizer("adam", lr=1e-2, clip_norm=0.5)


class TiedChaosStage(ClippingChaosStage):
    """ClippingChaosStage showing pipetrain/stages/ties.py the JAX stage's accumulator it reads and writes."""

    device = property(lambda self: self.inner.device)
    _versions = property(lambda self: self.inner._versions)  # (pipedream: the carried value swapped in)
    _mean_jit = property(lambda self: self.inner._mean_jit)
    _count = property(lambda self: self.inner._count)

    def _params(self, version, k=None):
        return self.inner._params(version, k)

    @property
    def _acc(self):
        return self.inner._acc

    @_acc.setter
    def _acc(self, value):
        self.inner._acc = value


class TiedChaosModel(ChaosModel):
    ties = gpt.TIES

    def _trace(self):
        return self.model._trace()

    def build_stage(self, spec, *, optimizer):
        mine = [f for f in self.faults if f.stage == spec.index]
        return TiedChaosStage(self.model.build_stage(spec, optimizer=optimizer), mine, self.marker_dir,
                              self.checkpoint_dir)


def test_killed_relay_stage_recovers_bit_identical(client, tmp_path):
    fault = Fault(1, "B", 13, after_commit=8)
    markers = tmp_path / "markers"
    markers.mkdir()
    chaos = TiedChaosModel(gpt.build(**SIZE, tie_embeddings=True), faults=[fault], marker_dir=str(markers),
                           checkpoint_dir=str(tmp_path / "checkpoints"))
    part = partition(chaos, 3, method="uniform", example_input=Tokens().inputs(0))
    kwargs = dict(schedule="1f1b", microbatches=M, steps=STEPS, optimizer=OPT, progress=False)
    result = fit(part, Tokens(), client=client, checkpoint_dir=str(tmp_path / "checkpoints"), checkpoint_every=EVERY,
                 run_dir=str(tmp_path / "run"), placement_timeout=30.0, job_id="tied-kill", **kwargs)
    assert fired(markers, fault) is not None
    assert [r["rollback_to"] for r in result.recoveries] == [8]

    plain = partition(gpt.build(**SIZE, tie_embeddings=True), 3, method="uniform", example_input=Tokens().inputs(0))
    reference = fit(plain, Tokens(), executor="reference", **kwargs)
    assert_runs_equal(result, reference)
    v = int(result.states[0]["meta/latest"])
    assert result.states[0][f"v{v}/embed/tokens"].tobytes() == result.states[2][f"v{v}/head/tokens"].tobytes()
    # every micro-batch reached every stage's weights exactly once, in order
    assert all(ledger == {"applied": [[0, M * STEPS]], "pending": []} for ledger in result.ledgers)


@pytest.mark.parametrize("stage,kind,k", [(1, "B", 13), (2, "F", 11)])
def test_pipedream_killed_stage_recovers_bit_identical(client, tmp_path, stage, kind, k):
    fault = Fault(stage, kind, k, after_commit=8)
    markers = tmp_path / "markers"
    markers.mkdir()
    chaos = TiedChaosModel(gpt.build(**SIZE, tie_embeddings=True), faults=[fault], marker_dir=str(markers),
                           checkpoint_dir=str(tmp_path / "checkpoints"))
    part = partition(chaos, 3, method="uniform", example_input=Tokens().inputs(0))
    kwargs = dict(schedule="pipedream", microbatches=M, steps=STEPS, optimizer=OPT, progress=False)
    result = fit(part, Tokens(), client=client, checkpoint_dir=str(tmp_path / "checkpoints"), checkpoint_every=EVERY,
                 run_dir=str(tmp_path / "run"), placement_timeout=30.0, job_id=f"tied-pd-kill-{stage}", **kwargs)
    assert fired(markers, fault) is not None
    assert [r["rollback_to"] for r in result.recoveries] == [8]

    plain = partition(gpt.build(**SIZE, tie_embeddings=True), 3, method="uniform", example_input=Tokens().inputs(0))
    reference = fit(plain, Tokens(), executor="reference", **kwargs)
    assert_runs_equal(result, reference)
    assert all(ledger == {"applied": [[0, M * STEPS]], "pending": []} for ledger in result.ledgers)


class HolderChaosStage(ClippingChaosStage):
    """ClippingChaosStage showing pipetrain/stages/ties.py a torch or Keras stage's bookkeeping
    (weight versions, accumulator, names), read from the stage it wraps."""

    def __getattr__(self, name):
        if name == "inner":  # (unpickling: not set yet)
            raise AttributeError(name)
        return getattr(self.inner, name)


class TiedMixedChaosModel(ChaosModel):
    """The tied mixed MLP (torch weight owning, Keras kernel the head) with faults; ``part_of`` and
    the rest of the MixedSequential, for the tie's planning, from the model it wraps."""

    def __getattr__(self, name):
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    def build_stage(self, spec, *, optimizer):
        mine = [f for f in self.faults if f.stage == spec.index]
        return HolderChaosStage(self.model.build_stage(spec, optimizer=optimizer), mine, self.marker_dir,
                                self.checkpoint_dir)


def test_pipedream_killed_keras_head_of_a_torch_owned_tie_recovers_bit_identical(client, tmp_path):
    pytest.importorskip("tensorflow")
    from models import mixed
    from test_ties_frameworks import TIE, tied_mixed

    fault = Fault(2, "F", 11, after_commit=8)
    markers = tmp_path / "markers"
    markers.mkdir()
    model = mixed.build()
    model.ties = TIE
    chaos = TiedMixedChaosModel(model, faults=[fault], marker_dir=str(markers),
                                checkpoint_dir=str(tmp_path / "checkpoints"))
    source = mixed.train_source(n=512, microbatch_size=16)
    part = partition(chaos, 3, boundaries=[2, 4], example_input=source.inputs(0))
    kwargs = dict(schedule="pipedream", microbatches=M, steps=STEPS, progress=False,
                  optimizer=Optimizer("momentum", lr=0.1, clip_norm=0.5))
    result = fit(part, source, client=client, checkpoint_dir=str(tmp_path / "checkpoints"), checkpoint_every=EVERY,
                 run_dir=str(tmp_path / "run"), placement_timeout=30.0, job_id="tied-mixed-pd-kill", **kwargs)
    assert fired(markers, fault) is not None
    assert [r["rollback_to"] for r in result.recoveries] == [8]

    reference = fit(tied_mixed(source), source, executor="reference", **kwargs)
    assert_runs_equal(result, reference)
    assert not result.states[2]["acc/0.kernel"].any()
    assert all(ledger == {"applied": [[0, M * STEPS]], "pending": []} for ledger in result.ledgers)

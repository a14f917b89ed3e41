"""Tied weights on real worker processes: the GPT's tied token table (stage 0's
embedding, the last stage's head) relays its summed gradient through the middle
stage (TIE_PARTIAL down, TIE_TOTAL up, schedule/ties.py), and the Dask run equals
the reference executor bit for bit (losses and every state entry, the copies
bit-identical), under 1f1b with clipping and 2bw; a run resumed from its
checkpoint continues bit-identical to the uninterrupted one. Under pipedream the
tie rides on the F/B and eval messages (runtime/tie_carry.py), Dask == reference
bit for bit too, with JAX holders and with a torch owner and a Keras head (its recovery:
tests/reliability/test_tie_kills.py)."""
import numpy as np
import pytest

from models import gpt
from pipetrain.api import fit
from pipetrain.optim import Optimizer
from pipetrain.partitioning import partition
from test_ties import SIZE, Tokens
from stage_helpers import assert_runs_equal

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _copies_identical(run):
    first, last = run.states[0], run.states[-1]
    v = int(first["meta/latest"])
    assert first[f"v{v}/embed/tokens"].tobytes() == last[f"v{v}/head/tokens"].tobytes()


def _part():
    return partition(gpt.build(**SIZE, tie_embeddings=True), 3, method="uniform", example_input=Tokens().inputs(0))


@pytest.mark.parametrize("schedule,clip", [("1f1b", 0.05), ("2bw", None)])
def test_tied_gpt_equals_reference_bit_for_bit(client, schedule, clip):
    part = _part()
    kwargs = dict(schedule=schedule, microbatches=4, steps=3, optimizer=Optimizer("adam", lr=1e-2, clip_norm=clip),
                  progress=False)
    dask_run = fit(part, Tokens(), client=client, **kwargs)
    reference = fit(part, Tokens(), executor="reference", **kwargs)
    assert_runs_equal(dask_run, reference)
    _copies_identical(dask_run)
    # the middle stage relayed the sums of every update, and its timeline says so (distinct from the norms' kinds)
    relayed = [dask_run.events[1]["k"][dask_run.events[1]["kind"] == kind].tolist() for kind in ("SEND_G", "SEND_S")]
    assert relayed == [[1, 2, 3], [1, 2, 3]]


def test_a_resumed_tied_run_is_bit_identical(client, tmp_path):
    part = _part()
    kwargs = dict(schedule="1f1b", microbatches=4, optimizer=Optimizer("adam", lr=1e-2), progress=False,
                  checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=4)
    fit(part, Tokens(), client=client, steps=2, **kwargs)
    resumed = fit(part, Tokens(), client=client, resume=True, steps=4, **kwargs)
    assert resumed.resumed_from == 8
    reference = fit(part, Tokens(), executor="reference", steps=4,
                    **{k: v for k, v in kwargs.items() if k not in ("checkpoint_dir", "checkpoint_every")})
    assert set(range(8, 16)) <= set(resumed.losses)
    assert all(resumed.losses[k] == reference.losses[k] for k in resumed.losses)
    for s, (got, want) in enumerate(zip(resumed.states, reference.states, strict=True)):
        for name in want:
            assert np.array_equal(got[name], want[name]), f"stage {s}: {name} differs"
    _copies_identical(resumed)


def test_tied_torch_and_keras_copies_equal_reference_bit_for_bit(client):
    pytest.importorskip("tensorflow")
    from models import mixed
    from test_ties_frameworks import tied_mixed

    source = mixed.train_source(n=512, microbatch_size=16)
    part = tied_mixed(source)
    kwargs = dict(schedule="1f1b", microbatches=4, steps=3, optimizer=Optimizer("momentum", lr=0.1, clip_norm=0.05),
                  progress=False)
    dask_run = fit(part, source, client=client, **kwargs)
    assert_runs_equal(dask_run, fit(part, source, executor="reference", **kwargs))
    v = int(dask_run.states[1]["meta/latest"])
    assert dask_run.states[1][f"v{v}/0.weight"].tobytes() == dask_run.states[2][f"v{v}/0.kernel"].tobytes()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_pipedream_tied_gpt_equals_reference_bit_for_bit(client, precision):
    """Vertical sync (runtime/tie_carry.py): the owner's table rides up with each activation and the head's
    gradient down with each input gradient, through the middle stage; clipping per stage, eval on the workers.
    Under bf16 the activations travel as bfloat16 and the carried table as its float32 master."""
    part = partition(gpt.build(**SIZE, tie_embeddings=True), 3, method="uniform", example_input=Tokens().inputs(0),
                     precision=precision)
    kwargs = dict(schedule="pipedream", microbatches=4, steps=3, progress=False, heldout=Tokens(),
                  eval_microbatches=2, eval_every=1, optimizer=Optimizer("adam", lr=1e-2, clip_norm=0.05))
    dask_run = fit(part, Tokens(), client=client, **kwargs)
    reference = fit(part, Tokens(), executor="reference", **kwargs)
    assert_runs_equal(dask_run, reference)
    assert dask_run.evals == reference.evals and len(dask_run.evals) == 4
    v = int(dask_run.states[0]["meta/latest"])
    # the head's copy is not a parameter it updates: its gradient went to the owner, its accumulator keeps none
    assert dask_run.states[0][f"v{v}/embed/tokens"].tobytes() != dask_run.states[-1][f"v{v}/head/tokens"].tobytes()
    assert not dask_run.states[-1]["acc/head/tokens"].any()



def test_pipedream_tied_torch_owner_and_keras_head_equal_reference_bit_for_bit(client):
    """The torch weight owns, the Keras kernel is the head (stages/ties.py swaps the carried value into
    each one's weight version); eval blocks carry the owner's latest value."""
    pytest.importorskip("tensorflow")
    from models import mixed
    from test_ties_frameworks import tied_mixed

    source = mixed.train_source(n=512, microbatch_size=16)
    part = tied_mixed(source)
    kwargs = dict(schedule="pipedream", microbatches=4, steps=3, progress=False,
                  heldout=mixed.heldout_source(n=64, microbatch_size=16), eval_microbatches=2, eval_every=1,
                  optimizer=Optimizer("momentum", lr=0.1, clip_norm=0.05))
    dask_run = fit(part, source, client=client, **kwargs)
    reference = fit(part, source, executor="reference", **kwargs)
    assert_runs_equal(dask_run, reference)
    assert dask_run.evals == reference.evals and len(dask_run.evals) == 4
    assert not dask_run.states[2]["acc/0.kernel"].any()


def test_export_of_a_pipedream_tied_run_writes_the_owners_value_to_every_copy(client, tmp_path):
    # Under pipedream only the owner's copy trains; the head's copy in its shard stays as it
    # began, and the unpartitioned model reads both names: the artifact must hold the owner's.
    from safetensors.numpy import load_file

    from pipetrain.checkpoint.store import CheckpointStore
    from pipetrain.cli import main

    run = tmp_path / "run"
    config = tmp_path / "job.toml"
    config.write_text(f'run_dir = "{run}"\n[model]\nentry = "models.gpt:build"\nkwargs = {{ context = 8, '
                      f'd_model = 16, n_heads = 2, n_layers = 1, tie_embeddings = true }}\n[data]\n'
                      f'train = "models.text:CharWindows"\nkwargs = {{ context = 8, microbatch_size = 4 }}\n'
                      f'[partition]\nstages = 2\n[schedule]\nname = "pipedream"\nmicrobatches = 4\nsteps = 2\n'
                      f'[optimizer]\nname = "adam"\nlr = 0.01\n[checkpoint]\nevery = 4\n')
    assert main(["train", str(config), "--scheduler", client.scheduler.address, "-q"]) == 0
    store = CheckpointStore(str(run / "checkpoints"))
    cut = store.latest().cut
    owner, head = store.load_shard(cut, 0)["v8/embed/tokens"], store.load_shard(cut, 1)["v8/head/tokens"]
    assert not np.array_equal(owner, head), "the head's own copy trained: the test no longer tests the export"
    out = tmp_path / "model.safetensors"
    assert main(["export", str(run), str(out), "--format", "safetensors"]) == 0
    tensors = load_file(str(out))
    assert np.array_equal(tensors["embed/tokens"], owner) and np.array_equal(tensors["head/tokens"], owner)

"""Rematerialization: the same training with less kept.

The same MLP as JAX, torch and Keras stages (3 stages), trained a few steps
of 1f1b and pipedream through the reference executor with remat "stage" and
"layer", must end with the weights of the run without remat (the same
operations run again in the backward; float tolerance where a compiler may
fuse the recomputation differently). Torch also with every backward split.
And remat must keep less: the JAX stage's VJP residuals, measured on real
arrays, shrink to what the estimate (pipetrain.memory) says they become.
"""
import numpy as np
import pytest

from pipetrain.optim import Optimizer
from pipetrain.runtime.reference import run_reference
from pipetrain.schedule.builders import build_schedule
from stage_helpers import Batches, batch, stages
from test_corrections_frameworks import keras_model, torch_model

BOUNDARIES = [2, 4]
ADAM = Optimizer("adam", lr=1e-2)


def jax_model(remat="none"):
    from models.layers import activation, cross_entropy, dense
    from pipetrain.stages.jax_stage import JaxSequential

    layers = [dense(32, name="d0"), activation("tanh", name="t0"), dense(32, name="d1"),
              activation("tanh", name="t1"), dense(4, name="d2")]
    return JaxSequential(layers, loss=cross_entropy, example_input=batch(0)[0], remat=remat)


def with_remat(framework, remat, **kw):
    model = {"jax": jax_model, "torch": torch_model, "keras": keras_model}[framework](**kw)
    model.remat = remat
    return model


def trained(model, schedule):
    built = stages(model, BOUNDARIES, opt=ADAM)
    run_reference(build_schedule(schedule, num_stages=3, microbatches=4, steps=3), stages=built, source=Batches())
    return [s.state_dict() for s in built]


@pytest.mark.parametrize("framework", ["jax", "torch", "keras"])
@pytest.mark.parametrize("schedule", ["1f1b", "pipedream"])
def test_remat_changes_no_gradient(framework, schedule):
    plain = trained(with_remat(framework, "none"), schedule)
    for remat in ("stage", "layer"):
        states = trained(with_remat(framework, remat), schedule)
        for s, (a, b) in enumerate(zip(plain, states)):
            assert a.keys() == b.keys()
            for name in a:
                np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-6,
                                           err_msg=f"{framework} remat {remat}: stage {s} {name}")
    initial = [st.state_dict() for st in stages(with_remat(framework, "none"), BOUNDARIES, opt=ADAM)]
    latest = max(int(n.split("/")[0][1:]) for n in plain[0] if n.startswith("v"))
    moved = [n for n in initial[0] if n.startswith("v0/")
             and not np.allclose(plain[0][n.replace("v0/", f"v{latest}/")], initial[0][n])]
    assert moved, "training must move the weights, or the comparison proves nothing"


def test_torch_remat_with_every_backward_split():
    plain = trained(with_remat("torch", "none", split_backward=True), "1f1b")
    for remat in ("stage", "layer"):
        for a, b in zip(plain, trained(with_remat("torch", remat, split_backward=True), "1f1b")):
            for name in a:
                np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-6, err_msg=f"remat {remat} {name}")


def test_jax_remat_keeps_what_the_estimate_says():
    import jax

    from pipetrain.memory import kept_per_microbatch, partition_layer_bytes
    from pipetrain.partitioning import partition

    x = batch(0)[0]
    kept = {}
    for remat in ("none", "stage", "layer"):
        model = jax_model(remat)
        part = partition(model, 1, method="uniform", example_input=x)
        (stage,) = stages(model, [], opt=ADAM)
        stage.forward(0, x, version=0, targets=batch(0)[1])
        vjp = stage._pending[0][1]
        kept[remat] = sum(a.nbytes for a in jax.tree_util.tree_leaves(vjp))
        estimated = kept_per_microbatch(partition_layer_bytes(part)[0], remat)
        # Within the 25% the issue asks of the estimate: it adds up each layer's
        # residuals, so it counts twice a tensor two layers keep (tanh's output is
        # the next dense's input), and leaves out the loss head's few scalars.
        assert abs(estimated - kept[remat]) <= 0.25 * kept[remat], (remat, kept, estimated)
    # (per layer, a dense layer keeps its input either way: only a deeper layer, like a
    # transformer block, gains from "layer"; bench/memory.py measures the flagship's)
    assert kept["stage"] < kept["none"] and kept["layer"] <= kept["none"], kept
    # remat "stage" keeps the stage's input and its parameters (arguments of what is recomputed)
    assert kept["stage"] <= x.nbytes + sum(part.stages[0].layer_param_bytes) + 256  # (+ the loss head's scalars)


def test_a_bad_remat_names_where_it_was_given():
    from torch import nn

    from pipetrain.stages.torch_stage import TorchSequential

    with pytest.raises(ValueError, match="JaxSequential: remat must be one of 'none', 'stage', 'layer', got 'all'"):
        jax_model("all")
    with pytest.raises(ValueError, match="TorchSequential: remat"):
        TorchSequential([lambda: nn.Linear(2, 2)], loss=None, remat="full")


def _job(tmp_path, remat):
    config = tmp_path / f"{remat}.toml"
    config.write_text(f'run_dir = "{tmp_path / remat}"\n[model]\nentry = "models.gpt:build"\nremat = "{remat}"\n'
                      'kwargs = { context = 8, d_model = 16, n_heads = 2, n_layers = 2 }\n'
                      '[data]\ntrain = "models.text:CharWindows"\nkwargs = { context = 8, microbatch_size = 4 }\n'
                      '[partition]\nstages = 2\n[schedule]\nname = "pipedream"\nmicrobatches = 2\nsteps = 3\n')
    return str(config)


def test_a_job_config_turns_remat_on_and_trains_the_same(tmp_path):
    from pipetrain.config import ConfigError
    from pipetrain.job import train_from_config

    runs = {r: train_from_config(_job(tmp_path, r), executor="reference", progress=False)
            for r in ("none", "stage", "layer")}
    for remat in ("stage", "layer"):
        assert runs[remat].losses.keys() == runs["none"].losses.keys()
        np.testing.assert_allclose([runs[remat].losses[k] for k in sorted(runs[remat].losses)],
                                   [runs["none"].losses[k] for k in sorted(runs["none"].losses)], rtol=1e-5)
        assert runs[remat].partition.model.remat == remat
    with pytest.raises(ConfigError, match="model.remat: 'full' is not one of none, stage, layer"):
        train_from_config(_job(tmp_path, "full"), executor="reference", progress=False)

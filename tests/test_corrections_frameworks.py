"""Delay corrections on torch and Keras stages against the numpy oracle.

The same MLP (16 -> 32 -> tanh -> 32 -> tanh -> 4) as a TorchSequential and
a KerasSequential, cut into 3 stages, runs pipedream and 2bw with each
correction through the reference executor; every stage's final weights must
equal tests/oracles.py's ``corrected_async_weights``, whose gradients come
from a plain JAX twin of the network (independent of every stage adapter).
A run resumed from a checkpoint cut is bit-identical, correction state
included.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oracles import NumpyOptimizer, corrected_async_weights
from pipetrain.optim import Optimizer
from pipetrain.runtime.reference import run_reference
from pipetrain.schedule.builders import build_schedule
from stage_helpers import Batches, batch, stages

BOUNDARIES = [2, 4]  # Linear | Tanh Linear | Tanh Linear
LAMBDA = {"predict": None, "dcasgd": 20.0, "dcasgd-a": 1.0}


def torch_model(split_backward="auto"):
    from torch import nn

    from pipetrain.stages.torch_stage import TorchSequential

    layers = [lambda: nn.Linear(16, 32), nn.Tanh, lambda: nn.Linear(32, 32), nn.Tanh, lambda: nn.Linear(32, 4)]
    return TorchSequential(layers, loss=lambda out, y: nn.functional.cross_entropy(out, y.long()), device="cpu",
                           split_backward=split_backward)


def keras_model():
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    from pipetrain.stages.tf_stage import KerasSequential
    from pipetrain.stages.base import TensorSpec

    def loss(logits, labels):
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(tf.cast(labels, tf.int32), logits))

    layers = [lambda: keras.layers.Dense(32), lambda: keras.layers.Activation("tanh"),
              lambda: keras.layers.Dense(32), lambda: keras.layers.Activation("tanh"), lambda: keras.layers.Dense(4)]
    return KerasSequential(layers, loss=loss, input_spec=TensorSpec((8, 16), "float32"))


# name of a linear layer's (weight, bias) per framework, and whether the weight is [out, in]
LAYOUT = {"torch": (("weight", "bias"), True), "keras": (("kernel", "bias"), False)}


def twin_grad_fn(framework):
    """k, flat weights per stage -> their gradients, from a plain JAX MLP."""
    (weight, bias), transposed = LAYOUT[framework]

    def loss_of(flat, x, y):
        merged = {n: a for stage in flat for n, a in stage.items()}
        h = x
        for i in (0, 2, 4):
            w = merged[f"{i}.{weight}"]
            h = h @ (w.T if transposed else w) + merged[f"{i}.{bias}"]
            h = jnp.tanh(h) if i < 4 else h
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(h), y[:, None], axis=1))

    grad = jax.jit(jax.grad(loss_of))
    return lambda k, weights: grad(weights, *batch(k))


def build(framework, opt, **kw):
    model = torch_model(**kw) if framework == "torch" else keras_model()
    return stages(model, BOUNDARIES, opt)


CASES = [("pipedream", 1, "predict", "momentum"), ("2bw", 1, "predict", "adam"), ("pipedream", 1, "dcasgd", "sgd"),
         ("pipedream", 2, "dcasgd-a", "momentum"), ("2bw", 1, "dcasgd-a", "sgd")]


@pytest.mark.parametrize("framework", ["torch", "keras"])
@pytest.mark.parametrize("schedule_name,accumulate,correction,optimizer", CASES)
def test_corrected_weights_follow_the_oracle(framework, schedule_name, accumulate, correction, optimizer):
    m, steps, lr = 4, 3, {"adam": 0.01}.get(optimizer, 0.2)
    opt = Optimizer(optimizer, lr=lr, correction=correction, dc_lambda=LAMBDA[correction])
    stage_list = build(framework, opt)
    schedule = build_schedule(schedule_name, num_stages=3, microbatches=m, steps=steps, accumulate=accumulate)
    run_reference(schedule, stages=stage_list, source=Batches())

    params0 = [{n: np.asarray(t) for n, t in s.state_dict().items() if n.startswith("v0/")} for s in build(
        framework, opt)]
    params0 = [{n[len("v0/"):]: a for n, a in p.items()} for p in params0]
    oracle = corrected_async_weights(
        twin_grad_fn(framework), params0, schedule=schedule_name, microbatches=m, steps=steps,
        accumulate=accumulate, correction=correction, lam=LAMBDA[correction] or 0.0,
        optimizers=[NumpyOptimizer(optimizer, lr) for _ in params0])
    for s, stage in enumerate(stage_list):
        last = len(oracle[s]) - 1
        assert max(stage.versions()) == last
        state = stage.state_dict()
        for n, want in oracle[s][last].items():
            np.testing.assert_allclose(state[f"v{last}/{n}"], want, rtol=1e-4, atol=2e-6, err_msg=f"stage {s} {n}")


def test_torch_split_backward_corrects_the_same_bits():
    """DC-ASGD on torch's split backward (weight gradients after the send) gives the fused bits."""
    opt = Optimizer("momentum", lr=0.2, correction="dcasgd-a", dc_lambda=1.0)
    runs = []
    for split in (False, True):
        stage_list = build("torch", opt, split_backward=split)
        schedule = build_schedule("pipedream", num_stages=3, microbatches=4, steps=3)
        run_reference(schedule, stages=stage_list, source=Batches())
        runs.append([s.state_dict() for s in stage_list])
    for fused, split in zip(*runs):
        assert fused.keys() == split.keys()
        assert all(np.array_equal(fused[n], split[n]) for n in fused)


@pytest.mark.parametrize("framework", ["torch", "keras"])
@pytest.mark.parametrize("schedule_name,correction", [("pipedream", "predict"), ("2bw", "dcasgd-a")])
def test_resume_from_a_cut_is_bit_identical(framework, schedule_name, correction):
    m, steps, cut = 4, 4, 8
    opt = Optimizer("adam", lr=0.01, correction=correction)
    full = run_reference(build_schedule(schedule_name, num_stages=3, microbatches=m, steps=steps,
                                        checkpoint_every=m),
                         stages=build(framework, opt), source=Batches(), keep_checkpoints=True)
    assert any(n.startswith("corr/") for n in full.checkpoints[cut][0])
    fresh = build(framework, opt)
    for s, stage in enumerate(fresh):
        stage.load_state_dict(full.checkpoints[cut][s])
    resumed = run_reference(build_schedule(schedule_name, num_stages=3, microbatches=m, steps=steps,
                                           checkpoint_every=m, first_microbatch=cut),
                            stages=fresh, source=Batches())
    assert {k: v for k, v in full.losses.items() if k >= cut} == resumed.losses
    for a, b in zip(full.state_dicts(), resumed.state_dicts()):
        assert a.keys() == b.keys()
        assert all(np.array_equal(a[n], b[n]) for n in a), [n for n in a if not np.array_equal(a[n], b[n])]

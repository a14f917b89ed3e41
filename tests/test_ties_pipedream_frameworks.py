"""Tied weights under pipedream (runtime/tie_carry.py) with torch and Keras holders.

"torch->keras": the mixed JAX -> torch -> Keras MLP of models/mixed.py, its torch ``nn.Linear``
weight (stage 1, the owner) tied to its Keras ``Dense`` kernel (stage 2, the head), as in
test_ties_frameworks.py. "keras->torch": its mirror, JAX -> Keras -> torch (built here), the
Keras kernel owning and the torch weight the head.

The oracle is plain JAX + optax written from PipeDream's rule, not from pipetrain: micro-batch
k runs stage s at its stashed version v_s(k) = max(0, k - (p - s) + 1) (one update per
micro-batch), and the head's layer reads the owner's matrix at the OWNER's version for k
(torch's [out, in] layout transposed, Keras' [in, out] kernel as is). The owner's update
applies the sum of both uses' gradients; the head's copy is no parameter of anyone else.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from models import mixed, mlp
from models.layers import apply_sequence
from oracles import initial_params
from pipetrain.optim import Optimizer
from pipetrain.partitioning import partition
from pipetrain.runtime.reference import build_stages, run_reference
from pipetrain.schedule.builders import ScheduleSpec
from pipetrain.stages.ties import write_params
from pipetrain.ties import plan_ties
from test_ties_frameworks import _latest, tied_mixed

pytest.importorskip("tensorflow")
pytest.importorskip("torch")

M, STEPS, LR = 4, 3, 0.1
RANGES = ((0, 2), (2, 4), (4, 7))
# direction -> (owner's name, head's name, the owner's layout is torch's [out, in]), stages 1 and 2
COPIES = {"torch->keras": ("0.weight", "0.kernel", True), "keras->torch": ("0.kernel", "0.weight", False)}


def _torch_loss(logits, labels):
    import torch

    return torch.nn.functional.cross_entropy(logits, labels.long())


def keras_then_torch(source):
    """JAX (dense0, tanh) -> Keras (dense1, tanh) -> torch (dense2, tanh, dense3 + the loss),
    initialized from the all-JAX twin's weights, its Keras dense1 kernel tied to its torch dense2 weight."""
    import keras
    import torch
    from torch import nn

    from pipetrain.stages.jax_stage import JaxSequential
    from pipetrain.stages.mixed import MixedSequential
    from pipetrain.stages.tf_stage import KerasSequential
    from pipetrain.stages.torch_stage import TorchSequential

    twin = mixed.jax_twin()
    params = twin.init_params()
    dense1 = keras.layers.Dense(mixed.SIZES[1])
    dense1.build((None, mixed.SIZES[0]))
    dense1.set_weights([np.asarray(params["dense1"]["w"]), np.asarray(params["dense1"]["b"])])
    linears = [nn.Linear(mixed.SIZES[1], mixed.SIZES[2]), nn.Linear(mixed.SIZES[2], mixed.NUM_CLASSES)]
    with torch.no_grad():
        for linear, name in zip(linears, ("dense2", "dense3")):
            linear.weight.copy_(torch.from_numpy(np.asarray(params[name]["w"]).T.copy()))
            linear.bias.copy_(torch.from_numpy(np.asarray(params[name]["b"]).copy()))
    model = MixedSequential([JaxSequential(list(twin.layers[:2]), loss=mlp.loss_fn),
                             KerasSequential([dense1, keras.layers.Activation("tanh")], loss=None),
                             TorchSequential([linears[0], nn.Tanh(), linears[1]], loss=_torch_loss)])
    model.ties = (("0.kernel", "0.weight"),)
    return partition(model, 3, boundaries=[2, 4], example_input=source.inputs(0))


def _oracle(source, torch_owner):
    """Per stage, its final params ("shared": the owner's matrix, in the owner's layout), the losses
    and the shared matrix's initial value."""
    layers = mlp.layers(sizes=mixed.SIZES, kind="tanh")
    theta = initial_params(layers, source.inputs(0))
    shared = theta[2]["w"].T if torch_owner else theta[2]["w"]
    per_stage = [list(theta[a:b]) for a, b in RANGES]
    per_stage[1][0] = {"b": theta[2]["b"]}
    per_stage[2][0] = {"b": theta[4]["b"]}
    per_stage = [{"layers": w} for w in per_stage]
    per_stage[1]["shared"] = shared
    p, tx = len(RANGES), optax.sgd(LR, momentum=0.9)
    versions, states, losses = [[w] for w in per_stage], [tx.init(w) for w in per_stage], {}

    def loss(used, x, y):
        full = [layer for w in used for layer in w["layers"]]
        w = used[1]["shared"]  # the owner's value at the owner's version, for both uses
        full[2] = {**full[2], "w": w.T if torch_owner else w}
        full[4] = {**full[4], "w": w if torch_owner else w.T}
        return mlp.loss_fn(apply_sequence(layers, full, x), y)

    for k in range(M * STEPS):
        used = [versions[s][max(0, k - (p - s) + 1)] for s in range(p)]
        value, grads = jax.value_and_grad(loss)(used, jnp.asarray(source.inputs(k)), jnp.asarray(source.targets(k)))
        losses[k] = float(value)
        for s in range(p):
            updates, states[s] = tx.update(grads[s], states[s], versions[s][-1])
            versions[s].append(optax.apply_updates(versions[s][-1], updates))
    return [v[-1] for v in versions], losses, np.asarray(shared)


def _run(direction, spoil_head=False, precision="fp32"):
    source = mixed.train_source(n=512, microbatch_size=16)
    part = tied_mixed(source) if direction == "torch->keras" else keras_then_torch(source)
    if precision != "fp32":
        part = partition(part.model, 3, boundaries=[2, 4], example_input=source.inputs(0), precision=precision)
        assert plan_ties(part).spans == ((1, 2),)  # (the bf16 copy of the mixed model is still tied)
    spec = ScheduleSpec("pipedream", num_stages=3, microbatches=M, steps=STEPS, ties=plan_ties(part).spans)
    stages = build_stages(part, Optimizer("momentum", lr=LR))
    if spoil_head:
        write_params(stages[2], {COPIES[direction][1]: np.full((32, 32), 3.0, np.float32)})
    return source, run_reference(spec.build(), stages=stages, source=source)


def _close(got, want):
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("direction", sorted(COPIES))
def test_torch_and_keras_owners_and_heads_follow_vertical_sync(direction):
    owner_name, head_name, torch_owner = COPIES[direction]
    source, result = _run(direction)
    want, want_losses, start = _oracle(source, torch_owner)
    np.testing.assert_allclose([result.losses[k] for k in sorted(want_losses)],
                               [want_losses[k] for k in sorted(want_losses)], rtol=2e-5)
    owner, head = _latest(result.stages[1]), _latest(result.stages[2])
    _close(owner[owner_name], want[1]["shared"])
    _close(owner["0.bias"], want[1]["layers"][0]["b"])
    _close(head["0.bias"], want[2]["layers"][0]["b"])
    last = want[2]["layers"][2]["w"]
    _close(head["2.kernel"] if torch_owner else head["2.weight"], last if torch_owner else last.T)
    _close(_latest(result.stages[0])["dense0/w"], want[0]["layers"][0]["w"])
    # The owner's matrix trained; the head's copy (prepare_stage set it to the first copy's initial
    # value) had zero gradients (momentum: unmoved) and its accumulator keeps none.
    assert np.abs(owner[owner_name] - start).max() > 1e-3
    assert head[head_name].tobytes() == start.tobytes()
    assert not np.asarray(result.stages[2].state_dict()[f"acc/{head_name}"]).any()


@pytest.mark.parametrize("direction,precision", [("keras->torch", "fp32"), ("torch->keras", "fp32"),
                                                 ("torch->keras", "bf16")])
def test_the_head_reads_the_owners_value_not_its_own_copy(direction, precision):
    """Spoil the head's own copy before training: nothing changes, bit for bit (under bf16 too,
    where both stages cast the float32 value they read inside their graphs)."""
    owner_name = COPIES[direction][0]
    _, clean = _run(direction, precision=precision)
    _, spoiled = _run(direction, spoil_head=True, precision=precision)
    assert spoiled.losses == clean.losses
    assert _latest(spoiled.stages[1])[owner_name].tobytes() == _latest(clean.stages[1])[owner_name].tobytes()
    for name, value in _latest(clean.stages[2]).items():
        if name != COPIES[direction][1]:
            assert _latest(spoiled.stages[2])[name].tobytes() == value.tobytes(), name


def test_a_torch_holder_that_always_splits_its_backward_is_refused():
    source = mixed.train_source(n=64, microbatch_size=16)
    model = mixed.build(split_backward="always")
    model.ties = (("0.weight", "0.kernel"),)
    part = partition(model, 3, boundaries=[2, 4], example_input=source.inputs(0))
    spec = ScheduleSpec("pipedream", num_stages=3, microbatches=2, steps=1, ties=plan_ties(part).spans)
    stages = build_stages(part, Optimizer("momentum", lr=LR))
    with pytest.raises(NotImplementedError, match="stage 1: tied weights under pipedream .* split_backward='always'"):
        run_reference(spec.build(), stages=stages, source=source)

"""Tied weights under pipedream (runtime/tie_carry.py) with torch and Keras holders: the mixed
JAX -> torch -> Keras MLP of models/mixed.py, its torch ``nn.Linear`` weight (stage 1, the owner)
tied to its Keras ``Dense`` kernel (stage 2, the head), as in test_ties_frameworks.py.

The oracle is plain JAX + optax written from PipeDream's rule, not from pipetrain: micro-batch
k runs stage s at its stashed version v_s(k) = max(0, k - (p - s) + 1) (one update per
micro-batch), and the head's dense2 reads the owner's matrix at the OWNER's version for k (as
is: Keras' [in, out] kernel; dense1 reads it transposed, torch's [out, in]). The owner's update
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
from pipetrain.runtime.reference import build_stages, run_reference
from pipetrain.schedule.builders import ScheduleSpec
from pipetrain.stages.ties import write_params
from pipetrain.ties import plan_ties
from test_ties_frameworks import _latest, tied_mixed

pytest.importorskip("tensorflow")
pytest.importorskip("torch")

M, STEPS, LR = 4, 3, 0.1
RANGES = ((0, 2), (2, 4), (4, 7))


def _oracle(source):
    """Per stage, its final params ("shared": the owner's matrix, in torch's layout), the losses
    and the shared matrix's initial value."""
    layers = mlp.layers(sizes=mixed.SIZES, kind="tanh")
    theta = initial_params(layers, source.inputs(0))
    shared = theta[2]["w"].T
    per_stage = [list(theta[a:b]) for a, b in RANGES]
    per_stage[1][0] = {"b": theta[2]["b"]}
    per_stage[2][0] = {"b": theta[4]["b"]}
    per_stage = [{"layers": w} for w in per_stage]
    per_stage[1]["shared"] = shared
    p, tx = len(RANGES), optax.sgd(LR, momentum=0.9)
    versions, states, losses = [[w] for w in per_stage], [tx.init(w) for w in per_stage], {}

    def loss(used, x, y):
        full = [layer for w in used for layer in w["layers"]]
        full[2] = {**full[2], "w": used[1]["shared"].T}
        full[4] = {**full[4], "w": used[1]["shared"]}  # the owner's value at the owner's version
        return mlp.loss_fn(apply_sequence(layers, full, x), y)

    for k in range(M * STEPS):
        used = [versions[s][max(0, k - (p - s) + 1)] for s in range(p)]
        value, grads = jax.value_and_grad(loss)(used, jnp.asarray(source.inputs(k)), jnp.asarray(source.targets(k)))
        losses[k] = float(value)
        for s in range(p):
            updates, states[s] = tx.update(grads[s], states[s], versions[s][-1])
            versions[s].append(optax.apply_updates(versions[s][-1], updates))
    return [v[-1] for v in versions], losses, np.asarray(shared)


def _run(spoil_head=False):
    source = mixed.train_source(n=512, microbatch_size=16)
    part = tied_mixed(source)
    spec = ScheduleSpec("pipedream", num_stages=3, microbatches=M, steps=STEPS, ties=plan_ties(part).spans)
    stages = build_stages(part, Optimizer("momentum", lr=LR))
    if spoil_head:
        write_params(stages[2], {"0.kernel": np.full((32, 32), 3.0, np.float32)})
    return source, run_reference(spec.build(), stages=stages, source=source)


def _close(got, want):
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-6)


def test_a_torch_owner_and_a_keras_head_follow_vertical_sync():
    source, result = _run()
    want, want_losses, start = _oracle(source)
    np.testing.assert_allclose([result.losses[k] for k in sorted(want_losses)],
                               [want_losses[k] for k in sorted(want_losses)], rtol=2e-5)
    owner, head = _latest(result.stages[1]), _latest(result.stages[2])
    _close(owner["0.weight"], want[1]["shared"])
    _close(owner["0.bias"], want[1]["layers"][0]["b"])
    _close(head["0.bias"], want[2]["layers"][0]["b"])
    _close(head["2.kernel"], want[2]["layers"][2]["w"])
    _close(_latest(result.stages[0])["dense0/w"], want[0]["layers"][0]["w"])
    # The owner's matrix trained; the head's copy had zero gradients (momentum: unmoved) and keeps none.
    # (prepare_stage set the head's copy to the first copy's initial value.)
    assert np.abs(owner["0.weight"] - start).max() > 1e-3
    assert head["0.kernel"].tobytes() == start.tobytes()
    assert not np.asarray(result.stages[2].state_dict()["acc/0.kernel"]).any()


def test_the_keras_head_reads_the_torch_owners_value_not_its_own_copy():
    """Spoil the head's own copy before training: nothing changes, bit for bit."""
    _, clean = _run()
    _, spoiled = _run(spoil_head=True)
    assert spoiled.losses == clean.losses
    assert _latest(spoiled.stages[1])["0.weight"].tobytes() == _latest(clean.stages[1])["0.weight"].tobytes()
    assert _latest(spoiled.stages[2])["2.kernel"].tobytes() == _latest(clean.stages[2])["2.kernel"].tobytes()

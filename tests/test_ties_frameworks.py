"""Tied weights held by torch and Keras stages (pipetrain/stages/ties.py): the mixed
JAX -> torch -> Keras MLP of models/mixed.py with its torch ``nn.Linear`` weight
tied to its Keras ``Dense`` kernel (both 32x32), cut so each part is a stage.

On the reference executor (1f1b): the copies start and end bit-identical, stage 0
(outside the tie's span) runs no tie action, and the weights equal plain JAX + optax
on the all-JAX twin whose dense1 reads the shared matrix transposed (torch's layout)
and dense2 reads it as is (Keras's), with and without clipping (the shared matrix
counted once in the global norm)."""
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
from pipetrain.schedule.actions import TIES
from pipetrain.schedule.builders import ScheduleSpec
from pipetrain.ties import TieError, plan_ties

pytest.importorskip("tensorflow")
pytest.importorskip("torch")

TIE = (("0.weight", "0.kernel"),)  # the torch part's layer 0, the Keras part's layer 0
M, STEPS, LR = 4, 3, 0.1


def tied_mixed(source):
    model = mixed.build()
    model.ties = TIE
    return partition(model, 3, boundaries=[2, 4], example_input=source.inputs(0))


def _latest(stage):
    state = stage.state_dict()
    v = int(state["meta/latest"])
    return {k[len(f"v{v}/"):]: a for k, a in state.items() if k.startswith(f"v{v}/")}


def _oracle(source, clip):
    layers = mlp.layers(sizes=mixed.SIZES, kind="tanh")
    theta = initial_params(layers, source.inputs(0))
    shared = theta[2]["w"].T  # torch's [out, in] layout, the first copy's
    theta[2] = {"b": theta[2]["b"]}
    theta[4] = {"b": theta[4]["b"]}
    theta = {"layers": theta, "shared": shared}

    def loss(th, x, y):
        full = list(th["layers"])
        full[2] = {**full[2], "w": th["shared"].T}
        full[4] = {**full[4], "w": th["shared"]}
        return mlp.loss_fn(apply_sequence(layers, full, x), y)

    tx = optax.sgd(LR, momentum=0.9)
    if clip:
        tx = optax.chain(optax.clip_by_global_norm(clip), tx)
    state = tx.init(theta)
    for step in range(STEPS):
        grads = [jax.grad(loss)(theta, jnp.asarray(source.inputs(k)), jnp.asarray(source.targets(k)))
                 for k in range(step * M, (step + 1) * M)]
        mean = jax.tree_util.tree_map(lambda *g: sum(g) / len(g), *grads)
        updates, state = tx.update(mean, state, theta)
        theta = optax.apply_updates(theta, updates)
    return theta


@pytest.mark.parametrize("clip", [None, 0.05])
def test_torch_and_keras_copies_equal_one_shared_matrix(clip):
    source = mixed.train_source(n=512, microbatch_size=16)
    part = tied_mixed(source)
    plan = plan_ties(part)
    assert plan.spans == ((1, 2),)
    stages = build_stages(part, Optimizer("momentum", lr=LR, clip_norm=clip))
    assert _latest(stages[1])["0.weight"].tobytes() == _latest(stages[2])["0.kernel"].tobytes()
    spec = ScheduleSpec("1f1b", num_stages=3, microbatches=M, steps=STEPS, clip=bool(clip), ties=plan.spans)
    schedule = spec.build()
    assert not any(a.kind in TIES for a in schedule.actions[0])
    result = run_reference(schedule, stages=stages, source=source)
    torch_copy, keras_copy = _latest(result.stages[1])["0.weight"], _latest(result.stages[2])["0.kernel"]
    assert torch_copy.tobytes() == keras_copy.tobytes()
    want = _oracle(source, clip)
    np.testing.assert_allclose(keras_copy, np.asarray(want["shared"]), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(_latest(result.stages[0])["dense0/w"], np.asarray(want["layers"][0]["w"]),
                               rtol=1e-4, atol=1e-6)
    assert np.abs(keras_copy - np.asarray(initial_params(mlp.layers(sizes=mixed.SIZES, kind="tanh"),
                                                         source.inputs(0))[4]["w"])).max() > 1e-3


def test_an_ambiguous_name_in_a_mixed_model_is_refused():
    source = mixed.train_source(n=64, microbatch_size=16)
    part = tied_mixed(source)
    part.model.ties = (("0.bias", "dense0/b"),)  # both the torch and the Keras part have a "0.bias"
    with pytest.raises(TieError, match="'0.bias' names a parameter of layer 2 and one of layer 4"):
        plan_ties(part)

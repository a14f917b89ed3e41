"""Tied weights under pipedream (runtime/tie_carry.py): PipeDream's "vertical sync" for a tie.

The oracle below is written from the rule, not from pipetrain: micro-batch k
runs every stage s at its stashed weight version v_s(k) = max(0, k - (p - s)
+ 1) // a (PipeDream's weight stashing), the head's token table reading the
owner's (stage 0's) table at ITS version for k; the owner's update applies the
mean over its update's micro-batches of the sum of both uses' gradients, and
the head's copy is no parameter of anyone else. Plain JAX + optax, one
optimizer per stage (Adam is per element, clipping per stage).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from models import gpt
from models.layers import apply_sequence
from oracles import initial_params
from pipetrain.api import fit
from pipetrain.optim import Optimizer
from pipetrain.runtime.reference import build_stages, run_reference
from pipetrain.runtime.ties import TieMismatch
from pipetrain.schedule.actions import Kind
from pipetrain.schedule.builders import ScheduleSpec
from pipetrain.ties import plan_ties
from test_ties import LR, SIZE, Tokens, _latest, _tied_partition

M, STEPS = 4, 3


def _global_norm(tree):
    return float(np.sqrt(sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for g in jax.tree_util.tree_leaves(tree))))


def _pipedream_oracle(ranges, *, accumulate=1, clip=None):
    """Per stage, its layers' final params (the head's tokens dropped: the owner's are the tie's) and the losses."""
    layers = gpt.layers(**SIZE, tie_embeddings=True)
    theta = initial_params(layers, Tokens().inputs(0))
    p, total, src = len(ranges), M * STEPS, Tokens()
    per_stage = [theta[a:b] for a, b in ranges]
    per_stage[-1][-1] = {n: v for n, v in per_stage[-1][-1].items() if n != "tokens"}
    tx = optax.adam(LR, b1=0.9, b2=0.999, eps=1e-8)
    versions = [[w] for w in per_stage]  # stage -> version -> its layers' params
    states = [tx.init(w) for w in per_stage]
    pending: list[list] = [[] for _ in range(p)]
    losses = {}

    def loss(stage_params, x, y):
        flat = [layer for w in stage_params for layer in w]
        flat[-1] = {**flat[-1], "tokens": flat[0]["tokens"]}  # the head reads the owner's table
        return gpt.loss_fn(apply_sequence(layers, flat, x), y)

    for k in range(total):
        used = [versions[s][max(0, k - (p - s) + 1) // accumulate] for s in range(p)]
        value, grads = jax.value_and_grad(loss)(used, jnp.asarray(src.inputs(k)), jnp.asarray(src.targets(k)))
        losses[k] = float(value)
        for s in range(p):
            pending[s].append(grads[s])
        if (k + 1) % accumulate == 0:
            for s in range(p):
                mean = jax.tree_util.tree_map(lambda *g: sum(g) / len(g), *pending[s])
                if clip:
                    norm = _global_norm(mean)
                    mean = jax.tree_util.tree_map(lambda g: g * min(1.0, clip / norm), mean)
                updates, states[s] = tx.update(mean, states[s], versions[s][-1])
                versions[s].append(optax.apply_updates(versions[s][-1], updates))
                pending[s] = []
    return [v[-1] for v in versions], losses


def _run(p, *, accumulate=1, clip=None, **kw):
    part = _tied_partition(p)
    spec = ScheduleSpec("pipedream", num_stages=p, microbatches=M, steps=STEPS, accumulate=accumulate,
                        clip=bool(clip), ties=plan_ties(part).spans, **kw)
    stages = build_stages(part, Optimizer("adam", lr=LR, clip_norm=clip))
    return part, spec, run_reference(spec.build(), stages=stages, source=Tokens())


def _close(got, want):
    np.testing.assert_allclose(got, np.asarray(want), rtol=3e-4, atol=3e-6)


@pytest.mark.parametrize("p,accumulate,clip", [(2, 1, None), (3, 1, None), (3, 2, None), (3, 1, 0.05)])
def test_pipedream_ties_follow_vertical_sync(p, accumulate, clip):
    part, spec, result = _run(p, accumulate=accumulate, clip=clip)
    assert not any(a.kind is Kind.TIE for acts in spec.build().actions for a in acts)  # nothing but F/B carries it
    ranges = [(s.start, s.end) for s in part.stages]
    want, want_losses = _pipedream_oracle(ranges, accumulate=accumulate, clip=clip)
    np.testing.assert_allclose([result.losses[k] for k in sorted(want_losses)],
                               [want_losses[k] for k in sorted(want_losses)], rtol=2e-5)
    first, last = _latest(result.stages[0]), _latest(result.stages[-1])
    _close(first["embed/tokens"], want[0][0]["tokens"])
    _close(first["embed/positions"], want[0][0]["positions"])
    _close(last["head/ln/scale"], want[-1][-1]["ln"]["scale"])
    # The owner's table trained; the head's copy is not a parameter it updates (zero gradient, Adam: unmoved).
    start = np.asarray(initial_params(gpt.layers(**SIZE, tie_embeddings=True), Tokens().inputs(0))[0]["tokens"])
    assert np.abs(first["embed/tokens"] - start).max() > LR / 2
    assert last["head/tokens"].tobytes() == start.tobytes()
    assert not np.asarray(result.stages[-1].state_dict()["acc/head/tokens"]).any()


def test_the_head_reads_the_owners_value_not_its_own_copy():
    """Spoil the head's own copy before training: nothing changes, bit for bit (it reads the carried value)."""
    from pipetrain.stages.ties import write_params

    _, _, clean = _run(3)
    part = _tied_partition(3)
    spec = ScheduleSpec("pipedream", num_stages=3, microbatches=M, steps=STEPS, ties=plan_ties(part).spans)
    stages = build_stages(part, Optimizer("adam", lr=LR))
    write_params(stages[-1], {"head/tokens": np.full((97, SIZE["d_model"]), 3.0, np.float32)})
    spoiled = run_reference(spec.build(), stages=stages, source=Tokens())
    assert spoiled.losses == clean.losses
    assert _latest(spoiled.stages[0])["embed/tokens"].tobytes() == _latest(clean.stages[0])["embed/tokens"].tobytes()


def test_a_carried_tie_of_the_wrong_shape_is_refused_on_receipt():
    import dataclasses

    part = _tied_partition(2)
    stages = build_stages(part, Optimizer("adam", lr=LR))
    plan = plan_ties(part)
    broken = dataclasses.replace(plan.ties[0], spec=dataclasses.replace(plan.ties[0].spec, shape=(97, 15)))
    stages[1].tied = dataclasses.replace(stages[1].tied, ties=(broken,))
    spec = ScheduleSpec("pipedream", num_stages=2, microbatches=2, steps=1, ties=plan.spans)
    with pytest.raises(TieMismatch, match=r"stage 1: the activation of micro-batch 0 from stage 0: tie 0 "
                                          r"\(embed/tokens, head/tokens\) is float32\[97, 16\]"):
        run_reference(spec.build(), stages=stages, source=Tokens())


def test_what_is_not_built_is_refused():
    with pytest.raises(NotImplementedError, match="a tie inside one stage"):
        ScheduleSpec("pipedream", num_stages=2, microbatches=2, steps=1, ties=((1, 1),))
    part = _tied_partition(2)
    stages = build_stages(part, Optimizer("adam", lr=LR))
    stages[0].correction = "dc-asgd"
    spec = ScheduleSpec("pipedream", num_stages=2, microbatches=2, steps=1, ties=plan_ties(part).spans)
    with pytest.raises(NotImplementedError, match="delay correction 'dc-asgd'"):
        run_reference(spec.build(), stages=stages, source=Tokens())
    with pytest.raises(NotImplementedError, match="delay correction 'dcasgd' are not implemented"):
        fit(_tied_partition(2), Tokens(), executor="reference", schedule="pipedream", correction="dcasgd",
            microbatches=2, steps=1, progress=False)


def test_the_edges_bounds_and_expected_specs_grow_by_the_carried_tie():
    from types import SimpleNamespace

    from pipetrain.runtime.links import _expected_input, edge_bounds, payload_bound
    from pipetrain.runtime.plan import boundary_specs
    from pipetrain.runtime.transport import wire
    from pipetrain.stages.base import StageSpec

    part = _tied_partition(3)
    plan, table = plan_ties(part), 97 * SIZE["d_model"] * 4 + wire.ALIGN

    def job(s, schedule):
        return SimpleNamespace(spec=StageSpec(s, 3, 0, 1), ties=plan, schedule=SimpleNamespace(name=schedule),
                               input_specs=boundary_specs(part, s), output_specs=boundary_specs(part, s + 1))

    for s in (1, 2):
        plain, carried = edge_bounds(job(s, "1f1b")), edge_bounds(job(s, "pipedream"))
        assert carried[s - 1] == payload_bound(boundary_specs(part, s)) + table  # activations from below
        expected = _expected_input(job(s, "pipedream"))
        assert expected["tied"] == {"g0": plan.ties[0].spec} and expected["x"] == boundary_specs(part, s)
        assert _expected_input(job(s, "1f1b")) == boundary_specs(part, s)
        if s == 1:  # input gradients from above carry the head's gradient of the table
            assert carried[2] == payload_bound(boundary_specs(part, 2)) + table
        assert plain[s - 1] == payload_bound(boundary_specs(part, s))

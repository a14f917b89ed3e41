"""Tied weights across stages (pipetrain/ties.py, schedule/ties.py, runtime/ties.py).

- The pass: the relay before each UPDATE of the stages in the tie's span, in the
  documented order; pipedream has none (tests/test_ties_pipedream.py); the simulator
  runs tied schedules under the runtime's credits.
- Sync schedules (gpipe, 1f1b; 2bw with its one-update delay) on the reference
  executor equal plain JAX + optax on the unpartitioned GPT with ONE shared token
  table (embedding and head), with and without clipping (the shared parameter
  counted once in the global norm); the copies end bit-identical.
- A tie that names a missing parameter or tensors of different shapes is refused
  before training, naming both parameters and stages; a tie message of the wrong
  shape is refused on receipt.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from models import gpt, text
from models.layers import apply_sequence
from oracles import initial_params
from pipetrain.optim import Optimizer
from pipetrain.partitioning import partition
from pipetrain.runtime.reference import build_stages, run_reference
from pipetrain.runtime.ties import TieMismatch
from pipetrain.schedule.actions import Kind
from pipetrain.schedule.builders import ScheduleSpec
from pipetrain.schedule.simulator import simulate
from pipetrain.ties import TieError, plan_ties

SIZE = dict(context=8, d_model=16, n_heads=2, n_layers=2)
M, STEPS, LR = 4, 3, 1e-2


class Tokens:
    """Seeded random character windows: inputs and next-token targets by micro-batch id."""

    microbatch_size = 4

    def _window(self, k):
        rng = np.random.default_rng(1000 + k)
        return rng.integers(0, text.VOCAB_SIZE, (4, SIZE["context"] + 1)).astype(np.int32)

    def inputs(self, k):
        return self._window(k)[:, :-1]

    def targets(self, k):
        return self._window(k)[:, 1:]


def _tied_partition(p, **kw):
    model = gpt.build(**SIZE, tie_embeddings=True, **kw)
    return partition(model, p, method="uniform", example_input=Tokens().inputs(0))


def _run(p, name, *, clip=None):
    part = _tied_partition(p)
    plan = plan_ties(part)
    opt = Optimizer("adam", lr=LR, clip_norm=clip)
    spec = ScheduleSpec(name, num_stages=p, microbatches=M, steps=STEPS, clip=bool(clip), ties=plan.spans)
    result = run_reference(spec.build(), stages=build_stages(part, opt), source=Tokens())
    return part, result


def _oracle(*, delay, clip=None):
    """Plain JAX + optax on the unpartitioned GPT whose head reads the embedding's token
    table: theta holds it once (the head's own entry is dropped and filled from it)."""
    layers = gpt.layers(**SIZE, tie_embeddings=True)
    theta = initial_params(layers, Tokens().inputs(0))
    del theta[-1]["tokens"]

    def loss(th, x, y):
        full = [*th[:-1], {**th[-1], "tokens": th[0]["tokens"]}]
        return gpt.loss_fn(apply_sequence(layers, full, x), y)

    tx = optax.adam(LR, b1=0.9, b2=0.999, eps=1e-8)
    if clip:
        tx = optax.chain(optax.clip_by_global_norm(clip), tx)
    state, versions, src = tx.init(theta), [theta], Tokens()
    for step in range(STEPS):
        used = versions[max(0, step - delay)]
        grads = [jax.grad(loss)(used, jnp.asarray(src.inputs(k)), jnp.asarray(src.targets(k)))
                 for k in range(step * M, (step + 1) * M)]
        mean = jax.tree_util.tree_map(lambda *g: sum(g) / len(g), *grads)
        updates, state = tx.update(mean, state, versions[-1])
        versions.append(optax.apply_updates(versions[-1], updates))
    return versions[-1]


def _latest(stage):
    state = stage.state_dict()
    v = int(state["meta/latest"])
    return {k[len(f"v{v}/"):]: a for k, a in state.items() if k.startswith(f"v{v}/")}


def test_the_pass_relays_through_the_middle_stages():
    s = ScheduleSpec("1f1b", num_stages=3, microbatches=3, steps=1, ties=((0, 2),)).build()
    tails = [" ".join(str(a) for a in acts[-6:]) for acts in s.actions]
    assert tails[0].endswith("0RECV_G1 0TIE1 0SEND_S1 0U1")
    assert tails[1].endswith("1RECV_G1 1TIE1 1SEND_G1 1RECV_S1 1SEND_S1 1U1")
    assert tails[2].endswith("2TIE1 2SEND_G1 2RECV_S1 2U1")
    clipped = ScheduleSpec("1f1b", num_stages=3, microbatches=3, steps=1, ties=((0, 2),), clip=True).build()
    kinds = [a.kind for a in clipped.actions[1][-11:]]
    assert kinds.index(Kind.SEND_TIED) < kinds.index(Kind.NORM)  # the norm is of the summed gradients
    assert ScheduleSpec("1f1b", num_stages=3, microbatches=3, steps=1, ties=[[0, 2]]).to_dict()["ties"] == [[0, 2]]
    assert "ties" not in ScheduleSpec("1f1b", num_stages=3, microbatches=3, steps=1).to_dict()
    # pipedream: the ties ride on the F/B messages (runtime/tie_carry.py), no actions of their own.
    carried = ScheduleSpec("pipedream", num_stages=3, microbatches=3, steps=1, ties=((0, 2),)).build()
    assert carried.actions == ScheduleSpec("pipedream", num_stages=3, microbatches=3, steps=1).build().actions


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "2bw"])
@pytest.mark.parametrize("p", [1, 2, 4])
def test_tied_schedules_simulate_without_deadlock(name, p):
    m = max(p, 4)
    spec = ScheduleSpec(name, num_stages=p, microbatches=m, steps=3, clip=True, checkpoint_every=m,
                        ties=((0, p - 1),))
    assert simulate(spec.build(), credits=p + 1, send_cost=0.1).makespan > 0


@pytest.mark.parametrize("name,delay,p,clip", [("1f1b", 0, 3, None), ("gpipe", 0, 2, None),
                                                ("1f1b", 0, 1, None), ("2bw", 1, 3, None),
                                                ("1f1b", 0, 3, 0.05)])
def test_sync_schedules_equal_one_shared_parameter(name, delay, p, clip):
    part, result = _run(p, name, clip=clip)
    assert plan_ties(part).spans == ((0, p - 1),)
    first, last = _latest(result.stages[0]), _latest(result.stages[-1])
    # The copies are bit-identical after training.
    assert first["embed/tokens"].tobytes() == last["head/tokens"].tobytes()
    want = _oracle(delay=delay, clip=clip)
    np.testing.assert_allclose(first["embed/tokens"], np.asarray(want[0]["tokens"]), rtol=2e-4, atol=2e-6)
    np.testing.assert_allclose(last["head/ln/scale"], np.asarray(want[-1]["ln"]["scale"]), rtol=2e-4, atol=2e-6)
    np.testing.assert_allclose(first["embed/positions"], np.asarray(want[0]["positions"]), rtol=2e-4, atol=2e-6)
    # It trained (the shared table moved from where it started).
    start = np.asarray(initial_params(gpt.layers(**SIZE, tie_embeddings=True), Tokens().inputs(0))[0]["tokens"])
    assert np.abs(first["embed/tokens"] - start).max() > LR / 2
    if clip:  # every update was clipped by the same global norm, which counts the table once
        norms = {s: list(v.values()) for s, v in result.grad_norms.items()}
        assert all(n == norms[0] for n in norms.values())


def test_the_copies_start_identical_and_an_untied_gpt_differs():
    stages = build_stages(_tied_partition(2), Optimizer("adam", lr=LR))
    assert _latest(stages[0])["embed/tokens"].tobytes() == _latest(stages[1])["head/tokens"].tobytes()
    untied = gpt.build(**SIZE)
    assert not getattr(untied, "ties", ())
    assert "head/out/w" in _latest(build_stages(partition(untied, 2, method="uniform",
                                                          example_input=Tokens().inputs(0)), Optimizer())[1])


def test_a_bad_tie_is_refused_before_training_naming_both():
    part = _tied_partition(2)
    part.model.ties = (("embed/tokens", "head/token"),)
    with pytest.raises(TieError, match="'head/token' is not a parameter of the model"):
        plan_ties(part)
    part.model.ties = (("embed/positions", "head/tokens"),)
    with pytest.raises(TieError, match=r"'embed/positions' \(stage 0\) is float32\[8,16\] but 'head/tokens' "
                                       r"\(stage 1\) is float32\[97,16\]"):
        plan_ties(part)
    part.model.ties = (("embed/tokens",),)
    with pytest.raises(TieError, match="two or more"):
        plan_ties(part)


def test_a_tie_message_of_the_wrong_shape_is_refused_on_receipt():
    part = _tied_partition(2)
    stages = build_stages(part, Optimizer("adam", lr=LR))
    spec = ScheduleSpec("1f1b", num_stages=2, microbatches=2, steps=1, ties=plan_ties(part).spans)
    broken = dataclasses.replace(plan_ties(part).ties[0], spec=dataclasses.replace(
        plan_ties(part).ties[0].spec, shape=(97, 15)))
    stages[0].tied = dataclasses.replace(stages[0].tied, ties=(broken,))
    with pytest.raises(TieMismatch, match=r"stage 0: the tie sums for update 1 from stage 1: tie 0 "
                                          r"\(embed/tokens, head/tokens\) is float32\[97, 16\]"):
        run_reference(spec.build(), stages=stages, source=Tokens())


def test_tie_frames_come_only_from_their_neighbour():
    import secrets

    from pipetrain.runtime.links import _Endpoint
    from pipetrain.runtime.transport import MessageKind, TransportTimeout

    key = secrets.token_bytes(32)
    below, middle, above = (_Endpoint.start(stage=s, secret=key) for s in (0, 1, 2))
    try:
        up, down = below.connect(middle.address, peer_stage=1), above.connect(middle.address, peer_stage=1)
        grad = {"g0": np.ones((3, 2), np.float32)}
        up.put(MessageKind.TIE_PARTIAL, 1, grad).result(10)  # partial sums come from s + 1 only
        down.put(MessageKind.TIE_TOTAL, 1, grad).result(10)  # and the totals from s - 1 only
        for kind in (MessageKind.TIE_PARTIAL, MessageKind.TIE_TOTAL):
            with pytest.raises(TransportTimeout):
                middle.get(kind, 1, timeout=0.2)
        assert middle.stats["rejected_frames"] == 2
        up.put(MessageKind.TIE_TOTAL, 2, grad)
        down.put(MessageKind.TIE_PARTIAL, 2, grad)
        for kind in (MessageKind.TIE_TOTAL, MessageKind.TIE_PARTIAL):
            assert np.array_equal(middle.get(kind, 2, timeout=10).tree["g0"], grad["g0"])
    finally:
        for endpoint in (below, middle, above):
            endpoint.close()


def _tied_job(tmp_path, name, *, model_extra="", schedule="1f1b"):
    config = tmp_path / f"{name}.toml"
    config.write_text(f'run_dir = "{tmp_path / name}"\n[model]\nentry = "models.gpt:build"\n{model_extra}\n'
                      'kwargs = { context = 8, d_model = 16, n_heads = 2, n_layers = 2, tie_embeddings = true }\n'
                      '[data]\ntrain = "models.text:CharWindows"\nkwargs = { context = 8, microbatch_size = 4 }\n'
                      f'[partition]\nstages = 3\nmethod = "uniform"\n[schedule]\nname = "{schedule}"\n'
                      'microbatches = 3\nsteps = 2\n')
    return str(config)


def test_a_job_config_trains_the_tied_gpt_and_can_untie_or_refuse_it(tmp_path):
    from pipetrain.config import ConfigError, from_dict
    from pipetrain.job import train_from_config

    tied = train_from_config(_tied_job(tmp_path, "tied"), executor="reference", progress=False)
    declared = train_from_config(_tied_job(tmp_path, "declared", model_extra='ties = [["embed/tokens", '
                                                                               '"head/tokens"]]'),
                                 executor="reference", progress=False)
    untied = train_from_config(_tied_job(tmp_path, "untied", model_extra="ties = []"), executor="reference",
                               progress=False)
    assert tied.losses == declared.losses and tied.losses != untied.losses
    v = int(tied.states[0]["meta/latest"])
    assert tied.states[0][f"v{v}/embed/tokens"].tobytes() == tied.states[-1][f"v{v}/head/tokens"].tobytes()
    assert untied.states[0][f"v{v}/embed/tokens"].tobytes() != untied.states[-1][f"v{v}/head/tokens"].tobytes()
    with pytest.raises(ConfigError, match=r"model.ties\[0\]: a tie is a list of two or more parameter names"):
        from_dict({"model": {"entry": "models.gpt:build", "ties": [["embed/tokens"]]},
                   "data": {"train": "models.text:CharWindows"}})
    with pytest.raises(TieError, match="'head/w' is not a parameter"):
        train_from_config(_tied_job(tmp_path, "bad", model_extra='ties = [["embed/tokens", "head/w"]]'),
                          executor="reference", progress=False)
    carried = train_from_config(_tied_job(tmp_path, "async", schedule="pipedream"), executor="reference",
                                progress=False)
    assert all(np.isfinite(list(carried.losses.values())))

"""Learning-rate schedules (pipetrain.optim.lr_at and the stages that use it).

- ``lr_at`` equals optax's schedules (warmup_cosine_decay_schedule, a joined
  pair of linear schedules, constant after a warm-up) at every update count.
- The config's [optimizer] fields reach the Optimizer; bad values name the field.
- A JAX, a torch, a Keras and a mixed JAX -> torch -> Keras chain trained with
  1f1b and a cosine schedule end at the weights of tests/oracles.py's
  ``sync_weights`` with a numpy Adam whose LR follows ``scheduled_lr``,
  gradients from a plain JAX twin of the network.
- A run resumed from a checkpoint cut continues the schedule (bit-identical).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from oracles import ScheduledNumpyOptimizer, scheduled_lr, sync_weights
from pipetrain.config import ConfigError, from_dict
from pipetrain.optim import Optimizer, lr_at
from pipetrain.runtime.reference import run_reference
from pipetrain.schedule.builders import build_schedule
from stage_helpers import Batches

SCHEDULES = [
    dict(schedule="cosine", lr=0.1, warmup=5, decay_steps=40, min_lr=0.01),
    dict(schedule="cosine", lr=3e-4, warmup=0, decay_steps=17),
    dict(schedule="linear", lr=0.5, warmup=3, decay_steps=20, min_lr=0.05),
    dict(schedule="linear", lr=1.0, warmup=0, decay_steps=9, min_lr=0.0),
    dict(schedule="constant", lr=2e-3, warmup=7),
    dict(schedule="constant", lr=2e-3),
]


def _optax_twin(schedule, lr, warmup=0, decay_steps=None, min_lr=0.0):
    if schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, decay_steps, end_value=min_lr)
    after = (optax.linear_schedule(lr, min_lr, decay_steps - warmup) if schedule == "linear"
             else optax.constant_schedule(lr))
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


@pytest.mark.parametrize("kw", SCHEDULES, ids=lambda kw: f"{kw['schedule']}-w{kw.get('warmup', 0)}")
def test_lr_at_equals_optax_and_the_definition(kw):
    opt, twin = Optimizer("adam", **kw), _optax_twin(**kw)
    counts = range(0, (kw.get("decay_steps") or 20) + 10)
    got = [lr_at(opt, c) for c in counts]
    np.testing.assert_allclose(got, [float(twin(c)) for c in counts], rtol=2e-6, atol=1e-12)
    np.testing.assert_allclose(got, [scheduled_lr(c, **kw) for c in counts], rtol=1e-12, atol=1e-15)
    assert got[0] == (0.0 if kw.get("warmup") else kw["lr"])
    if kw["schedule"] != "constant":
        assert got[-1] == pytest.approx(kw.get("min_lr", 0.0))


@pytest.mark.parametrize("kw,field", [
    (dict(schedule="step"), "optimizer.schedule"),
    (dict(schedule="cosine"), "optimizer.decay_steps"),
    (dict(schedule="cosine", warmup=10, decay_steps=10), "optimizer.decay_steps"),
    (dict(schedule="linear", decay_steps=10, min_lr=1.0), "optimizer.min_lr"),
    (dict(schedule="constant", decay_steps=10), "optimizer.decay_steps"),
    (dict(warmup=-1), "optimizer.warmup"),
    (dict(warmup=2.5), "optimizer.warmup"),
    (dict(decay_mask="biases"), "optimizer.decay_mask"),
])
def test_bad_schedule_fields_are_named(kw, field):
    with pytest.raises(ValueError, match=field):
        Optimizer("adam", lr=0.1, **kw)


def test_config_optimizer_table_sets_the_schedule():
    cfg = from_dict({"model": {"entry": "m:f"}, "data": {"train": "d:t"}, "optimizer": {
        "name": "adamw", "lr": 1e-3, "schedule": "cosine", "warmup": 10, "decay_steps": 100, "min_lr": 1e-5,
        "decay_mask": "all"}})
    o = cfg.optimizer
    assert (o.schedule, o.warmup, o.decay_steps, o.min_lr, o.decay_mask) == ("cosine", 10, 100, 1e-5, "all")
    with pytest.raises(ConfigError, match="optimizer.decay_steps"):
        from_dict({"model": {"entry": "m:f"}, "data": {"train": "d:t"},
                   "optimizer": {"schedule": "linear", "warmup": 5}})


# ---------------------------------------------------------------- chains against the oracle



def _case(framework, opt=None, **model_kw):
    """(stages, source, the twin's layers as ((stage, weight name, transposed), (stage, bias name)))."""
    from models import mixed
    from pipetrain.partitioning import partition
    from pipetrain.runtime.reference import build_stages
    from stage_helpers import stages

    opt = opt or OPT
    if framework in ("jax", "mixed"):
        source = mixed.train_source(n=512, microbatch_size=16)
        if framework == "jax":
            part = partition(mixed.jax_twin(), 2, boundaries=[4], example_input=source.inputs(0))
            where = [(0, "dense0"), (0, "dense1"), (1, "dense2"), (1, "dense3")]
            layout = [((s, f"{n}/w", False), (s, f"{n}/b")) for s, n in where]
        else:
            part = partition(mixed.build(), 3, boundaries=[2, 4], example_input=source.inputs(0))
            layout = [((0, "dense0/w", False), (0, "dense0/b")), ((1, "0.weight", True), (1, "0.bias")),
                      ((2, "0.kernel", False), (2, "0.bias")), ((2, "2.kernel", False), (2, "2.bias"))]
        return build_stages(part, opt), source, layout
    from test_corrections_frameworks import keras_model, torch_model

    model = torch_model(**model_kw) if framework == "torch" else keras_model()
    weight, transposed = ("weight", True) if framework == "torch" else ("kernel", False)
    layout = [((s, f"{i}.{weight}", transposed), (s, f"{i}.bias")) for s, i in ((0, 0), (1, 2), (1, 4))]
    return stages(model, [2], opt), Batches(), layout


def twin_grad_fn(layout, source):
    """k, flat weights per stage -> their gradients: the tanh MLP ``layout`` describes, in plain JAX."""
    def loss_of(flat, x, y):
        h = x
        for i, ((sw, w, transposed), (sb, b)) in enumerate(layout):
            h = h @ (flat[sw][w].T if transposed else flat[sw][w]) + flat[sb][b]
            h = jnp.tanh(h) if i < len(layout) - 1 else h
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(h), jnp.asarray(y)[:, None], axis=1))

    grad = jax.jit(jax.grad(loss_of))
    return lambda k, weights: grad(weights, jnp.asarray(source.inputs(k)), jnp.asarray(source.targets(k)))


OPT = Optimizer("adam", lr=0.05, schedule="cosine", warmup=2, decay_steps=5, min_lr=0.005)
OPT_KW = dict(schedule="cosine", lr=0.05, warmup=2, decay_steps=5, min_lr=0.005)


def _weights(stage, version):
    prefix = f"v{version}/"
    return {n[len(prefix):]: np.asarray(a) for n, a in stage.state_dict().items() if n.startswith(prefix)}


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["jax", "torch", "keras", "mixed"])
def test_cosine_schedule_chain_follows_the_oracle(framework):
    if framework in ("keras", "mixed"):
        pytest.importorskip("tensorflow")
    m, steps = 2, 6  # past decay_steps: the last update runs at min_lr
    stage_list, source, layout = _case(framework)
    params0 = [_weights(s, 0) for s in stage_list]
    run_reference(build_schedule("1f1b", num_stages=len(stage_list), microbatches=m, steps=steps),
                  stages=stage_list, source=source)
    oracle = sync_weights(twin_grad_fn(layout, source), params0, microbatches=m, steps=steps,
                          optimizers=[ScheduledNumpyOptimizer("adam", lambda t: scheduled_lr(t, **OPT_KW))
                                      for _ in params0])
    constant = sync_weights(twin_grad_fn(layout, source), params0, microbatches=m, steps=steps,
                            optimizers=[ScheduledNumpyOptimizer("adam", lambda t: OPT.lr) for _ in params0])
    for s, stage in enumerate(stage_list):
        assert max(stage.versions()) == steps
        got = _weights(stage, steps)
        for n, want in oracle[s].items():
            np.testing.assert_allclose(got[n], want, rtol=1e-4, atol=2e-6, err_msg=f"{framework} stage {s} {n}")
        # the schedule matters: a constant LR ends elsewhere
        assert any(not np.allclose(got[n], constant[s][n], rtol=1e-3, atol=1e-5) for n in got)


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_resumed_run_continues_the_schedule_bit_for_bit(framework):
    m, steps, cut = 2, 6, 6  # the cut after 3 of 6 updates: inside the cosine decay
    full_stages, source, _ = _case(framework)
    full = run_reference(build_schedule("1f1b", num_stages=len(full_stages), microbatches=m, steps=steps,
                                        checkpoint_every=m), stages=full_stages, source=source,
                         keep_checkpoints=True)
    fresh, _, _ = _case(framework)
    for s, stage in enumerate(fresh):
        stage.load_state_dict(full.checkpoints[cut][s])
    resumed = run_reference(build_schedule("1f1b", num_stages=len(fresh), microbatches=m, steps=steps,
                                           checkpoint_every=m, first_microbatch=cut), stages=fresh, source=source)
    assert {k: v for k, v in full.losses.items() if k >= cut} == resumed.losses
    for a, b in zip(full.state_dicts(), resumed.state_dicts()):
        assert a.keys() == b.keys()
        assert all(np.array_equal(a[n], b[n]) for n in a), framework

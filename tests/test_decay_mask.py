"""adamw's weight-decay mask (``Optimizer.decay_mask``) and LR schedule, the same in
every framework: the JAX stage's optax transformation, the torch and the Keras
tensor optimizers, each against ``optax.adamw`` given the mask written here
(rank >= 2 decays; "all": every parameter) and the optax schedule."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pipetrain.optim import Optimizer

SHAPES = {"w": (5, 3), "b": (3,), "scale": (3,)}


def _optax_twin(opt):
    mask = None if opt.decay_mask == "all" else (lambda ps: jax.tree_util.tree_map(lambda q: q.ndim >= 2, ps))
    lr = optax.warmup_cosine_decay_schedule(0.0, opt.lr, opt.warmup, opt.decay_steps, end_value=opt.min_lr)
    return optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay, mask=mask)


def _run_optax(tx, p0, grads):
    p = {n: jnp.asarray(a) for n, a in p0.items()}
    state = tx.init(p)
    for g in grads:
        updates, state = tx.update({n: jnp.asarray(a) for n, a in g.items()}, state, p)
        p = optax.apply_updates(p, updates)
    return {n: np.asarray(a) for n, a in p.items()}


def _run_framework(framework, opt, p0, grads):
    if framework == "jax":
        from pipetrain.stages.jax_optim import as_optax
        return _run_optax(as_optax(opt), p0, grads)
    if framework == "torch":
        import torch

        from pipetrain.stages.torch_optim import TensorOptimizer
        ours, to, back = TensorOptimizer(opt), (lambda a: torch.from_numpy(a.copy())), (lambda t: t.numpy())
    else:
        tf = pytest.importorskip("tensorflow")
        from pipetrain.stages.tf_stage import _TensorOptimizer
        ours, to, back = _TensorOptimizer(opt), tf.constant, (lambda t: t.numpy())
    p = {n: to(a) for n, a in p0.items()}
    state = ours.init(p)
    for g in grads:
        p, state = ours.step(p, {n: to(a) for n, a in g.items()}, state)
    return {n: back(a) for n, a in p.items()}


@pytest.mark.parametrize("framework", ["jax", "torch", "keras"])
@pytest.mark.parametrize("mask", ["auto", "all"])
def test_adamw_mask_and_schedule_equal_optax(framework, mask):
    opt = Optimizer("adamw", lr=0.05, weight_decay=0.3, decay_mask=mask, schedule="cosine", warmup=2,
                    decay_steps=6, min_lr=0.01)
    rng = np.random.default_rng(0)
    p0 = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    grads = [{n: (rng.standard_normal(s) * 1e-2).astype(np.float32) for n, s in SHAPES.items()} for _ in range(8)]
    got = _run_framework(framework, opt, p0, grads)
    want = _run_optax(_optax_twin(opt), p0, grads)
    for n in SHAPES:
        np.testing.assert_allclose(got[n], want[n], rtol=2e-6, atol=1e-6, err_msg=f"{framework} {n}")
    other = _run_optax(_optax_twin(Optimizer(**{**opt.__dict__, "decay_mask": "all" if mask == "auto" else "auto"})),
                       p0, grads)
    # the mask matters for the rank-1 parameters, and only for them
    assert not np.allclose(got["b"], other["b"], rtol=1e-4) and np.array_equal(want["w"], other["w"])

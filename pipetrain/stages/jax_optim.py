"""The JAX stage's optimizer: ``pipetrain.optim.Optimizer`` as the optax
transformation it names (a JAX stage also takes any optax transformation)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from pipetrain.optim import Optimizer, decays


def as_optax(optimizer: Optimizer | optax.GradientTransformation) -> optax.GradientTransformation:
    """A ``pipetrain.optim.Optimizer`` as the optax transformation it names, its LR
    schedule as the optax schedule ``pipetrain.optim.lr_at`` mirrors, and adamw's
    decay mask (``pipetrain.optim.decays``) as optax's ``mask``."""
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"jax stage: optimizer must be a pipetrain.optim.Optimizer or an "
                        f"optax.GradientTransformation, got {type(optimizer).__name__}")
    o = optimizer
    lr = lr_schedule(o)
    if o.name == "sgd":
        return optax.sgd(lr)
    if o.name == "momentum":
        return optax.sgd(lr, momentum=o.momentum)
    if o.name == "adam":
        return optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps)
    mask = None if o.decay_mask == "all" else (
        lambda params: jax.tree_util.tree_map(lambda p: decays(o, jnp.ndim(p)), params))
    return optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=mask)


def lr_schedule(o: Optimizer) -> float | optax.Schedule:
    """``o``'s LR for optax: the float itself when constant (as before schedules
    existed, so such runs keep their numbers), else optax's schedule."""
    warm = optax.linear_schedule(0.0, o.lr, o.warmup)
    if o.schedule == "constant":
        return o.lr if o.warmup == 0 else optax.join_schedules([warm, optax.constant_schedule(o.lr)], [o.warmup])
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, o.lr, o.warmup, o.decay_steps, end_value=o.min_lr)
    return optax.join_schedules([warm, optax.linear_schedule(o.lr, o.min_lr, o.decay_steps - o.warmup)],
                                [o.warmup])

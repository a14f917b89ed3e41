"""A framework-neutral optimizer description, and its update rules.

One ``Optimizer`` drives every stage of a mixed pipeline. A JAX stage turns it
into optax (and also accepts an ``optax.GradientTransformation`` directly).
Torch and Keras stages apply ``tensor_step``: optax's rules in optax's order of
operations on their own tensors, as pure functions of (params, grads, state),
because ``torch.optim`` and Keras optimizers update variables in place (wrong
with several live weight versions) and Keras Adam puts epsilon elsewhere.

``correction`` names a delay compensation for the asynchronous schedules
(pipedream, 2bw): how a stage uses the known delay of every gradient
(``pipetrain.stages.corrections``). It travels with the optimizer because it
is part of the update rule every stage applies.

The learning rate follows ``schedule`` (``lr_at``): optax's warm-up + cosine
decay, warm-up + linear decay, or constant (after an optional warm-up), as a
function of the stage's update count. Every framework uses this one rule (the
JAX stage through the optax schedule it mirrors, ``optax_schedule_args``), so
the update number ``count`` of any stage uses the same LR. The count advances
once per *update*, not per step: under gpipe and 1f1b an update is a step;
under pipedream every micro-batch (every ``accumulate`` of them) is an update,
so ``warmup``/``decay_steps`` are ``steps * microbatches / accumulate``-scaled;
under 2bw an update closes a window of ``microbatches`` (one per step).

``decay_mask`` chooses which parameters adamw's weight decay touches: "auto"
(the default, like the usual optax mask) decays only parameters of rank >= 2,
so biases and normalization scales are left alone; "all" decays every one.

``clip_norm`` clips the mean gradients of an update by their global norm:
the whole model's under gpipe, 1f1b and 2bw, each stage's own under pipedream
(``pipetrain.schedule.norms`` says why and how the stages reduce it).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
CORRECTIONS = ("none", "predict", "dcasgd", "dcasgd-a")
LR_SCHEDULES = ("constant", "cosine", "linear")
DECAY_MASKS = ("auto", "all")
ASYNC_SCHEDULES = ("pipedream", "2bw")  # the schedules with delayed gradients to correct


@dataclass(frozen=True)
class Optimizer:
    name: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9  # "momentum" only
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0  # "adamw" only
    correction: str = "none"  # one of CORRECTIONS (pipetrain.stages.corrections)
    dc_lambda: float | None = None  # DC-ASGD's lambda (lambda0 for "dcasgd-a"); None: the paper's value
    dc_mean_square: float = 0.95  # "dcasgd-a": the momentum of its mean square of gradients
    schedule: str = "constant"  # one of LR_SCHEDULES: the LR as a function of the update count (lr_at)
    warmup: int = 0  # updates of linear warm-up from 0 to lr
    decay_steps: int | None = None  # cosine/linear: the schedule's length in updates, warm-up included
    min_lr: float = 0.0  # cosine/linear: the LR from update decay_steps on
    decay_mask: str = "auto"  # one of DECAY_MASKS: which parameters adamw decays
    clip_norm: float | None = None  # clip the mean gradients by global norm (schedule/norms.py); None/0: off

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer.name: {self.name!r} is not one of {', '.join(OPTIMIZERS)}")
        if not self.lr > 0:
            raise ValueError(f"optimizer.lr: must be > 0, got {self.lr}")
        if self.correction not in CORRECTIONS:
            raise ValueError(f"correction: {self.correction!r} is not one of {', '.join(CORRECTIONS)}")
        if self.dc_lambda is not None and not self.dc_lambda >= 0:
            raise ValueError(f"optimizer.dc_lambda: must be >= 0, got {self.dc_lambda}")
        if not 0 <= self.dc_mean_square < 1:
            raise ValueError(f"optimizer.dc_mean_square: must be in [0, 1), got {self.dc_mean_square}")
        self._check_schedule()
        if self.clip_norm is not None and (isinstance(self.clip_norm, bool) or not self.clip_norm >= 0):
            raise ValueError(f"optimizer.clip_norm: must be None (off) or a number >= 0 (0: off), got "
                             f"{self.clip_norm!r}")
        if self.decay_mask not in DECAY_MASKS:
            raise ValueError(f"optimizer.decay_mask: {self.decay_mask!r} is not one of {', '.join(DECAY_MASKS)}")

    def _check_schedule(self) -> None:
        if self.schedule not in LR_SCHEDULES:
            raise ValueError(f"optimizer.schedule: {self.schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
        if not _is_int(self.warmup) or self.warmup < 0:
            raise ValueError(f"optimizer.warmup: must be an int >= 0 (updates), got {self.warmup!r}")
        if self.schedule == "constant":
            if self.decay_steps is not None or self.min_lr != 0.0:
                raise ValueError("optimizer.decay_steps/min_lr: only for schedule = \"cosine\" or \"linear\", "
                                 "not \"constant\"")
            return
        if self.decay_steps is None or not _is_int(self.decay_steps) or self.decay_steps <= self.warmup:
            raise ValueError(f"optimizer.decay_steps: schedule {self.schedule!r} needs an int > warmup "
                             f"({self.warmup}) (updates, warm-up included), got {self.decay_steps!r}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optimizer.min_lr: must be in [0, lr = {self.lr}], got {self.min_lr}")

    @classmethod
    def from_dict(cls, d: dict) -> "Optimizer":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"optimizer: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def lr_at(opt: Optimizer, count: int) -> float:
    """The learning rate of a stage's update after ``count`` updates (0: the first),
    as optax's schedules compute it (same formulas, in float64): the JAX stage's
    optax schedule (``optax_schedule_args``) gives these values to float32."""
    if count < opt.warmup:  # optax.linear_schedule(0, lr, warmup)
        return (0.0 - opt.lr) * (1.0 - count / opt.warmup) + opt.lr
    if opt.schedule == "constant":
        return opt.lr
    t, span = min(count - opt.warmup, opt.decay_steps - opt.warmup), opt.decay_steps - opt.warmup
    if opt.schedule == "linear":  # optax.linear_schedule(lr, min_lr, span)
        return (opt.lr - opt.min_lr) * (1.0 - t / span) + opt.min_lr
    alpha = opt.min_lr / opt.lr  # optax.cosine_decay_schedule(lr, span, alpha)
    return opt.lr * ((1 - alpha) * 0.5 * (1 + math.cos(math.pi * t / span)) + alpha)


def decays(opt: Optimizer, ndim: int) -> bool:
    """Whether adamw's weight decay applies to a parameter of rank ``ndim``."""
    return opt.decay_mask == "all" or ndim >= 2


def squared_norm(arrays: Iterable[Any]) -> float:
    """The sum of every squared entry of ``arrays`` (host arrays, in the caller's fixed
    order), in float64: each stage's share of the global gradient norm, computed the
    same way in every framework so that a clipped update is a function of the
    gradients alone."""
    total = 0.0
    for a in arrays:
        total += float(np.square(np.asarray(a, dtype=np.float64)).sum())
    return total


def with_correction(optimizer: Any, correction: str | None, *, schedule: str) -> Any:
    """``optimizer`` carrying ``correction`` (None: keep its own), checked against
    ``schedule``: a correction needs a pipetrain Optimizer and delayed gradients."""
    if correction is None:
        correction = getattr(optimizer, "correction", "none")
    elif not isinstance(optimizer, Optimizer):
        raise ValueError(f"correction: {correction!r} needs a pipetrain.Optimizer, not {type(optimizer).__name__}")
    elif optimizer.correction not in ("none", correction):
        raise ValueError(f"correction: {correction!r} given, but the optimizer carries {optimizer.correction!r}")
    if correction not in CORRECTIONS:
        raise ValueError(f"correction: {correction!r} is not one of {', '.join(CORRECTIONS)}")
    if correction != "none" and schedule not in ASYNC_SCHEDULES:
        raise ValueError(f"correction: {schedule} has no delayed gradients to correct; {correction!r} is for "
                         f"{' and '.join(ASYNC_SCHEDULES)}")
    return replace(optimizer, correction=correction) if correction != "none" else optimizer


def sgd(lr: float) -> Optimizer:
    return Optimizer("sgd", lr=lr)


def adam(lr: float = 1e-3, **kw) -> Optimizer:
    return Optimizer("adam", lr=lr, **kw)


_SLOTS = {"sgd": (), "momentum": ("trace",), "adam": ("mu", "nu"), "adamw": ("mu", "nu")}


def tensor_state(opt: Optimizer, params: dict[str, Any], *, zeros_like: Callable[[Any], Any],
                 count: Any) -> dict[str, Any]:
    """The optimizer state for ``params``: the step ``count`` (a 0-d int64 zero of
    the framework) and one zero tensor per parameter and slot."""
    state = {"count": count}
    for slot in _SLOTS[opt.name]:
        state.update({f"{slot}/{n}": zeros_like(p) for n, p in params.items()})
    return state


def tensor_step(opt: Optimizer, params: dict[str, Any], grads: dict[str, Any], state: dict[str, Any], *,
                square: Callable[[Any], Any], sqrt: Callable[[Any], Any],
                power: Callable[[float, Any, Any], Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """One update of ``params`` by ``grads`` (means), in optax's order: optax.sgd,
    optax.trace (momentum), optax.scale_by_adam (eps outside the square root,
    eps_root = 0) and add_decayed_weights before the learning rate (adamw).
    The LR is ``lr_at(opt, count)`` (a Python float: the count is read back).
    Tensors need + - * /; the framework gives ``square``, ``sqrt`` and
    ``power(b, count, like)`` = b ** count in ``like``'s dtype."""
    lr = lr_at(opt, int(state["count"]))
    count = state["count"] + 1
    new_state = {"count": count}
    new_params = {}
    for n, p in params.items():
        g = grads[n]
        if opt.name == "sgd":
            update = g
        elif opt.name == "momentum":  # optax.trace: t = g + momentum * t
            update = new_state[f"trace/{n}"] = g + opt.momentum * state[f"trace/{n}"]
        else:
            mu = new_state[f"mu/{n}"] = (1 - opt.b1) * g + opt.b1 * state[f"mu/{n}"]
            nu = new_state[f"nu/{n}"] = (1 - opt.b2) * square(g) + opt.b2 * state[f"nu/{n}"]
            mu_hat = mu / (1 - power(opt.b1, count, p))
            nu_hat = nu / (1 - power(opt.b2, count, p))
            update = mu_hat / (sqrt(nu_hat) + opt.eps)
            if opt.name == "adamw" and decays(opt, len(p.shape)):
                update = update + opt.weight_decay * p
        new_params[n] = p + (-lr) * update
    return new_params, new_state

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
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
CORRECTIONS = ("none", "predict", "dcasgd", "dcasgd-a")
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

    @classmethod
    def from_dict(cls, d: dict) -> "Optimizer":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"optimizer: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


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
    Tensors need + - * /; the framework gives ``square``, ``sqrt`` and
    ``power(b, count, like)`` = b ** count in ``like``'s dtype."""
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
            if opt.name == "adamw":
                update = update + opt.weight_decay * p
        new_params[n] = p + (-opt.lr) * update
    return new_params, new_state

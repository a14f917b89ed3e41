"""A framework-neutral optimizer description, and its update rules.

One ``Optimizer`` drives every stage of a mixed pipeline. A JAX stage turns it
into optax (and also accepts an ``optax.GradientTransformation`` directly).
Torch and Keras stages apply ``tensor_step``: optax's rules in optax's order of
operations on their own tensors, as pure functions of (params, grads, state),
because ``torch.optim`` and Keras optimizers update variables in place (wrong
with several live weight versions) and Keras Adam puts epsilon elsewhere.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")


@dataclass(frozen=True)
class Optimizer:
    name: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9  # "momentum" only
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0  # "adamw" only

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer.name: {self.name!r} is not one of {', '.join(OPTIMIZERS)}")
        if not self.lr > 0:
            raise ValueError(f"optimizer.lr: must be > 0, got {self.lr}")

    @classmethod
    def from_dict(cls, d: dict) -> "Optimizer":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"optimizer: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


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

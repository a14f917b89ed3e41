"""A framework-neutral optimizer description.

Each stage adapter turns an ``Optimizer`` into its framework's own (optax,
torch.optim, keras.optimizers), so one config drives a mixed pipeline. A JAX
stage also accepts an ``optax.GradientTransformation`` directly.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

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

"""A JAX layer as a pair of pure functions, the plain way to write a model.

``init(key, x_spec) -> params``: ``x_spec`` is the input as a pytree of
``jax.ShapeDtypeStruct`` (use ``x_spec.shape``), ``params`` a pytree of arrays
(may be empty: ``{}``). ``apply(params, x) -> y``: pure, jit-able, x and y
pytrees. The model's seed and the layer's global index fix ``key``, so every
partition of a model starts from the same weights.

This module imports nothing heavy; ``jax_stage`` turns layers into stages.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Layer:
    name: str
    init: Callable[[Any, Any], Any]
    apply: Callable[[Any, Any], Any]

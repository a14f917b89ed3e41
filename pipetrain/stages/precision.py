"""Mixed precision: ``precision = "fp32" | "bf16"`` for every stage of a model.

Under ``"bf16"`` a stage keeps its parameters, gradient accumulator and
optimizer state in float32 (the masters: what updates, checkpoints and the
delay corrections read and write) and computes in bfloat16:

- the cast of the float32 parameters to bfloat16 happens *inside* the
  differentiated compute, so the gradient comes back through the cast as a
  float32 gradient of the master (JAX: inside the jitted VJP; torch: explicit
  ``.to(torch.bfloat16)`` inside the autograd graph; Keras: the variables read
  in an ``AutocastScope`` and every layer on the ``mixed_bfloat16`` policy);
- a stage's float inputs are cast to bfloat16 before its first layer, and its
  float outputs to bfloat16 after its last: activations forward and their
  gradients backward cross stage boundaries as bfloat16, half the bytes of
  float32 (integer leaves, token ids, are untouched);
- the last stage casts its outputs to float32 before the loss, so the loss and
  its first cotangent are float32.

Why explicit casts in torch rather than ``torch.autocast("cpu", bfloat16)``:
autocast lowers only the ops on its list (matmul, linear, conv) and leaves
the rest (layer norm, softmax, adds) in float32, so the dtype a stage sends
would depend on which op its last layer ends with, and differ from the JAX
and Keras stages. Casting the parameters and inputs makes every op run in
bfloat16 in all three frameworks, and the boundary dtype a fixed rule.

The partition knows it too: under ``"bf16"`` every float leaf of a traced
boundary spec is bfloat16 (``lowered``), so the boundary checks of the
transport, its payload bounds and the memory estimate all see the wire dtype.
A model gets its precision from its constructor (``precision=``), from
``pipetrain.partition(..., precision=)`` / ``fit(..., precision=)`` /
``[model] precision`` (``with_precision``: a copy, the caller's model is
left as it is).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any

from pipetrain.errors import PipetrainError
from pipetrain.tree import Tree, tree_map

PRECISIONS = ("fp32", "bf16")
WIRE_DTYPE = "bfloat16"  # what float boundary tensors travel as under "bf16"
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


class PrecisionError(PipetrainError, ValueError):
    """A precision that is not supported, or a model that cannot run with it."""


def check_precision(precision: Any, where: str) -> str:
    """``precision`` if it is one of PRECISIONS; else a PrecisionError naming ``where``."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"{where}: precision must be one of {', '.join(map(repr, PRECISIONS))}, "
                             f"got {precision!r}")
    return precision


def model_precision(model: Any) -> str:
    """The precision ``model``'s stages compute in (a MixedSequential's parts must agree)."""
    if hasattr(model, "parts"):
        found = {model_precision(part) for part in model.parts}
        if len(found) > 1:
            raise PrecisionError(f"MixedSequential: its parts have precisions {sorted(found)}; one model, one "
                                 f"precision (set it on the whole model: partition(..., precision=))")
        return found.pop()
    return getattr(model, "precision", "fp32")


def with_precision(model: Any, precision: str) -> Any:
    """``model`` if it already has ``precision``, else a shallow copy set to build stages
    with it (each part of a MixedSequential too). A model without the option is refused."""
    check_precision(precision, "precision")
    if model_precision(model) == precision:
        return model
    if hasattr(model, "parts"):
        from pipetrain.stages.mixed import MixedSequential

        twin = MixedSequential([with_precision(part, precision) for part in model.parts])
        if hasattr(model, "ties"):  # (set on the model, not its parts: a new one would train untied)
            twin.ties = model.ties
        return twin
    if not hasattr(model, "precision"):
        raise PrecisionError(f"precision {precision!r}: {type(model).__name__} has no precision option "
                             f"(JaxSequential, TorchSequential, KerasSequential and MixedSequential have)")
    twin = copy.copy(model)
    twin.precision = precision
    if isinstance(getattr(twin, "_traced", None), dict):
        twin._traced = {}  # (a JAX model's trace cache is per precision)
    return twin


def lowered(specs: Tree, precision: str) -> Tree:
    """Boundary specs as they travel: under "bf16" every float leaf is bfloat16."""
    from pipetrain.stages.base import TensorSpec

    if precision == "fp32":
        return specs
    return tree_map(lambda s: TensorSpec(s.shape, WIRE_DTYPE) if s.dtype in _FLOAT_DTYPES else s, specs)


def check_masters(named_dtypes: Any, where: str) -> None:
    """Under "bf16" the masters are float32: a parameter of another float dtype is refused."""
    for name, dtype in named_dtypes:
        if dtype in _FLOAT_DTYPES and dtype != "float32":
            raise PrecisionError(f"{where}: parameter {name!r} is {dtype}; precision 'bf16' keeps float32 "
                                 f"master weights and casts them itself: give the layer float32 parameters "
                                 f"(or use precision 'fp32')")


# ---------------------------------------------------------------- per framework

class JaxCasts:
    """The casts of a JAX stage (``jnp`` given, so nothing here imports JAX)."""

    def __init__(self, precision: str, jnp: Any, tree_map_fn: Any):
        self.on = precision == "bf16"
        self._jnp, self._map = jnp, tree_map_fn

    def _to(self, tree: Tree, dtype: Any) -> Tree:
        jnp = self._jnp
        return self._map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.inexact) else a, tree)

    def compute(self, tree: Tree) -> Tree:
        """Parameters or inputs in the compute dtype (a differentiable cast)."""
        return self._to(tree, self._jnp.bfloat16) if self.on else tree

    def outputs(self, tree: Tree, *, last: bool) -> Tree:
        """A stage's outputs: bfloat16 to the wire, float32 into the loss."""
        if not self.on:
            return tree
        return self._to(tree, self._jnp.float32 if last else self._jnp.bfloat16)

    def layer(self, apply: Any) -> Any:
        """A layer's ``apply(params, x)`` computing in bfloat16 from float32 parameters."""
        if not self.on:
            return apply
        return lambda params, x: apply(self.compute(params), self.compute(x))


class TorchCasts:
    """The casts of a torch stage: parameters and float buffers to bfloat16 inside the graph."""

    def __init__(self, precision: str, torch: Any):
        self.on = precision == "bf16"
        self._torch = torch

    def _to(self, tree: Tree, dtype: Any) -> Tree:
        return tree_map(lambda t: t.to(dtype) if isinstance(t, self._torch.Tensor) and t.is_floating_point()
                        else t, tree)

    def compute(self, tree: Tree) -> Tree:
        return self._to(tree, self._torch.bfloat16) if self.on else tree

    def outputs(self, tree: Tree, *, last: bool) -> Tree:
        if not self.on:
            return tree
        return self._to(tree, self._torch.float32 if last else self._torch.bfloat16)

    def module_values(self, module: Any, params: dict) -> dict:
        """What ``functional_call(module, ...)`` runs with: the parameters, and under
        bf16 also the module's float buffers, as bfloat16 (a float32 buffer would
        meet bfloat16 activations in one op, which torch refuses)."""
        if not self.on:
            return params
        buffers = {n: b for n, b in module.named_buffers() if b.is_floating_point()}
        return {**self.compute(buffers), **{n: p.to(self._torch.bfloat16) if p.is_floating_point() else p
                                            for n, p in params.items()}}


class KerasCasts:
    """The casts of a Keras stage: its layers on the ``mixed_bfloat16`` policy, and
    ``stateless_call`` (which calls ``layer.call``, skipping the casts ``__call__``
    does) run in the policy's ``AutocastScope`` with its inputs cast."""

    def __init__(self, precision: str, tf: Any):
        self.on = precision == "bf16"
        self._tf = tf

    def adopt(self, layer: Any) -> None:
        """Put ``layer`` and every layer inside it on the mixed_bfloat16 policy (float32 variables)."""
        if self.on:
            for sub in layer._flatten_layers(include_self=True, recursive=True):
                sub.dtype_policy = "mixed_bfloat16"

    def scope(self) -> Any:
        if not self.on:
            return contextlib.nullcontext()
        from keras.src.backend import AutocastScope  # (not in keras' public API; what Layer.__call__ enters)

        return AutocastScope("bfloat16")

    def _to(self, tree: Tree, dtype: Any) -> Tree:
        tf = self._tf
        return tree_map(lambda t: tf.cast(t, dtype) if t.dtype.is_floating else t, tree)

    def compute(self, tree: Tree) -> Tree:
        return self._to(tree, self._tf.bfloat16) if self.on else tree

    def outputs(self, tree: Tree, *, last: bool) -> Tree:
        if not self.on:
            return tree
        return self._to(tree, self._tf.float32 if last else self._tf.bfloat16)

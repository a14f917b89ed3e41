"""What each layer's backward keeps from its forward, in bytes per micro-batch.

``pipetrain.memory`` multiplies this by the micro-batches a schedule holds.
Each framework is asked the way its autodiff stores things, on shapes only
(nothing is allocated):

- JAX: the residuals of ``jax.vjp`` of the layer (``jax.eval_shape``), as the
  JAX stage keeps them: its jitted forward returns the VJP, and a jit output
  is a buffer of its own even where it is an input (measured with JAX 0.10 on
  CPU), so a residual that is a parameter (a dense layer's weight, read by its
  input gradient) is a copy per micro-batch and counts.
- PyTorch: the tensors autograd saves (``saved_tensors_hooks``) on the meta
  device, leaving out parameters and views of them.
- Under precision "bf16" both run the layer with the stage's casts
  (``stages/precision.py``): what is kept is bfloat16, and torch keeps the
  bfloat16 copy of a weight its input gradient reads (not a parameter).
- Keras (and anything else): the layer's output bytes, a lower bound, since
  TensorFlow offers no shape-only view of what a tape keeps.
"""
from __future__ import annotations

from typing import Any

from pipetrain.tree import flatten


def layer_saved_bytes(model: Any, example_input: Any, output_bytes: list[int]) -> list[int]:
    """Per layer of ``model``: the bytes one micro-batch keeps for its backward."""
    # By what the model offers, not what it says it is: a wrapper (a test's chaos
    # model, a user's) that passes the SequentialModel protocol through counts outputs.
    framework = getattr(model, "framework", None)
    if hasattr(model, "parts"):
        return _mixed(model, example_input, output_bytes)
    if framework == "jax" and hasattr(model, "_trace") and hasattr(model, "layers"):
        return _jax(model, example_input)
    if framework == "torch" and hasattr(model, "_meta_layer"):
        return _torch(model, example_input)
    return list(output_bytes)


def _mixed(model: Any, example_input: Any, output_bytes: list[int]) -> list[int]:
    from pipetrain.stages.mixed import _zeros_like_spec

    out, x, offset = [], example_input, 0
    for part in model.parts:
        specs = part.trace_specs(x)
        out += layer_saved_bytes(part, x, output_bytes[offset:offset + len(specs)])
        offset += len(specs)
        x = _zeros_like_spec(specs[-1])
    return out


def _jax(model: Any, example_input: Any) -> list[int]:
    import jax
    import numpy as np

    def nbytes(a: Any) -> int:
        return int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize

    from pipetrain.stages import jax_trees as trees
    from pipetrain.stages.precision import JaxCasts

    casts = JaxCasts(getattr(model, "precision", "fp32"), jax.numpy, jax.tree_util.tree_map)
    out = []
    for i, (layer, (x, p, _)) in enumerate(zip(model.layers, model._trace(example_input))):
        # As a stage differentiates: the parameters, and after the model's
        # first layer the input's float leaves too (data has no gradient).
        def residuals(p, x, apply=casts.layer(layer.apply), first=i == 0):
            if first:
                return jax.vjp(lambda q: apply(q, x), p)[1]
            x = casts.compute(x)  # (what arrives under bf16)
            x_ints = trees.ints(x)
            return jax.vjp(lambda q, f: apply(q, trees.merge(f, x_ints)), p, trees.floats(x))[1]

        out.append(sum(nbytes(a) for a in jax.tree_util.tree_leaves(jax.eval_shape(residuals, p, x))))
    return out


def _torch(model: Any, example_input: Any) -> list[int]:
    import torch

    from pipetrain.stages.precision import TorchCasts
    from pipetrain.stages.torch_trees import meta_tensor
    from pipetrain.tree import tree_map

    casts = TorchCasts(getattr(model, "precision", "fp32"), torch)
    x = tree_map(meta_tensor, example_input)
    out = []
    for i in range(len(model)):
        layer = model._meta_layer(i)
        owned = {id(p) for p in layer.parameters()}
        seen: set[int] = set()
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            base = t._base if t._base is not None else t
            if id(t) not in seen and id(base) not in owned and id(t) not in owned:
                seen.add(id(t))
                total += t.numel() * t.element_size()
            return t

        # As a stage differentiates: after the model's first layer its input too (data has no
        # gradient, so the first layer keeps no bf16 weight copy for one under "bf16")
        x_in = tree_map(lambda t: t.requires_grad_(True) if t.is_floating_point() and i > 0 else t, x)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.enable_grad():
            y = layer(x_in) if not casts.on else torch.func.functional_call(
                layer, casts.module_values(layer, dict(layer.named_parameters())), (casts.compute(x_in),))
        out.append(total)
        x = tree_map(lambda t: t.detach(), y)
    return out


def input_bytes(example_specs: Any, layer_outputs: list[Any]) -> list[int]:
    """Per layer: the bytes of its input (the model input, then each previous output)."""
    from pipetrain.stages.base import TensorSpec

    def size(specs: Any) -> int:
        return sum(leaf.nbytes for leaf in flatten(specs)[0] if isinstance(leaf, TensorSpec))

    return [size(example_specs)] + [size(s) for s in layer_outputs[:-1]]

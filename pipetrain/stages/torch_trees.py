"""The torch stage's small tensor-tree helpers (shared with ``torch_costs`` and
``saved_bytes``): meta tensors for tracing, fresh autograd leaves for a stage's
inputs, and the input-gradient tree a backward returns."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pipetrain.stages.base import TensorSpec
from pipetrain.stages.tensors import to_numpy, to_torch
from pipetrain.tree import Tree, flatten, unflatten


def meta_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, TensorSpec):
        return torch.empty(x.shape, dtype=getattr(torch, x.dtype), device="meta")
    t = to_torch(x) if not isinstance(x, torch.Tensor) else x
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def grad_leaf(t: torch.Tensor) -> torch.Tensor:
    """A new autograd leaf over the same storage (inputs of non-first stages)."""
    return t.detach().requires_grad_(t.is_floating_point())


def float_leaves(tree: Tree) -> list[torch.Tensor]:
    return [t for t in flatten(tree)[0] if t.requires_grad]


def input_gradient_tree(x_leaves: list, x_structure: Any, grads: Sequence) -> Tree:
    """The inputs' tree with their gradients (in order, one per leaf that
    requires grad): zeros where autograd found no path, None on int leaves."""
    found = iter(grads)
    return unflatten(x_structure, [_zero_if_none(next(found), t) if t.requires_grad else None for t in x_leaves])


def _zero_if_none(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like).detach() if g is None else g.detach()


def numpy_copy(t: torch.Tensor) -> np.ndarray:
    return np.array(to_numpy(t), copy=True)

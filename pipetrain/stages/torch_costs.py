"""Per-layer costs of a TorchSequential for ``partition``: FLOPs (torch's flop
counter on the meta device) or measured seconds of forward + backward."""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from pipetrain.stages.tensors import to_torch
from pipetrain.stages.torch_stage import default_device
from pipetrain.stages.torch_trees import float_leaves, grad_leaf, meta_tensor
from pipetrain.tree import Tree, flatten, tree_map


def layer_flops(model: Any, example_input: Tree) -> list[float]:
    """Each layer's forward + backward FLOPs (torch's flop counter, on the meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = tree_map(meta_tensor, example_input)
    costs = []
    for i in range(len(model)):
        layer = model._meta_layer(i)
        x_in = tree_map(grad_leaf, x)
        counter = FlopCounterMode(display=False)
        with counter, torch.enable_grad():
            out = layer(x_in)
            _backward_ones(out, [*layer.parameters(), *float_leaves(x_in)])
        costs.append(float(counter.get_total_flops()))
        x = tree_map(torch.Tensor.detach, out)
    return costs


def layer_profile(model: Any, example_input: Tree, *, repeats: int) -> list[float]:
    """Each layer's median measured seconds of forward + backward, after one warm-up."""
    device = model.device or default_device()
    x = to_torch(example_input, device=device)
    costs = []
    for i in range(len(model)):
        layer = model.make_layer(i, device=device)
        times = []
        for r in range(repeats + 1):  # the first run warms up caches and kernels
            x_in = tree_map(grad_leaf, x)
            _sync(device)
            start = time.perf_counter()
            with torch.enable_grad():
                out = layer(x_in)
                _backward_ones(out, [*layer.parameters(), *float_leaves(x_in)])
            _sync(device)
            if r:
                times.append(time.perf_counter() - start)
        costs.append(statistics.median(times))
        x = tree_map(torch.Tensor.detach, out)
    return costs


def _backward_ones(out: Tree, wrt: list[torch.Tensor]) -> None:
    roots = [t for t in flatten(out)[0] if t.requires_grad]
    wrt = [t for t in wrt if t.requires_grad]
    if roots and wrt:
        # autograd.backward, not autograd.grad: FlopCounterMode's module hooks reject the latter.
        torch.autograd.backward(roots, grad_tensors=[torch.ones_like(t) for t in roots], inputs=wrt)


def _sync(device: Any) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()

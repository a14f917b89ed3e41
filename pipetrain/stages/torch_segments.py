"""A torch stage's forward as one autograd segment per layer, so that its
backward can hand out the input gradient before the weight gradients.

Why: the previous stage is waiting for that input gradient, while the weight
gradients are only read at the next update. Computing them after the input
gradient has been sent (the B/W split of Zero Bubble pipeline parallelism,
Qi et al. 2023) gets the gradient to the previous stage a weight-gradient's
time earlier, about half a backward. In a flush schedule that is taken off
the bubble between two steps; in every schedule it loosens the loop in which
a stage waits for its neighbour's answer.

How: ``forward`` runs each layer on fresh autograd leaves (views, not copies)
of the previous layer's outputs and keeps one ``Segment`` per layer.
``input_gradients`` walks the segments last to first, asking autograd for each
layer's input gradient only (so it skips the weight-gradient kernels), and
keeps the gradient that reached each layer's outputs. ``weight_gradients`` then
asks each layer for its parameters' gradients from those. Every kernel runs
once, as in one fused backward, on the same operands: the gradients are the
same bits (tested against the fused backward).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import nn

from pipetrain.tree import Tree, flatten, paths, tree_map, unflatten


class Segment(NamedTuple):
    inputs: Tree  # autograd leaves
    outputs: Tree
    params: dict[str, torch.Tensor]  # full parameter name -> leaf


class PendingWeights(NamedTuple):
    """What ``weight_gradients`` needs: each segment with the gradient its outputs received."""

    segments: list[tuple[Segment, list[torch.Tensor], list[torch.Tensor]]]  # (segment, roots, seeds)


def forward(chain: nn.ModuleDict, params: dict[str, torch.Tensor], x: Tree, *,
            loss: Callable[[Any, Any], Any] | None = None, targets: Any = None) -> tuple[Tree, list[Segment]]:
    """Run ``chain``'s layers one segment each; ``loss`` (last stage) joins the last one."""
    segments: list[Segment] = []
    layers = list(chain.items())
    h = x
    for i, (name, layer) in enumerate(layers):
        mine = {local: params[f"{name}.{local}"] for local, _ in layer.named_parameters()}
        out = torch.func.functional_call(layer, mine, (h,)) if mine else layer(h)
        if loss is not None and i == len(layers) - 1:
            out = loss(out, targets)
        segments.append(Segment(h, out, {f"{name}.{local}": t for local, t in mine.items()}))
        if i < len(layers) - 1:
            h = tree_map(_leaf, out)
    return out, segments


def input_gradients(segments: list[Segment], grad_outputs: Tree | None, *,
                    stage: int) -> tuple[Tree, PendingWeights]:
    """The gradient of the first segment's inputs; ``grad_outputs`` None means a scalar loss (seed 1)."""
    pending = []
    grad: Tree = grad_outputs
    for segment in reversed(segments):
        if grad_outputs is None and segment is segments[-1]:
            roots, seeds = [segment.outputs], [torch.ones_like(segment.outputs)]
        else:
            roots, seeds = roots_and_seeds(segment.outputs, grad, stage)
        pending.append((segment, roots, seeds))
        leaves, structure = flatten(segment.inputs)
        wrt = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
        found = iter(torch.autograd.grad(roots, wrt, grad_outputs=seeds, retain_graph=True, allow_unused=True)
                     if roots and wrt else [None] * len(wrt))
        wanted = {id(t) for t in wrt}  # by identity: tensors compare elementwise
        grad = unflatten(structure, [zero_if_none(next(found), t) if id(t) in wanted else None for t in leaves])
    return grad, PendingWeights(pending)


def weight_gradients(pending: PendingWeights) -> Iterator[tuple[str, torch.Tensor | None]]:
    """``(parameter name, gradient or None)`` for every trainable parameter of the segments."""
    for segment, roots, seeds in pending.segments:
        names = [n for n, t in segment.params.items() if t.requires_grad]
        if not names:
            continue
        grads = (torch.autograd.grad(roots, [segment.params[n] for n in names], grad_outputs=seeds,
                                     allow_unused=True) if roots else [None] * len(names))
        yield from zip(names, grads)


def roots_and_seeds(out: Tree, grad_outputs: Tree, stage: int) -> tuple[list, list]:
    """Pair each output leaf with its gradient; a None gradient (an int output) seeds nothing."""
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def walk(o: Tree, g: Tree, where: str) -> None:
        if g is None or o is None:
            return
        if isinstance(o, (tuple, list)) and isinstance(g, (tuple, list)) and len(o) == len(g):
            for i, (oi, gi) in enumerate(zip(o, g)):
                walk(oi, gi, f"{where}[{i}]")
        elif isinstance(o, dict) and isinstance(g, dict) and set(o) == set(g):
            for key in sorted(o):
                walk(o[key], g[key], f"{where}[{key!r}]")
        elif isinstance(o, torch.Tensor) and isinstance(g, torch.Tensor):
            if tuple(o.shape) != tuple(g.shape):
                raise ValueError(f"stage {stage}: gradient of output {where or '<value>'} has shape "
                                 f"{tuple(g.shape)}, the output {tuple(o.shape)}")
            if o.requires_grad:
                pairs.append((o, g.to(o.dtype)))
        else:
            raise ValueError(f"stage {stage}: grad_outputs {paths(grad_outputs)} do not match the outputs {paths(out)}"
                             f" at {where or '<value>'}")

    walk(out, grad_outputs, "")
    return [o for o, _ in pairs], [g for _, g in pairs]


def _leaf(t: Any) -> Any:
    """A fresh autograd leaf over the same storage; integer tensors stay as they are."""
    if isinstance(t, torch.Tensor):
        return t.detach().requires_grad_(t.is_floating_point())
    return t


def zero_if_none(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like).detach() if g is None else g.detach()

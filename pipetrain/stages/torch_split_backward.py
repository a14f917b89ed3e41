"""A torch stage's backward in two halves: the input gradient first, the
weight gradients after it has been sent.

Why: the previous stage is waiting for the input gradient, while the weight
gradients are only read at the next update. Computing them after the input
gradient has left (the B/W split of Zero Bubble pipeline parallelism,
Qi et al. 2023) gets the gradient to the previous stage a weight-gradient's
time earlier, about half a backward: in a flush schedule that comes off the
bubble between two steps, and in every schedule it loosens the loop in which a
stage waits for its neighbour's answer.

How: with torch.distributed.pipelining's own implementation of the split
(``stage_backward_input`` / ``stage_backward_weight``), the one torch's Zero
Bubble schedules run. The first half asks autograd for the input gradients
only and keeps the gradient that reaches each node where a parameter's path
joins the input's; the second half starts from those. Every kernel runs once,
as in one fused backward; on a chain of layers the gradients are the same bits
(tested). Where that module is missing (a torch built without distributed) or
has another signature, ``available()`` is False and stages keep one fused
backward.
"""
from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch


try:  # private to torch, hence the signature check below
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight
except ImportError:  # pragma: no cover - torch without distributed
    stage_backward_input = stage_backward_weight = None


def available() -> bool:
    if stage_backward_input is None or stage_backward_weight is None:
        return False
    inputs = list(inspect.signature(stage_backward_input).parameters)
    weights = list(inspect.signature(stage_backward_weight).parameters)
    return inputs[:4] == ["stage_outputs_or_loss", "output_grads", "input_values", "weights"] \
        and weights[:2] == ["weights", "param_groups"]


class PendingWeights(NamedTuple):
    names: list[str]
    leaves: list[torch.Tensor]  # the forward's parameter leaves, in ``names`` order
    param_groups: list[dict[str, Any]]


def input_gradients(roots: list[torch.Tensor], seeds: list[torch.Tensor] | None, inputs: list[torch.Tensor],
                    named_params: dict[str, torch.Tensor]) -> tuple[tuple, PendingWeights]:
    """Gradients of ``inputs`` (autograd leaves that require grad) from ``roots``
    seeded with ``seeds`` (None: a scalar loss, seed 1), and what the weight
    gradients of ``named_params`` need later."""
    names = [n for n, t in named_params.items() if t.requires_grad]
    leaves = [named_params[n] for n in names]
    grads, param_groups = stage_backward_input(roots, seeds, inputs, iter(leaves))
    return grads, PendingWeights(names, leaves, param_groups)


def weight_gradients(pending: PendingWeights) -> Iterator[tuple[str, torch.Tensor | None]]:
    """``(parameter name, gradient or None)`` for every trainable parameter."""
    stage_backward_weight(iter(pending.leaves), pending.param_groups)
    for name, leaf in zip(pending.names, pending.leaves):
        yield name, leaf.grad

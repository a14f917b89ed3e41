"""The torch stage's optimizer: ``pipetrain.optim.Optimizer`` as pure functions on
tensor maps (why not ``torch.optim``: see ``torch_stage.py``), with the
multi-tensor fast path for SGD."""
from __future__ import annotations

import torch

from pipetrain.optim import Optimizer, lr_at, tensor_state, tensor_step


class TensorOptimizer:
    """``pipetrain.optim.Optimizer`` as pure functions on tensor maps, in optax's order
    of operations: ``init(params) -> state``, ``step(params, grads, state) -> (params, state)``."""

    def __init__(self, opt: Optimizer):
        if not isinstance(opt, Optimizer):
            raise TypeError(f"torch stage: optimizer must be a pipetrain.optim.Optimizer, got {type(opt).__name__}")
        self.opt = opt

    def init(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return tensor_state(self.opt, params, zeros_like=torch.zeros_like, count=torch.zeros((), dtype=torch.int64))

    def step(self, params, grads, state, *, summed: int = 1, scale: float = 1.0):
        """``grads`` is the sum of ``summed`` micro-batches' gradients: the step
        uses their mean, times ``scale`` (clipping). May overwrite ``grads`` (the
        caller's accumulator)."""
        o = self.opt
        names = list(params)
        if o.name == "sgd":
            # The common case: one multi-tensor pass, the mean folded into the
            # step size (a separate division would be a second pass over every
            # gradient, a third of an update's time on the benchmark MLP).
            updated = torch._foreach_add([params[n] for n in names], [grads[n] for n in names],
                                         alpha=-lr_at(o, int(state["count"])) * scale / summed)
            return dict(zip(names, updated)), {"count": state["count"] + 1}
        if summed != 1:
            torch._foreach_div_([grads[n] for n in names], float(summed))
        if scale != 1.0:
            torch._foreach_mul_([grads[n] for n in names], float(scale))
        return tensor_step(o, params, grads, state, square=torch.square, sqrt=torch.sqrt,
                           power=lambda b, count, like: torch.tensor(b, dtype=like.dtype) ** count.to(like.dtype))

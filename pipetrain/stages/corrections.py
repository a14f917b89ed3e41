"""Delay compensation for the asynchronous schedules: the rules, framework-free.

A schedule knows, for every micro-batch k of a stage, which weight version
F k and B k read (v) and which update applies its gradient: its delay d
(``Schedule.delays``) is how many updates separate the two, so the gradient
is applied to version v + d. The interpreter hands d to ``forward``; a
stage with a correction uses it (``Optimizer.correction``):

- ``"predict"``, weight prediction (SpecTrain, Chen et al. 2018,
  arXiv:1809.02839; PipeOptim, Guan et al. 2023, arXiv:2312.00839): F k and
  B k run with ``w_v + d * step_v``, where ``step_v = w_v - w_(v-1)`` is the
  update that produced version v (zero for version 0). That step is -lr
  times the optimizer's update direction (the momentum for SGD-momentum,
  SpecTrain's smoothed gradient; m_hat / (sqrt(v_hat) + eps) for Adam,
  PipeOptim's rule; the gradient for plain SGD), so the forward sees the
  weights extrapolated to those its gradient will update. For pipedream v is
  the latest version when F k runs, as in the papers. The prediction starts
  from v, not from whatever is latest when F k runs, because a run resumed
  from a checkpoint re-runs the forwards in flight at the cut later than the
  first run did: (v, d, step_v) is what both runs agree on. B k reuses F k's
  predicted weights (weight stashing: the gradient is then the exact
  gradient at the predicted point, where SpecTrain predicts a second time for
  the backward). State: ``step_v`` for every held version (one more copy of
  each stashed version).
- ``"dcasgd"``, DC-ASGD-c (Zheng et al., ICML'17, arXiv:1609.08326): the
  gradient g of micro-batch k, computed at w_used (version v), is applied as
  ``g + lam * g * g * (w_now - w_used)``, with w_now the latest version when
  B k runs: the one its update starts from. No state.
- ``"dcasgd-a"``, DC-ASGD-a: lam is ``lam0 / (sqrt(ms) + eps)`` elementwise,
  ``ms = m * ms + (1 - m) * g * g`` updated with every gradient before it is
  corrected (the paper's order; eps, not in the paper, keeps a parameter
  with no gradient yet finite). State: ``ms``.

Adapters pass their container ops: ``map(f, *collections)`` applies f to the
matching tensors of parameter collections (a dict comprehension for torch
and Keras, ``jax.tree_util.tree_map`` for JAX), and ``compile`` (``jax.jit``
for JAX) wraps the pure functions once. The correction state lives in the
stage's state_dict under ``corr/{slot}/{param}``, so checkpoints hold it.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from pipetrain.optim import Optimizer

STAGE_SLOTS = {"none": (), "predict": (), "dcasgd": (), "dcasgd-a": ("ms",)}  # besides predict's per-version steps
DEFAULT_LAMBDA = {"dcasgd": 0.04, "dcasgd-a": 2.0}  # the paper's CIFAR-10 settings (DC-ASGD-c, DC-ASGD-a)

Collection = Any  # one weight version (or gradient, or state slot) in the adapter's container


def predicted(params: Collection, step: Collection, delay: float, *, map: Callable) -> Collection:
    return map(lambda w, s: w + delay * s, params, step)


def last_step(old: Collection, new: Collection, *, map: Callable) -> Collection:
    return map(lambda o, n: n - o, old, new)


def dc_gradients(grads: Collection, now: Collection, used: Collection, ms: Collection | None, *, lam: float,
                 mean_square: float, eps: float, map: Callable, sqrt: Callable) -> tuple[Collection, Any]:
    """DC-ASGD's corrected gradients, and the updated mean square (None for the constant-lambda form)."""
    if ms is None:
        return map(lambda g, n, u: g + lam * g * g * (n - u), grads, now, used), None
    ms = map(lambda s, g: mean_square * s + (1 - mean_square) * (g * g), ms, grads)
    corrected = map(lambda g, n, u, s: g + lam * g * g * (n - u) / (sqrt(s) + eps), grads, now, used, ms)
    return corrected, ms


def name_of(optimizer: Any) -> str:
    """The optimizer's correction ("none" for anything but a pipetrain Optimizer)."""
    return optimizer.correction if isinstance(optimizer, Optimizer) else "none"


class StageCorrection:
    """One stage's correction: which weights a forward reads, how a gradient is
    corrected, what an update leaves behind, and the state that needs."""

    def __init__(self, optimizer: Any, params: Collection, *, map: Callable, zeros_like: Callable,
                 sqrt: Callable, compile: Callable = lambda f, **kw: f):
        self.name = name_of(optimizer)
        self.predicts = self.name == "predict"
        self.state: dict[str, Collection] = {slot: map(zeros_like, params) for slot in STAGE_SLOTS[self.name]}
        self.steps: dict[int, Collection] = {0: map(zeros_like, params)} if self.predicts else {}  # per version
        self.corrects_gradients = self.name.startswith("dcasgd")
        if self.corrects_gradients:
            lam = optimizer.dc_lambda if optimizer.dc_lambda is not None else DEFAULT_LAMBDA[self.name]
            self.rule = functools.partial(dc_gradients, lam=lam, mean_square=optimizer.dc_mean_square,
                                          eps=optimizer.eps, map=map, sqrt=sqrt)
            self._rule = compile(self.rule)
        # ``delay`` is a small int (at most the pipeline depth): one compilation each.
        self._predicted = compile(functools.partial(predicted, map=map), static_argnums=2)
        self._last_step = compile(functools.partial(last_step, map=map))

    @property
    def enabled(self) -> bool:
        return self.name != "none"

    def delay(self, delay: int | None, where: str) -> int:
        """The delay a forward was given; a correction refuses to run without one
        (a wrapper stage that does not pass it on would silently disable it)."""
        if delay is None and self.enabled:
            raise ValueError(f"{where}: correction {self.name!r} needs each forward's delay "
                             f"(Schedule.delays; the interpreter passes it to stages whose .correction is set)")
        return delay or 0

    def forward_weights(self, params: Collection, *, version: int, delay: int) -> Collection:
        """The weights F k (and then B k) run with: version ``version``'s ``params``
        as the schedule says, or under "predict" those extrapolated by ``delay``
        updates, to the version its gradient will update."""
        if not self.predicts or delay == 0:
            return params
        return self._predicted(params, self.steps[version], float(delay))

    def correct(self, grads: Collection, *, now: Collection, used: Collection, delay: int) -> Collection:
        """A micro-batch's gradients as its update should apply them (DC-ASGD)."""
        if not self.corrects_gradients:
            return grads
        ms = self.state.get("ms")
        if ms is None and delay == 0:
            return grads  # w_now is w_used: nothing to correct
        grads, ms = self._rule(grads, now, used, ms)
        if ms is not None:
            self.state["ms"] = ms
        return grads

    def after_update(self, old_version: int, new_version: int, old: Collection, new: Collection | None) -> None:
        """Keep the step that made ``new_version``: the direction "predict" extrapolates
        along. ``new`` None: an update that applied nothing, which keeps the direction."""
        if self.predicts:
            self.steps[new_version] = self.steps[old_version] if new is None else self._last_step(old, new)

    def release(self, version: int) -> None:
        self.steps.pop(version, None)

    def flat_steps(self) -> dict[str, Any]:
        """The per-version steps as ``step/v{version}/{param}`` (flat collections only)."""
        return {f"step/v{v}/{n}": t for v, tensors in self.steps.items() for n, t in tensors.items()}


def dict_map(f: Callable, *collections: dict[str, Any]) -> dict[str, Any]:
    """``map`` for flat ``{param name: tensor}`` collections (torch and Keras stages)."""
    return {n: f(*(c[n] for c in collections)) for n in collections[0]}


def flat(state: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{slot: {param: tensor}}`` as the state_dict's ``corr/{slot}/{param}`` keys."""
    return {f"{slot}/{n}": t for slot, tensors in state.items() for n, t in tensors.items()}


def unflat(flat_state: dict[str, Any], slots: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {slot: {n: flat_state[f"{slot}/{n}"] for n in tensors} for slot, tensors in slots.items()}

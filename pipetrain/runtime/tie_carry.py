"""Tied weights under pipedream: the tie rides on each micro-batch's own messages.

PipeDream's rule for weights ("vertical sync"): every stage's forward of
micro-batch k uses the weights that produced k's input. For a tie between
stages lo < hi (``pipetrain.ties``; e.g. the GPT's token table on stage 0 and
its LM head on stage p-1) that means:

- stage lo OWNS the tied tensor: it alone updates it, with its optimizer
  state. After its forward of k it puts the value that forward used (its
  weight version for k) on k's activation: ``{"x": activation, "tied":
  {"g0": value}}``;
- the stages between relay it unchanged, on k's activation up and on k's
  input gradient down;
- stage hi's forward of k (and so its backward, which differentiates the
  very tensors the forward read) uses exactly that value in place of its own copy. After
  its backward of k, its gradient w.r.t. the tie is taken out of its
  accumulator (which is left at zero there: the copy is not a parameter hi
  updates) and put on k's input gradient, down to stage lo;
- stage lo, after its own backward of k, adds it to its accumulator (own
  gradient first, then hi's, one float addition: a fixed order), so its
  update applies the sum of both copies' gradients of its micro-batches.

Eval blocks do the same with the owner's latest version. Nothing about a
tie is ever in flight outside k's own F/B messages, so a checkpoint cut holds
all of it (lo's accumulator, hi's zero) and a replay recomputes the rest:
recovery stays bit-identical with no new checkpoint state. Stage hi's own
copy stays in its shard, kept but unused: it is the first copy's initial
value as ``prepare_stage`` set it (moved only by what an optimizer does with
zero gradients, e.g. weight decay); the tie's value is the owner's.

Cost: the tied tensor crosses each edge of [lo, hi] with every activation and
every input gradient (the demo GPT's 97x128 float32 table: 48.5 KiB on top of
a 16x64x128 float32 activation's 512 KiB, both ways). Built for two copies
per tie, on JAX, torch and Keras stages (``stages/ties.py`` swaps the value
into each one's weight version), without delay corrections or a holder's
split_backward='always'; the rest raises ``NotImplementedError``. Messages are checked on receipt (``TieMismatch``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pipetrain.runtime.ties import TieMismatch, checked_ties
from pipetrain.schedule.actions import Kind
from pipetrain.stages import ties as framework

__all__ = ["CarryingLinks", "TieCarrier", "carried_specs", "check_carried"]

_UP = (Kind.RECV_ACT, Kind.SEND_ACT, Kind.RECV_EVAL, Kind.SEND_EVAL)  # values go up
_DOWN = (Kind.RECV_GRAD, Kind.SEND_GRAD)  # gradients come down


def check_carried(ties: Any, correction: str = "none") -> None:
    """Refuse what is not built for pipedream's ties (before any worker starts, and on each stage)."""
    for t in ties:
        if len(t.copies) != 2:
            raise NotImplementedError(f"tied weights under pipedream: tie {t.index} has {len(t.copies)} copies "
                                      f"({', '.join(c.name for c in t.copies)}); only two are implemented")
    if ties and correction != "none":
        raise NotImplementedError(f"tied weights under pipedream with the delay correction {correction!r} are "
                                  f"not implemented (the carried value is the owner's, not a corrected one); "
                                  f"drop one of them")


def carried_specs(tied: Any, edge: int, specs: Any) -> Any:
    """What a message on edge (edge, edge + 1) matches: ``specs`` alone, or with the ties crossing it."""
    across = tied.specs_across(edge) if tied is not None else {}
    return {"x": specs, "tied": across} if across else specs


class TieCarrier:
    def __init__(self, stage: Any, tied: Any):
        s = self.index = tied.stage
        self.stage, self.tied = stage, tied
        check_carried(tied.ties, getattr(stage, "correction", "none"))
        self.owned = {t.key: t.copies[0].name for t in tied.ties if t.span[0] == s}
        self.used = {t.key: t.copies[1].name for t in tied.ties if t.span[1] == s}
        for t in tied.held():
            framework.check_carried_holder(stage, f"tie {t.index}")
        self.up = tied.specs_across(s)        # crossing to s + 1
        self.below = tied.specs_across(s - 1)  # crossing to s - 1
        # (kind of message, k) -> key -> array: values from below / to send up, gradients from above / to send down.
        self._values: dict[tuple[bool, int], dict[str, np.ndarray]] = {}  # (eval?, k) -> from below
        self._send_up: dict[tuple[bool, int], dict[str, np.ndarray]] = {}
        self._grads: dict[int, dict[str, np.ndarray]] = {}  # from above
        self._send_down: dict[int, dict[str, np.ndarray]] = {}

    # ------------------------------------------------------------ compute, for StageProgram

    def forward(self, k: int, x: Any, *, version: int, targets: Any = None, **kw: Any) -> Any:
        values = self._values.pop((False, k), {})
        with framework.params_replaced(self.stage, version, {self.used[key]: values[key] for key in self.used}):
            out = self.stage.forward(k, x, version=version, targets=targets, **kw)
        if self.up:
            self._send_up[(False, k)] = self._going_up(values, version)
        return out

    def evaluate(self, k: int, x: Any, *, targets: Any = None) -> Any:
        values, latest = self._values.pop((True, k), {}), max(self.stage.versions())
        with framework.params_replaced(self.stage, latest, {self.used[key]: values[key] for key in self.used}):
            out = self.stage.evaluate(x, targets=targets)
        if self.up:
            self._send_up[(True, k)] = self._going_up(values, latest)
        return out

    def _going_up(self, values: dict[str, np.ndarray], version: int) -> dict[str, np.ndarray]:
        out = {key: values[key] for key in self.up if key in values}  # relayed unchanged
        out.update({key: framework.param_at(self.stage, version, self.owned[key]) for key in self.owned})
        return out

    def after_backward(self, k: int) -> None:
        grads, down = self._grads.pop(k, {}), {}
        if self.used:  # hi: its gradient of k goes down; its accumulator keeps none of it
            names = [self.used[key] for key in self.used]
            down.update(zip(self.used, framework.read_grads(self.stage, tuple(names))))
            framework.write_grads(self.stage, {n: np.zeros_like(g) for n, g in zip(names, down.values())})
        if self.owned:  # lo: its own gradient of k is in; then hi's, in that order
            names = tuple(self.owned[key] for key in self.owned)
            own = framework.read_grads(self.stage, names)
            framework.write_grads(self.stage, {n: g + grads[key] for n, g, key in zip(names, own, self.owned)})
        down.update({key: grads[key] for key in self.below if key in grads and key not in down})
        if self.below:
            self._send_down[k] = down

    # ------------------------------------------------------------ messages, for CarryingLinks

    def received(self, kind: Kind, k: int, tree: Any) -> Any:
        up = kind in _UP
        expected, sender = (self.below, self.index - 1) if up else (self.up, self.index + 1)
        if not expected:
            return tree
        what = f"{'activation' if up else 'input gradient'} of micro-batch {k}"
        if not isinstance(tree, dict) or set(tree) != {"x", "tied"}:
            raise TieMismatch(f"stage {self.index}: the {what} from stage {sender} does not carry the tied "
                              f"weights {sorted(expected)} (expected {{'x': ..., 'tied': ...}})")
        carried = checked_ties(tree["tied"], expected, self.tied.ties,
                               f"stage {self.index}: the {what} from stage {sender}")
        if up:
            self._values[(kind is Kind.RECV_EVAL, k)] = carried
        else:
            self._grads[k] = carried
        return tree["x"]

    def sending(self, kind: Kind, k: int, tree: Any) -> Any:
        if kind in _UP:
            carried = self._send_up.pop((kind is Kind.SEND_EVAL, k), {})
            return {"x": tree, "tied": carried} if self.up else tree
        return {"x": tree, "tied": self._send_down.pop(k)} if self.below else tree


class CarryingLinks:
    """A stage's links with the ties put on (and taken off) its F/B and eval messages."""

    def __init__(self, links: Any, carrier: TieCarrier):
        self.links, self.carrier = links, carrier

    @property
    def received_are_fresh(self) -> bool:
        return getattr(self.links, "received_are_fresh", False)

    def ready(self, kind: Kind, k: int) -> bool:
        return self.links.ready(kind, k)

    def recv(self, kind: Kind, k: int) -> Any:
        tree = self.links.recv(kind, k)
        return self.carrier.received(kind, k, tree) if kind in _UP or kind in _DOWN else tree

    def send(self, kind: Kind, k: int, version: int | None, tree: Any, *, wait_follows: bool = False) -> None:
        if kind in _UP or kind in _DOWN:
            tree = self.carrier.sending(kind, k, tree)
        self.links.send(kind, k, version, tree, wait_follows=wait_follows)

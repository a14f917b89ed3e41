"""The tie actions of one stage (``schedule/ties.py``), for ``StageProgram``.

Keyed by the update version v: ``RECV_G v`` takes the partial sums of the
copies on stages above (checked: exactly the ties whose span crosses that
edge, each of its parameter's shape and dtype), ``TIE v`` adds this stage's
copies (in copy order) and, for each tie whose lowest holder this is, closes
the sum; ``SEND_G v`` passes the partial sums on down, ``RECV_S v`` takes
the totals from below and ``SEND_S v`` passes them on up. As soon as a
tie's total is known, this stage's copies' accumulated gradients become it,
so the UPDATE that follows applies the same gradient to every copy.

Gradients are the accumulators' *sums* over the update's micro-batches (not
means): every stage of a sync schedule accumulates the same micro-batches
for an update, so dividing the sum by that count in the update gives the
mean of the shared parameter's gradient, with no extra rounding here.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from pipetrain.errors import PipetrainError
from pipetrain.schedule.actions import Action, Kind
from pipetrain.stages import ties as framework


class TieMismatch(PipetrainError, ValueError):
    """A tie message that does not hold what the tied parameters are (as ``wire.BoundaryMismatch``
    for activations: a broken peer, not worth a retry)."""


class TieReducer:
    def __init__(self, stage: Any, tied: Any, links: Any, wait_follows: Callable[[], bool]):
        self.stage, self.tied, self.links, self.wait_follows = stage, tied, links, wait_follows
        self.index = tied.stage
        self._partial: dict[int, dict[str, np.ndarray]] = {}  # v -> key -> running sum (from above, then here)
        self._total: dict[int, dict[str, np.ndarray]] = {}    # v -> key -> the tie's sum, to pass up
        self.skip_in_norm = tied.not_counted()

    def run(self, a: Action) -> None:
        v, s = a.k, self.index
        if a.kind is Kind.RECV_TIE:
            self._partial[v] = self._checked(self.links.recv(a.kind, v), s, sender=s + 1, v=v)
        elif a.kind is Kind.TIE:
            self._add_own(v)
        elif a.kind is Kind.SEND_TIE:
            partial = self._partial.pop(v, {})
            self.links.send(a.kind, v, v, {key: partial[key] for key in self.tied.specs_across(s - 1)},
                            wait_follows=self.wait_follows())
        elif a.kind is Kind.RECV_TIED:
            totals = self._checked(self.links.recv(a.kind, v), s - 1, sender=s - 1, v=v)
            self._apply(totals)
            self._total.setdefault(v, {}).update(totals)
        else:  # SEND_TIED
            total = self._total.pop(v, {})
            self.links.send(a.kind, v, v, {key: total[key] for key in self.tied.specs_across(s)},
                            wait_follows=self.wait_follows())

    def _add_own(self, v: int) -> None:
        s, partial = self.index, self._partial.setdefault(v, {})
        for tie in self.tied.held():
            names = tie.on(s)
            grads = framework.read_grads(self.stage, names)
            own = grads[0]
            for g in grads[1:]:  # copies on one stage: in copy order
                own = own + g
            # The fixed order: copies above first (their partial came down), then this stage's.
            partial[tie.key] = partial[tie.key] + own if tie.key in partial else own
        closing = {t.key: partial.pop(t.key) for t in self.tied.ties if t.span[0] == s and t.key in partial}
        if not partial:
            del self._partial[v]
        if closing:
            self._apply(closing)
            self._total.setdefault(v, {}).update(closing)

    def _apply(self, totals: dict[str, np.ndarray]) -> None:
        s = self.index
        values = {n: totals[t.key] for t in self.tied.held() if t.key in totals for n in t.on(s)}
        if values:
            framework.write_grads(self.stage, values)

    def _checked(self, tree: Any, edge: int, *, sender: int, v: int) -> dict[str, np.ndarray]:
        """The message on edge (edge, edge + 1) as {key: array}, or ``TieMismatch`` naming what is wrong."""
        return checked_ties(tree, self.tied.specs_across(edge), self.tied.ties,
                            f"stage {self.index}: the tie sums for update {v} from stage {sender}")

    def grad_sq_norm(self) -> float:
        """The stage's squared norm for clipping, counting each tie at its first copy only."""
        return framework.grad_sq_norm_without(self.stage, self.skip_in_norm)


def checked_ties(tree: Any, expected: dict, ties: Any, where: str) -> dict[str, np.ndarray]:
    """A tie message's ``{key: array}``, each as ``expected`` (key -> the tied parameter's spec)
    says, or ``TieMismatch`` saying ``where`` and which tie is wrong: what a peer sends is
    checked before it is added to anything (the relay here, the carried ties of tie_carry.py)."""
    if not isinstance(tree, dict) or set(tree) != set(expected):
        got = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise TieMismatch(f"{where} holds the ties {got}, expected {sorted(expected)}")
    out = {}
    for key, spec in expected.items():
        a = np.asarray(tree[key])
        if tuple(a.shape) != tuple(spec.shape) or a.dtype != np.dtype(spec.dtype):
            tie = next(t for t in ties if t.key == key)
            raise TieMismatch(f"{where}: tie {tie.index} ({', '.join(c.name for c in tie.copies)}) is "
                              f"{a.dtype}{list(a.shape)}, the tied parameter is {spec}")
        out[key] = a
    return out

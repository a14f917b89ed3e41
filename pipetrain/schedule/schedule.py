"""The ``Schedule`` record every builder returns and every executor interprets.

Semantics (DESIGN.md section 2), with p stages, m micro-batches per step (a
"mini-batch"), N = steps * m micro-batches in all, stage s in 0..p-1 and
w = p - s (the number of micro-batches stage s has in flight in steady state):

- ``gpipe``: per step t, every stage runs F of the step's m micro-batches in
  increasing k, then B of them in increasing k, then ``U t+1``. All F/B of step
  t use version t. Same math as the unpartitioned model.
- ``1f1b`` (PipeDream-Flush / DeepSpeed): per step, stage s runs
  min(p - s - 1, m) warm-up forwards, then alternates F, B (one forward then one
  backward), then the remaining backwards, then ``U t+1``. Versions as gpipe.
- ``pipedream`` (async 1F1B, weight stashing, no flush): the micro-batches of
  all steps stream through one 1F1B pipeline: stage s runs w warm-up forwards,
  then alternates B, F (backward of the oldest, forward of the next), then
  drains. After every ``accumulate``-th B (counted from micro-batch 0) it runs
  ``U``. F k uses the latest version at that point,
  ``floor(max(0, k - w + 1) / accumulate)``; B k uses F k's version.
- ``2bw`` (PipeDream-2BW): the same async 1F1B order; ``U`` after the last B of
  every mini-batch of m >= p micro-batches; every micro-batch of mini-batch t
  uses version ``max(0, t - 1)`` (delay 1: W(t+1) = W(t) - lr * grad f(W(t-1))).
  At most two versions are live per stage.

A CHECKPOINT action with cut K sits on every stage right after the B of
micro-batch K - 1 and the U that follows it (if any): the stage state there
(retained weight versions, optimizer state, gradient accumulator) plus the
data cursor K is enough to rebuild the run from K. A schedule built with
``first_microbatch=K`` is that rebuilt run: it starts with the versions in
``initial_versions`` and re-runs the forwards of micro-batches >= K that were
in flight at the cut; every F/B/U carries the same version as in the full run.

Communication actions are lowered in by the builders: ``RECV_F k`` just before
``F k`` (s > 0), ``SEND_F k`` just after it (s < p - 1), ``RECV_B k`` just
before ``B k`` (s < p - 1), ``SEND_B k`` just after it (s > 0).

A split backward (``split_positions``) does not change the schedule: a B that
runs split computes the input gradient, its SEND_B goes out, and the weight
gradients follow before the stage's next action.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from pipetrain.errors import PipetrainError
from pipetrain.schedule.actions import BEFORE_UPDATE, COMPUTE, Action, Kind


class ScheduleError(PipetrainError, ValueError):
    """A schedule request or a schedule that breaks the rules; the message names the field or action."""

SCHEDULES = ("gpipe", "1f1b", "pipedream", "2bw")
FLUSH_SCHEDULES = ("gpipe", "1f1b")
SPLIT_POLICIES = ("never", "always", "auto")


@dataclass(frozen=True)
class Schedule:
    name: str
    num_stages: int
    microbatches_per_step: int
    steps: int
    accumulate: int
    checkpoint_every: int | None
    first_microbatch: int
    actions: tuple[tuple[Action, ...], ...]
    initial_versions: tuple[tuple[int, ...], ...]

    @property
    def total_microbatches(self) -> int:
        return self.steps * self.microbatches_per_step

    @property
    def is_flush(self) -> bool:
        return self.name in FLUSH_SCHEDULES

    def stage_actions(self, stage: int) -> tuple[Action, ...]:
        return self.actions[stage]

    def last_use(self, stage: int) -> dict[int, int]:
        """Version -> index of the last action of ``stage`` that reads it.

        An executor may drop a version once that action ran, unless it is the
        stage's latest version (the next UPDATE reads it).
        """
        last: dict[int, int] = {}
        for i, a in enumerate(self.actions[stage]):
            if a.kind in (Kind.FORWARD, Kind.BACKWARD):
                last[a.version] = i
        return last

    def delays(self, stage: int) -> dict[int, int]:
        """Micro-batch k -> its delay on ``stage``: how many updates separate the
        version F k and B k read from the version the U after B k starts from,
        the one its gradient is applied to (what a delay correction needs).
        0 throughout gpipe and 1f1b; pipedream's is p - s - 1 in steady state
        (``accumulate`` 1), 2bw's 1 from the second mini-batch on. A B that no
        U follows counts the updates to the end of the schedule."""
        latest = max(self.initial_versions[stage])
        waiting: list[Action] = []
        out: dict[int, int] = {}
        for a in self.actions[stage]:
            if a.kind is Kind.BACKWARD:
                waiting.append(a)
            elif a.kind is Kind.UPDATE:
                out.update({b.k: latest - b.version for b in waiting})
                waiting, latest = [], a.version
        out.update({b.k: latest - b.version for b in waiting})
        return out

    def split_positions(self, stage: int, policy: str) -> frozenset[int]:
        """Positions of ``stage``'s B actions that run split under ``policy``:
        "always", every B followed by its SEND_B; "auto", those of them whose
        next computation is a flush schedule's UPDATE (the previous stage waits
        for that gradient to end its step; elsewhere both stages have work and
        a split only adds its cost); "never", none."""
        if policy not in SPLIT_POLICIES:
            raise ValueError(f"split_backward policy must be one of {SPLIT_POLICIES}, got {policy!r}")
        if policy == "never" or (policy == "auto" and not self.is_flush):
            return frozenset()
        actions, split = self.actions[stage], set()
        for i, a in enumerate(actions[:-1]):
            after = actions[i + 1]
            if a.kind is not Kind.BACKWARD or after.kind is not Kind.SEND_GRAD or after.k != a.k:
                continue
            if policy == "always" or _next_computation(actions, i + 2) is Kind.UPDATE:
                split.add(i)
        return frozenset(split)

    def checkpoint_cuts(self) -> tuple[int, ...]:
        return tuple(a.k for a in self.actions[0] if a.kind is Kind.CHECKPOINT)

    def cut_points(self, stage: int) -> dict[int, int]:
        """Where on ``stage`` each unscheduled cut K is consistent: the position in its
        action list after the B of K - 1 and the U that follows it, if one does (the
        point a scheduled CHECKPOINT K occupies). For checkpoints at cuts the driver
        picks while the job runs (time-based); scheduled cuts have their CHECKPOINT."""
        actions = self.actions[stage]
        scheduled = {a.k for a in actions if a.kind is Kind.CHECKPOINT}
        points = {}
        for i, a in enumerate(actions):
            if a.kind is not Kind.BACKWARD or a.k + 1 in scheduled:
                continue
            point = i
            for j in range(i + 1, len(actions)):
                if actions[j].kind is Kind.UPDATE:
                    point = j
                if actions[j].kind not in (Kind.SEND_GRAD, Kind.UPDATE, *BEFORE_UPDATE):
                    break
            points[a.k + 1] = point
        return points


def _next_computation(actions: tuple[Action, ...], position: int) -> Kind | None:
    """The kind of the first F, B or U at or after ``position``."""
    for a in itertools.islice(actions, position, None):
        if a.kind in COMPUTE or a.kind is Kind.UPDATE:
            return a.kind
    return None


def bubble_fraction_formula(name: str, p: int, m: int) -> float:
    """The idle share of a flush schedule with uniform costs: (p - 1) / (m + p - 1)."""
    if name not in FLUSH_SCHEDULES:
        raise ScheduleError(f"name: the bubble formula is for {', '.join(FLUSH_SCHEDULES)}; "
                            f"{name!r} has none (simulate it)")
    if p < 1 or m < 1:
        raise ScheduleError(f"p and m must be >= 1, got p={p}, m={m}")
    return (p - 1) / (m + p - 1)

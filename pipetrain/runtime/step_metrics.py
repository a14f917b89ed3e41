"""The optimizer's figures of a step record: the LR and the gradient norm of the
update that closed the step. Pure (no clock, no I/O), shared by the job core's
``StepBook`` and the reference executor's records, so both log the same numbers.

- ``lr``: ``pipetrain.optim.lr_at`` of that update's count, from the schedule
  alone (deterministic: no stage needs to report it). The update closing step t
  produces version (t + 1) * microbatches / microbatches_per_update: step t + 1
  under gpipe, 1f1b and 2bw, (t + 1) * m / accumulate under pipedream.
- ``grad_norm``: only with clipping (the norm actions compute it,
  schedule/norms.py): the global norm the stages clipped that update by, or
  under pipedream, where each stage clips by its own norm, the root of the sum
  of the stages' squared norms for that update (the same micro-batches' gradients,
  each at the weights its stage used). A step's record waits for the norms of
  its update, which the stages report with their next step report or flush.
"""
from __future__ import annotations

import math
from typing import Any

__all__ = ["StepOptimizerMetrics"]


class StepOptimizerMetrics:
    def __init__(self, *, optimizer: Any, schedule: Any, num_stages: int, replicas: int = 1):
        """``schedule``: the job's ``ScheduleSpec``; ``optimizer``: a pipetrain Optimizer (else no LR is logged)."""
        from pipetrain.optim import Optimizer
        from pipetrain.schedule.norms import is_global

        self.p, self.m, self.per_update = num_stages, schedule.microbatches, schedule.microbatches_per_update
        self.replicas = replicas  # versions count each replica's micro-batches; cuts are the job's
        self.optimizer = optimizer if isinstance(optimizer, Optimizer) else None
        self.clip = "off" if not schedule.clip else ("global" if is_global(schedule.name) else "local")
        self.norms: dict[tuple[int, int], float] = {}  # (stage, version) -> the norm that update clipped by

    def version_closing(self, step: int) -> int:
        return (step + 1) * self.m // self.per_update

    def add_norms(self, stage: int, norms: dict[int, float]) -> None:
        self.norms.update({(stage, int(v)): float(n) for v, n in norms.items()})

    def ready(self, step: int) -> bool:
        """Whether every figure of ``step`` is known (its update's norms reported)."""
        v = self.version_closing(step)
        if self.clip == "global":  # every stage clipped by the same norm: the last stage's says it
            return (self.p - 1, v) in self.norms
        return self.clip == "off" or all((s, v) in self.norms for s in range(self.p))

    def fields(self, step: int, *, known_only: bool = False) -> dict[str, float | None]:
        """The figures of ``step``'s record; ``known_only``: a norm not reported is None (a step
        closed at a rollback, ``StepBook.forget_from``), else it must be there (``ready``)."""
        from pipetrain.optim import lr_at

        v = self.version_closing(step)
        lr = lr_at(self.optimizer, v - 1) if self.optimizer is not None and v >= 1 else None
        norm = None
        if self.clip != "off" and (self.ready(step) or not known_only):
            norm = (self.norms[self.p - 1, v] if self.clip == "global"  # every stage clipped by this one
                    else math.sqrt(sum(self.norms[s, v] ** 2 for s in range(self.p))))
        self.norms = {key: n for key, n in self.norms.items() if key[1] > v}  # (pipedream: every update's)
        return {"lr": lr, "grad_norm": norm}

    def forget_from(self, cut: int) -> None:
        """After a rollback to ``cut``, the updates after it run (and report) again."""
        first = cut // self.replicas // self.per_update
        self.norms = {key: n for key, n in self.norms.items() if key[1] <= first}

"""The job core's bookkeeping while a generation runs: step records assembled
from the stages' reports, and the time-based checkpoint requests. Pure: no
clock, no I/O (the core hands in the times its events carry)."""
from __future__ import annotations


from typing import Any

import numpy as np

from pipetrain.observe.records import CheckpointMissedRecord, CheckpointRequestRecord, StepRecord
from pipetrain.runtime.core_events import CutMissed, Instruction, RequestCut, ShardWritten, StepReport, WriteRecord


class StepBook:
    """Collects per-stage step reports into one record per step."""

    def __init__(self, num_stages: int, microbatches: int, microbatch_size: int, *, metrics: Any = None):
        self.p, self.m, self.b = num_stages, microbatches, microbatch_size
        self.metrics = metrics  # the lr and grad_norm of each record (runtime/step_metrics.py); None: not logged
        self.reports: dict[int, dict[int, dict]] = {}
        self.losses: dict[int, float] = {}
        self.emitted: set[int] = set()
        self.last_stage0_time: float | None = None

    def add(self, message: dict) -> list[StepRecord]:
        self.losses.update({int(k): float(v) for k, v in message.get("losses", {}).items()})
        if self.metrics is not None:
            self.metrics.add_norms(message["stage"], message.get("grad_norms", {}))
        step = message["step"]
        if step >= 0:
            self.reports.setdefault(step, {})[message["stage"]] = message
        ready = []
        for t in sorted(self.reports):
            if t in self.emitted or len(self.reports[t]) < self.p:
                continue
            if self.metrics is not None and not self.metrics.ready(t):
                break  # in step order: a later step waits for this one's update norms
            ready.append(self._record(t))
            self.emitted.add(t)
        return ready

    def _record(self, t: int) -> StepRecord:
        per_stage = self.reports.pop(t)
        first = per_stage[0]
        rate = None
        if self.last_stage0_time is not None and first["time"] > self.last_stage0_time:
            rate = self.m * self.b / (first["time"] - self.last_stage0_time)
        self.last_stage0_time = first["time"]
        busy = [per_stage[s]["busy"] / per_stage[s]["wall"] if per_stage[s]["wall"] > 0 else 0.0
                for s in range(self.p)]
        extra = self.metrics.fields(t) if self.metrics is not None else {}
        return StepRecord(step=t, loss=self._mean_loss(t), samples_per_s=rate, busy=busy, stage0_done=first["time"],
                          **extra)

    def _mean_loss(self, t: int) -> float | None:
        """The mean of step ``t``'s micro-batch losses known so far; None if none is."""
        losses = [self.losses[k] for k in range(t * self.m, (t + 1) * self.m) if k in self.losses]
        return float(np.mean(losses)) if losses else None

    def forget_from(self, cut: int, committed_losses: dict[int, float] | None = None) -> list[StepRecord]:
        """After a rollback to ``cut``, those micro-batches run again. Returns the records of the
        steps before the cut that were not emitted, closed now: no stage reports them again (the
        checkpoint holds their work), and one left open would hold back every later record (a
        record waits for its update's norms, which the stages send with their next report). Their
        losses come from the checkpoint (``committed_losses``, its manifest's) and the reports
        that came; what only the lost reports held (rate, busy shares, a norm) stays out."""
        first_step = cut // self.m
        self.losses = {k: v for k, v in self.losses.items() if k < cut}
        self.losses.update({int(k): float(v) for k, v in (committed_losses or {}).items() if int(k) < cut})
        closed = [self._close(t) for t in range(first_step) if t not in self.emitted]
        self.emitted = {t for t in self.emitted if t < first_step} | {r.step for r in closed}
        self.reports = {t: r for t, r in self.reports.items() if t < first_step}
        self.last_stage0_time = None
        if self.metrics is not None:
            self.metrics.forget_from(cut)
        return closed

    def _close(self, t: int) -> StepRecord:
        """Step ``t``'s record from what is known of it (``forget_from``)."""
        per_stage = self.reports.pop(t, {})
        extra = self.metrics.fields(t, known_only=True) if self.metrics is not None else {}
        return StepRecord(step=t, loss=self._mean_loss(t), samples_per_s=None, busy=[],
                          stage0_done=per_stage[0]["time"] if 0 in per_stage else None, **extra)

    def restore(self, losses: dict[int, float], cut: int) -> list[dict]:
        """A resumed job: the losses before ``cut`` come from the checkpoint manifest;
        returns the history entries of the steps the checkpoint completed (marked "restored"),
        which are not written to the metrics log again."""
        self.losses = {k: v for k, v in losses.items() if k < cut}
        records = []
        for t in range(cut // self.m):
            records.append({"type": "step", "step": t, "loss": self._mean_loss(t), "samples_per_s": None,
                            "busy": [], "restored": True})
            self.emitted.add(t)
        return records


class CutTimer:
    """Time-based checkpoints: which cut to ask for, and when.

    A cut must be one every stage reaches after it hears of it, so K lies about
    ``LEAD_SECONDS`` (and at least two steps) past the furthest step any stage
    reported. A stage that heard too late says so ("missed") and the cut is
    asked again later. Which cuts get taken depends on timing; the numbers never do.
    """

    # Reports reach the driver late and stages see a request only at their next poll.
    LEAD_SECONDS = 1.0

    def __init__(self, every_seconds: float, microbatches: int, steps: int, now: float):
        self.every, self.m, self.steps = every_seconds, microbatches, steps
        self.last = now
        self.furthest_step, self.furthest_at = -1, 0.0
        self.step_seconds = 0.0  # the latest pace, from the furthest stage's reports
        self.pending: int | None = None

    def heard_step(self, report: StepReport) -> None:
        if report.step > self.furthest_step:
            if self.furthest_step >= 0:
                self.step_seconds = (report.time - self.furthest_at) / (report.step - self.furthest_step)
            self.furthest_step, self.furthest_at = report.step, report.time

    def heard_missed(self, report: CutMissed) -> list[Instruction]:
        if report.cut != self.pending:
            return []
        self.pending = None
        return [WriteRecord(CheckpointMissedRecord(cut=report.cut, stage=report.stage))]

    def heard_shard(self, report: ShardWritten) -> None:
        if report.stage == 0:  # stage 0 is the last to pass any cut: its shard marks the cut done
            self.last = report.now
            if report.cut == self.pending:
                self.pending = None

    def due(self, now: float, generation: int) -> list[Instruction]:
        if not self.every or self.pending is not None or self.furthest_step < 0 or now - self.last < self.every:
            return []
        lead = 2 + (int(self.LEAD_SECONDS / self.step_seconds) if self.step_seconds > 0 else 0)
        cut = (self.furthest_step + 1 + lead) * self.m
        if cut >= self.steps * self.m:
            return []
        self.pending = cut
        return [RequestCut(cut, generation),
                WriteRecord(CheckpointRequestRecord(cut=cut, furthest_step=self.furthest_step))]

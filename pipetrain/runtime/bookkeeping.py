"""The driver's bookkeeping while a generation runs: step records assembled
from the stages' reports, and the time-based checkpoint requests."""
from __future__ import annotations

import time
from typing import Any

import numpy as np


class StepBook:
    """Collects per-stage step reports into one record per step."""

    def __init__(self, num_stages: int, microbatches: int, microbatch_size: int):
        self.p, self.m, self.b = num_stages, microbatches, microbatch_size
        self.reports: dict[int, dict[int, dict]] = {}
        self.losses: dict[int, float] = {}
        self.emitted: set[int] = set()
        self.last_stage0_time: float | None = None

    def add(self, message: dict) -> list[dict]:
        self.losses.update({int(k): float(v) for k, v in message.get("losses", {}).items()})
        step = message["step"]
        if step < 0:
            return []
        self.reports.setdefault(step, {})[message["stage"]] = message
        ready = []
        for t in sorted(self.reports):
            if t in self.emitted or len(self.reports[t]) < self.p:
                continue
            ready.append(self._record(t))
            self.emitted.add(t)
        return ready

    def _record(self, t: int) -> dict:
        per_stage = self.reports.pop(t)
        ks = range(t * self.m, (t + 1) * self.m)
        losses = [self.losses[k] for k in ks if k in self.losses]
        first = per_stage[0]
        rate = None
        if self.last_stage0_time is not None and first["time"] > self.last_stage0_time:
            rate = self.m * self.b / (first["time"] - self.last_stage0_time)
        self.last_stage0_time = first["time"]
        busy = [per_stage[s]["busy"] / per_stage[s]["wall"] if per_stage[s]["wall"] > 0 else 0.0
                for s in range(self.p)]
        return {"type": "step", "step": t, "loss": float(np.mean(losses)) if losses else None,
                "samples_per_s": rate, "busy": busy, "stage0_done": first["time"]}

    def forget_from(self, cut: int) -> None:
        """After a rollback to ``cut``, those micro-batches run again."""
        self.losses = {k: v for k, v in self.losses.items() if k < cut}
        first_step = cut // self.m
        self.emitted = {t for t in self.emitted if t < first_step}
        self.reports = {t: r for t, r in self.reports.items() if t < first_step}
        self.last_stage0_time = None

    def restore(self, losses: dict[int, float], cut: int) -> list[dict]:
        """A resumed job: the losses before ``cut`` come from the checkpoint manifest;
        returns the step records of the steps the checkpoint completed."""
        self.losses = {k: v for k, v in losses.items() if k < cut}
        records = []
        for t in range(cut // self.m):
            ks = range(t * self.m, (t + 1) * self.m)
            values = [self.losses[k] for k in ks if k in self.losses]
            records.append({"type": "step", "step": t, "loss": float(np.mean(values)) if values else None,
                            "samples_per_s": None, "busy": [], "restored": True})
            self.emitted.add(t)
        return records


class TimedCheckpoints:
    """Checkpoints every ``checkpoint_seconds`` as well as every N micro-batches.

    A cut must be one every stage reaches after it hears of it, so the driver
    picks K about a second (and at least two steps) past the furthest step any
    stage reported, and asks for it on the control plane; each stage snapshots right after its B of K - 1
    (and the U that follows), the point a scheduled CHECKPOINT K occupies. A
    stage that heard too late says so and the driver asks again later. Which
    cuts get taken depends on timing; the numbers never do.
    """

    def __init__(self, plan: Any, client: Any, control: Any, metrics: Any):
        self.plan, self.client, self.control, self.metrics = plan, client, control, metrics
        self.last = time.time()
        self.furthest_step = -1
        self.step_seconds = 0.0  # the latest pace, from the furthest stage's reports
        self._furthest_at = 0.0
        self.pending: int | None = None

    # Reports reach the driver late and stages see a request only at their
    # next poll: the cut must lie this far ahead of what the driver knows.
    LEAD_SECONDS = 1.0

    def heard(self, message: dict) -> None:
        kind = message["type"]
        if kind == "step" and message["step"] > self.furthest_step:
            if self.furthest_step >= 0:
                steps = message["step"] - self.furthest_step
                self.step_seconds = (message["time"] - self._furthest_at) / steps
            self.furthest_step, self._furthest_at = message["step"], message["time"]
        elif kind == "missed" and message["cut"] == self.pending:
            self.metrics.write({"type": "checkpoint-missed", "cut": message["cut"], "stage": message["stage"]})
            self.pending = None
        elif kind == "shard" and message["stage"] == 0:
            # Stage 0 is the last to pass any cut: its shard marks the cut done.
            self.last = time.time()
            if message["cut"] == self.pending:
                self.pending = None

    def maybe_request(self) -> None:
        seconds = self.plan.checkpoint_seconds
        if not seconds or self.plan.checkpoint_url is None or self.pending is not None or self.furthest_step < 0:
            return
        if time.time() - self.last < seconds:
            return
        lead = 2 + (int(self.LEAD_SECONDS / self.step_seconds) if self.step_seconds > 0 else 0)
        cut = (self.furthest_step + 1 + lead) * self.plan.microbatches
        if cut >= self.plan.steps * self.plan.microbatches:
            return
        self.pending = cut
        self.control.request_checkpoint(self.client, cut)
        self.metrics.write({"type": "checkpoint-request", "cut": cut, "furthest_step": self.furthest_step})

"""One stage of a job, running as one long-running task on its Dask worker.

The task thread is the stage's compute thread: it interprets the stage's
action list (``StageProgram``) while the transport's event loop moves bytes.
Reports and checkpoint writes leave through the courier thread, so compute
never waits on the scheduler or the disk. The task returns the stage's final
state and its timeline events.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipetrain.runtime.control import ControlNames, StageControl
from pipetrain.runtime.interpreter import Hooks, StageProgram
from pipetrain.schedule.actions import Action, Kind
from pipetrain.stages.base import StageSpec


@dataclass(frozen=True)
class StageJob:
    """Everything a worker needs to run one stage (shipped with the task)."""

    job_id: str
    generation: int
    spec: StageSpec
    model: Any
    optimizer: Any
    schedule_args: dict
    source: Any
    checkpoint_url: str | None = None
    resume_cut: int | None = None
    credits: int = 0
    connect_timeout: float = 60.0
    input_specs: Any = None  # expected boundary specs from the partition, if known
    security: Any = None
    max_events: int = 200_000


class _Reporter(Hooks):
    """Turns the program's callbacks into reports, events and checkpoints."""

    def __init__(self, job: StageJob, control: StageControl, store: Any):
        self.job, self.control, self.store = job, control, store
        self.m = job.schedule_args["microbatches"]
        self.stage = job.spec.index
        self.losses: dict[int, float] = {}
        self.busy = 0.0
        self.window_start = time.time()
        self.events: list[tuple] = []

    def on_loss(self, k: int, loss: float) -> None:
        self.losses[k] = loss

    def on_action(self, action: Action, start: float, end: float) -> None:
        if action.kind in (Kind.FORWARD, Kind.BACKWARD, Kind.UPDATE):
            self.busy += end - start
        if len(self.events) < self.job.max_events:
            self.events.append((action.kind.value, -1 if action.k is None else action.k,
                                -1 if action.version is None else action.version, start, end))
        if action.kind is Kind.BACKWARD and action.k % self.m == self.m - 1:
            self._report_step(action.k // self.m, end)

    def _report_step(self, step: int, now: float) -> None:
        wall = now - self.window_start
        message = {"type": "step", "stage": self.stage, "step": step, "busy": self.busy, "wall": wall,
                   "time": time.time()}
        if self.losses:
            message["losses"] = self.losses
            self.losses = {}
        self.control.report(message)
        self.busy, self.window_start = 0.0, now

    def on_checkpoint(self, cut: int, stage: Any) -> None:
        if self.store is None:
            return
        # The snapshot is taken here, between micro-batches; the write happens
        # on the courier thread while compute goes on.
        snapshot = {name: np.array(value, copy=True) for name, value in stage.state_dict().items()}
        self.control.call_in_courier(self._write, cut, snapshot)

    def _write(self, cut: int, snapshot: dict) -> dict:
        started = time.perf_counter()
        record = self.store.write_shard(cut, self.stage, snapshot, generation=self.job.generation,
                                        meta={"stage": self.stage})
        return {"type": "shard", "stage": self.stage, "cut": cut, "record": record.to_dict(),
                "seconds": time.perf_counter() - started}


def run_stage(job: StageJob) -> dict:
    """The body of a stage task. Returns {"state": ..., "events": ...}."""
    from pipetrain.runtime.links import open_links
    from pipetrain.schedule.builders import build_schedule

    started = time.time()
    control = StageControl(ControlNames(job.job_id, job.generation))
    store = None
    if job.checkpoint_url:
        from pipetrain.checkpoint.store import CheckpointStore

        store = CheckpointStore(job.checkpoint_url)
    try:
        schedule = build_schedule(**job.schedule_args)
        stage = job.model.build_stage(job.spec, optimizer=job.optimizer)
        if job.resume_cut:
            stage.load_state_dict(store.load_shard(job.resume_cut, job.spec.index))
        reporter = _Reporter(job, control, store)
        with open_links(job, control) as links:
            control.report({"type": "ready", "stage": job.spec.index, "seconds": time.time() - started})
            StageProgram(stage, schedule, source=job.source, links=links, hooks=reporter, clock=time.time).run_all()
            if reporter.losses:
                control.report({"type": "step", "stage": job.spec.index, "step": -1, "busy": 0.0, "wall": 0.0,
                                "time": time.time(), "losses": reporter.losses})
        control.report({"type": "done", "stage": job.spec.index, "seconds": time.time() - started})
    finally:
        control.close()
    return {"state": stage.state_dict(), "events": np.array(reporter.events, dtype=_EVENT_DTYPE)}


_EVENT_DTYPE = np.dtype([("kind", "U6"), ("k", "i8"), ("version", "i8"), ("start", "f8"), ("end", "f8")])

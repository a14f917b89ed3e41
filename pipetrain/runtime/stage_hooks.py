"""What a stage on its worker does around its schedule's actions, in small parts.

``StageHooks`` is the ``interpreter.Hooks`` a Dask stage runs with. It only
routes each callback to the part that owns the concern:

- ``Ledger``: the exactly-once evidence (DESIGN.md section 2): in the order
  they were applied, the micro-batch ids whose gradients each UPDATE folded
  into the weights, plus those accumulated since. It travels with the state:
  a checkpoint's shard record carries the ledger at its cut, and a stage
  resumed from that cut starts from it.
- ``StepMeter``: busy time, losses and the per-step report to the driver
  (and the worker's dashboard gauges).
- ``Timeline``: the stage's timeline events, bounded.
- ``RequestedCuts``: time-based checkpoints, at the cuts the driver asks for;
  where each cut sits in the action list is the schedule's to say
  (``Schedule.cut_points``).
- ``ShardWriter``: a checkpoint's snapshot on the compute thread, its write
  on the courier thread, and the report of either outcome.

Replicated pipelines (``schedule/replicas.py``): the stage's schedule counts its
replica's local micro-batches, while what it tells the driver is in the job's
ids (``k * replicas + replica``; a cut K is the job's cut ``K * replicas``), so
the driver and the checkpoints see one job whatever its replicas. The ledger
records the job's ids: at each update, every replica's (``Hooks.on_reduced``,
from the parts the sum was made of). Only replica 0 writes checkpoint shards
(its replicas hold the same state at every cut) and reports gradient norms.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from pipetrain.errors import RetryableError, short_error
from pipetrain.observe.timeline import EVENT_DTYPE
from pipetrain.runtime import messages as msg
from pipetrain.runtime.interpreter import Hooks
from pipetrain.schedule.actions import Action, Kind


class StopRequested(RetryableError, RuntimeError):
    """The driver stopped this generation; raised between actions."""


class Ledger:
    """Which micro-batch ids reached the weights, as runs ``[first, last + 1]`` in order."""

    def __init__(self, saved: dict | None = None):
        saved = saved or {}
        self.applied: list[list[int]] = [list(run) for run in saved.get("applied", [])]
        self.pending: list[int] = list(saved.get("pending", []))

    def backward(self, k: int) -> None:
        self.pending.append(k)

    def update(self) -> None:
        for k in self.pending:
            if self.applied and self.applied[-1][1] == k:
                self.applied[-1][1] = k + 1
            else:
                self.applied.append([k, k + 1])
        self.pending = []

    def to_dict(self) -> dict:
        return {"applied": [list(run) for run in self.applied], "pending": list(self.pending)}


class Timeline:
    """The stage's timeline events (observe/timeline.py), at most ``limit`` of them."""

    def __init__(self, limit: int):
        self.limit = limit
        self.events: list[tuple] = []

    def record(self, kind: str, k: int | None, version: int | None, start: float, end: float) -> None:
        if len(self.events) < self.limit:
            self.events.append((kind, -1 if k is None else k, -1 if version is None else version, start, end))

    def array(self) -> np.ndarray:
        return np.array(self.events, dtype=EVENT_DTYPE)


class StepMeter:
    """Busy time and losses over each step, reported when the step's last backward is done."""

    def __init__(self, generation: int, stage: int, microbatches: int, control: Any, gauges: Any = None):
        self.generation, self.stage, self.m = generation, stage, microbatches
        self.control, self.gauges = control, gauges
        self.losses: dict[int, float] = {}
        self.grad_norms: dict[int, float] = {}  # clipping: version -> norm, reported with the next report
        self.busy = 0.0
        self.window_start = time.time()
        self.latest_version = self.staleness = self.received = 0
        self.endpoint: Any = None  # set once the links are open (queued-message gauge)

    def step_done(self, step: int, now: float) -> None:
        wall = now - self.window_start
        self.control.report(msg.StepReport(self.generation, self.stage, step=step, busy=self.busy, wall=wall,
                                           time=time.time(), losses=self.losses, grad_norms=self.grad_norms))
        self.losses, self.grad_norms = {}, {}
        if self.gauges is not None:
            self.gauges.update(microbatches_per_s=self.m / wall if wall > 0 else 0.0,
                               busy=self.busy / wall if wall > 0 else 0.0,
                               queued=self._queued(), staleness=self.staleness)
        self.busy, self.window_start = 0.0, now

    def flush_losses(self) -> None:
        """Send the losses not reported yet (the last stage, before a shard and at the end)."""
        if self.losses or self.grad_norms:
            self.control.report(msg.StepReport(self.generation, self.stage, step=-1, busy=0.0, wall=0.0,
                                               time=time.time(), losses=self.losses, grad_norms=self.grad_norms))
            self.losses, self.grad_norms = {}, {}

    def _queued(self) -> int:
        if self.endpoint is None:
            return 0
        stats = self.endpoint.stats
        return max(0, stats["received"] - stats["dropped_stale"] - self.received)


class ShardWriter:
    """A checkpoint of this stage: snapshot now, write on the courier thread, report the outcome."""

    def __init__(self, generation: int, stage: int, store: Any, control: Any, worker: str):
        self.generation, self.stage, self.store, self.control, self.worker = generation, stage, store, control, worker

    def checkpoint(self, cut: int, stage_object: Any, ledger: Ledger) -> None:
        # The snapshot is taken here, between micro-batches; the write happens
        # on the courier thread while compute goes on.
        snapshot = {name: np.array(value, copy=True) for name, value in stage_object.state_dict().items()}
        self.control.call_in_courier(self._write, cut, snapshot, ledger.to_dict())

    def _write(self, cut: int, snapshot: dict, ledger: dict) -> msg.Report:
        started = time.perf_counter()
        try:
            record = self.store.write_shard(cut, self.stage, snapshot, generation=self.generation,
                                            meta={"stage": self.stage, "ledger": ledger})
        except OSError as error:
            # The driver stops the job on this report: a restart would write here again.
            return msg.CourierError(self.generation, self.stage, worker=self.worker, cut=cut,
                                    error=f"stage {self.stage} could not write its checkpoint shard for cut {cut} "
                                          f"under {self.store.url}: {short_error(error)}")
        return msg.ShardWritten(self.generation, self.stage, cut=cut, record=record.to_dict(),
                                seconds=time.perf_counter() - started)


class RequestedCuts:
    """Time-based checkpoints: the cut the driver asked for is taken when the stage's
    action cursor reaches the cut's point, or reported missed if it is already past."""

    def __init__(self, cut_points: dict[int, int]):
        self.cut_points = cut_points  # cut -> the action after which the stage is consistent there
        self.position = -1
        self.handled: set[int] = set()

    def advance(self, requested: int | None) -> tuple[str, int] | None:
        """Move past one action; ("take", cut) or ("missed", cut) when a request is due."""
        self.position += 1
        if requested is None or requested in self.handled or requested not in self.cut_points:
            return None
        point = self.cut_points[requested]
        if self.position < point:
            return None
        self.handled.add(requested)
        return ("take" if self.position == point else "missed"), requested


class StageHooks(Hooks):
    """Routes the program's callbacks to the parts above; raises StopRequested between
    actions once the driver's stop is seen (a local flag: cheap after every action)."""

    def __init__(self, job: Any, control: Any, store: Any, *, stage_object: Any, cut_points: dict[int, int],
                 worker: str, gauges: Any = None):
        self.stage, self.m, self.is_last = job.task, job.schedule.microbatches, job.spec.is_last
        self.replica, self.replicas = job.replica, job.replicas
        self.generation, self.control, self.stage_object = job.generation, control, stage_object
        self.ledger = Ledger(job.resume_ledger)
        self.timeline = Timeline(job.max_events)
        self.meter = StepMeter(job.generation, self.stage, self.m, control, gauges)
        writes = store is not None and job.replica == 0
        self.writer = ShardWriter(job.generation, job.spec.index, store, control, worker) if writes else None
        self.cuts = RequestedCuts({cut * self.replicas: point for cut, point in cut_points.items()})
        self.first_backward_reported = False

    def on_loss(self, k: int, loss: float) -> None:
        self.meter.losses[k] = loss

    def on_grad_norm(self, version: int, norm: float, *, stage: int) -> None:
        if self.replica == 0:  # (the replicas clip by the same norm)
            self.meter.grad_norms[version] = norm

    def on_reduced(self, version: int, ids: list[int]) -> None:
        self.ledger.pending = list(ids)

    def on_eval(self, step: int, loss: float) -> None:
        self.control.report(msg.EvalReport(self.generation, self.stage, step=step, loss=loss))

    def on_weights(self, k: int, version: int, start: float, end: float) -> None:
        # Work, not an action of the schedule: an event and busy time, but no
        # move of the action cursor (checkpoint cuts are positions in the list).
        self.meter.busy += end - start
        self.timeline.record("W", k, version, start, end)

    def on_action(self, action: Action, start: float, end: float) -> None:
        kind, meter = action.kind, self.meter
        if kind in (Kind.FORWARD, Kind.BACKWARD, Kind.UPDATE, Kind.EVAL_F, Kind.REDUCE):
            meter.busy += end - start
        self.timeline.record(kind.value, action.k, action.version, start, end)
        if kind is Kind.FORWARD:
            meter.staleness = max(0, meter.latest_version - action.version)
        elif kind is Kind.BACKWARD:
            self.ledger.backward(action.k * self.replicas + self.replica)
            if not self.first_backward_reported:
                self.first_backward_reported = True
                self.control.report(msg.FirstBackward(self.generation, self.stage, k=action.k, time=time.time()))
            if action.k % self.m == self.m - 1:
                meter.step_done(action.k // self.m, end)
        elif kind is Kind.UPDATE:
            self.ledger.update()
            meter.latest_version = action.version
        elif kind in (Kind.RECV_ACT, Kind.RECV_GRAD, Kind.RECV_EVAL):
            meter.received += 1
        due = self.cuts.advance(self.control.requested_cut if self.writer is not None else None)
        if due is not None:
            what, cut = due
            if what == "take":
                self._checkpoint(cut)
            else:  # heard of it too late: the driver drops this cut and asks again later
                self.control.report(msg.CutMissed(self.generation, self.stage, cut=cut))
        if self.control.stopped():
            raise StopRequested(f"stage {self.stage}: stopped by the driver after {action!r}")

    def on_checkpoint(self, cut: int, stage: Any) -> None:
        self._checkpoint(cut * self.replicas)  # the schedule's cut, as the job's

    def _checkpoint(self, cut: int) -> None:
        """A checkpoint at the job's cut ``cut``."""
        # Losses before the cut reach the driver before this shard does, so the
        # manifest it commits can carry the loss history up to the cut (another
        # replica's last stage sends its own at the same point of its schedule).
        if self.is_last:
            self.meter.flush_losses()
        if self.writer is None:
            return
        self.writer.checkpoint(cut, self.stage_object, self.ledger)

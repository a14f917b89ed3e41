"""The job core: every decision of the driver, and none of its I/O.

In the manner of distributed's worker state machine: ``JobCore.handle(*events)``
takes typed events (``core_events``) and returns the instructions the shell
must carry out, in order. It never calls the scheduler, the store or a clock,
so recovery, rollback and timed checkpoints are tested by playing events.

A generation goes: ``Place`` -> ``Placed`` -> ``Submit`` -> running (reports,
task ends, worker lists, ticks) -> either ``Finish``, or a loss: ``StopGeneration``
-> ``StopFinished`` -> ``ReadLatestCheckpoint`` -> ``LatestCheckpoint`` ->
``BeginGeneration`` (g + 1, fenced before anything records the recovery) and
the recovery record -> ``Place`` again. A job that cannot go on (a computation
error, an unwritable checkpoint, the restart bound, no workers, Ctrl-C, a lost
scheduler) takes the same road up to ``LatestCheckpoint``, which names the
place to resume from, and ends in ``Fail``.

Evaluation (``schedule/evaluation.py``): the last stage reports each eval
block's loss (``EvalReport``); the core logs the first report of each step
(an ``EvalRecord`` and the progress line) and keeps it across rollbacks. A
block re-run after a rollback (every eval after the cut, and the one at the
cut itself) reports the same value, bit for bit, and is not logged again.
A checkpoint's manifest carries the evals known at its commit (a scheduled
checkpoint's own cut's included: its eval block runs before the shard), so a
resumed job does not log them again and keeps the loss before training; one
it did not know (a time-based cut's) it logs again, with the same value.

Blame: a worker that left is the cause; its neighbours' lost peers or
failures are effects. A neighbour usually notices before the scheduler drops
the dead worker, so a failure or lost peer is blamed only once
``PEER_LOST_GRACE`` has passed without a worker leaving.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

from pipetrain.observe.records import (CheckpointRecord, ErrorRecord, EvalRecord, FailedRecord, InterruptedRecord,
                                       PlacementRecord, RecoveredRecord, RecoveryRecord, ResumeRecord)
from pipetrain.runtime.placement import merge_placement
from pipetrain.errors import (JobInterrupted, StageLost, cannot_write_checkpoints,
                              is_retryable, is_worker_death, short_error)
from pipetrain.runtime.bookkeeping import CutTimer, StepBook
from pipetrain.runtime.core_events import (BeginGeneration, CheckpointView, Commit, CommitDone,
                                           CommitFailed, CourierError, CutMissed, EvalReport, Event, Fail, Finish,
                                           FirstBackward, Instruction, Interrupted, JobSettings, LatestCheckpoint,
                                           Note, PeerLostReport, Place, Placed, PlacementFailed,
                                           ReadLatestCheckpoint, Report, SchedulerLost,
                                           ShardWritten, ShowEval, ShowStep, StageDone, StageReady, Started,
                                           StepReport,
                                           StopFinished, StopGeneration, StopOldRun, Submit, TaskEnded, Tick,
                                           WorkersChanged, WriteRecord)

# How long a failure or lost peer waits for the scheduler to drop a killed worker.
PEER_LOST_GRACE = 1.0
# How long a finished generation waits for the stages' "done" reports, after
# which every earlier report of theirs has arrived (they are sent before the task returns).
DONE_GRACE = 1.0
CHECKPOINT_FAILED = "a checkpoint could not be written, and a restart would write to the same place"


@dataclass
class _Generation:
    """What one generation's run has heard; replaced when the next one is submitted."""

    timer: CutTimer
    failed: dict[int, tuple[str, BaseException | None]] = field(default_factory=dict)  # stage -> reason, error
    peer_lost: dict[int, str] = field(default_factory=dict)  # stage -> the reason it reported
    blame_at: float | None = None  # when the grace for the suspects ends
    results: dict[int, dict] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)
    done_by: float | None = None
    shards: dict[int, dict[int, dict]] = field(default_factory=dict)  # cut -> stage -> shard record
    committing: set[int] = field(default_factory=set)
    ready: dict[int, StageReady] = field(default_factory=dict)


# How a job that cannot go on ends, given the checkpoint to resume from.
Ending = Callable[[CheckpointView | None], list[Instruction]]


class JobCore:
    def __init__(self, settings: JobSettings):
        self.settings = settings
        self.phase = "new"  # new | placing | running | stopping | finding | over
        self.generation, self.cut, self.ledgers = 0, 0, {}
        self.cut_replicas = settings.replicas  # the replicas that wrote the checkpoint at self.cut
        self.resumed_from = 0  # the cut this run's first generation started at
        self.placement: dict[int, str] = {}
        self.alive: set[str] = set()
        self.dead: set[str] = set()
        self.avoid: set[str] = set()
        self.restarts = 0
        self.book = StepBook(settings.num_tasks, settings.microbatches, settings.microbatch_size,
                             metrics=settings.step_metrics())
        self.history: list[dict] = []
        self.evals: dict[int, float] = {}  # step -> held-out loss after it, as first reported
        self.recoveries: list[dict] = []
        self.committed: CheckpointView | None = None  # the newest checkpoint known good, for a hurried end
        self.loss: StageLost | None = None
        self.ending: Ending | None = None  # set when the job ends instead of recovering
        self.interrupted = False
        self.run: _Generation | None = None
        self.started_at = self.stop_started = self.place_started = self.stop_seconds = 0.0

    def handle(self, *events: Event) -> list[Instruction]:
        out: list[Instruction] = []
        for event in events:
            if self.phase != "over":
                out += self._handle(event)
        return out

    @functools.singledispatchmethod
    def _handle(self, event: Event) -> list[Instruction]:
        raise TypeError(f"not an event of the job core: {event!r}")

    # -- starting -------------------------------------------------------------
    @_handle.register
    def _started(self, ev: Started) -> list[Instruction]:
        if self.phase != "new":
            return []
        s, self.started_at = self.settings, ev.now
        if ev.resume:
            return self._resume(ev)
        if s.store is None:
            return self._place(ev.now)
        # Whether a new run may start in this store was decided before it got here
        # (rundir.claim_checkpoints): it holds no step directory of another run.
        return [BeginGeneration(0, 0)] + self._place(ev.now)

    def _resume(self, ev: Started) -> list[Instruction]:
        s, latest, out = self.settings, ev.latest, []
        if s.store is None:
            return self._end(Fail("resume needs a checkpoint directory"))
        if ev.previous_generation is not None:
            # Stages of the run that stopped (its driver died) may still be going on their
            # workers: tell them to stop, so they free their workers' threads.
            for job_id in sorted({s.job_id, latest.job_id if latest else None} - {None}):
                out.append(StopOldRun(job_id, ev.previous_generation))
        self.generation = (ev.previous_generation or 0) + 1
        out += [Note(f"resume: checkpoint at micro-batch {cut} not used: {why}")
                for cut, why in (latest.skipped if latest else ())]
        if latest is None and ev.unusable:
            # Starting over would throw away the work they hold, and the discard would
            # delete the evidence: that is the user's call (`train --overwrite`).
            found = "; ".join(f"{path}: {reason}" for path, reason in ev.unusable)
            return out + self._end(Fail(
                f"resume: no checkpoint in {s.store} can be used, so the job stops here and keeps them all "
                f"({found}); `pipetrain train CONFIG --overwrite` starts the job over from the beginning"))
        if latest is None:
            out.append(Note("resume: no committed checkpoint found; starting from the beginning"))
        elif latest.cut % self.settings.cut_unit:
            return out + self._end(Fail(
                f"resume: the checkpoint at micro-batch {latest.cut} ({latest.path}, written by {latest.replicas} "
                f"replica(s)) is not a cut of {s.replicas} replica(s): their cuts are multiples of "
                f"{s.cut_unit} micro-batches (replicas x micro-batches per update); resume with replicas = "
                f"{latest.replicas}"))
        else:
            out.append(Note(f"resume: from the checkpoint at micro-batch {latest.cut} ({latest.path})"
                            + (f", written by {latest.replicas} replica(s), going on with {s.replicas}"
                               if latest.replicas != s.replicas else "")))
            self.history += self.book.restore(dict(latest.losses), latest.cut)
            self.evals.update(latest.evals)
            out.append(WriteRecord(ResumeRecord(generation=self.generation, rollback_to=latest.cut,
                                                checkpoint=latest.path)))
        self._start_from(latest)
        self.resumed_from = self.cut
        return out + [BeginGeneration(self.generation, self.cut)] + self._place(ev.now)

    def _start_from(self, latest: CheckpointView | None) -> None:
        self.cut = latest.cut if latest else 0
        self.ledgers = dict(latest.ledgers) if latest else {}
        self.committed = latest
        self.cut_replicas = latest.replicas if latest else self.settings.replicas

    def _place(self, now: float) -> list[Instruction]:
        self.phase, self.place_started = "placing", now
        return [Place(exclude=frozenset(self.dead | self.avoid), previous=dict(self.placement))]

    @_handle.register
    def _placed(self, ev: Placed) -> list[Instruction]:
        if self.phase != "placing":
            return []
        self.placement = placement = merge_placement(self.placement, dict(ev.placement), tuple(ev.spares))
        if self.restarts:
            self.recoveries[-1].update(place_seconds=ev.now - self.place_started, placed_at=ev.now,
                                       workers_after=dict(placement))
        self.alive |= set(placement.values())  # read from the scheduler after any worker list we hold
        s = self.settings
        self.run = _Generation(CutTimer(s.checkpoint_seconds if s.store else 0.0, s.microbatches, s.steps, ev.now))
        self.phase = "running"
        where = ", ".join(f"stage {stage} on {w}" for stage, w in placement.items())
        return [WriteRecord(PlacementRecord(generation=self.generation,
                                            workers={str(stage): w for stage, w in placement.items()},
                                            hosts={str(stage): _host(w) for stage, w in placement.items()})),
                Note(f"placement (generation {self.generation}): {where}"),
                Submit(self.generation, self.cut, dict(self.ledgers), dict(placement), self.cut_replicas)]

    @_handle.register
    def _placement_failed(self, ev: PlacementFailed) -> list[Instruction]:
        if self.phase != "placing":
            return []
        cause = self.loss or StageLost([], [], "no stage lost yet", worker_died=False, detected_at=ev.now)
        return self._end_with(functools.partial(self._failed, cause, f"no workers to place the stages on:\n"
                                                                     f"{ev.reason}"), ev.now)

    # -- running --------------------------------------------------------------
    @_handle.register
    def _report(self, ev: Report) -> list[Instruction]:
        if self.phase != "running" or ev.generation != self.generation:
            return []  # an old generation's, or one being stopped: it no longer counts
        if ev.stage is not None and not 0 <= ev.stage < self.settings.num_tasks:
            return []  # no stage of this job (the queue is reachable by any client of the scheduler)
        return self._on_report(ev)

    @functools.singledispatchmethod
    def _on_report(self, ev: Report) -> list[Instruction]:
        return []

    @_on_report.register
    def _step(self, ev: StepReport) -> list[Instruction]:
        self.run.timer.heard_step(ev)
        message = {"stage": ev.stage, "step": ev.step, "busy": ev.busy, "wall": ev.wall, "time": ev.time,
                   "losses": ev.losses, "grad_norms": ev.grad_norms}
        out: list[Instruction] = []
        for record in self.book.add(message):
            self.history.append(record.as_dict())
            out += [WriteRecord(record), ShowStep(record.step, record.loss, record.samples_per_s, record.busy)]
        return out

    @_on_report.register
    def _eval(self, ev: EvalReport) -> list[Instruction]:
        if ev.stage != self.settings.num_stages - 1 or ev.step in self.evals:
            return []  # only the last stage computes the loss; a re-run's block is logged once
        self.evals[ev.step] = ev.loss
        return [WriteRecord(EvalRecord(step=ev.step, heldout_loss=ev.loss)), ShowEval(ev.step, ev.loss)]

    @_on_report.register
    def _shard(self, ev: ShardWritten) -> list[Instruction]:
        self.run.timer.heard_shard(ev)
        if ev.stage >= self.settings.num_stages:
            return []  # (only replica 0 writes shards: a stage is stored once)
        shards = self.run.shards.setdefault(ev.cut, {})
        shards[ev.stage] = ev.record
        if len(shards) < self.settings.num_stages:
            return []
        records = self.run.shards.pop(ev.cut)
        self.run.committing.add(ev.cut)
        # repr-exact floats: a resumed job reports the same loss history
        losses = {str(k): v for k, v in sorted(self.book.losses.items()) if k < ev.cut}
        evals = {str(t): v for t, v in sorted(self.evals.items()) if t * self.settings.microbatches <= ev.cut}
        manifest = {**self.settings.manifest, "job_id": self.settings.job_id, "losses": losses, "evals": evals}
        return [Commit(ev.cut, tuple(records[s] for s in sorted(records)), self.generation, manifest)]

    @_on_report.register
    def _ready(self, ev: StageReady) -> list[Instruction]:
        self.run.ready[ev.stage] = ev
        return []

    @_on_report.register
    def _peer_lost(self, ev: PeerLostReport) -> list[Instruction]:
        self.run.peer_lost.setdefault(ev.stage, ev.reason)
        return self._look_for_loss(ev.now)

    @_on_report.register
    def _first(self, ev: FirstBackward) -> list[Instruction]:
        if ev.stage != 0 or not self.recoveries or "total_seconds" in self.recoveries[-1]:
            return []
        # The new generation's first micro-batch is back at stage 0: the recovery is over.
        r, ready = self.recoveries[-1], list(self.run.ready.values())
        ready_at = max((m.time for m in ready), default=ev.time)
        r.update({"load_seconds": max((m.load_seconds for m in ready), default=0.0),
                  "startup_seconds": max((m.seconds for m in ready), default=0.0),
                  "warmup_seconds": max(0.0, ev.time - ready_at), "ready_at": ready_at,
                  "first_microbatch_at": ev.time, "total_seconds": ev.time - r["detected_at"]})
        return [WriteRecord(RecoveredRecord.from_json(r)),
                Note(f"recovered: generation {r['generation']} completed its first micro-batch "
                     f"{r['total_seconds']:.1f} s after the loss was detected "
                     f"(stop {r['stop_seconds']:.1f} s, placement {r.get('place_seconds', 0):.1f} s, "
                     f"load {r['load_seconds']:.2f} s, warm-up {r['warmup_seconds']:.1f} s)")]

    @_on_report.register
    def _missed(self, ev: CutMissed) -> list[Instruction]:
        return self.run.timer.heard_missed(ev)

    @_on_report.register
    def _courier_error(self, ev: CourierError) -> list[Instruction]:
        # A stage's courier failed: its shard write (or a report). Its checkpoints cannot
        # be trusted to land, and a restart writes to the same place: stop and say so.
        record = ErrorRecord(stage=ev.stage, worker=ev.worker, cut=ev.cut, error=ev.error)
        known = ev.stage is not None
        loss = StageLost([ev.stage] if known else [], [ev.worker or "?"] if known else [], ev.error,
                         worker_died=False, detected_at=ev.now)
        return [WriteRecord(record)] + self._end_with(functools.partial(self._failed, loss, CHECKPOINT_FAILED),
                                                      ev.now)

    @_on_report.register
    def _done(self, ev: StageDone) -> list[Instruction]:
        self.run.done.add(ev.stage)
        return self._maybe_finish(ev.now)

    @_handle.register
    def _task_ended(self, ev: TaskEnded) -> list[Instruction]:
        if self.phase != "running" or ev.generation != self.generation:
            return []
        result = ev.result or {}
        if ev.status == "finished" and not result.get("ended"):
            self.run.results[ev.stage] = result
            return self._maybe_finish(ev.now)
        if ev.status == "finished":
            # The stop of this generation ended it, and this core never stops a generation
            # it still runs: someone else did (a second driver resuming the job).
            self.run.failed[ev.stage] = (result.get("reason", "stopped"), None)
        else:
            reason = short_error(ev.error) if ev.error is not None else f"task {ev.status}"
            self.run.failed[ev.stage] = (reason, ev.error)
        return self._look_for_loss(ev.now)

    @_handle.register
    def _workers_changed(self, ev: WorkersChanged) -> list[Instruction]:
        self.alive = set(ev.alive)
        return self._look_for_loss(ev.now)

    @_handle.register
    def _tick(self, ev: Tick) -> list[Instruction]:
        if self.phase != "running":
            return []
        return self.run.timer.due(ev.now, self.generation) + self._look_for_loss(ev.now) + self._maybe_finish(ev.now)

    def _look_for_loss(self, now: float) -> list[Instruction]:
        if self.phase != "running":
            return []
        run, placement = self.run, self.placement
        gone = [s for s in sorted(placement) if s not in run.results and placement[s] not in self.alive]
        if gone:
            return self._lost(StageLost(gone, [placement[s] for s in gone], "worker left the cluster",
                                        worker_died=True, detected_at=now))
        suspects = sorted(set(run.failed) | set(run.peer_lost))
        if not suspects:
            return []
        if run.blame_at is None:
            run.blame_at = now + PEER_LOST_GRACE
        if now < run.blame_at:
            return []
        s = suspects[0]
        if s not in run.failed:  # a lost peer counts exactly as if its task had failed with PeerLost
            return self._lost(StageLost([s], [placement[s]], run.peer_lost[s], worker_died=False, detected_at=now))
        reason, error = run.failed[s]
        return self._lost(StageLost([s], [placement[s]], reason, worker_died=is_worker_death(error),
                                    deterministic=error is not None and not is_retryable(error),
                                    unwritable=cannot_write_checkpoints(error), detected_at=now))

    def _maybe_finish(self, now: float) -> list[Instruction]:
        run = self.run
        if self.phase != "running" or len(run.results) < self.settings.num_tasks or run.committing:
            return []
        if run.done_by is None:
            run.done_by = now + DONE_GRACE
        if len(run.done) < self.settings.num_tasks and now < run.done_by:
            return []  # reports sent before the tasks returned may still be on their way
        return self._end(Finish(losses=dict(sorted(self.book.losses.items())), history=list(self.history),
                                recoveries=[dict(r) for r in self.recoveries], generation=self.generation,
                                wall_seconds=now - self.started_at, resumed_from=self.resumed_from,
                                results=tuple(run.results[s] for s in range(self.settings.num_tasks)),
                                evals=dict(sorted(self.evals.items()))))

    # -- checkpoints ----------------------------------------------------------
    @_handle.register
    def _commit_done(self, ev: CommitDone) -> list[Instruction]:
        if self.run is None or ev.generation != self.generation:
            return []
        self.run.committing.discard(ev.cut)
        if self.committed is None or ev.cut > self.committed.cut:
            self.committed = CheckpointView(ev.cut, ev.path)
        record = CheckpointRecord(cut=ev.cut, generation=ev.generation, commit_seconds=ev.seconds)
        return [WriteRecord(record)] + self._maybe_finish(ev.now)

    @_handle.register
    def _commit_failed(self, ev: CommitFailed) -> list[Instruction]:
        if ev.generation != self.generation:
            return []  # an old generation's commit, refused by the fence as it should be
        loss = StageLost([], [], f"the driver could not commit checkpoint {ev.cut} in {ev.path}: "
                                 f"{short_error(ev.error)}", worker_died=False, detected_at=ev.now)
        return self._end_with(functools.partial(self._failed, loss, CHECKPOINT_FAILED), ev.now)

    # -- stopping and recovering ----------------------------------------------
    def _lost(self, loss: StageLost) -> list[Instruction]:
        self.loss = loss  # recovered from, unless an ending comes first
        return self._stop(loss.detected_at)

    def _stop(self, now: float) -> list[Instruction]:
        self.phase, self.stop_started = "stopping", now
        return [StopGeneration(self.generation, self.settings.stop_timeout)]

    @_handle.register
    def _stop_finished(self, ev: StopFinished) -> list[Instruction]:
        if self.phase != "stopping" or ev.generation != self.generation:
            return []
        self.stop_seconds = ev.now - self.stop_started
        if ev.alive is not None:
            self.alive = set(ev.alive)
        self.dead |= {w for w in self.placement.values() if w not in self.alive}
        if self.loss is not None and self.loss.worker_died:
            self.dead |= set(self.loss.workers)
        out: list[Instruction] = []
        for s in ev.lingering:
            # Its thread may still hold the worker's only slot: place elsewhere.
            self.avoid.add(self.placement[s])
            out.append(Note(f"recovery: stage {s} on {self.placement[s]} did not stop within "
                            f"{self.settings.stop_timeout:g} s; cancelled, and that worker is avoided"))
        return out + self._read_latest(ev.now)

    def _read_latest(self, now: float) -> list[Instruction]:
        if self.settings.store is None:
            return self._conclude(None, now)
        self.phase = "finding"
        return [ReadLatestCheckpoint()]

    @_handle.register
    def _latest(self, ev: LatestCheckpoint) -> list[Instruction]:
        return self._conclude(ev.checkpoint, ev.now) if self.phase == "finding" else []

    def _conclude(self, latest: CheckpointView | None, now: float) -> list[Instruction]:
        if self.ending is not None:
            return self.ending(latest)
        loss = self.loss
        self.restarts += 1
        if loss.deterministic:
            return self._failed(loss, "a restart would fail the same way" if loss.unwritable else
                                "the stage's own computation failed, so a restart would fail the same way", latest)
        if self.restarts > self.settings.max_restarts:
            return self._failed(loss, f"gave up after {self.settings.max_restarts} restart(s)", latest)
        self.generation += 1
        self._start_from(latest)
        # Fenced before anything (the metrics log, the progress line) says a recovery
        # happened: from then on an old stage that wakes up finds its writes refused.
        out: list[Instruction] = [BeginGeneration(self.generation, self.cut)] if self.settings.store else []
        closed = self.book.forget_from(self.cut, dict(latest.losses) if latest else None)
        self.history = [h for h in self.history if h["step"] < self.cut // self.settings.microbatches]
        self.history += [record.as_dict() for record in closed]
        out += [WriteRecord(record) for record in closed]
        skipped = [{"cut": cut, "why": why} for cut, why in (latest.skipped if latest else ())]
        record = RecoveryRecord(generation=self.generation, stage=loss.stage, worker=loss.worker, stages=loss.stages,
                                workers=loss.workers, reason=loss.reason, worker_died=loss.worker_died,
                                rollback_to=self.cut, checkpoint=latest.path if latest else None,
                                skipped_checkpoints=skipped, detected_at=loss.detected_at,
                                stop_seconds=self.stop_seconds)
        self.recoveries.append(record.as_dict())  # completed by the placement and the first micro-batch
        out.append(WriteRecord(record))
        out += [Note(f"recovery: checkpoint at micro-batch {item['cut']} not used: {item['why']}") for item in skipped]
        source = f"the checkpoint at micro-batch {self.cut}" if latest else "the beginning (no checkpoint)"
        out.append(Note(f"recovery: {loss}; rolling back to {source} as generation {self.generation}"))
        return out + self._place(now)

    # -- the end --------------------------------------------------------------
    @_handle.register
    def _interrupted(self, ev: Interrupted) -> list[Instruction]:
        if self.interrupted and self.phase in ("stopping", "finding"):
            return self._on_interrupt(self.committed, hurried=True)  # again: do not wait for the stop
        self.interrupted = True
        return self._end_with(self._on_interrupt, ev.now)

    def _on_interrupt(self, latest: CheckpointView | None, hurried: bool = False) -> list[Instruction]:
        stopped = "interrupted again before the stages stopped" if hurried else "the stages were stopped"
        return [WriteRecord(InterruptedRecord(generation=self.generation,
                                              checkpoint=latest.path if latest else None))] + self._end(
            Fail(f"interrupted; {stopped}; {self._hint(latest)}", kind=JobInterrupted))

    @_handle.register
    def _scheduler_lost(self, ev: SchedulerLost) -> list[Instruction]:
        # Nothing can be stopped through a scheduler that is gone (the stages stop on their
        # own once they lose it): fence them off the store instead, and drop what they left
        # uncommitted, so the directory holds exactly what a resume will use.
        def ending(latest: CheckpointView | None) -> list[Instruction]:
            fence = BeginGeneration(self.generation + 1, latest.cut if latest else -1)
            out: list[Instruction] = [fence] if self.settings.store else []
            why = f"lost the Dask scheduler ({ev.reason}); its tasks are gone and the stages stop on their own"
            out += [WriteRecord(FailedRecord(stages=[], workers=[], reason=ev.reason, why=why,
                                             checkpoint=latest.path if latest else None)),
                    Note(f"job failed: {why}; {self._hint(latest)}")]
            return out + self._end(Fail(f"{why}; {self._hint(latest)} once a scheduler is back", retryable=True))

        return self._end_with(ending, ev.now, stop=False)

    def _end_with(self, ending: Ending, now: float, *, stop: bool = True) -> list[Instruction]:
        """End the job once nothing of it runs (after a stop, if a generation runs) and the
        checkpoint to resume from is known."""
        self.ending = ending
        if stop and self.phase == "running":
            return self._stop(now)
        if (stop and self.phase == "stopping") or self.phase == "finding":
            return []  # under way: StopFinished, then LatestCheckpoint, lead to the ending
        return self._read_latest(now)

    def _failed(self, loss: StageLost, why: str, latest: CheckpointView | None) -> list[Instruction]:
        reason = f"{loss}; {why}; {self._hint(latest)}"
        return [WriteRecord(FailedRecord(stages=loss.stages, workers=loss.workers, reason=loss.reason, why=why,
                                         checkpoint=latest.path if latest else None)),
                Note(f"job failed: {reason}")] + self._end(Fail(reason, cause=loss))

    def _hint(self, latest: CheckpointView | None) -> str:
        if latest is None:
            return "no checkpoint was committed, so a new run starts from the beginning"
        command = f"`pipetrain resume {self.settings.run_dir}`" if self.settings.run_dir else "resume=True"
        return f"the last committed checkpoint is {latest.path} (micro-batch {latest.cut}); {command} continues from it"

    def _end(self, last: Instruction) -> list[Instruction]:
        self.phase = "over"
        return [last]


def _host(address: str) -> str:
    try:
        from distributed.comm.addressing import get_address_host  # parses only

        return get_address_host(address)
    except (ImportError, ValueError):
        return address

"""The job core: every decision of the driver, and none of its I/O.

In the manner of distributed's worker state machine: ``JobCore.handle(*events)``
takes typed events (``core_events``) and returns the instructions the shell
must carry out, in order. It never calls the scheduler, the store or a clock,
so recovery, rollback and timed checkpoints are tested by playing events.

A generation goes: ``Place`` -> ``Placed`` -> ``Submit`` -> running (reports,
task ends, worker lists, ticks) -> either ``Finish``, or a loss: ``StopGeneration``
-> ``StopFinished`` -> ``ReadLatestCheckpoint`` -> ``LatestCheckpoint`` ->
``BeginGeneration`` (g + 1, fenced before anything records the recovery) and
the recovery record -> ``Place`` again.

Blame: a worker that left is the cause; its neighbours' lost peers or
failures are effects. A neighbour usually notices before the scheduler drops
the dead worker, so a failure or lost peer is blamed only once
``PEER_LOST_GRACE`` has passed without a worker leaving.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

from pipetrain.errors import (CheckpointDirInUse, JobFailed, JobInterrupted, StageLost, is_retryable, is_worker_death,
                              short_error)
from pipetrain.runtime.bookkeeping import StepBook
from pipetrain.runtime.core_events import (BeginGeneration, CheckpointView, ClearStore, Commit, CommitDone,
                                           CommitFailed, CourierError, CutMissed, Event, Fail, Finish,
                                           FirstBackward, Instruction, Interrupted, LatestCheckpoint,
                                           Note, PeerLostReport, Place, Placed, PlacementFailed,
                                           JobSettings, ReadLatestCheckpoint, Report, RequestCut, SchedulerLost,
                                           ShardWritten, ShowStep, StageDone, StageReady, Started, StepReport,
                                           StopFinished, StopGeneration, StopOldRun, Submit, TaskEnded, Tick,
                                           WorkersChanged, WriteRecord)

# How long a failure or lost peer waits for the scheduler to drop a killed worker.
PEER_LOST_GRACE = 1.0
# How long a finished generation waits for the stages' "done" reports, after
# which every earlier report of theirs has arrived (they are sent before the task returns).
DONE_GRACE = 1.0


def merge_placement(previous: dict[int, str], fresh: dict[int, str], spares: tuple[str, ...]) -> dict[int, str]:
    """Surviving stages stay where they are; lost ones take spares first, then what the fresh placement freed."""
    if not previous:
        return dict(fresh)
    usable = set(fresh.values()) | set(spares)
    kept = {s: w for s, w in previous.items() if w in usable and s in fresh}
    free = list(dict.fromkeys(w for w in list(spares) + sorted(fresh.values()) if w not in kept.values()))
    for s in sorted(fresh):
        if s not in kept:
            kept[s] = free.pop(0)
    return dict(sorted(kept.items()))


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
        return [WriteRecord({"type": "checkpoint-missed", "cut": report.cut, "stage": report.stage})]

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
                WriteRecord({"type": "checkpoint-request", "cut": cut, "furthest_step": self.furthest_step})]


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


@dataclass(frozen=True)
class _Failure:
    """How the job fails: what happened, why that ends it, as which error."""

    what: str
    why: str | None = None
    kind: type[JobFailed] = JobFailed
    retryable: bool = False
    loss: StageLost | None = None


class JobCore:
    def __init__(self, settings: JobSettings):
        self.settings = settings
        self.phase = "new"  # new | placing | running | stopping | finding | over
        self.generation, self.cut, self.ledgers = 0, 0, {}
        self.placement: dict[int, str] = {}
        self.alive: set[str] | None = None
        self.dead: set[str] = set()
        self.avoid: set[str] = set()
        self.restarts = 0
        self.book = StepBook(settings.num_stages, settings.microbatches, settings.microbatch_size)
        self.history: list[dict] = []
        self.recoveries: list[dict] = []
        self.committed: tuple[int, str] | None = None  # (cut, path) of the newest commit known to be good
        self.loss: StageLost | None = None
        self.ending: _Failure | None = None  # fail, not recover, once stopped
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
        if not ev.resume:
            if s.store is None:
                return self._place(ev.now)
            if ev.existing_cuts:
                return self._end(Fail(
                    f"{s.store} already belongs to a run (generation {ev.previous_generation}, checkpoints up to "
                    f"micro-batch {ev.existing_cuts[-1]}): continue it with resume=True (`pipetrain resume RUN_DIR`), "
                    f"or start this one in an empty directory (`pipetrain train CONFIG --overwrite` empties the run "
                    f"directory first)", kind=CheckpointDirInUse))
            return [ClearStore(), BeginGeneration(0, 0)] + self._place(ev.now)
        if s.store is None:
            return self._end(Fail("resume needs a checkpoint directory"))
        out: list[Instruction] = []
        latest = ev.latest
        if ev.previous_generation is not None:
            # Stages of the run that stopped (its driver died) may still be going on their
            # workers: tell them to stop, so they free their workers' threads.
            for job_id in sorted({s.job_id, latest.job_id if latest else None} - {None}):
                out.append(StopOldRun(job_id, ev.previous_generation))
        self.generation = (ev.previous_generation or 0) + 1
        out += [Note(f"resume: checkpoint at micro-batch {cut} not used: {why}")
                for cut, why in (latest.skipped if latest else ())]
        if latest is None:
            out.append(Note("resume: no committed checkpoint found; starting from the beginning"))
        else:
            out.append(Note(f"resume: from the checkpoint at micro-batch {latest.cut} ({latest.path})"))
            self.history += self.book.restore(dict(latest.losses), latest.cut)
            out.append(WriteRecord({"type": "resume", "generation": self.generation, "rollback_to": latest.cut,
                                    "checkpoint": latest.path}))
        self._start_from(latest)
        return out + [BeginGeneration(self.generation, self.cut)] + self._place(ev.now)

    def _start_from(self, latest: CheckpointView | None) -> None:
        self.cut = latest.cut if latest else 0
        self.ledgers = dict(latest.ledgers) if latest else {}
        self.committed = (latest.cut, latest.path) if latest else None

    def _place(self, now: float) -> list[Instruction]:
        self.phase, self.place_started = "placing", now
        return [Place(exclude=frozenset(self.dead | self.avoid), previous=dict(self.placement))]

    @_handle.register
    def _placed(self, ev: Placed) -> list[Instruction]:
        if self.phase != "placing":
            return []
        self.placement = merge_placement(self.placement, dict(ev.placement), tuple(ev.spares))
        if self.restarts:
            self.recoveries[-1].update(place_seconds=ev.now - self.place_started, placed_at=ev.now,
                                       workers_after=dict(self.placement))
        # The placement was read from the scheduler after any worker list we hold.
        self.alive = (self.alive or set()) | set(self.placement.values())
        s = self.settings
        every = s.checkpoint_seconds if s.store is not None else 0.0
        self.run = _Generation(timer=CutTimer(every, s.microbatches, s.steps, ev.now))
        self.phase = "running"
        return [Submit(self.generation, self.cut, dict(self.ledgers), dict(self.placement))]

    @_handle.register
    def _placement_failed(self, ev: PlacementFailed) -> list[Instruction]:
        if self.phase != "placing":
            return []
        cause = self.loss or StageLost([], [], "no stage lost yet", worker_died=False, detected_at=ev.now)
        return self._fail(_Failure(str(cause), f"no workers to place the stages on:\n{ev.reason}", loss=cause))

    # -- running --------------------------------------------------------------
    @_handle.register
    def _report(self, ev: Report) -> list[Instruction]:
        if self.phase != "running" or ev.generation != self.generation:
            return []  # an old generation's, or one being stopped: it no longer counts
        return self._on_report(ev)

    @functools.singledispatchmethod
    def _on_report(self, ev: Report) -> list[Instruction]:
        return []

    @_on_report.register
    def _step(self, ev: StepReport) -> list[Instruction]:
        self.run.timer.heard_step(ev)
        message = {"stage": ev.stage, "step": ev.step, "busy": ev.busy, "wall": ev.wall, "time": ev.time,
                   "losses": ev.losses}
        out: list[Instruction] = []
        for record in self.book.add(message):
            self.history.append(record)
            out += [WriteRecord(record), ShowStep(record["step"], record["loss"], record["samples_per_s"],
                                                  record["busy"])]
        return out

    @_on_report.register
    def _shard(self, ev: ShardWritten) -> list[Instruction]:
        self.run.timer.heard_shard(ev)
        shards = self.run.shards.setdefault(ev.cut, {})
        shards[ev.stage] = ev.record
        if len(shards) < self.settings.num_stages:
            return []
        records = self.run.shards.pop(ev.cut)
        self.run.committing.add(ev.cut)
        # repr-exact floats: a resumed job reports the same loss history
        losses = {str(k): v for k, v in sorted(self.book.losses.items()) if k < ev.cut}
        manifest = {**self.settings.manifest, "job_id": self.settings.job_id, "losses": losses}
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
        return [WriteRecord({"type": "recovered", **{k: v for k, v in r.items() if k != "type"}}),
                Note(f"recovered: generation {r['generation']} completed its first micro-batch "
                     f"{r['total_seconds']:.1f} s after the loss was detected "
                     f"(stop {r['stop_seconds']:.1f} s, placement {r.get('place_seconds', 0):.1f} s, "
                     f"load {r['load_seconds']:.2f} s, warm-up {r['warmup_seconds']:.1f} s)")]

    @_on_report.register
    def _missed(self, ev: CutMissed) -> list[Instruction]:
        return self.run.timer.heard_missed(ev)

    @_on_report.register
    def _courier_error(self, ev: CourierError) -> list[Instruction]:
        return [WriteRecord({"type": "error", "error": ev.error})]

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
        running = [s for s in sorted(placement) if s not in run.results]
        gone = [s for s in running if placement[s] not in self.alive]  # alive is set once placed
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
                                    deterministic=error is not None and not is_retryable(error), detected_at=now))

    def _maybe_finish(self, now: float) -> list[Instruction]:
        run = self.run
        if self.phase != "running" or len(run.results) < self.settings.num_stages or run.committing:
            return []
        if run.done_by is None:
            run.done_by = now + DONE_GRACE
        if len(run.done) < self.settings.num_stages and now < run.done_by:
            return []  # reports sent before the tasks returned may still be on their way
        return self._end(Finish(losses=dict(sorted(self.book.losses.items())), history=list(self.history),
                                recoveries=[dict(r) for r in self.recoveries], generation=self.generation,
                                wall_seconds=now - self.started_at,
                                results=tuple(run.results[s] for s in range(self.settings.num_stages))))

    # -- checkpoints ----------------------------------------------------------
    @_handle.register
    def _commit_done(self, ev: CommitDone) -> list[Instruction]:
        if self.run is None or ev.generation != self.generation:
            return []
        self.run.committing.discard(ev.cut)
        if self.committed is None or ev.cut > self.committed[0]:
            self.committed = (ev.cut, ev.path)
        return [WriteRecord({"type": "checkpoint", "cut": ev.cut, "generation": ev.generation,
                             "commit_seconds": ev.seconds})] + self._maybe_finish(ev.now)

    @_handle.register
    def _commit_failed(self, ev: CommitFailed) -> list[Instruction]:
        if ev.generation != self.generation:
            return []  # an old generation's commit, refused by the fence as it should be
        return self._fail_after_stop(ev.now, _Failure(
            f"the checkpoint commit of micro-batch {ev.cut} at {ev.path} failed: {short_error(ev.error)}",
            "a restart cannot help: it would write the same checkpoint to the same place"))

    # -- losses and recovery --------------------------------------------------
    def _lost(self, loss: StageLost) -> list[Instruction]:
        self.loss = loss
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
        if self.ending is not None:
            return out + self._fail(self.ending)
        if self.settings.store is None:
            return out + self._recover(None, ev.now)
        self.phase = "finding"
        return out + [ReadLatestCheckpoint()]

    @_handle.register
    def _latest(self, ev: LatestCheckpoint) -> list[Instruction]:
        if self.phase != "finding":
            return []
        if self.ending is not None:
            return self._fail(self.ending)
        return self._recover(ev.checkpoint, ev.now)

    def _recover(self, latest: CheckpointView | None, now: float) -> list[Instruction]:
        loss = self.loss
        self.restarts += 1
        self.committed = (latest.cut, latest.path) if latest else None
        if loss.deterministic:
            why = "the stage's own computation failed, so a restart would fail the same way"
            return self._fail(_Failure(str(loss), why, loss=loss))
        if self.restarts > self.settings.max_restarts:
            return self._fail(_Failure(str(loss), f"gave up after {self.settings.max_restarts} restart(s)", loss=loss))
        self.generation += 1
        self._start_from(latest)
        # Fenced before anything (the metrics log, the progress line) says a recovery
        # happened: from then on an old stage that wakes up finds its writes refused.
        out: list[Instruction] = [BeginGeneration(self.generation, self.cut)] if self.settings.store else []
        self.book.forget_from(self.cut)
        self.history = [h for h in self.history if h["step"] < self.cut // self.settings.microbatches]
        skipped = [{"cut": cut, "why": why} for cut, why in (latest.skipped if latest else ())]
        record = {"type": "recovery", "generation": self.generation, "stage": loss.stage, "worker": loss.worker,
                  "stages": loss.stages, "workers": loss.workers, "reason": loss.reason,
                  "worker_died": loss.worker_died, "rollback_to": self.cut,
                  "checkpoint": latest.path if latest else None, "skipped_checkpoints": skipped,
                  "detected_at": loss.detected_at, "stop_seconds": self.stop_seconds}
        self.recoveries.append(record)
        out.append(WriteRecord(dict(record)))
        out += [Note(f"recovery: checkpoint at micro-batch {item['cut']} not used: {item['why']}") for item in skipped]
        source = f"the checkpoint at micro-batch {self.cut}" if latest else "the beginning (no checkpoint)"
        out.append(Note(f"recovery: {loss}; rolling back to {source} as generation {self.generation}"))
        return out + self._place(now)

    # -- the end --------------------------------------------------------------
    @_handle.register
    def _interrupted(self, ev: Interrupted) -> list[Instruction]:
        interrupted = _Failure("interrupted", kind=JobInterrupted)
        if self.phase == "stopping" and self.ending == interrupted:
            return self._fail(interrupted)  # a second Ctrl-C: do not wait for the stop
        return self._fail_after_stop(ev.now, interrupted)

    @_handle.register
    def _scheduler_lost(self, ev: SchedulerLost) -> list[Instruction]:
        # Nothing can be stopped through a scheduler that is gone: fence the stages
        # still running off the store instead, and drop what they left uncommitted.
        out: list[Instruction] = []
        fence = ""
        if self.settings.store is not None:
            out.append(BeginGeneration(self.generation + 1, self.committed[0] if self.committed else 0))
            fence = (f"generation {self.generation + 1} is recorded in {self.settings.store}, so the stages "
                     f"still running cannot write there")
        return out + self._fail(_Failure(f"lost the scheduler ({ev.reason})", fence or None, retryable=True))

    def _fail_after_stop(self, now: float, ending: _Failure) -> list[Instruction]:
        """Fail once nothing of this job runs: after a stop when a generation runs, else now."""
        if self.phase == "running":
            self.ending = ending
            return self._stop(now)
        if self.phase in ("stopping", "finding"):
            self.ending = ending  # instead of the recovery under way
            return []
        return self._fail(ending)

    def _fail(self, failure: _Failure) -> list[Instruction]:
        cut, path = self.committed if self.committed else (None, None)
        where = (f"the last committed checkpoint is {path} (micro-batch {cut}); `pipetrain resume` continues "
                 f"from it" if path else "no checkpoint was committed")
        reason = "; ".join(part for part in (failure.what, failure.why, where) if part)
        loss = failure.loss
        record = {"type": "failed", "stages": loss.stages if loss else [], "workers": loss.workers if loss else [],
                  "reason": loss.reason if loss else failure.what, "why": failure.why, "checkpoint": path}
        fail = Fail(reason, retryable=failure.retryable, kind=failure.kind, cause=loss)
        return [WriteRecord(record), Note(f"job failed: {reason}")] + self._end(fail)

    def _end(self, last: Instruction) -> list[Instruction]:
        self.phase = "over"
        return [last]

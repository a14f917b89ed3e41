"""The driver: places the stages, submits them, watches them, recovers.

Each stage is one long-running Dask task pinned to its worker (DESIGN.md
section 3). The driver never touches activations: it reads the stages'
reports from the control plane, commits checkpoints once every shard of a
cut is durable, and recovers when a stage is lost:

1. detect: a stage task fails, a stage reports that a neighbour vanished,
   or a stage's worker leaves the cluster, whichever the driver sees first
   (it looks every ``poll`` seconds); the blame goes to the workers that
   left, if any did;
2. stop: raise the generation's stop flag; every stage leaves at its next
   action or wait slice, and its task returns {"ended": "stopped"} rather
   than failing (so Dask logs no error for what is only a recovery's
   effect; see ``worker._ended_by_recovery``). A stage still running after
   ``stop_timeout`` is cancelled and its worker avoided (its thread may
   linger there);
3. re-place: the stages whose workers survived stay; lost ones go to spares
   first, else wait up to ``placement_timeout`` for a replacement (e.g. the
   nanny's restarted worker, at a new address);
4. roll back: every stage loads the newest committed checkpoint that verifies
   (or starts from micro-batch 0) under generation g + 1: the store refuses
   writes of older generations, the transport drops their messages, and the
   control plane's names carry the generation, so a stage of an old
   generation that wakes up cannot write into the new run.

At most ``max_restarts`` recoveries, then ``JobFailed`` naming what died and
where the last good checkpoint is. Each recovery is a "recovery" record in
the metrics log when it is decided, and a "recovered" record (placement,
load, warm-up and total seconds) when the new generation's first micro-batch
has come back through stage 0.
"""
from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipetrain.observe.progress import MetricsLog, Progress
from pipetrain.runtime.bookkeeping import StepBook, TimedCheckpoints
from pipetrain.runtime.control import ControlNames, DriverControl
from pipetrain.runtime.worker import CheckpointUnwritable, StageJob, run_stage, short_error


class StageLost(RuntimeError):
    """One or more stages of the running generation are gone."""

    def __init__(self, stages: list[int], workers: list[str], reason: str, *, worker_died: bool):
        where = ", ".join(f"stage {s} on worker {w}" for s, w in zip(stages, workers))
        super().__init__(f"{where}: {reason}")
        self.stages, self.workers, self.reason = stages, workers, reason
        self.worker_died = worker_died
        self.deterministic = False  # set when the stage's own computation raised
        self.unwritable = False  # set when its worker cannot write the checkpoint location
        self.detected_at = time.time()

    @property
    def stage(self) -> int:
        return self.stages[0]

    @property
    def worker(self) -> str:
        return self.workers[0]


class JobFailed(RuntimeError):
    pass


class CheckpointDirInUse(JobFailed):
    """A new run was pointed at checkpoints another run owns."""


class JobInterrupted(JobFailed):
    """The user interrupted the driver (Ctrl-C); the stages were stopped."""


class SchedulerLost(RuntimeError):
    """The driver can no longer reach the Dask scheduler."""


@dataclass
class JobPlan:
    """A job as the driver sees it; built by ``pipetrain.fit``."""

    partition: Any
    source: Any
    optimizer: Any
    schedule_args: dict
    checkpoint_url: str | None = None
    keep_checkpoints: int = 3
    checkpoint_seconds: float = 0.0  # also checkpoint when this long passed since the last commit
    resource: str = "GPU"
    placement_timeout: float = 60.0
    max_restarts: int = 3
    credits: int = 0
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    resume: bool = False
    security: Any = None
    record_events: bool = True
    stop_timeout: float = 10.0
    poll: float = 0.2
    # How long the scheduler may stay unreachable before the job stops: a Dask
    # scheduler that comes back has lost every task, so there is no point in
    # waiting for it as long as the client's own 30 s reconnect.
    scheduler_timeout: float = 5.0
    run_dir: str | None = None  # for the `pipetrain resume RUN_DIR` hints
    # Per-job key the stages prove themselves to each other with (transport
    # handshake): handed to them through Dask, never sent on a stage port.
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)

    @property
    def num_stages(self) -> int:
        return len(self.partition.stages)

    @property
    def microbatches(self) -> int:
        return self.schedule_args["microbatches"]

    @property
    def steps(self) -> int:
        return self.schedule_args["steps"]


@dataclass
class RunOutcome:
    losses: dict[int, float]
    states: list[dict[str, np.ndarray]]
    events: list[np.ndarray]
    history: list[dict]
    recoveries: list[dict]
    generation: int
    wall_seconds: float
    ledgers: list[dict] = field(default_factory=list)


@dataclass
class _Start:
    """Where a generation starts: its number, its cut, the ledgers at that cut."""

    generation: int
    cut: int = 0
    ledgers: dict[int, dict] = field(default_factory=dict)


class Driver:
    def __init__(self, client: Any, plan: JobPlan, *, progress: Progress, metrics: MetricsLog,
                 spare_workers_for_recovery: bool = True):
        self.client, self.plan = client, plan
        self.progress, self.metrics = progress, metrics
        self.recoveries: list[dict] = []
        self.history: list[dict] = []
        self.dead_workers: set[str] = set()
        self.avoid_workers: set[str] = set()
        self._peer_lost: dict[int, dict] = {}  # per generation: stage -> its "peer-lost" report (worker.py)
        self.store = None
        if plan.checkpoint_url:
            from pipetrain.checkpoint.store import CheckpointStore

            self.store = CheckpointStore(plan.checkpoint_url, keep=plan.keep_checkpoints)

    # -- the job ---------------------------------------------------------
    def run(self) -> RunOutcome:
        started = time.time()
        book = StepBook(self.plan.num_stages, self.plan.microbatches, self.plan.source.microbatch_size)
        start = self._starting_point(book)
        restarts = 0
        placement: dict[int, str] = {}
        lost: StageLost | None = None
        self._begin_generation(start)
        while True:
            futures: list[Any] = []
            try:
                placed_at = time.time()
                placement = self._place(placement, lost)
                if self.recoveries and lost is not None:
                    self.recoveries[-1]["place_seconds"] = time.time() - placed_at
                    self.recoveries[-1]["placed_at"] = time.time()
                    self.recoveries[-1]["workers_after"] = dict(placement)
                self._record_placement(start.generation, placement)
                futures = self._submit(start, placement)
                results = self._watch(start.generation, futures, placement, book)
                return RunOutcome(losses=dict(sorted(book.losses.items())),
                                  states=[r["state"] for r in results], events=[r["events"] for r in results],
                                  history=self.history, recoveries=self.recoveries, generation=start.generation,
                                  wall_seconds=time.time() - started, ledgers=[r["ledger"] for r in results])
            except StageLost as error:
                lost = error
                stop_seconds = self._stop(start.generation, futures, placement, lost)
                restarts += 1
                latest = self._latest_checkpoint()
                if lost.deterministic:
                    self._fail(lost, latest, "a restart would fail the same way" if lost.unwritable else
                               "the stage's own computation failed, so a restart would fail the same way")
                if restarts > self.plan.max_restarts:
                    self._fail(lost, latest, f"gave up after {self.plan.max_restarts} restart(s)")
                start = self._rollback(start.generation + 1, latest)
                # Fenced before anything (the metrics log, the progress line)
                # says a recovery happened: from then on an old stage that
                # wakes up must already find its writes refused.
                self._begin_generation(start)
                book.forget_from(start.cut)
                self.history = [h for h in self.history if h["step"] < start.cut // self.plan.microbatches]
                self._record_recovery(lost, start, latest, stop_seconds)
            except SchedulerLost as error:
                self._scheduler_lost(start, error)
            except KeyboardInterrupt:
                self._interrupted(start, futures, placement)
            except _CheckpointFailed as error:
                self._stop(start.generation, futures, placement, None)
                self._fail(error.lost, self._latest_checkpoint(), "a checkpoint could not be written, and a "
                           "restart would write to the same place")
            except Exception as error:
                from pipetrain.runtime.placement import PlacementError

                if not isinstance(error, PlacementError):
                    raise
                self._stop(start.generation, futures, placement, None)
                latest = self._latest_checkpoint()
                cause = lost or StageLost([], [], "no stage lost yet", worker_died=False)
                self._fail(cause, latest, f"no workers to place the stages on:\n{error}")

    def _resume_hint(self, latest: Any) -> str:
        command = f"`pipetrain resume {self.plan.run_dir}`" if self.plan.run_dir else "resume=True"
        if latest is None:
            return "no checkpoint was committed, so a new run starts from the beginning"
        return f"the last committed checkpoint is {latest.path} (micro-batch {latest.cut}); {command} continues from it"

    def _scheduler_lost(self, start: _Start, error: SchedulerLost) -> None:
        """The scheduler is gone, and with it every task and the control plane.
        The stages notice on their own and stop (StageControl); until they do,
        a new generation recorded in the store refuses their checkpoint writes,
        and the uncommitted step directories they left are removed, so the
        directory holds exactly the committed checkpoints a resume will use."""
        latest = self._latest_checkpoint()
        if self.store is not None:
            fenced = start.generation + 1
            self.store.begin_generation(fenced)
            self.store.discard_after(latest.cut if latest else -1, generation=fenced)
        why = f"lost the Dask scheduler ({error}); its tasks are gone and the stages stop on their own"
        self.metrics.write({"type": "failed", "stages": [], "workers": [], "reason": str(error), "why": why,
                            "checkpoint": latest.path if latest else None})
        self.progress.note(f"job failed: {why}; {self._resume_hint(latest)}")
        raise JobFailed(f"{why}; {self._resume_hint(latest)} once a scheduler is back") from error

    def _interrupted(self, start: _Start, futures: list[Any], placement: dict[int, str]) -> None:
        """Ctrl-C: stop the stages (they would train on unobserved), then say where to resume."""
        try:
            self._stop(start.generation, futures, placement, None)
        except Exception:  # noqa: BLE001 - the scheduler may be what the user gave up on
            pass
        latest = self._latest_checkpoint()
        self.metrics.write({"type": "interrupted", "generation": start.generation,
                            "checkpoint": latest.path if latest else None})
        raise JobInterrupted(f"interrupted; the stages were stopped; {self._resume_hint(latest)}") from None

    def _fail(self, lost: StageLost, latest: Any, why: str) -> None:
        where = self._resume_hint(latest)
        record = {"type": "failed", "stages": lost.stages, "workers": lost.workers, "reason": lost.reason,
                  "why": why, "checkpoint": latest.path if latest else None}
        self.metrics.write(record)
        self.progress.note(f"job failed: {lost}; {why}; {where}")
        raise JobFailed(f"{lost}; {why}; {where}") from lost

    def _latest_checkpoint(self) -> Any:
        return self.store.latest() if self.store is not None else None

    def _require_empty_store(self) -> None:
        """A new run may not start in a checkpoint directory another run
        owns: its first checkpoint would collide with that run's, after the
        work up to it was done."""
        if self.store is None:
            return
        cuts = self.store.cuts()
        if not cuts:  # at most the generation record of a run that never checkpointed: nothing to lose
            self.store.clear()
            return
        raise CheckpointDirInUse(
            f"{self.store.root} already belongs to a run (generation {self.store.current_generation()}, "
            f"checkpoints up to micro-batch {cuts[-1]}): continue it with resume=True (`pipetrain resume RUN_DIR`), "
            f"or start this one in an empty directory (`pipetrain train CONFIG --overwrite` empties the run "
            f"directory first)")

    def _rollback(self, generation: int, latest: Any) -> _Start:
        if latest is None:
            return _Start(generation=generation)
        ledgers = {s: latest.shard(s).get("meta", {}).get("ledger", {}) for s in range(latest.num_stages)}
        return _Start(generation=generation, cut=latest.cut, ledgers=ledgers)

    def _begin_generation(self, start: _Start) -> None:
        """Record the generation, then remove the step directories newer than
        its starting cut (after a rollback or a resume: torn or corrupt ones,
        the newest that verified being the cut), so it can write and commit
        those cuts again. Recorded first: a stage of the old generation that
        wakes up now can no longer write into a directory just discarded."""
        if self.store is not None:
            self.store.begin_generation(start.generation)
            self.store.discard_after(start.cut, generation=start.generation)

    def _refuse_unusable_checkpoints(self) -> None:
        """A resume that finds committed checkpoints but none that verifies stops
        here, keeping them: starting over from micro-batch 0 would silently
        throw away the work they hold, and the discard would delete the
        evidence. Starting over is the user's call (`train --overwrite`)."""
        committed = [c for c in self.store.list() if c.status != "uncommitted"]
        if not committed:
            return
        found = "; ".join(f"{c.path}: {c.reason}" for c in committed)
        raise JobFailed(f"resume: no checkpoint in {self.store.root} can be used, so the job stops here and keeps "
                        f"them all ({found}); `pipetrain train CONFIG --overwrite` starts the job over from the "
                        f"beginning")

    def _record_recovery(self, lost: StageLost, start: _Start, latest: Any, stop_seconds: float) -> None:
        skipped = [{"cut": cut, "why": why} for cut, why in (latest.skipped if latest else ())]
        event = {"type": "recovery", "generation": start.generation, "stage": lost.stage, "worker": lost.worker,
                 "stages": lost.stages, "workers": lost.workers, "reason": lost.reason,
                 "worker_died": lost.worker_died, "rollback_to": start.cut,
                 "checkpoint": latest.path if latest else None, "skipped_checkpoints": skipped,
                 "detected_at": lost.detected_at, "stop_seconds": stop_seconds}
        self.recoveries.append(event)
        self.metrics.write(event)
        for item in skipped:
            self.progress.note(f"recovery: checkpoint at micro-batch {item['cut']} not used: {item['why']}")
        source = f"the checkpoint at micro-batch {start.cut}" if latest else "the beginning (no checkpoint)"
        self.progress.note(f"recovery: {lost}; rolling back to {source} as generation {start.generation}")

    def _starting_point(self, book: StepBook) -> _Start:
        if not self.plan.resume:
            self._require_empty_store()
            return _Start(generation=0)
        if self.store is None:
            raise JobFailed("resume needs a checkpoint directory")
        previous = self.store.current_generation()
        latest = self.store.latest()
        if previous is not None:
            # Stages of the run that stopped (its driver died) may still be going on
            # their workers: tell them to stop, so they free their workers' threads.
            job_ids = {self.plan.job_id, latest.manifest.get("job_id") if latest else None} - {None}
            for job_id in job_ids:
                DriverControl(ControlNames(job_id, previous), client=self.client).stop()
        generation = (previous or 0) + 1
        for cut, why in (latest.skipped if latest else ()):
            self.progress.note(f"resume: checkpoint at micro-batch {cut} not used: {why}")
        if latest is None:
            self._refuse_unusable_checkpoints()
            self.progress.note("resume: no committed checkpoint found; starting from the beginning")
            return _Start(generation=generation)
        self.progress.note(f"resume: from the checkpoint at micro-batch {latest.cut} ({latest.path})")
        saved = {int(k): float(v) for k, v in latest.manifest.get("losses", {}).items()}
        for record in book.restore(saved, latest.cut):
            self.history.append(record)
        self.metrics.write({"type": "resume", "generation": generation, "rollback_to": latest.cut,
                            "checkpoint": latest.path})
        return self._rollback(generation, latest)

    # -- placement and submission ---------------------------------------
    def _place(self, previous: dict[int, str], lost: StageLost | None) -> dict[int, str]:
        from pipetrain.runtime.placement import StageNeed, wait_for_placement

        needs = [StageNeed(stage=s.index, memory_bytes=getattr(s, "memory_bytes", 0) or 0)
                 for s in self.plan.partition.stages]
        placement = wait_for_placement(self.client, needs, resource=self.plan.resource,
                                       timeout=self.plan.placement_timeout,
                                       exclude=tuple(self.dead_workers | self.avoid_workers))
        fresh = dict(placement.stage_workers)
        if not previous:
            return fresh
        # Surviving stages stay where they are; lost ones take spares first,
        # then whatever the fresh placement freed.
        usable = set(fresh.values()) | set(placement.spares)
        kept = {s: w for s, w in previous.items() if w in usable}
        free = [w for w in list(placement.spares) + sorted(fresh.values()) if w not in kept.values()]
        free = list(dict.fromkeys(free))
        for s in sorted(fresh):
            if s not in kept:
                kept[s] = free.pop(0)
        return kept

    def _submit(self, start: _Start, placement: dict[int, str]) -> list[Any]:
        plan = self.plan
        futures = []
        for spec in plan.partition.specs():
            job = StageJob(job_id=plan.job_id, generation=start.generation, spec=spec, model=plan.partition.model,
                           optimizer=plan.optimizer,
                           schedule_args={**plan.schedule_args, "first_microbatch": start.cut},
                           source=plan.source, checkpoint_url=plan.checkpoint_url,
                           resume_cut=start.cut or None, credits=plan.credits, security=plan.security,
                           max_events=StageJob.max_events if plan.record_events else 0,
                           resume_ledger=start.ledgers.get(spec.index), secret=plan.secret,
                           input_specs=_boundary_specs(plan.partition, spec.index),
                           output_specs=_boundary_specs(plan.partition, spec.index + 1))
            futures.append(self.client.submit(run_stage, job, workers=[placement[spec.index]],
                                              allow_other_workers=False, pure=False, retries=0,
                                              key=f"pipetrain-{plan.job_id}-g{start.generation}-stage{spec.index}"))
        return futures

    # -- watching ---------------------------------------------------------
    def _alive(self) -> set[str]:
        # Asked of the scheduler directly: ``Client.scheduler_info`` returns a
        # cache that the client's periodic refresh may just have replaced with
        # one holding no workers, which would read as "every worker left".
        self._check_scheduler()
        try:
            identity = self.client.sync(self.client.scheduler.identity, n_workers=-1,
                                        callback_timeout=self.plan.scheduler_timeout)
        except (OSError, TimeoutError) as error:  # CommClosedError is an OSError
            raise SchedulerLost(f"{self._scheduler_address()} did not answer: {short_error(error)}") from error
        return set(identity["workers"])

    def _scheduler_address(self) -> str:
        try:
            return str(self.client.scheduler.address)
        except Exception:  # noqa: BLE001 - only for the message
            return "the scheduler"

    def _check_scheduler(self) -> None:
        """Raise SchedulerLost once the client has been cut off from the scheduler
        for ``scheduler_timeout`` seconds (or has given up on it)."""
        status = str(getattr(self.client, "status", "running"))
        if status == "running":
            self._unreachable_since = None
            return
        now = time.time()
        since = self._unreachable_since = self._unreachable_since or now
        if status in ("closed", "failed") or now - since > self.plan.scheduler_timeout:
            raise SchedulerLost(f"{self._scheduler_address()} unreachable for {now - since:.0f} s "
                                f"(client status {status!r})")

    _unreachable_since: float | None = None

    def _record_placement(self, generation: int, placement: dict[int, str]) -> None:
        """Say which worker runs which stage: on the progress line and in the metrics log."""
        hosts = {s: _host(w) for s, w in placement.items()}
        self.metrics.write({"type": "placement", "generation": generation,
                            "workers": {str(s): w for s, w in sorted(placement.items())},
                            "hosts": {str(s): h for s, h in sorted(hosts.items())}})
        where = ", ".join(f"stage {s} on {w}" for s, w in sorted(placement.items()))
        self.progress.note(f"placement (generation {generation}): {where}")

    def _watch(self, generation: int, futures: list[Any], placement: dict[int, str], book: StepBook) -> list[dict]:
        control = DriverControl(ControlNames(self.plan.job_id, generation), client=self.client)
        shards: dict[int, dict[int, dict]] = {}
        self._ready: dict[int, dict] = {}
        self._peer_lost = {}
        self._timed = TimedCheckpoints(self.plan, self.client, control, self.metrics)
        last_membership_check = 0.0
        while True:
            self._check_scheduler()
            if self._unreachable_since is not None:  # reconnecting: a call now would block for its timeout
                time.sleep(self.plan.poll)
                continue
            try:
                messages = control.drain(timeout=self.plan.poll, callback_timeout=self.plan.scheduler_timeout)
            except (OSError, TimeoutError) as error:
                raise SchedulerLost(f"{self._scheduler_address()}: {short_error(error)}") from error
            for message in messages:
                self._handle(message, book, shards, generation)
            self._timed.maybe_request()
            failed = [s for s, f in enumerate(futures) if f.status in ("error", "cancelled", "lost")]
            if failed or self._peer_lost or time.time() - last_membership_check > 2 * self.plan.poll:
                last_membership_check = time.time()
                self._check(futures, placement, failed)
            if all(f.status == "finished" for f in futures):
                results = self.client.gather(futures)
                for message in control.drain(timeout=0.05):
                    self._handle(message, book, shards, generation)
                self._check_ended(results, placement)
                return results

    def _check(self, futures: list[Any], placement: dict[int, str], failed: list[int]) -> None:
        """Raise StageLost if a stage's worker left, its task failed or it lost a
        peer; a worker that left is the cause, its neighbours' lost peers (or
        failures) are the effect. A stage that reported a lost peer is waiting
        for the stop: it counts exactly as if its task had failed with PeerLost."""
        suspects = sorted(set(failed) | set(self._peer_lost))
        alive = self._alive()
        gone = [s for s in sorted(placement) if placement[s] not in alive]
        grace = time.time() + 1.0
        while suspects and not gone and time.time() < grace:
            # A neighbour's lost peer often comes to light before the scheduler
            # has dropped the killed worker: give it a moment.
            time.sleep(0.1)
            alive = self._alive()
            gone = [s for s in sorted(placement) if placement[s] not in alive]
        if gone:
            raise StageLost(gone, [placement[s] for s in gone], "worker left the cluster", worker_died=True)
        if not suspects:
            return
        s = suspects[0]
        if s not in failed:
            raise StageLost([s], [placement[s]], self._peer_lost[s]["reason"], worker_died=False)
        f = futures[s]
        error = f.exception() if f.status == "error" else None
        reason = short_error(error) if error is not None else f"task {f.status}"
        died = "KilledWorker" in reason
        lost = StageLost([s], [placement[s]], reason, worker_died=died)
        lost.deterministic = error is not None and _is_computation_error(error)
        lost.unwritable = isinstance(error, CheckpointUnwritable)
        raise lost

    def _check_ended(self, results: list[dict], placement: dict[int, str]) -> None:
        """A result saying the stop of this generation ended its stage. This
        driver never stops a generation it still watches, so someone else did
        (a second driver resuming the same job): the stage did not finish, and
        is lost as it was when its task failed with ``Stopped``."""
        ended = [s for s, r in enumerate(results) if r.get("ended")]
        if ended:
            s = ended[0]
            raise StageLost([s], [placement[s]], results[s]["reason"], worker_died=False)

    def _handle(self, message: dict, book: StepBook, shards: dict, generation: int) -> None:
        kind = message.get("type")
        if kind in ("step", "missed", "shard"):
            self._timed.heard(message)
        if kind == "step":
            for record in book.add(message):
                self.history.append(record)
                self.metrics.write(record)
                self.progress.step(record["step"], loss=record["loss"], samples_per_s=record["samples_per_s"],
                                   busy=record["busy"])
        elif kind == "shard":
            cut = message["cut"]
            shards.setdefault(cut, {})[message["stage"]] = message["record"]
            if len(shards[cut]) == self.plan.num_stages:
                self._commit(cut, shards.pop(cut), book, generation)
        elif kind == "ready":
            self._ready[message["stage"]] = message
        elif kind == "peer-lost":
            self._peer_lost.setdefault(message["stage"], message)
        elif kind == "first" and message["stage"] == 0:
            self._recovered(message["time"])
        elif kind == "error":
            # A stage's courier failed: its shard write (or a report). Its
            # checkpoints cannot be trusted to land, and a restart writes to
            # the same place: stop and say so.
            self.metrics.write(message)
            stage = message.get("stage")
            raise _CheckpointFailed(StageLost([stage] if stage is not None else [],
                                              [message.get("worker", "?")] if stage is not None else [],
                                              str(message.get("error")), worker_died=False))

    def _commit(self, cut: int, records: dict[int, dict], book: StepBook, generation: int) -> None:
        from pipetrain.checkpoint.store import ShardRecord

        started = time.perf_counter()
        try:
            self.store.commit(cut, records=[ShardRecord.from_dict(records[s]) for s in range(self.plan.num_stages)],
                              generation=generation, num_stages=self.plan.num_stages,
                              manifest=self._manifest(cut, book))
        except OSError as error:
            raise _CheckpointFailed(StageLost([], [], f"the driver could not commit checkpoint {cut} in "
                                              f"{self.store.root}: {short_error(error)}", worker_died=False)) from error
        self.metrics.write({"type": "checkpoint", "cut": cut, "generation": generation,
                            "commit_seconds": time.perf_counter() - started})

    def _recovered(self, first_done: float) -> None:
        """The new generation's first micro-batch is back at stage 0: the recovery is over."""
        if not self.recoveries or "total_seconds" in self.recoveries[-1]:
            return
        r = self.recoveries[-1]
        ready = list(self._ready.values())
        ready_at = max((m["time"] for m in ready), default=first_done)
        r.update({
            "load_seconds": max((m.get("load_seconds", 0.0) for m in ready), default=0.0),
            "startup_seconds": max((m.get("seconds", 0.0) for m in ready), default=0.0),
            "warmup_seconds": max(0.0, first_done - ready_at),
            "ready_at": ready_at,
            "first_microbatch_at": first_done,
            "total_seconds": first_done - r["detected_at"],
        })
        self.metrics.write({"type": "recovered", **{k: v for k, v in r.items() if k != "type"}})
        self.progress.note(f"recovered: generation {r['generation']} completed its first micro-batch "
                           f"{r['total_seconds']:.1f} s after the loss was detected "
                           f"(stop {r['stop_seconds']:.1f} s, placement {r.get('place_seconds', 0):.1f} s, "
                           f"load {r['load_seconds']:.2f} s, warm-up {r['warmup_seconds']:.1f} s)")

    def _manifest(self, cut: int, book: StepBook) -> dict:
        return {"schedule": dict(self.plan.schedule_args),
                "partition": {"boundaries": list(self.plan.partition.boundaries),
                              "method": self.plan.partition.method},
                "job_id": self.plan.job_id,
                # repr-exact floats: a resumed job reports the same loss history
                "losses": {str(k): v for k, v in sorted(book.losses.items()) if k < cut}}

    def _stop(self, generation: int, futures: list[Any], placement: dict[int, str], lost: StageLost | None) -> float:
        """Stop every stage of ``generation``; returns the seconds it took."""
        started = time.time()
        DriverControl(ControlNames(self.plan.job_id, generation), client=self.client).stop()
        lingering: list[int] = []
        alive: set[str] = set()
        while True:
            alive = self._alive()
            # A task on a worker that is gone will never report back: do not wait for it.
            lingering = [s for s, f in enumerate(futures) if f.status == "pending" and placement.get(s) in alive]
            if not lingering or time.time() - started > self.plan.stop_timeout:
                break
            time.sleep(0.05)
        if futures:
            self.client.cancel(futures, force=True)
        self.dead_workers |= {w for w in placement.values() if w not in alive}
        if lost is not None and lost.worker_died:
            self.dead_workers |= set(lost.workers)
        for s in lingering:
            # Its thread may still hold the worker's only slot: place elsewhere.
            self.avoid_workers.add(placement[s])
            self.progress.note(f"recovery: stage {s} on {placement[s]} did not stop within "
                               f"{self.plan.stop_timeout:g} s; cancelled, and that worker is avoided")
        return time.time() - started


class _CheckpointFailed(Exception):
    """A checkpoint could not be written or committed (not retried)."""

    def __init__(self, lost: StageLost):
        super().__init__(str(lost))
        self.lost = lost


def _host(address: str) -> str:
    from distributed.comm.addressing import get_address_host

    try:
        return get_address_host(address)
    except ValueError:
        return address


# Errors of the machinery around a stage (a vanished peer, a stop, a timeout,
# a lost worker): a restart may cure them. Anything else came from the
# stage's own computation on its data, which a restart would only repeat.
_RETRYABLE = ("PeerLost", "TransportError", "TransportTimeout", "Stopped", "TimeoutError", "KilledWorker",
              "CancelledError", "CommClosedError", "StaleGenerationError", "MemoryError")


def _is_computation_error(error: BaseException) -> bool:
    names = {cls.__name__ for cls in type(error).__mro__}
    return not (names & set(_RETRYABLE)) and not isinstance(error, OSError)


def _boundary_specs(partition: Any, stage: int) -> Any:
    """What stage ``stage`` must receive: the previous stage's output specs
    as traced by the partitioner, every dimension but the last free (batch
    and sequence length may vary per micro-batch; dtypes and feature sizes
    may not)."""
    if stage == 0:
        return None
    from pipetrain.stages.base import TensorSpec
    from pipetrain.tree import tree_map

    def relaxed(spec: TensorSpec) -> TensorSpec:
        shape = tuple(None for _ in spec.shape[:-1]) + tuple(spec.shape[-1:])
        return TensorSpec(shape, spec.dtype)

    return tree_map(relaxed, partition.stages[stage - 1].output_specs)

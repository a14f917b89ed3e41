"""The driver: the Dask shell around the job core.

Every decision (what to place, when a stage is lost and who is to blame, where
to roll back to, when to commit or ask for a timed checkpoint, when to give
up) is the job core's (``runtime/core.py``), which does no I/O. This shell
turns what it sees into the core's events and carries out its instructions:

    Dask future statuses       -> TaskEnded          Place            -> wait_for_placement
    scheduler's worker list    -> WorkersChanged     Submit           -> client.submit(run_stage)
    control-plane reports      -> StepReport, ...    StopGeneration   -> stop flag, wait, cancel
    store answers              -> Started, ...       BeginGeneration  -> fence + discard newer cuts
    the poll                   -> Tick               Commit           -> store.commit
    Ctrl-C                     -> Interrupted        WriteRecord/Note -> metrics log, progress line
    a scheduler that is gone   -> SchedulerLost      Finish / Fail    -> return / raise

Answers (``Placed``, ``StopFinished``, ``LatestCheckpoint``, ``CommitDone``,
...) go back to the core before the next polled event. Each stage is one
long-running Dask task pinned to its worker (DESIGN.md section 3); the driver
never touches activations.
"""
from __future__ import annotations

import time
from typing import Any

from pipetrain.errors import CheckpointDirInUse, JobFailed, JobInterrupted, RetryableError, StageLost, short_error
from pipetrain.observe.progress import MetricsLog, Progress
from pipetrain.runtime import core_events as ev
from pipetrain.runtime.control import ControlNames, DriverControl
from pipetrain.runtime.core import JobCore
from pipetrain.runtime.plan import JobPlan, RunOutcome, StoredStates, boundary_specs
from pipetrain.runtime.worker import StageJob, run_stage

__all__ = ["CheckpointDirInUse", "Driver", "JobFailed", "JobInterrupted", "JobPlan", "RunOutcome", "StageLost"]


class SchedulerUnreachable(RetryableError, RuntimeError):
    """A call to the scheduler failed, or the client has been cut off from it too long."""


class Driver:
    def __init__(self, client: Any, plan: JobPlan, *, progress: Progress, metrics: MetricsLog):
        self.client, self.plan = client, plan
        self.progress, self.metrics = progress, metrics
        self.store = None
        if plan.checkpoint_url:
            from pipetrain.checkpoint.store import CheckpointStore

            self.store = CheckpointStore(plan.checkpoint_url, keep=plan.spec.checkpoint.keep)
        self.core = JobCore(ev.JobSettings.from_plan(plan, self.store.root if self.store else None))
        self.futures: dict[int, list[Any]] = {}  # generation -> its stage tasks
        self.placements: dict[int, dict[int, str]] = {}
        self._ended: set[tuple[int, int]] = set()  # (generation, stage) whose TaskEnded went in
        self._unreachable_since: float | None = None
        self._needs: list[int] | None = None  # each stage's estimated peak bytes (placement)
        self._controls: dict[ControlNames, DriverControl] = {}
        self._stop_asked = False  # the supervisor's stop request, heard once

    # -- the loop -----------------------------------------------------------
    def run(self) -> RunOutcome:
        outcome = self._feed(self._started())
        last_membership = 0.0
        while outcome is None:
            try:
                events = self._poll(include_members=time.time() - last_membership > 2 * self.plan.poll)
                if any(isinstance(e, ev.WorkersChanged) for e in events):
                    last_membership = time.time()
                outcome = self._feed(events)
            except KeyboardInterrupt:
                outcome = self._feed([ev.Interrupted(now=time.time())])
            except SchedulerUnreachable as error:
                outcome = self._feed([ev.SchedulerLost(str(error), now=time.time())])
        return outcome

    def _feed(self, events: list[ev.Event]) -> RunOutcome | None:
        """Hand events to the core, carry out what it says; answers go back in first."""
        while events:
            answers: list[ev.Event] = []
            try:
                for instruction in self.core.handle(events.pop(0)):
                    answer = self._carry_out(instruction)
                    if isinstance(answer, RunOutcome):
                        return answer
                    if answer is not None:
                        answers.append(answer)
            except KeyboardInterrupt:
                answers.append(ev.Interrupted(now=time.time()))
            except SchedulerUnreachable as error:
                answers.append(ev.SchedulerLost(str(error), now=time.time()))
            events[:0] = answers
        return None

    def _started(self) -> list[ev.Event]:
        store, resume = self.store, self.plan.resume
        if store is None:
            return [ev.Started(resume=resume, now=time.time())]
        latest = ev.CheckpointView.from_committed(store.latest()) if resume else None
        unusable = ()
        if resume and latest is None:
            unusable = tuple((c.path, c.reason) for c in store.list() if c.status != "uncommitted")
        if not resume:
            from pipetrain.rundir import claim_checkpoints

            claim_checkpoints(store)
        return [ev.Started(resume=resume,
                           previous_generation=store.current_generation(), latest=latest, unusable=unusable,
                           now=time.time())]

    def _poll(self, *, include_members: bool) -> list[ev.Event]:
        g = self.core.generation
        self._check_scheduler()
        if self._unreachable_since is not None:  # reconnecting: a call now would block for its timeout
            time.sleep(self.plan.poll)
            return [ev.Tick(now=time.time())]
        try:
            messages = self._control(g).drain(timeout=self.plan.poll, callback_timeout=self.plan.scheduler_timeout)
        except (OSError, TimeoutError) as error:
            raise SchedulerUnreachable(f"{self._scheduler_address()}: {short_error(error)}") from error
        events: list[ev.Event] = [r for m in messages if (r := ev.report_from_message(m, g, time.time()))]
        for s, future in enumerate(self.futures.get(g, [])):
            if future.status != "pending" and (g, s) not in self._ended:
                self._ended.add((g, s))
                events.append(ev.TaskEnded(s, g, future.status, now=time.time(),
                                           error=future.exception() if future.status == "error" else None,
                                           result=future.result() if future.status == "finished" else None))
        if include_members:
            events.append(ev.WorkersChanged(frozenset(self._alive()), now=time.time()))
            if self.plan.supervisor is not None and not self._stop_asked and self.plan.supervisor.stop_requested():
                self._stop_asked = True
                self.progress.note("stop requested (`pipetrain cancel`): stopping the stages")
                events.append(ev.Interrupted(now=time.time()))
        return events + [ev.Tick(now=time.time())]

    # -- instructions ---------------------------------------------------------
    def _carry_out(self, i: ev.Instruction) -> Any:
        now = time.time
        if isinstance(i, ev.WriteRecord):
            self.metrics.write(i.record)
        elif isinstance(i, ev.Note):
            self.progress.note(i.text)
        elif isinstance(i, ev.ShowStep):
            self.progress.step(i.step, loss=i.loss, samples_per_s=i.samples_per_s, busy=i.busy)
        elif isinstance(i, ev.ShowEval):
            self.progress.eval(i.step, i.loss)
        elif isinstance(i, ev.BeginGeneration):
            self.store.begin_generation(i.generation)
            self.store.discard_after(i.cut, generation=i.generation)
        elif isinstance(i, ev.StopOldRun):
            self._control(i.generation, i.job_id).stop()
        elif isinstance(i, ev.Place):
            return self._place(i)
        elif isinstance(i, ev.Submit):
            self.placements[i.generation] = dict(i.placement)
            self.futures[i.generation] = self._submit(i)
        elif isinstance(i, ev.StopGeneration):
            return self._stop(i)
        elif isinstance(i, ev.ReadLatestCheckpoint):
            return ev.LatestCheckpoint(ev.CheckpointView.from_committed(self.store.latest()), now=now())
        elif isinstance(i, ev.Commit):
            return self._commit(i)
        elif isinstance(i, ev.RequestCut):
            self._control(i.generation).request_checkpoint(self.client, i.cut)
        elif isinstance(i, ev.Finish):
            # Per task (replica r's stage s is r * p + s): the events and ledgers; the states are
            # replica 0's (every replica ends with the same).
            return RunOutcome(losses=i.losses, states=self._final_states(i.results[:self.plan.num_stages]),
                              events=[r["events"] for r in i.results], history=i.history, recoveries=i.recoveries,
                              generation=i.generation, wall_seconds=i.wall_seconds, resumed_from=i.resumed_from,
                              ledgers=[r["ledger"] for r in i.results], evals=i.evals)
        elif isinstance(i, ev.Fail):
            raise i.exception() from i.cause
        else:
            raise TypeError(f"the driver cannot carry out {i!r}")
        return None

    def _final_states(self, results: tuple[dict, ...]) -> Any:
        """The stages' final states: read from the run's last checkpoint, stage by stage, when
        asked (a stage whose schedule ends with one returns none), else as the tasks returned them."""
        if all(r.get("state") is not None for r in results):
            return [r["state"] for r in results]
        end = self.plan.schedule.total_microbatches * self.plan.replicas  # the job's last cut
        return StoredStates(self.plan.checkpoint_url, end, len(results))

    def _place(self, i: ev.Place) -> ev.Event:
        from pipetrain.runtime.placement import PlacementError, StageNeed, wait_for_placement

        p, per_stage = self.plan.num_stages, self._memory_needs()
        needs = [StageNeed(stage=r * p + s, memory_bytes=b, replica=r)
                 for r in range(self.plan.replicas) for s, b in enumerate(per_stage)]
        exclude = set(i.exclude) | (self.plan.supervisor.reserved_workers() if self.plan.supervisor else set())
        try:
            cluster = self.plan.spec.cluster
            placement = wait_for_placement(self.client, needs, resource=cluster.resource,
                                           timeout=cluster.placement_timeout, exclude=tuple(sorted(exclude)))
        except PlacementError as error:
            return ev.PlacementFailed(str(error), now=time.time())
        return ev.Placed(dict(placement.stage_workers), tuple(placement.spares), now=time.time())

    def _memory_needs(self) -> list[int]:
        """Each stage's estimated peak bytes under the job's schedule (pipetrain.memory), once."""
        if self._needs is None:
            from pipetrain.memory import placement_needs

            plan = self.plan
            self._needs = placement_needs(plan.partition, plan.schedule.build(), optimizer=plan.spec.optimizer,
                                          credits=plan.spec.cluster.credits or None)
        return self._needs

    def _submit(self, i: ev.Submit) -> list[Any]:
        from pipetrain.ties import plan_ties

        plan = self.plan
        futures = []
        ties = plan_ties(plan.partition) or None
        d = plan.replicas
        # The job's cut i.cut is each replica's cut i.cut / d (schedule/replicas.py).
        schedule = plan.schedule.resumed_at(i.cut // d)
        for r in range(d):  # in task order: replica r's stage s is task r * p + s
            for spec in plan.partition.specs():
                job = StageJob(job_id=plan.job_id, generation=i.generation, spec=spec, model=plan.partition.model,
                               optimizer=plan.optimizer, schedule=schedule,
                               source=plan.source, checkpoint_url=plan.checkpoint_url, resume_cut=i.cut or None,
                               credits=plan.spec.cluster.credits, transport=plan.spec.cluster.transport,
                               max_events=StageJob.max_events if plan.spec.record_events else 0,
                               resume_ledger=i.ledgers.get(spec.index), secret=plan.secret,
                               input_specs=boundary_specs(plan.partition, spec.index),
                               output_specs=boundary_specs(plan.partition, spec.index + 1),
                               heldout=plan.heldout, evaluation=plan.evaluation, ties=ties, replica=r, replicas=d,
                               cut_replicas=i.cut_replicas, bucket_bytes=plan.spec.cluster.reduce_bucket_bytes,
                               exchange=plan.spec.cluster.reduce_exchange)
                name = f"stage{spec.index}" if d == 1 else f"stage{spec.index}-replica{r}"
                futures.append(self.client.submit(run_stage, job, workers=[i.placement[job.task]],
                                                  allow_other_workers=False, pure=False, retries=0,
                                                  key=f"pipetrain-{plan.job_id}-g{i.generation}-{name}"))
        return futures

    def _stop(self, i: ev.StopGeneration) -> ev.Event:
        """Raise the stop flag, wait for the tasks on live workers (one on a worker
        that is gone never reports back), then cancel them all."""
        started = time.time()
        self._alive()  # a scheduler that is gone raises here, bounded, not inside the stop's own calls
        self._control(i.generation).stop()
        futures, placement = self.futures.get(i.generation, []), self.placements.get(i.generation, {})
        while True:
            alive = self._alive()
            lingering = [s for s, f in enumerate(futures) if f.status == "pending" and placement.get(s) in alive]
            if not lingering or time.time() - started > i.timeout:
                break
            time.sleep(0.05)
        if futures:
            self.client.cancel(futures, force=True)
        return ev.StopFinished(i.generation, tuple(lingering), frozenset(alive), now=time.time())

    def _commit(self, i: ev.Commit) -> ev.Event:
        from pipetrain.checkpoint.manifest import step_dir_name
        from pipetrain.checkpoint.store import ShardRecord

        started = time.perf_counter()
        try:
            committed = self.store.commit(i.cut, records=[ShardRecord.from_dict(r) for r in i.records],
                                          generation=i.generation, num_stages=len(i.records), manifest=i.manifest)
        except Exception as error:  # noqa: BLE001 - the core decides; it fails the job, naming the place
            path = f"{self.store.root.rstrip('/')}/{step_dir_name(i.cut)}"
            return ev.CommitFailed(i.cut, i.generation, error, path, now=time.time())
        return ev.CommitDone(i.cut, i.generation, committed.path, time.perf_counter() - started, now=time.time())

    # -- the scheduler ------------------------------------------------------
    def _control(self, generation: int, job_id: str | None = None) -> DriverControl:
        names = ControlNames(job_id or self.plan.job_id, generation)
        if names not in self._controls:  # (making one is a scheduler round trip)
            self._controls[names] = DriverControl(names, client=self.client)
        return self._controls[names]

    def _alive(self) -> set[str]:
        # Asked of the scheduler directly: ``Client.scheduler_info`` returns a
        # cache that the client's periodic refresh may just have replaced with
        # one holding no workers, which would read as "every worker left".
        self._check_scheduler()
        try:
            identity = self.client.sync(self.client.scheduler.identity, n_workers=-1,
                                        callback_timeout=self.plan.scheduler_timeout)
        except (OSError, TimeoutError) as error:  # CommClosedError is an OSError
            raise SchedulerUnreachable(f"{self._scheduler_address()} did not answer: {short_error(error)}") from error
        return set(identity["workers"])

    def _check_scheduler(self) -> None:
        """Raise once the client has been cut off from the scheduler for
        ``scheduler_timeout`` seconds, or has given up on it."""
        status = str(getattr(self.client, "status", "running"))
        if status == "running":
            self._unreachable_since = None
            return
        now = time.time()
        since = self._unreachable_since = self._unreachable_since or now
        if status in ("closed", "failed") or now - since > self.plan.scheduler_timeout:
            raise SchedulerUnreachable(f"{self._scheduler_address()} unreachable for {now - since:.0f} s "
                                       f"(client status {status!r})")

    def _scheduler_address(self) -> str:
        try:
            return str(self.client.scheduler.address)
        except Exception:  # noqa: BLE001 - only for the message
            return "the scheduler"

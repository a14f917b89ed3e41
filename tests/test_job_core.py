"""The job core, played event by event: no cluster, no clock, no threads.

Each test drives ``JobCore`` the way the driver's shell would (placement
answers, stage reports, task ends, worker lists, ticks, store answers) and
checks the instructions that come back, in order.
"""
import asyncio
from types import SimpleNamespace

import pytest

from pipetrain.observe.records import (CheckpointMissedRecord, CheckpointRecord, CheckpointRequestRecord, ErrorRecord,
                                       FailedRecord, InterruptedRecord, PlacementRecord, RecoveredRecord,
                                       RecoveryRecord, ResumeRecord, StepRecord)
from pipetrain.errors import JobFailed, JobInterrupted, StageLost, is_retryable, is_worker_death
from pipetrain.runtime.core import PEER_LOST_GRACE, JobCore
from pipetrain.runtime.placement import merge_placement
from pipetrain.runtime.core_events import (BeginGeneration, CheckpointView, Commit, CommitDone,
                                           CommitFailed, CourierError, CutMissed, Fail, Finish, FirstBackward,
                                           Interrupted, JobSettings, LatestCheckpoint, PeerLostReport, Placed,
                                           Place, PlacementFailed, ReadLatestCheckpoint, RequestCut, SchedulerLost,
                                           ShardWritten, ShowStep, StageDone, StageReady, Started, StepReport,
                                           StopFinished, StopGeneration, StopOldRun, Submit, TaskEnded, Tick,
                                           WorkersChanged, WriteRecord, report_from_message)

W = {0: "tcp://w0:1", 1: "tcp://w1:1", 2: "tcp://w2:1"}
SPARE = "tcp://w3:1"
M = 4  # micro-batches per step


class Job:
    """A core and a clock: ``job(Event, ..., after=seconds)`` hands it one event at a later ``now``."""

    def __init__(self, *, store: str | None = "/ckpt", **settings):
        self.core = JobCore(JobSettings(num_stages=3, microbatches=M, steps=10, microbatch_size=2, job_id="job",
                                        store=store, **settings))
        self.now = 1000.0

    def __call__(self, event, *args, after: float = 0.0, **fields):
        self.now += after
        return self.core.handle(event(*args, now=self.now, **fields))

    @property
    def generation(self) -> int:
        return self.core.generation

    def start(self, placement=W, spares=(SPARE,)) -> list:
        assert kinds(self(Started)) == ["BeginGeneration", "Place"]
        return self.place(placement, spares)

    def place(self, placement, spares=()) -> Submit:
        out = self(Placed, dict(placement), tuple(spares))
        assert kinds(out) == ["WriteRecord", "Note", "Submit"]
        return out[-1]

    def step(self, step: int, *, after: float = 0.5) -> list:
        self.now += after
        out = []
        for s in (2, 1, 0):
            out += self(StepReport, generation=self.generation, stage=s, step=step, busy=0.4, wall=0.5,
                        time=self.now, losses={step * M + k: 1.0 for k in range(M)} if s == 2 else {})
        return out

    def shards(self, cut: int) -> list:
        out = []
        for s in (2, 1, 0):
            ledger = {"applied": [[0, cut]]}
            record = {"cut": cut, "stage": s, "generation": self.generation, "meta": {"ledger": ledger}}
            out += self(ShardWritten, generation=self.generation, stage=s, cut=cut, record=record)
        return out

    def checkpoint(self, cut: int) -> list:
        (commit,) = self.shards(cut)
        assert isinstance(commit, Commit) and commit.cut == cut
        return self(CommitDone, cut, self.generation, f"/ckpt/step-{cut:010d}")

    def recover(self, latest, **stop) -> list:
        """The shell's side of a stop and a checkpoint look-up; returns what follows them."""
        assert self(StopFinished, self.generation, **stop) == [ReadLatestCheckpoint()]
        return self(LatestCheckpoint, latest)

    def fails(self, latest, *, after_stop=True) -> Fail:
        """The end of a job that cannot go on: [stop,] look-up, then Fail (returned)."""
        out = self.recover(latest) if after_stop else self(LatestCheckpoint, latest)
        assert isinstance(out[-1], Fail) and self(Tick) == []  # nothing comes out after the end
        self.out = out
        return out[-1]


def killed_worker(address: str):
    from distributed.scheduler import KilledWorker

    return KilledWorker("pipetrain-job-g0-stage1", SimpleNamespace(address=address), 0)


def kinds(instructions) -> list[str]:
    return [type(i).__name__ for i in instructions]


def only(instructions, kind):
    (found,) = [i for i in instructions if isinstance(i, kind)]
    return found


def records(instructions, kind: type) -> list:
    return [i.record for i in instructions if isinstance(i, WriteRecord) and isinstance(i.record, kind)]


def view(cut: int) -> CheckpointView:
    return CheckpointView(cut=cut, path=f"/ckpt/step-{cut:010d}", ledgers={s: {"applied": [[0, cut]]} for s in W},
                          losses={k: 1.0 for k in range(cut)}, job_id="job")


def test_a_clean_run_commits_every_cut_and_ends_with_finish():
    job = Job()
    job(Started)
    placed = job(Placed, dict(W), (SPARE,))
    assert placed[0].record == PlacementRecord(generation=0, workers={"0": W[0], "1": W[1], "2": W[2]},
                                               hosts={"0": "w0", "1": "w1", "2": "w2"})
    assert "stage 1 on tcp://w1:1" in placed[1].text and placed[2] == Submit(0, 0, {}, W)
    out = job.step(0)
    assert kinds(out) == ["WriteRecord", "ShowStep"] and records(out, StepRecord)[0].loss == 1.0
    assert only(out, ShowStep).step == 0
    commit = job.shards(4)[0]
    assert [r["stage"] for r in commit.records] == [0, 1, 2]  # in stage order, whatever the arrival order
    assert commit.manifest["losses"] == {str(k): 1.0 for k in range(4)} and commit.manifest["job_id"] == "job"
    assert records(job(CommitDone, 4, 0, "/ckpt/step-0000000004", seconds=0.1), CheckpointRecord) == [
        CheckpointRecord(cut=4, generation=0, commit_seconds=0.1)]
    for s in range(3):
        assert job(TaskEnded, s, 0, "finished", result={"state": s, "ledger": {}}) == []  # "done" not yet heard
    assert job(StageDone, generation=0, stage=0) == [] and job(StageDone, generation=0, stage=1) == []
    (finish,) = job(StageDone, generation=0, stage=2)
    assert isinstance(finish, Finish) and [r["state"] for r in finish.results] == [0, 1, 2]
    assert finish.generation == 0 and finish.recoveries == [] and list(finish.losses) == [0, 1, 2, 3]
    assert job(Tick) == []  # over: nothing more comes out


def test_a_finished_generation_does_not_wait_forever_for_done_reports():
    job = Job(store=None)
    assert kinds(job(Started)) == ["Place"]
    job.place(W)
    for s in range(3):
        job(TaskEnded, s, 0, "finished", result={"state": s})
    assert job(Tick, after=0.5) == []
    assert kinds(job(Tick, after=0.6)) == ["Finish"]


def test_a_worker_lost_mid_step_rolls_back_to_the_last_committed_cut():
    job = Job()
    job.start()
    job.step(0)
    job.checkpoint(4)
    job.step(1)
    assert job(WorkersChanged, frozenset({W[0], W[2], SPARE}), after=0.3) == [StopGeneration(0, 10.0)]
    out = job.recover(view(4), alive=frozenset({W[0], W[2], SPARE}), after=0.2)
    assert kinds(out) == ["BeginGeneration", "WriteRecord", "Note", "Place"]
    assert out[0] == BeginGeneration(1, 4)  # fenced before anything records the recovery
    (recovery,) = records(out, RecoveryRecord)
    assert recovery.stages == [1] and recovery.workers == [W[1]] and recovery.worker_died
    assert recovery.rollback_to == 4 and recovery.checkpoint == "/ckpt/step-0000000004"
    assert recovery.stop_seconds == pytest.approx(0.2)
    assert job.core.recoveries == [recovery.as_dict()]  # FitResult.recoveries: dicts, as before
    assert "rolling back to the checkpoint at micro-batch 4 as generation 1" in out[2].text
    assert out[3] == Place(exclude=frozenset({W[1]}), previous=W)
    job.now += 1.0
    submit = job.place({0: W[0], 1: W[2], 2: SPARE}, (SPARE,))
    assert submit == Submit(1, 4, view(4).ledgers, {0: W[0], 1: SPARE, 2: W[2]})
    job(StageReady, generation=1, stage=0, time=job.now + 0.5, load_seconds=0.3)
    out = job(FirstBackward, generation=1, stage=0, k=4, time=job.now + 1.5)
    (recovered,) = records(out, RecoveredRecord)
    assert recovered.warmup_seconds == pytest.approx(1.0) and recovered.load_seconds == 0.3
    assert recovered.total_seconds == pytest.approx(0.2 + 1.0 + 1.5) and recovered.place_seconds == 1.0
    assert recovered.workers_after == {"0": W[0], "1": SPARE, "2": W[2]} and recovered.rollback_to == 4
    # The step history after the cut is gone; step 1 is recorded again, once.
    assert [r.step for r in records(job.step(1), StepRecord)] == [1]
    assert [h["step"] for h in job.core.history] == [0, 1]


def test_a_step_before_the_cut_that_no_stage_reports_again_is_closed_at_the_rollback():
    job = Job()
    job.start()
    job.step(0)
    for s in (2, 1):  # step 1 ran on every stage, but stage 0's report is lost with its worker
        job(StepReport, generation=0, stage=s, step=1, busy=0.4, wall=0.5, time=job.now,
            losses={4: 1.0, 5: 1.0} if s == 2 else {})
    job.checkpoint(8)
    alive = frozenset({W[1], W[2], SPARE})
    assert job(WorkersChanged, alive, after=0.3) == [StopGeneration(0, 10.0)]
    out = job.recover(view(8), alive=alive, after=0.2)
    assert kinds(out) == ["BeginGeneration", "WriteRecord", "WriteRecord", "Note", "Place"]
    # Its losses from the checkpoint (the reports held only two of them), no rate or busy shares.
    (closed,) = records(out, StepRecord)
    assert (closed.step, closed.loss, closed.samples_per_s, closed.busy) == (1, 1.0, None, [])
    job.place({0: SPARE, 1: W[1], 2: W[2]})
    assert [r.step for r in records(job.step(2), StepRecord)] == [2]
    assert [h["step"] for h in job.core.history] == [0, 1, 2]


def test_a_loss_during_recovery_recovers_again():
    job = Job()
    job.start()
    job.checkpoint(4)
    job(WorkersChanged, frozenset({W[0], W[2], SPARE}))
    job.recover(view(4))
    job.place({0: W[0], 1: SPARE, 2: W[2]})
    # Generation 1 loses stage 0 before its first micro-batch is back.
    assert job(WorkersChanged, frozenset({W[2], SPARE})) == [StopGeneration(1, 10.0)]
    out = job.recover(view(4))
    assert out[0] == BeginGeneration(2, 4) and out[-1].exclude == {W[0], W[1]}
    assert records(out, RecoveryRecord)[0].stages == [0]
    assert "total_seconds" not in job.core.recoveries[0]  # the first recovery never completed


def test_two_workers_lost_at_once_make_one_recovery_blaming_both():
    job = Job()
    job.start(spares=(SPARE, "tcp://w4:1"))
    out = job(WorkersChanged, frozenset({W[1], SPARE, "tcp://w4:1"}))
    assert out == [StopGeneration(0, 10.0)]
    out = job.recover(None)
    (recovery,) = records(out, RecoveryRecord)
    assert recovery.stages == [0, 2] and recovery.workers == [W[0], W[2]] and recovery.rollback_to == 0
    assert out[-1].exclude == {W[0], W[2]}
    assert job(PeerLostReport, generation=0, stage=1, reason="PeerLost: stage 0") == []  # an effect, and stale


def test_a_lost_peer_waits_for_the_scheduler_to_drop_the_dead_worker():
    job = Job()
    job.start()
    assert job(PeerLostReport, generation=0, stage=2, reason="PeerLost: stage 1 went away") == []
    assert job(Tick, after=PEER_LOST_GRACE / 2) == []
    out = job(WorkersChanged, frozenset({W[0], W[2]}), after=0.1)  # the killed worker's neighbour is not blamed
    assert out == [StopGeneration(0, 10.0)] and job.core.loss.stages == [1] and job.core.loss.worker_died


def test_a_lost_peer_is_blamed_when_no_worker_left_within_the_grace():
    job = Job()
    job.start()
    job(PeerLostReport, generation=0, stage=2, reason="PeerLost: stage 1 went away")
    assert job(Tick, after=PEER_LOST_GRACE) == [StopGeneration(0, 10.0)]
    loss = job.core.loss
    assert (loss.stages, loss.reason, loss.worker_died, loss.deterministic) == (
        [2], "PeerLost: stage 1 went away", False, False)


def test_killed_worker_counts_as_a_worker_death():
    job = Job()
    job.start()
    job(TaskEnded, 1, 0, "error", error=killed_worker(W[1]))
    assert job(Tick, after=PEER_LOST_GRACE) == [StopGeneration(0, 10.0)]
    assert job.core.loss.worker_died and not job.core.loss.deterministic
    out = job.recover(None)
    assert out[-1].exclude == {W[1]} and records(out, RecoveryRecord)[0].reason.startswith("KilledWorker")


def test_timed_checkpoints_pick_a_cut_ahead_of_the_furthest_stage_and_ask_again_after_a_miss():
    job = Job(checkpoint_seconds=5.0)
    job.start()
    job.step(0, after=0.0)
    job.step(1, after=0.5)  # 0.5 s a step: the lead is 2 + 1 s / 0.5 s = 4 steps
    assert job(Tick, after=1.0) == []  # not yet 5 s since the generation started
    out = job(Tick, after=4.0)
    assert out == [RequestCut((1 + 1 + 4) * M, 0),
                   WriteRecord(CheckpointRequestRecord(cut=24, furthest_step=1))]
    assert job(Tick, after=1.0) == []  # one request at a time
    assert records(job(CutMissed, generation=0, stage=2, cut=24), CheckpointMissedRecord) == [
        CheckpointMissedRecord(cut=24, stage=2)]
    job.step(2, after=0.5)  # 5.5 s after step 1: the lead falls to 2 steps
    assert only(job(Tick), RequestCut) == RequestCut((2 + 1 + 2) * M, 0)
    job.checkpoint(20)  # stage 0's shard marks the cut done and restarts the clock
    assert job(Tick, after=4.0) == [] and kinds(job(Tick, after=1.0)) == ["RequestCut", "WriteRecord"]


def test_no_timed_cut_past_the_last_step():
    job = Job(checkpoint_seconds=1.0)
    job.start()
    job.step(7)
    assert job(Tick, after=2.0) == []  # 7 + 1 + 2 steps would be past 10 steps


def test_spares_are_preferred_when_re_placing():
    previous = {0: "a", 1: "b", 2: "c"}
    assert merge_placement(previous, {0: "a", 1: "c", 2: "d"}, ("e",)) == {0: "a", 1: "e", 2: "c"}
    assert merge_placement(previous, {0: "a", 1: "c", 2: "d"}, ()) == {0: "a", 1: "d", 2: "c"}
    assert merge_placement({}, {0: "x", 1: "y"}, ("z",)) == {0: "x", 1: "y"}


def test_max_restarts_exhausted_fails_with_the_reason_and_the_checkpoint():
    job = Job(max_restarts=1)
    job.start()
    job.checkpoint(4)
    job(WorkersChanged, frozenset({W[0], W[2], SPARE}))
    job.recover(view(4))
    job.place({0: W[0], 1: SPARE, 2: W[2]})
    job(WorkersChanged, frozenset({W[0], W[2]}))
    out = job.recover(view(4))
    assert kinds(out) == ["WriteRecord", "Note", "Fail"]
    fail = out[-1]
    assert "stage 1 on worker tcp://w3:1: worker left the cluster" in fail.reason
    assert "gave up after 1 restart(s)" in fail.reason and "/ckpt/step-0000000004 (micro-batch 4)" in fail.reason
    assert records(out, FailedRecord)[0].checkpoint == "/ckpt/step-0000000004" and not fail.retryable
    assert isinstance(fail.cause, StageLost) and isinstance(fail.exception(), JobFailed)


def test_reports_from_a_stale_generation_are_ignored():
    job = Job()
    job.start()
    job.step(0)
    job(WorkersChanged, frozenset({W[0], W[2], SPARE}))
    job.recover(None)
    job.place({0: W[0], 1: SPARE, 2: W[2]})
    assert job.generation == 1
    stale = [StepReport(generation=0, stage=s, step=1, busy=0.1, wall=0.1, time=job.now, now=job.now)
             for s in range(3)]
    stale += [ShardWritten(generation=0, stage=s, cut=8, record={}, now=job.now) for s in range(3)]
    stale += [PeerLostReport(generation=0, stage=2, reason="PeerLost", now=job.now),
              TaskEnded(1, 0, "error", error=RuntimeError("old"), now=job.now),
              CommitFailed(8, 0, RuntimeError("refused"), "/ckpt/step-0000000008", now=job.now),
              StopFinished(0, now=job.now), Tick(now=job.now + 5)]
    assert job.core.handle(*stale) == []


def test_a_stage_that_does_not_stop_has_its_worker_avoided():
    job = Job()
    job.start()
    job(TaskEnded, 0, 0, "error", error=TimeoutError("stage 1 did not publish its address"))
    job(Tick, after=PEER_LOST_GRACE)
    out = job(StopFinished, 0, lingering=(2,), alive=frozenset(W.values()), after=10.0)
    assert kinds(out) == ["Note", "ReadLatestCheckpoint"]
    assert "stage 2 on tcp://w2:1 did not stop within 10 s" in out[0].text
    assert job(LatestCheckpoint, None)[-1] == Place(exclude=frozenset({W[2]}), previous=W)


def test_a_deterministic_error_fails_at_once():
    job = Job()
    job.start()
    job.checkpoint(4)
    job(TaskEnded, 1, 0, "error", error=ValueError("stage 1: bad shapes"))
    job(PeerLostReport, generation=0, stage=2, reason="PeerLost")  # the effect, also not blamed
    assert job(Tick, after=PEER_LOST_GRACE) == [StopGeneration(0, 10.0)]
    out = job.recover(view(4))
    assert kinds(out) == ["WriteRecord", "Note", "Fail"]
    assert "ValueError: stage 1: bad shapes" in out[-1].reason
    assert "own computation failed" in out[-1].reason and records(out, FailedRecord)[0].stages == [1]


def test_a_checkpoint_that_cannot_be_committed_or_written_fails_the_job_naming_the_place():
    job = Job(run_dir="/runs/a")
    job.start()
    job.checkpoint(4)
    job.shards(8)
    error = OSError("[Errno 28] No space left on device")
    assert job(CommitFailed, 8, 0, error, "/ckpt/step-0000000008") == [StopGeneration(0, 10.0)]
    fail = job.fails(view(4))
    assert kinds(job.out) == ["WriteRecord", "Note", "Fail"] and not fail.retryable  # no restart
    assert fail.reason.startswith("the driver could not commit checkpoint 8 in /ckpt/step-0000000008: OSError")
    assert "a checkpoint could not be written" in fail.reason
    assert "/ckpt/step-0000000004 (micro-batch 4); `pipetrain resume /runs/a` continues from it" in fail.reason
    # A stage's shard write: its courier's error report names the stage and its worker.
    job = Job()
    job.start()
    out = job(CourierError, generation=0, stage=1, worker=W[1], cut=8, error="stage 1 could not write its shard")
    assert out == [WriteRecord(ErrorRecord(stage=1, worker=W[1], cut=8, error="stage 1 could not write its shard")),
                   StopGeneration(0, 10.0)]
    assert job.fails(None).reason.startswith("stage 1 on worker tcp://w1:1: stage 1 could not write its shard; "
                                             "a checkpoint could not be written")


def test_a_worker_that_cannot_write_the_checkpoint_location_is_not_retried():
    from pipetrain.runtime.worker import CheckpointUnwritable

    job = Job()
    job.start()
    job(TaskEnded, 0, 0, "error", error=CheckpointUnwritable("stage 0 cannot write the checkpoint location /ckpt"))
    job(Tick, after=PEER_LOST_GRACE)
    fail = job.fails(None)
    assert "cannot write the checkpoint location /ckpt; a restart would fail the same way" in fail.reason
    assert not records(job.out, RecoveryRecord)


def test_a_lost_scheduler_fences_the_store_and_fails_with_a_resume_hint():
    job = Job()
    job.start()
    job.checkpoint(4)
    job.shards(8)  # a commit the shell never got to make
    assert job(SchedulerLost, "tcp://s:8786 did not answer: TimeoutError") == [ReadLatestCheckpoint()]  # no stop
    fail = job.fails(view(4), after_stop=False)
    assert kinds(job.out) == ["BeginGeneration", "WriteRecord", "Note", "Fail"]
    assert job.out[0] == BeginGeneration(1, 4)  # discards step 8, fences generation 0 off
    assert fail.reason.startswith("lost the Dask scheduler (tcp://s:8786 did not answer: TimeoutError)")
    assert fail.reason.endswith("(micro-batch 4); resume=True continues from it once a scheduler is back")
    assert fail.retryable
    job = Job()
    job.start()
    job(WorkersChanged, frozenset({W[0], W[2]}))  # a recovery's stop, cut short by the scheduler's loss
    job(SchedulerLost, "gone")
    job.fails(None, after_stop=False)
    assert job.out[0] == BeginGeneration(1, -1)  # nothing committed: every step directory goes


def test_an_interrupt_stops_the_generation_then_fails_with_a_resume_hint():
    job = Job()
    job.start()
    job.checkpoint(4)
    assert job(Interrupted) == [StopGeneration(0, 10.0)]
    fail = job.fails(view(4))
    assert job.out[0] == WriteRecord(InterruptedRecord(generation=0, checkpoint=view(4).path))
    assert fail.kind is JobInterrupted and fail.reason.startswith("interrupted; the stages were stopped; ")
    assert "(micro-batch 4); resume=True continues from it" in fail.reason
    # A second Ctrl-C does not wait for the stop, nor for the checkpoint look-up.
    job = Job()
    job.start()
    job.checkpoint(4)
    job(Interrupted)
    out = job(Interrupted)
    assert kinds(out) == ["WriteRecord", "Fail"] and "interrupted again" in out[-1].reason
    assert "/ckpt/step-0000000004" in out[-1].reason


def test_resume_starts_after_the_checkpoint_and_stops_the_old_run():
    job = Job()
    latest = CheckpointView(cut=8, path="/ckpt/step-0000000008", ledgers={0: {"applied": [[0, 8]]}},
                            losses={k: 2.0 for k in range(8)}, job_id="old", skipped=((12, "not committed"),))
    out = job(Started, resume=True, previous_generation=2, latest=latest)
    assert out[:2] == [StopOldRun("job", 2), StopOldRun("old", 2)]
    assert kinds(out[2:]) == ["Note", "Note", "WriteRecord", "BeginGeneration", "Place"]
    assert "micro-batch 12 not used: not committed" in out[2].text
    assert out[4].record == ResumeRecord(generation=3, rollback_to=8, checkpoint=latest.path)
    assert out[5] == BeginGeneration(3, 8)
    assert job.place(W) == Submit(3, 8, latest.ledgers, W)
    assert [h["step"] for h in job.core.history] == [0, 1]


def test_what_a_run_refuses_to_start_on():
    assert Job(store=None)(Started, resume=True) == [Fail("resume needs a checkpoint directory")]
    # A resume whose checkpoints all fail verification keeps them and stops.
    out = Job()(Started, resume=True, previous_generation=0, unusable=(("/ckpt/step-0000000008", "sha256 ..."),))
    assert kinds(out) == ["StopOldRun", "Fail"] and "no checkpoint in /ckpt can be used" in out[-1].reason
    assert "/ckpt/step-0000000008: sha256 ..." in out[-1].reason and "--overwrite" in out[-1].reason


def test_no_workers_to_place_on_fails_with_the_placement_error():
    job = Job()
    job(Started)
    assert job(PlacementFailed, "cannot place stage 2") == [ReadLatestCheckpoint()]
    assert "no workers to place the stages on:\ncannot place stage 2" in job.fails(None, after_stop=False).reason


def test_a_stage_stopped_by_someone_else_is_lost():
    job = Job()
    job.start()
    job(TaskEnded, 1, 0, "finished", result={"ended": "stopped", "reason": "Stopped: by the driver"})
    assert job(Tick, after=PEER_LOST_GRACE) == [StopGeneration(0, 10.0)]
    assert job.core.loss.reason == "Stopped: by the driver" and not job.core.loss.deterministic


def test_control_plane_messages_become_typed_reports():
    step = report_from_message({"type": "step", "stage": 1, "step": 2, "busy": 0.1, "wall": 0.2, "time": 5.0,
                                "losses": {"8": 1.5}}, generation=3, now=6.0)
    assert step == StepReport(generation=3, stage=1, step=2, busy=0.1, wall=0.2, time=5.0, losses={8: 1.5}, now=6.0)
    assert report_from_message({"type": "error", "stage": None, "error": "OSError()"}, 0, 0.0).stage is None
    assert report_from_message({"type": "step", "stage": True, "step": 2, "busy": 0.1, "wall": 0.2, "time": 5.0},
                               0, 0.0) is None, "a bool is not a stage"
    assert report_from_message({"type": "shard", "stage": 0, "cut": "8", "record": {}}, 0, 0.0) is None
    assert report_from_message(["not", "a", "dict"], 0, 0.0) is None
    assert report_from_message({"type": "mystery"}, 0, 0.0) is None


def test_errors_say_whether_a_restart_may_cure_them():
    from distributed.comm.core import CommClosedError

    from pipetrain.checkpoint.manifest import CheckpointError, StaleGenerationError
    from pipetrain.runtime.links import Stopped
    from pipetrain.runtime.transport import PeerLost, TransportTimeout

    machinery = [PeerLost("x"), TransportTimeout("x"), Stopped("x"), TimeoutError(), killed_worker("w"),
                 CommClosedError(), asyncio.CancelledError(), ConnectionResetError(), StaleGenerationError("x"),
                 StageLost([1], ["w"], "gone", worker_died=True)]
    computation = [ValueError("nan"), ZeroDivisionError(), CheckpointError("x"), JobFailed("x"),
                   StageLost([1], ["w"], "bad", worker_died=False, deterministic=True)]
    assert [is_retryable(e) for e in machinery] == [True] * len(machinery)
    assert [is_retryable(e) for e in computation] == [False] * len(computation)
    assert is_worker_death(killed_worker("w")) and not is_worker_death(RuntimeError("KilledWorker"))
    assert JobFailed("x", retryable=True).retryable and not JobFailed("x").retryable


def test_every_report_a_stage_sends_comes_back_as_it_was_sent():
    from pipetrain.runtime.messages import (CourierError, CutMissed, FirstBackward, PeerLostReport, ShardWritten,
                                            StageDone, StageReady)

    sent = [StepReport(2, 1, step=3, busy=0.5, wall=0.7, time=9.0, losses={12: 2.5}),
            ShardWritten(2, 0, cut=16, record={"stage": 0, "bytes": 10}, seconds=0.01),
            StageReady(2, 2, time=8.0, seconds=1.5, load_seconds=0.2, build_seconds=1.0, connect_seconds=0.3),
            PeerLostReport(2, 1, reason="PeerLost: stage 0", time=8.5), FirstBackward(2, 0, k=16, time=8.7),
            CutMissed(2, 2, cut=24), CourierError(2, 1, error="OSError: disk", worker="tcp://w:1", cut=16),
            CourierError(2, None, error="OSError()"), StageDone(2, 1, seconds=30.0)]
    for message in sent:
        assert report_from_message(message.to_wire(), 2, 0.0) == message


def test_a_report_naming_no_stage_of_the_job_is_ignored():
    job = Job()
    job.start()
    assert job(StepReport, generation=0, stage=7, step=0, busy=0.1, wall=0.1, time=job.now) == []
    assert job(PeerLostReport, generation=0, stage=-1, reason="PeerLost") == []
    assert job(Tick, after=2 * PEER_LOST_GRACE) == []

"""The job core with replicated pipelines, played event by event (no cluster): p stages x d
replicas are p * d tasks for placement, reports and results; a step record waits for every
task; only replica 0's shards (the stage ids) make a checkpoint; a lost replica's worker stops
the whole generation and rolls every task back; a checkpoint the new layout cannot cut at is
refused before anything is placed."""
from pipetrain.runtime.core import JobCore
from pipetrain.runtime.core_events import (CheckpointView, Commit, Fail, Finish, JobSettings, LatestCheckpoint,
                                           Placed, ReadLatestCheckpoint, ShardWritten, StageDone, Started,
                                           StepReport, StopFinished, StopGeneration, Submit, TaskEnded,
                                           WorkersChanged, WriteRecord)
from pipetrain.schedule.builders import ScheduleSpec

P, D, M = 2, 2, 4  # stages, replicas, each replica's micro-batches per step
WORKERS = {t: f"tcp://w{t}:1" for t in range(P * D)}


def _core(**settings) -> JobCore:
    spec = ScheduleSpec("1f1b", num_stages=P, microbatches=M, steps=4, replicas=D, checkpoint_every=M)
    return JobCore(JobSettings(num_stages=P, microbatches=M * D, steps=4, microbatch_size=1, job_id="job",
                               store="/ckpt", replicas=D, schedule_spec=spec, **settings))


def _running(core: JobCore) -> JobCore:
    core.handle(Started(now=0.0))
    out = core.handle(Placed(dict(WORKERS), (), now=1.0))
    assert isinstance(out[-1], Submit) and sorted(out[-1].placement) == [0, 1, 2, 3]
    return core


def test_a_step_record_waits_for_every_task_and_holds_the_jobs_microbatches():
    core = _running(_core())
    records = []
    for task in range(P * D):
        last = task % P == P - 1
        replica = task // P
        losses = {k * D + replica: 1.0 + replica for k in range(M)} if last else {}  # the job's ids
        out = core.handle(StepReport(0, task, step=0, busy=0.5, wall=1.0, time=2.0, losses=losses, now=2.0))
        records += [i.record for i in out if isinstance(i, WriteRecord)]
        assert (records != []) == (task == P * D - 1)
    assert records[0].loss == 1.5 and len(records[0].busy) == P * D


def test_only_the_stages_shards_make_a_checkpoint():
    core = _running(_core())
    def shard(task):
        record = {"cut": 8, "stage": task, "generation": 0, "meta": {"ledger": {"applied": [[0, 8]]}}}
        return core.handle(ShardWritten(0, task, cut=8, record=record, now=3.0))
    assert shard(2) == [] and shard(3) == []  # replica 1 holds the same state: it writes none
    assert shard(0) == []
    (commit,) = shard(1)
    assert isinstance(commit, Commit) and commit.cut == 8 and len(commit.records) == P


def test_a_lost_replica_rolls_every_task_back_and_the_end_waits_for_all():
    core = _running(_core())
    out = core.handle(WorkersChanged(frozenset(w for t, w in WORKERS.items() if t != 3), now=4.0))
    assert isinstance(out[-1], StopGeneration)
    assert core.handle(StopFinished(0, (), frozenset(), now=5.0)) == [ReadLatestCheckpoint()]
    out = core.handle(LatestCheckpoint(CheckpointView(8, "/ckpt/step-0000000008", replicas=D), now=5.5))
    assert core.generation == 1
    fresh = {**WORKERS, 3: "tcp://w9:1"}
    submit = core.handle(Placed(fresh, (), now=6.0))[-1]
    assert isinstance(submit, Submit) and submit.cut == 8 and submit.placement[3] == "tcp://w9:1"
    for task in range(P * D - 1):
        core.handle(StageDone(1, task, seconds=1.0, now=7.0))
        assert not any(isinstance(i, Finish) for i in core.handle(
            TaskEnded(task, 1, "finished", now=7.0, result={"state": {}, "events": None, "ledger": {}})))
    core.handle(StageDone(1, 3, seconds=1.0, now=7.0))
    out = core.handle(TaskEnded(3, 1, "finished", now=7.0, result={"state": {}, "events": None, "ledger": {}}))
    assert isinstance(out[-1], Finish) and len(out[-1].results) == P * D


def test_a_checkpoint_the_new_layout_cannot_cut_at_is_refused_before_placement():
    core = _core()
    out = core.handle(Started(resume=True, previous_generation=0, now=0.0,
                              latest=CheckpointView(12, "/ckpt/step-0000000012", replicas=1)))
    assert isinstance(out[-1], Fail) and "not a cut of 2 replica(s)" in out[-1].reason
    core = _core()
    out = core.handle(Started(resume=True, previous_generation=0, now=0.0,
                              latest=CheckpointView(16, "/ckpt/step-0000000016", replicas=1)))
    assert not any(isinstance(i, Fail) for i in out)
    submit = core.handle(Placed(dict(WORKERS), (), now=1.0))[-1]
    assert submit.cut == 16 and submit.cut_replicas == 1  # the stages renumber its versions

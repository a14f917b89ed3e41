"""What goes into the job core and what comes out: its settings, typed events and instructions.

The driver's shell turns what it sees (Dask future statuses, the scheduler's
worker list, the control plane's reports, the checkpoint store's answers, a
Ctrl-C) into ``Event``s, hands them to ``JobCore.handle``, and carries out
the ``Instruction``s it gets back, in order. Every event carries ``now``, the
shell's wall clock (``time.time()``: stage reports carry their workers'
``time.time()``, and the core compares the two), so the core never reads a
clock and a test can play any timeline in microseconds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pipetrain.errors import JobFailed
from pipetrain.observe.records import Record
from pipetrain.runtime.messages import (  # noqa: F401 - the stages' reports are events of the core too
    CourierError,
    CutMissed,
    EvalReport,
    FirstBackward,
    PeerLostReport,
    Report,
    ShardWritten,
    StageDone,
    StageReady,
    StepReport,
    report_from_message,
)

# -- settings ---------------------------------------------------------------


@dataclass(frozen=True)
class JobSettings:
    num_stages: int
    microbatches: int  # the job's micro-batches per step: each replica's times the replicas
    steps: int
    microbatch_size: int
    job_id: str
    store: str | None = None  # the checkpoint store's root, for messages; None: no checkpoints
    run_dir: str | None = None  # for the `pipetrain resume RUN_DIR` hints
    max_restarts: int = 3
    stop_timeout: float = 10.0
    checkpoint_seconds: float = 0.0
    manifest: dict = field(default_factory=dict)  # the manifest's fixed fields (schedule, partition)
    optimizer: Any = None  # with the ScheduleSpec: each step record's lr and grad_norm (runtime/step_metrics.py)
    schedule_spec: Any = None
    # Replicated pipelines: each stage runs this many times, as tasks r * num_stages + s
    # (r the replica); reports, placement and results are per task, shards per stage.
    replicas: int = 1

    @property
    def num_tasks(self) -> int:
        return self.num_stages * self.replicas

    @property
    def cut_unit(self) -> int:
        """The job's micro-batches between two possible cuts: replicas x micro-batches per update."""
        per_update = self.schedule_spec.microbatches_per_update if self.schedule_spec is not None else 1
        return self.replicas * per_update

    def step_metrics(self) -> Any:
        from pipetrain.runtime.step_metrics import StepOptimizerMetrics

        if self.schedule_spec is None:
            return None
        return StepOptimizerMetrics(optimizer=self.optimizer, schedule=self.schedule_spec, num_stages=self.num_stages,
                                    replicas=self.replicas)

    @classmethod
    def from_plan(cls, plan: Any, store_root: str | None) -> JobSettings:
        """From a ``JobPlan``; ``store_root``: ``CheckpointStore.root``, None without checkpoints."""
        spec = plan.spec
        return cls(num_stages=plan.num_stages, microbatches=plan.microbatches * plan.replicas, steps=plan.steps,
                   replicas=plan.replicas,
                   microbatch_size=plan.source.microbatch_size, job_id=plan.job_id, store=store_root,
                   run_dir=spec.run_dir, max_restarts=spec.cluster.max_restarts,
                   stop_timeout=spec.cluster.stop_timeout, checkpoint_seconds=spec.checkpoint.seconds,
                   optimizer=spec.optimizer, schedule_spec=plan.schedule,
                   manifest={"schedule": plan.schedule.to_dict(),
                             "partition": {"boundaries": list(plan.partition.boundaries),
                                           "method": plan.partition.method}})


# -- events -----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Event:
    now: float


@dataclass(frozen=True)
class CheckpointView:
    """What the core needs of a committed checkpoint (``CheckpointStore.latest()``)."""

    cut: int
    path: str
    ledgers: dict[int, dict] = field(default_factory=dict)  # stage -> its ledger at the cut
    losses: dict[int, float] = field(default_factory=dict)  # micro-batch -> loss, before the cut
    job_id: str | None = None
    evals: dict[int, float] = field(default_factory=dict)  # step -> held-out loss, known when it was committed
    skipped: tuple[tuple[int, str], ...] = ()  # newer step directories passed over: (cut, why)
    replicas: int = 1  # the pipeline copies of the run that wrote it

    @classmethod
    def from_committed(cls, checkpoint: Any) -> CheckpointView | None:
        """From a ``CommittedCheckpoint`` (or None); reads only what it already holds."""
        if checkpoint is None:
            return None
        manifest = checkpoint.manifest
        return cls(cut=checkpoint.cut, path=checkpoint.path,
                   ledgers={s: checkpoint.shard(s).get("meta", {}).get("ledger", {})
                            for s in range(checkpoint.num_stages)},
                   losses={int(k): float(v) for k, v in manifest.get("losses", {}).items()},
                   job_id=manifest.get("job_id"), skipped=tuple(checkpoint.skipped),
                   evals={int(k): float(v) for k, v in manifest.get("evals", {}).items()},
                   replicas=int((manifest.get("schedule") or {}).get("replicas", 1)))


@dataclass(frozen=True)
class Started(Event):
    """The job begins, with what the checkpoint store says (nothing when there is no store)."""

    resume: bool = False
    previous_generation: int | None = None  # store.current_generation()
    latest: CheckpointView | None = None  # store.latest(), asked on resume
    # On a resume that found no latest: (path, reason) of each step directory
    # store.list() does not call "uncommitted" (committed once, failing verification now).
    unusable: tuple[tuple[str, str | None], ...] = ()


@dataclass(frozen=True)
class TaskEnded(Event):
    """A stage task left Dask's "pending": its future's status, exception and result."""

    stage: int
    generation: int
    status: Literal["finished", "error", "cancelled", "lost"]
    error: BaseException | None = None
    result: dict | None = None  # a finished task's: {"state", "events", "ledger"} or {"ended": ...}


@dataclass(frozen=True)
class WorkersChanged(Event):
    alive: frozenset[str]  # every worker address the scheduler knows now


@dataclass(frozen=True)
class Tick(Event):
    """Periodic (every poll): deadlines and time-based checkpoints are checked here."""


@dataclass(frozen=True)
class Placed(Event):
    placement: dict[int, str]  # Placement.stage_workers: a fresh placement; the core merges
    spares: tuple[str, ...] = ()


@dataclass(frozen=True)
class PlacementFailed(Event):
    reason: str  # the PlacementError's message


@dataclass(frozen=True)
class StopFinished(Event):
    generation: int
    lingering: tuple[int, ...] = ()  # stages still running (on live workers) at the timeout
    alive: frozenset[str] | None = None  # the worker list at the end of the stop


@dataclass(frozen=True)
class LatestCheckpoint(Event):
    """The answer to ``ReadLatestCheckpoint``."""

    checkpoint: CheckpointView | None


@dataclass(frozen=True)
class CommitDone(Event):
    cut: int
    generation: int
    path: str
    seconds: float = 0.0


@dataclass(frozen=True)
class CommitFailed(Event):
    cut: int
    generation: int
    error: BaseException
    path: str  # the step directory the commit was writing


@dataclass(frozen=True)
class SchedulerLost(Event):
    reason: str


@dataclass(frozen=True)
class Interrupted(Event):
    """Ctrl-C. A second one while the stop is under way fails at once."""


# -- instructions -----------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    pass


@dataclass(frozen=True)
class BeginGeneration(Instruction):
    """Fence: ``store.begin_generation(generation)``, then ``store.discard_after(cut, generation=...)``
    (``cut`` -1: every step directory goes)."""

    generation: int
    cut: int


@dataclass(frozen=True)
class StopOldRun(Instruction):
    """Raise the stop flag of a run this driver does not watch (resume); nothing comes back."""

    job_id: str
    generation: int


@dataclass(frozen=True)
class Place(Instruction):
    """Find a fresh placement avoiding ``exclude``; answer ``Placed`` or ``PlacementFailed``.

    ``previous`` is for the shell's logs only: the core merges it with the answer.
    """

    exclude: frozenset[str]
    previous: dict[int, str]


@dataclass(frozen=True)
class Submit(Instruction):
    """Submit every stage of ``generation`` from micro-batch ``cut``, each pinned to its worker."""

    generation: int
    cut: int
    ledgers: dict[int, dict]  # stage -> resume ledger (empty: from the beginning)
    placement: dict[int, str]  # task -> worker (replica r's stage s is task r * num_stages + s)
    # The replicas the checkpoint at ``cut`` was written by: another number than the job's means
    # its weight versions are numbered by that layout's updates (runtime/replicas.py renumbers them).
    cut_replicas: int = 1


@dataclass(frozen=True)
class StopGeneration(Instruction):
    """Raise ``generation``'s stop flag, wait up to ``timeout`` for its tasks on live workers,
    cancel them all; answer ``StopFinished`` with those still running at the timeout."""

    generation: int
    timeout: float


@dataclass(frozen=True)
class ReadLatestCheckpoint(Instruction):
    """Answer ``LatestCheckpoint(CheckpointView.from_committed(store.latest()))``."""


@dataclass(frozen=True)
class Commit(Instruction):
    """``store.commit``; answer ``CommitDone`` (with its seconds) or ``CommitFailed``."""

    cut: int
    records: tuple[dict, ...]  # ShardRecord dicts, in stage order
    generation: int
    manifest: dict


@dataclass(frozen=True)
class RequestCut(Instruction):
    """Ask ``generation``'s stages for a checkpoint at ``cut`` (a time-based checkpoint)."""

    cut: int
    generation: int


@dataclass(frozen=True)
class WriteRecord(Instruction):
    """A metrics-log line (``MetricsLog.write``, which adds "time")."""

    record: Record


@dataclass(frozen=True)
class ShowStep(Instruction):
    """``Progress.step``."""

    step: int
    loss: float | None
    samples_per_s: float | None
    busy: list[float]


@dataclass(frozen=True)
class ShowEval(Instruction):
    """``Progress.eval``: the held-out loss after ``step`` steps."""

    step: int
    loss: float


@dataclass(frozen=True)
class Note(Instruction):
    """``Progress.note``."""

    text: str


@dataclass(frozen=True)
class Finish(Instruction):
    """The job is done: the fields of a ``RunOutcome`` but the per-stage ones, which ``results`` hold."""

    losses: dict[int, float]
    history: list[dict]
    recoveries: list[dict]
    generation: int
    wall_seconds: float
    results: tuple[dict, ...]  # each stage's task result, in stage order
    resumed_from: int = 0  # the cut a resume started at (0: a new run)
    evals: dict[int, float] = field(default_factory=dict)  # step -> held-out loss after it


@dataclass(frozen=True)
class Fail(Instruction):
    """The job is over: ``raise fail.exception() from fail.cause``. Nothing of it runs any more,
    except after ``SchedulerLost`` (its stages were fenced off instead)."""

    reason: str
    retryable: bool = False
    kind: type[JobFailed] = JobFailed
    cause: BaseException | None = None

    def exception(self) -> JobFailed:
        return self.kind(self.reason, retryable=self.retryable)

"""``pipetrain.fit``: train a model as a pipeline and return what happened."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipetrain.optim import Optimizer, with_correction
from pipetrain.observe.progress import MetricsLog, Progress
from pipetrain.observe.records import EndRecord, Record, ResumeRecord, StartRecord, StepRecord
from pipetrain.rundir import CHECKPOINTS_DIR, EVENTS_DIR, METRICS_FILE, event_file_name


@dataclass
class FitResult:
    """What a run produced. ``history`` has one record per step (those before a
    resume's checkpoint restored from it, marked ``restored``); ``samples``,
    ``wall_seconds`` and ``samples_per_s`` count what this call trained:
    ``steps_run`` of the job's ``steps``, from micro-batch ``resumed_from`` on."""

    partition: Any
    schedule: str
    history: list[dict]
    losses: dict[int, float]  # micro-batch id -> training loss
    states: list[dict[str, np.ndarray]]
    recoveries: list[dict] = field(default_factory=list)
    events: list[np.ndarray] = field(default_factory=list)
    run_dir: Path | None = None
    wall_seconds: float = 0.0
    samples: int = 0
    heldout_before: float | None = None
    heldout_after: float | None = None
    executor: str = "dask"
    steps: int = 0
    resumed_from: int = 0  # the micro-batch this call started at: a resume's checkpoint cut, else 0
    microbatches: int = 1  # per step
    # Per stage, the exactly-once ledger of the final generation: "applied", the
    # runs [first, last + 1] of micro-batch ids each update folded into the
    # weights, in order; "pending", ids accumulated but not yet applied.
    ledgers: list[dict] = field(default_factory=list)

    def applied_ids(self, stage: int) -> list[int]:
        """Every micro-batch id stage ``stage``'s updates applied, in order, repeats kept."""
        return [k for first, end in self.ledgers[stage]["applied"] for k in range(first, end)]

    def stage_state(self, stage: int) -> dict[str, np.ndarray]:
        return self.states[stage]

    def build_stages(self, optimizer: Any = None) -> list[Any]:
        """Stages rebuilt in this process with the final weights."""
        stages = [self.partition.model.build_stage(spec, optimizer=optimizer or Optimizer())
                  for spec in self.partition.specs()]
        for stage, state in zip(stages, self.states):
            stage.load_state_dict(state)
        return stages

    @property
    def resumed_from_step(self) -> int:
        """Steps the checkpoint this call resumed from had completed."""
        return self.resumed_from // self.microbatches

    @property
    def steps_run(self) -> int:
        """Steps this call trained (a step the checkpoint cut in two counts as trained)."""
        return self.steps - self.resumed_from_step

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.wall_seconds if self.wall_seconds else 0.0


# Micro-batches between checkpoints when a checkpoint_dir is given without an
# interval (rounded up to what the schedule allows). For the flagship GPT on
# 2 CPU cores (~0.15 s per micro-batch) that is one checkpoint every ~10 s:
# at most ~10 s of work to redo after a failure (as long as the recovery
# itself takes, bench/recovery.py), while the snapshot on the compute thread
# costs a few ms against those 10 s (bench/checkpoint_overhead.py measures it).
DEFAULT_CHECKPOINT_EVERY = 64


def default_checkpoint_every(*, schedule: str, microbatches: int, accumulate: int = 1) -> int:
    from pipetrain.schedule.builders import microbatches_per_update

    unit = microbatches_per_update(schedule, microbatches, accumulate)
    return -(-DEFAULT_CHECKPOINT_EVERY // unit) * unit


def fit(model: Any, data: Any, *, num_stages: int | None = None, partition_method: str = "params",
        boundaries: list[int] | None = None, schedule: str = "1f1b", microbatches: int = 8, steps: int = 10,
        accumulate: int = 1, optimizer: Any = None, client: Any = None, checkpoint_dir: str | None = None,
        checkpoint_every: int | None = None, keep_checkpoints: int = 3, resume: bool = False,
        run_dir: str | None = None, heldout: Any = None, eval_microbatches: int = 8, resource: str = "GPU",
        placement_timeout: float = 60.0, max_restarts: int = 3, spare_workers: int = 0, credits: int = 0,
        executor: str = "dask", progress: bool = True, job_id: str | None = None, record_events: bool = True,
        stop_timeout: float = 10.0, checkpoint_seconds: float = 0.0, correction: str | None = None) -> FitResult:
    """Train ``model`` (a model or a ``Partition``) on ``data`` (a MicrobatchSource).

    ``client``: a ``distributed.Client``, a scheduler address, or None for an
    embedded ``LocalCluster`` with one worker process per stage (plus
    ``spare_workers``), shut down afterwards. ``executor="reference"`` runs
    every stage in this process instead (the numerics oracle).

    Recovery: when a stage's worker dies or its task fails, every stage is
    stopped (one that has not stopped after ``stop_timeout`` seconds is
    cancelled and its worker avoided), the stages are re-placed (spares
    first, waiting up to ``placement_timeout`` for replacements) and resume
    from the newest committed checkpoint in ``checkpoint_dir`` (written every
    ``checkpoint_every`` micro-batches; ``DEFAULT_CHECKPOINT_EVERY`` when a
    directory is given without an interval), at most ``max_restarts`` times.
    ``checkpoint_seconds``: also checkpoint once that long has passed since
    the last one (at a cut the driver picks ahead of every stage).
    ``resume=True`` continues a job stopped earlier from its checkpoints.
    ``correction``: a delay compensation for pipedream and 2bw ("predict",
    "dcasgd", "dcasgd-a"; ``pipetrain.stages.corrections``), carried to the
    stages by the optimizer.
    """
    from pipetrain.data import check_numeric
    from pipetrain.partitioning import Partition, partition as make_partition
    from pipetrain.schedule.builders import ScheduleSpec

    optimizer = with_correction(optimizer or Optimizer(), correction, schedule=schedule)
    if isinstance(model, Partition):
        part = model
    else:
        if num_stages is None:
            raise ValueError("fit: num_stages is required when model is not already a Partition")
        part = make_partition(model, num_stages, method=partition_method, example_input=data.inputs(0),
                              boundaries=boundaries)
    if checkpoint_every is None:
        checkpoint_every = (default_checkpoint_every(schedule=schedule, microbatches=microbatches,
                                                     accumulate=accumulate) if checkpoint_dir else 0)
    check_numeric(data.inputs(0), "data.inputs(0)")
    check_numeric(data.targets(0), "data.targets(0)")
    checkpoint_url = checkpoint_dir or (str(Path(run_dir) / CHECKPOINTS_DIR)
                                        if run_dir and (checkpoint_every or checkpoint_seconds) else None)
    # Validated here, before any worker starts; the workers build their own from it.
    schedule_spec = ScheduleSpec(schedule, num_stages=len(part.stages), microbatches=microbatches, steps=steps,
                                 accumulate=accumulate, checkpoint_every=checkpoint_every or None)
    run_path = Path(run_dir) if run_dir else None
    metrics = _Metrics(run_path / METRICS_FILE if run_path else None)
    bar = Progress(steps, enabled=progress)
    eval_ids = list(range(eval_microbatches))
    heldout_before = _heldout_loss(part, optimizer, heldout, eval_ids, states=None)
    metrics.write(StartRecord(schedule=schedule, stages=len(part.stages), steps=steps, microbatches=microbatches,
                              heldout_loss=heldout_before, executor=executor))

    if executor == "reference":
        outcome = _run_reference(part, optimizer, schedule_spec, data, bar, metrics)
    elif executor == "dask":
        from pipetrain.runtime.driver import Driver, JobPlan

        plan = JobPlan(partition=part, source=data, optimizer=optimizer, schedule=schedule_spec,
                       checkpoint_url=checkpoint_url, keep_checkpoints=keep_checkpoints, resource=resource,
                       placement_timeout=placement_timeout, max_restarts=max_restarts, credits=credits,
                       resume=resume, record_events=record_events, stop_timeout=stop_timeout,
                       checkpoint_seconds=checkpoint_seconds, run_dir=run_dir,
                       **({"job_id": job_id} if job_id else {}))
        with _client(client, len(part.stages) + spare_workers) as dask_client:
            outcome = Driver(dask_client, plan, progress=bar, metrics=metrics).run()
    else:
        raise ValueError(f"fit: executor must be 'dask' or 'reference', got {executor!r}")

    result = FitResult(partition=part, schedule=schedule, history=outcome.history, losses=outcome.losses,
                       states=outcome.states, recoveries=outcome.recoveries, events=outcome.events,
                       run_dir=run_path, wall_seconds=outcome.wall_seconds,
                       samples=(steps * microbatches - metrics.resumed_from) * data.microbatch_size,
                       executor=executor, steps=steps, resumed_from=metrics.resumed_from,
                       microbatches=microbatches, ledgers=outcome.ledgers)
    result.heldout_before = heldout_before
    result.heldout_after = _heldout_loss(part, optimizer, heldout, eval_ids, states=outcome.states)
    metrics.write(EndRecord(heldout_loss=result.heldout_after, wall_seconds=result.wall_seconds,
                            samples_per_s=result.samples_per_s, samples=result.samples, steps=steps,
                            steps_run=result.steps_run))
    if run_path and outcome.events:
        _save_events(run_path, outcome.events)
    return result


class _Metrics(MetricsLog):
    """The run's metrics log, which also notes the cut a resume started from: the
    driver's "resume" record is the one place that says so."""

    resumed_from = 0

    def write(self, record: Record) -> None:
        if isinstance(record, ResumeRecord):
            self.resumed_from = int(record.rollback_to)
        super().write(record)


def _heldout_loss(part: Any, optimizer: Any, heldout: Any, ids: list[int], *, states: Any) -> float | None:
    if heldout is None or not ids:
        return None
    from pipetrain.runtime.reference import evaluate

    stages = [part.model.build_stage(spec, optimizer=optimizer) for spec in part.specs()]
    if states is not None:
        for stage, state in zip(stages, states):
            stage.load_state_dict(state)
    return evaluate(stages, heldout, ids)


@dataclass
class _Outcome:
    losses: dict
    states: list
    history: list
    recoveries: list
    events: list
    wall_seconds: float
    ledgers: list = field(default_factory=list)


def _run_reference(part: Any, optimizer: Any, spec: Any, data: Any, bar: Progress,
                   metrics: MetricsLog) -> _Outcome:
    from pipetrain.runtime.reference import build_stages, run_reference

    started = time.time()
    schedule = replace(spec, checkpoint_every=None).build()
    result = run_reference(schedule, stages=build_stages(part, optimizer), source=data)
    wall = time.time() - started
    m = spec.microbatches
    history = []
    for t, loss in enumerate(result.loss_history(m)):
        record = {"type": "step", "step": t, "loss": loss, "samples_per_s": None, "busy": []}
        history.append(record)
        metrics.write(StepRecord.from_json(record))
        bar.step(t, loss=loss, samples_per_s=None, busy=[])
    return _Outcome(result.losses, result.state_dicts(), history, [], [], wall)


@contextmanager
def _client(client: Any, n_workers: int) -> Iterator[Any]:
    from distributed import Client

    if client is None:
        from pipetrain.runtime.local import start_local_cluster

        cluster = start_local_cluster(n_workers)
        try:
            with Client(cluster) as c:
                yield c
        finally:
            cluster.close()
    elif isinstance(client, str):
        with Client(client) as c:
            yield c
    else:
        yield client


def _save_events(run_path: Path, events: list[np.ndarray]) -> None:
    out = run_path / EVENTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    for s, ev in enumerate(events):
        np.save(out / event_file_name(s), ev)

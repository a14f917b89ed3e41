"""``pipetrain.fit``: train a model as a pipeline and return what happened."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipetrain.jobspec import JobSpec
from pipetrain.optim import Optimizer
from pipetrain.observe.progress import MetricsLog, Progress
from pipetrain.observe.records import EndRecord, EvalRecord, StartRecord, StepRecord
from pipetrain.rundir import EVENTS_DIR, METRICS_FILE, TENSORBOARD_DIR, event_file_name


@dataclass
class FitResult:
    """What a run produced. ``history`` has one record per step (those before a
    resume's checkpoint restored from it, marked ``restored``); ``samples``,
    ``wall_seconds`` and ``samples_per_s`` count what this call trained:
    ``steps_run`` of the job's ``steps``, from micro-batch ``resumed_from`` on.

    ``states``: each stage's final state (flat name -> numpy array), one per stage. On
    Dask, when the run checkpoints every N micro-batches, it reads each stage's shard of
    the run's last checkpoint when indexed (``runtime.plan.StoredStates``): the driver
    never holds the whole model. ``evals``: step -> the held-out loss the stages computed
    after it (0: before training); ``heldout_before``/``heldout_after`` are its first and
    last steps' (``evals[0]`` and ``evals[steps]``)."""

    partition: Any
    schedule: str
    history: list[dict]
    losses: dict[int, float]  # micro-batch id -> training loss
    states: Any  # a sequence of per-stage dicts: a list, or StoredStates read from the checkpoint store
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
    microbatches: int = 1  # per step: the job's (every replica's together)
    replicas: int = 1  # copies of the pipeline (schedule/replicas.py)
    # Per stage, the exactly-once ledger of the final generation: "applied", the
    # runs [first, last + 1] of micro-batch ids each update folded into the
    # weights, in order; "pending", ids accumulated but not yet applied. With
    # replicas, per task (replica r's stage s at r * p + s), each in the job's ids.
    ledgers: list[dict] = field(default_factory=list)
    evals: dict[int, float] = field(default_factory=dict)

    def applied_ids(self, stage: int) -> list[int]:
        """Every micro-batch id stage ``stage``'s updates applied, in order, repeats kept."""
        return [k for first, end in self.ledgers[stage]["applied"] for k in range(first, end)]

    def stage_state(self, stage: int) -> dict[str, np.ndarray]:
        return self.states[stage]

    def build_stages(self, optimizer: Any = None) -> list[Any]:
        """Every stage rebuilt in this process with the final weights (the whole model: for
        a model that fits one process; ``fit`` itself never does this)."""
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


def fit(model: Any, data: Any, *, spec: JobSpec | None = None, heldout: Any = None, client: Any = None,
        executor: str = "dask", resume: bool = False, progress: bool = True, job_id: str | None = None,
        num_stages: int | None = None, partition_method: str = "params", boundaries: list[int] | None = None,
        loss: Any = None, supervisor: Any = None, callbacks: Any = (), **settings: Any) -> FitResult:
    """Train ``model`` (a model, a list of JAX layers, or a ``Partition``) on ``data``
    (a MicrobatchSource), as the job ``spec`` describes (``pipetrain.JobSpec``) or,
    without one, as keyword ``settings`` describe it (``JobSpec.from_settings``:
    ``schedule``, ``microbatches``, ``steps``, ``accumulate``, ``correction``,
    ``optimizer``, ``checkpoint_dir``, ``checkpoint_every``, ``checkpoint_seconds``,
    ``keep_checkpoints``, ``run_dir``, ``eval_microbatches``, ``eval_every``, ``resource``,
    ``placement_timeout``, ``max_restarts``, ``credits``, ``stop_timeout``,
    ``spare_workers``, ``transport``, ``record_events``, ``tensorboard``, ``precision``,
    ``replicas``, ``reduce_bucket_mib``, ``reduce_exchange``).

    ``precision``: "fp32" or "bf16" (``pipetrain.stages.precision``: bfloat16 compute
    and boundary tensors, float32 master weights, optimizer state and loss); None,
    the default, keeps the partition's (``partition(..., precision=)``). A Partition
    of another precision is cut again at the same boundaries with the one asked for.

    Evaluation: with ``heldout`` (a MicrobatchSource), the stages run a forward-only
    pass over its micro-batches ``0 .. eval_microbatches - 1`` on their workers
    before the first step, after the last, and every ``eval_every`` steps
    (``pipetrain.schedule.evaluation``): each one's mean loss is an ``EvalRecord``
    in the metrics log and on the progress line, and ``FitResult.evals``. This
    process builds no stage of the model (on Dask).

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
    stages by the optimizer. ``loss``: the loss of a model given as a list of
    JAX layers. ``supervisor``: a ``runtime.plan.Supervisor`` (a detached job's
    driver task: workers to spare, a stop request).

    Metrics: every record (``pipetrain.observe.records``: start, each step,
    checkpoints, recoveries, end) goes to RUN_DIR/metrics.jsonl, with
    ``tensorboard=True`` also to TensorBoard event files in RUN_DIR/tensorboard/
    (the tensorboardX package), and to each of ``callbacks``: functions called
    with every ``Record`` as it is written, in order (for MLflow, W&B, ...). A
    callback that raises does not stop the job: a warning naming the callback
    and the record's type is logged (once per callback) and the job goes on,
    still calling it with the records that follow.
    """
    from pipetrain.data import check_numeric
    from pipetrain.partitioning import Partition, partition as make_partition
    from pipetrain.runtime.tie_carry import check_carried
    from pipetrain.schedule.ties import CARRIED
    from pipetrain.ties import plan_ties

    if spec is None:
        spec = JobSpec.from_settings(**settings)
    elif settings:
        raise TypeError(f"fit: give the job as spec= or as keyword settings, not both ({', '.join(settings)})")
    if isinstance(model, Partition):
        part = model
        if spec.precision not in (None, part.precision):  # the boundary specs and bytes change with it
            part = make_partition(part.model, part.num_stages, method=part.cost_method,
                                  example_input=data.inputs(0), boundaries=list(part.boundaries),
                                  precision=spec.precision)
    else:
        if num_stages is None:
            raise ValueError("fit: num_stages is required when model is not already a Partition")
        part = make_partition(model, num_stages, method=partition_method, example_input=data.inputs(0),
                              boundaries=boundaries, precision=spec.precision,
                              **({"loss": loss} if loss is not None else {}))
    check_numeric(data.inputs(0), "data.inputs(0)")
    check_numeric(data.targets(0), "data.targets(0)")
    if heldout is not None:
        check_numeric(heldout.inputs(0), "heldout.inputs(0)")
        check_numeric(heldout.targets(0), "heldout.targets(0)")
    # Validated here, before any worker starts; the workers build their own from it.
    schedule = spec.schedule_spec(len(part.stages))
    ties = plan_ties(part)  # tied weights: a tie that cannot hold is refused here, naming both parameters
    if ties:
        schedule = replace(schedule, ties=ties.spans)
        if schedule.name in CARRIED:  # (pipedream: the ties ride on the F/B messages, runtime/tie_carry.py)
            check_carried(ties.ties, spec.schedule.correction)
    if resume and executor == "dask" and spec.checkpoint_url:
        schedule = _trained_on(schedule, spec.checkpoint_url)
    evaluation = spec.evaluation(heldout)
    run_path = Path(spec.run_dir) if spec.run_dir else None
    metrics = MetricsLog(run_path / METRICS_FILE if run_path else None, sinks=_sinks(spec, run_path, callbacks))
    bar = Progress(schedule.steps, enabled=progress, stages=len(part.stages))
    # The held-out loss before training comes from the stages' first eval block (an EvalRecord).
    metrics.write(StartRecord(schedule=schedule.name, stages=len(part.stages), steps=schedule.steps,
                              microbatches=schedule.microbatches, heldout_loss=None, executor=executor,
                              replicas=schedule.replicas))

    if executor == "reference":
        outcome = _run_reference(part, spec.optimizer, schedule, data, bar, metrics, heldout, evaluation,
                                 bucket_bytes=spec.cluster.reduce_bucket_bytes,
                                 exchange=spec.cluster.reduce_exchange)
    elif executor == "dask":
        from pipetrain.runtime.driver import Driver, JobPlan

        plan = JobPlan(partition=part, source=data, spec=spec, schedule=schedule, resume=resume, supervisor=supervisor,
                       heldout=heldout if evaluation else None, evaluation=evaluation,
                       **({"job_id": job_id} if job_id else {}))
        with _client(client, len(part.stages) * spec.replicas + spec.cluster.spare_workers) as dask_client:
            outcome = Driver(dask_client, plan, progress=bar, metrics=metrics).run()
    else:
        raise ValueError(f"fit: executor must be 'dask' or 'reference', got {executor!r}")

    steps, microbatches = schedule.steps, schedule.microbatches * schedule.replicas  # the job's, per step
    result = FitResult(partition=part, schedule=schedule.name, history=outcome.history, losses=outcome.losses,
                       states=outcome.states, recoveries=outcome.recoveries, events=outcome.events,
                       run_dir=run_path, wall_seconds=outcome.wall_seconds,
                       samples=(steps * microbatches - outcome.resumed_from) * data.microbatch_size,
                       executor=executor, steps=steps, resumed_from=outcome.resumed_from,
                       microbatches=microbatches, ledgers=outcome.ledgers, evals=dict(outcome.evals),
                       heldout_before=outcome.evals.get(0), heldout_after=outcome.evals.get(steps),
                       replicas=schedule.replicas)
    metrics.write(EndRecord(heldout_loss=result.heldout_after, wall_seconds=result.wall_seconds,
                            samples_per_s=result.samples_per_s, samples=result.samples, steps=steps,
                            steps_run=result.steps_run))
    metrics.close()
    if run_path and outcome.events:
        _save_events(run_path, outcome.events)
    return result


def _sinks(spec: JobSpec, run_path: Path | None, callbacks: Any) -> list[Any]:
    from pipetrain.observe.sinks import CallbackSink, TensorBoardSink

    if callable(callbacks):
        raise TypeError("fit: callbacks is a list of callables; give callbacks=[fn]")
    sinks: list[Any] = [CallbackSink(fn) for fn in (callbacks or ())]
    if spec.observe.tensorboard:
        if run_path is None:
            raise ValueError("fit: tensorboard=True writes its event files to RUN_DIR/tensorboard/: give run_dir")
        sinks.insert(0, TensorBoardSink(run_path / TENSORBOARD_DIR))
    return sinks


def _run_reference(part: Any, optimizer: Any, spec: Any, data: Any, bar: Progress, metrics: MetricsLog,
                   heldout: Any, evaluation: Any, *, bucket_bytes: int | None = None, exchange: str = "auto") -> Any:
    """Every stage in this process (the numerics oracle; one process by design), eval blocks included."""
    from pipetrain.runtime.plan import RunOutcome
    from pipetrain.runtime.reference import build_stages, run_reference
    from pipetrain.runtime.step_metrics import StepOptimizerMetrics

    started = time.time()
    schedule = replace(spec, checkpoint_every=None).build()
    d = spec.replicas
    result = run_reference(schedule, stages=[st for _ in range(d) for st in build_stages(part, optimizer)],
                           source=data, heldout=heldout, evaluation=evaluation, replicas=d,
                           bucket_bytes=bucket_bytes, exchange=exchange)
    wall = time.time() - started
    m = spec.microbatches * d
    history = []

    def log_eval(step: int) -> None:
        if step in result.evals:
            metrics.write(EvalRecord(step=step, heldout_loss=result.evals[step]))
            bar.eval(step, result.evals[step])

    log_eval(0)
    figures = StepOptimizerMetrics(optimizer=optimizer, schedule=spec, num_stages=len(result.stages), replicas=d)
    for s, norms in result.grad_norms.items():
        figures.add_norms(s, norms)
    for t, loss in enumerate(result.loss_history(m)):
        record = {"type": "step", "step": t, "loss": loss, "samples_per_s": None, "busy": [], **figures.fields(t)}
        history.append(record)
        metrics.write(StepRecord.from_json(record))
        bar.step(t, loss=loss, samples_per_s=None, busy=[])
        log_eval(t + 1)
    return RunOutcome(losses=result.losses, states=result.state_dicts(), events=[], history=history, recoveries=[],
                      generation=0, wall_seconds=wall, evals=dict(sorted(result.evals.items())))


def _trained_on(schedule: Any, checkpoint_url: str) -> Any:
    """``schedule``, or, resuming a run that ended (its last checkpoint is its final cut) for more
    steps, the same starting again, empty, at that cut (``ScheduleSpec.restart_at``): the final
    checkpoint holds only the newest weight version, which pipedream and 2bw cannot go on from.
    ``pipetrain resume --steps`` sets the same from the run directory (``job.resume_run``)."""
    from pipetrain.checkpoint.store import CheckpointStore

    latest = CheckpointStore(checkpoint_url).latest()
    if latest is None or schedule.restart_at:
        return schedule
    before = latest.manifest.get("schedule") or {}
    # (cuts are the job's micro-batches; each replica's schedule counts its own: schedule/replicas.py)
    ended = int(before.get("steps", 0)) * int(before.get("microbatches", 0)) * int(before.get("replicas", 1))
    local, rest = divmod(ended, schedule.replicas)
    if latest.cut != ended or rest or not 0 < local < schedule.total_microbatches or local % schedule.microbatches:
        return schedule
    return replace(schedule, restart_at=local)


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

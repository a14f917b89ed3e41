"""One description of a training job, whatever starts it.

Everything about a job but its model, its data and where it runs: the
schedule, the optimizer, checkpoints, the cluster settings, the run
directory, evaluation. `pipetrain train` reads it from the TOML
(``JobSpec.from_config``: the config's own sections), ``pipetrain.fit``
builds it from its keyword arguments (``JobSpec.from_settings``), and the
driver runs what it says (``runtime/plan.JobPlan`` holds it). The defaults
that depend on other fields (the checkpoint interval when only a directory
is given, where checkpoints go) are decided here and nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipetrain.config import CheckpointConfig, ClusterConfig, JobConfig, ObserveConfig, ScheduleConfig
from pipetrain.optim import Optimizer, with_correction
from pipetrain.rundir import CHECKPOINTS_DIR
from pipetrain.stages.precision import check_precision

# Micro-batches between checkpoints when a checkpoint directory is given
# without an interval (rounded up to what the schedule allows). For the
# flagship GPT on 2 CPU cores (~0.15 s per micro-batch) that is one checkpoint
# every ~10 s: at most ~10 s of work to redo after a failure (as long as the
# recovery itself takes, bench/recovery.py), while the snapshot on the compute
# thread costs a few ms against those 10 s (bench/checkpoint_overhead.py).
DEFAULT_CHECKPOINT_EVERY = 64


def default_checkpoint_every(*, schedule: str, microbatches: int, accumulate: int = 1, replicas: int = 1) -> int:
    from pipetrain.schedule.builders import microbatches_per_update

    unit = replicas * microbatches_per_update(schedule, microbatches, accumulate)
    return -(-DEFAULT_CHECKPOINT_EVERY // unit) * unit


@dataclass(frozen=True)
class JobSpec:
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optimizer: Any = field(default_factory=Optimizer)  # a pipetrain.Optimizer (or an optax one, JAX stages)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    run_dir: str | None = None
    eval_microbatches: int = 8  # held-out micro-batches each evaluation on the stages reads
    eval_every: int = 0  # steps between evaluations (schedule/evaluation.py); 0: only before and after training
    record_events: bool = True  # the stages' timelines (pipetrain trace)
    observe: ObserveConfig = field(default_factory=ObserveConfig)  # metrics sinks besides metrics.jsonl
    # "fp32" | "bf16" (stages/precision.py), fit's keyword; None: the partition's own (a job config's
    # [model] precision is given to the partition, like [model] remat, so it stays None here)
    precision: str | None = None
    # Copies of the pipeline (schedule/replicas.py): each step runs schedule.microbatches on each
    # of them, so a step is replicas * microbatches of the job's micro-batches; checkpoint.every
    # counts the job's micro-batches.
    replicas: int = 1

    def __post_init__(self) -> None:
        for name in ("eval_microbatches", "eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}: must be an integer >= 0, got {value!r}")
        if not isinstance(self.replicas, int) or isinstance(self.replicas, bool) or self.replicas < 1:
            raise ValueError(f"replicas: must be an integer >= 1 (copies of the pipeline), got {self.replicas!r}")
        from pipetrain.schedule.builders import microbatches_per_update

        unit = self.replicas * microbatches_per_update(self.schedule.name, self.schedule.microbatches,
                                                       self.schedule.accumulate)
        if self.replicas > 1 and self.checkpoint.every % unit:
            raise ValueError(f"checkpoint.every: with {self.replicas} replicas a cut must be a multiple of "
                             f"{unit} of the job's micro-batches (replicas x micro-batches per update), got "
                             f"{self.checkpoint.every}")
        if self.precision is not None:
            check_precision(self.precision, "JobSpec")
        # The optimizer carries the schedule's delay correction to the stages.
        object.__setattr__(self, "optimizer", with_correction(self.optimizer, self.schedule.correction,
                                                              schedule=self.schedule.name))

    @classmethod
    def from_config(cls, cfg: JobConfig) -> JobSpec:
        return cls(schedule=cfg.schedule, optimizer=cfg.optimizer, checkpoint=cfg.checkpoint, cluster=cfg.cluster,
                   run_dir=cfg.run_dir, eval_microbatches=cfg.data.eval_microbatches,
                   eval_every=cfg.data.eval_every, observe=cfg.observe,  # ([model] precision: the partition's)
                   replicas=cfg.partition.replicas)

    @classmethod
    def from_settings(cls, *, schedule: str = "1f1b", microbatches: int = 8, steps: int = 10, accumulate: int = 1,
                      correction: str | None = None, optimizer: Any = None, checkpoint_dir: str | None = None,
                      checkpoint_every: int | None = None, checkpoint_seconds: float = 0.0,
                      keep_checkpoints: int = 3, run_dir: str | None = None, eval_microbatches: int = 8,
                      eval_every: int | None = 0,
                      resource: str = "GPU", placement_timeout: float = 60.0, max_restarts: int = 3,
                      credits: int = 0, stop_timeout: float = 10.0, spare_workers: int = 0, transport: str = "stream",
                      record_events: bool = True, tensorboard: bool = False, precision: str | None = None,
                      replicas: int = 1, reduce_bucket_mib: float = 1.0, reduce_exchange: str = "auto") -> JobSpec:
        """``fit``'s keyword arguments, as one spec. ``checkpoint_every=None``: every
        ``DEFAULT_CHECKPOINT_EVERY`` micro-batches when ``checkpoint_dir`` is given, else none."""
        optimizer = optimizer or Optimizer()
        if correction is None:
            correction = getattr(optimizer, "correction", "none")
        if checkpoint_every is None:
            checkpoint_every = (default_checkpoint_every(schedule=schedule, microbatches=microbatches,
                                                         accumulate=accumulate, replicas=replicas)
                                if checkpoint_dir else 0)
        return cls(schedule=ScheduleConfig(name=schedule, microbatches=microbatches, steps=steps,
                                           accumulate=accumulate, correction=correction),
                   optimizer=optimizer,
                   checkpoint=CheckpointConfig(every=checkpoint_every, seconds=checkpoint_seconds,
                                               keep=keep_checkpoints, dir=checkpoint_dir or ""),
                   cluster=ClusterConfig(resource=resource, placement_timeout=placement_timeout,
                                         max_restarts=max_restarts, credits=credits, stop_timeout=stop_timeout,
                                         spare_workers=spare_workers, transport=transport,
                                         reduce_bucket_mib=reduce_bucket_mib, reduce_exchange=reduce_exchange),
                   run_dir=run_dir, eval_microbatches=eval_microbatches, eval_every=eval_every or 0,
                   record_events=record_events,
                   observe=ObserveConfig(tensorboard=tensorboard), precision=precision, replicas=replicas)

    @property
    def checkpoint_url(self) -> str | None:
        """Where the checkpoints go: ``checkpoint.dir``, else RUN_DIR/checkpoints when the
        job writes any, else nowhere (None)."""
        if self.checkpoint.dir:
            return self.checkpoint.dir
        if self.run_dir and self.checkpoint.enabled:
            return str(Path(self.run_dir) / CHECKPOINTS_DIR)
        return None

    def evaluation(self, heldout: Any) -> Any:
        """The ``EvalSpec`` the stages evaluate by with ``heldout`` (None: no held-out set or
        no eval micro-batches, so no evaluation); a bad combination is refused, naming the field."""
        from pipetrain.schedule.evaluation import EvalSpec
        from pipetrain.schedule.schedule import FLUSH_SCHEDULES

        if heldout is None or not self.eval_microbatches:
            if self.eval_every:
                raise ValueError(f"eval_every={self.eval_every}: evaluation reads held-out data: give heldout= "
                                 f"(the config's data.heldout) and eval_microbatches >= 1")
            return None
        if self.cluster.credits == 1 and self.schedule.name not in FLUSH_SCHEDULES:
            # An async stage has one training activation in flight to its neighbour when its
            # eval block starts: with one credit its first eval send would wait forever.
            raise ValueError(f"credits: {self.schedule.name} with evaluation needs credits >= 2 (or 0: the "
                             f"default), got 1")
        return EvalSpec(self.eval_microbatches, every=self.eval_every)

    def schedule_spec(self, num_stages: int) -> Any:
        """The ``ScheduleSpec`` this job's stages build their actions from (checked now)."""
        from pipetrain.schedule.builders import ScheduleSpec

        s = self.schedule
        return ScheduleSpec(s.name, num_stages=num_stages, microbatches=s.microbatches, steps=s.steps,
                            accumulate=s.accumulate,
                            checkpoint_every=self.checkpoint.every // self.replicas or None,  # each replica's
                            clip=bool(getattr(self.optimizer, "clip_norm", None)),  # norm actions: clipping
                            restart_at=getattr(s, "restart_at", 0) // self.replicas, replicas=self.replicas)

"""A job as the driver runs it (``JobPlan``), what it returns (``RunOutcome``),
and what each stage must receive across its boundary."""
from __future__ import annotations

import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass
class JobPlan:
    """A job as the driver runs it: the job's spec (``pipetrain.JobSpec``, the one
    description of it) with what ``fit`` made of it: the partitioned model, the
    data, the schedule for that many stages, the job's id; built by ``pipetrain.fit``."""

    partition: Any
    source: Any
    spec: Any  # JobSpec
    schedule: Any  # ScheduleSpec: what every stage builds its actions from (spec.schedule_spec)
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    resume: bool = False
    poll: float = 0.2
    # How long the scheduler may stay unreachable before the job stops: a Dask
    # scheduler that comes back has lost every task, so there is no point in
    # waiting for it as long as the client's own 30 s reconnect.
    scheduler_timeout: float = 5.0
    # Per-job key the stages prove themselves to each other with (transport
    # handshake): handed to them through Dask, never sent on a stage port.
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)

    # Who else has a say in a running job (a detached job's driver task): the
    # workers no stage may use, and whether the job is asked to stop.
    supervisor: Supervisor | None = None
    # Evaluation on the stages (schedule/evaluation.py): the held-out source they read
    # (shipped to them like ``source``) and the EvalSpec; None: the stages never evaluate.
    heldout: Any = None
    evaluation: Any = None

    @property
    def checkpoint_url(self) -> str | None:
        return self.spec.checkpoint_url

    @property
    def optimizer(self) -> Any:
        return self.spec.optimizer

    @property
    def num_stages(self) -> int:
        return len(self.partition.stages)

    @property
    def microbatches(self) -> int:
        """Per step, on each replica."""
        return self.schedule.microbatches

    @property
    def replicas(self) -> int:
        """Copies of the pipeline (schedule/replicas.py): the job runs num_stages * replicas tasks."""
        return self.schedule.replicas

    @property
    def steps(self) -> int:
        return self.schedule.steps


class Supervisor(Protocol):
    """What a driver running on the cluster tells the driver loop (``pipetrain.detached_driver``)."""

    def reserved_workers(self) -> frozenset[str]:
        """Workers placement must leave to drivers."""

    def stop_requested(self) -> bool:
        """Whether the job is asked to stop (`pipetrain cancel`): it ends as Ctrl-C ends it."""


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
    resumed_from: int = 0  # the micro-batch this run started at: a resume's checkpoint cut, else 0
    evals: dict[int, float] = field(default_factory=dict)  # step -> held-out loss after it (0: before training)


class StoredStates(Sequence):
    """Each stage's final state, read from the checkpoint store's committed checkpoint at
    ``cut`` (the end of the run) when asked for, one stage at a time: the driver never
    holds the whole model's weights (a run that writes its last checkpoint there)."""

    def __init__(self, url: str, cut: int, num_stages: int):
        self.url, self.cut, self.num_stages = url, cut, num_stages

    def __len__(self) -> int:
        return self.num_stages

    def __getitem__(self, stage: Any) -> Any:
        if isinstance(stage, slice):
            return [self[s] for s in range(*stage.indices(self.num_stages))]
        if not -self.num_stages <= stage < self.num_stages:
            raise IndexError(f"stage {stage}: the run has {self.num_stages} stages")
        from pipetrain.checkpoint.store import CheckpointStore

        return CheckpointStore(self.url).load_shard(self.cut, stage % self.num_stages)

    def __repr__(self) -> str:
        return f"StoredStates({self.url!r}, cut={self.cut}, stages={self.num_stages})"


def boundary_specs(partition: Any, stage: int) -> Any:
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

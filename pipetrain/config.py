"""A training job as typed, validated dataclasses, read from TOML.

Every error names the field at fault (``schedule.microbatches: must be >= 1``)
and the file it came from, before any work starts.
"""
from __future__ import annotations

import importlib
import typing
import tomllib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from pipetrain.errors import PipetrainError
from pipetrain.memory import REMAT
from pipetrain.optim import ASYNC_SCHEDULES, CORRECTIONS, Optimizer
from pipetrain.schedule.schedule import SCHEDULES
from pipetrain.stages.precision import PRECISIONS


class ConfigError(PipetrainError, ValueError):
    pass


@dataclass(frozen=True)
class ModelConfig:
    entry: str = ""  # "package.module:function", called with kwargs
    kwargs: dict = field(default_factory=dict)
    remat: str = "none"  # activation rematerialization in every stage: none | stage | layer
    # Tied parameters (pipetrain.ties), e.g. [["embed/tokens", "head/tokens"]]: replaces the model's own
    # declaration (model.ties) when given; [] unties a model that declares ties.
    ties: list | None = None
    precision: str = "fp32"  # fp32 | bf16: bfloat16 compute and wire, float32 masters (stages/precision.py)


@dataclass(frozen=True)
class DataConfig:
    train: str = ""  # "module:factory" -> MicrobatchSource
    heldout: str = ""  # optional, same kwargs plus split-specific ones below
    kwargs: dict = field(default_factory=dict)
    heldout_kwargs: dict = field(default_factory=dict)
    eval_microbatches: int = 8  # held-out micro-batches (ids 0..n-1) each evaluation reads
    eval_every: int = 0  # steps between evaluations on the stages; 0: only before and after training


@dataclass(frozen=True)
class PartitionConfig:
    stages: int = 2
    method: str = "params"  # uniform | params | flops | profile
    boundaries: tuple[int, ...] = ()
    replicas: int = 1  # copies of the pipeline (pipeline x data parallelism): stages * replicas workers


@dataclass(frozen=True)
class ScheduleConfig:
    name: str = "1f1b"
    microbatches: int = 8  # per step
    steps: int = 10
    accumulate: int = 1
    correction: str = "none"  # pipedream / 2bw delay compensation: none | predict | dcasgd | dcasgd-a
    # Set by `pipetrain resume --steps` on a finished run: the micro-batch where its pipeline
    # starts again, empty (pipetrain.schedule.builders.ScheduleSpec.restart_at).
    restart_at: int = 0


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0  # micro-batches; 0 = none at fixed intervals
    seconds: float = 0.0  # also one whenever this long passed since the last; 0 = off
    keep: int = 3
    dir: str = ""  # default: RUN_DIR/checkpoints (any fsspec URL)

    @property
    def enabled(self) -> bool:
        """Whether the job writes checkpoints at all (every N micro-batches and/or every N seconds)."""
        return bool(self.every or self.seconds)


TRANSPORTS = ("stream", "ucx")  # cluster.transport: runtime/transport's backends a job may run on
REDUCE_EXCHANGES = ("auto", "direct", "scatter")  # cluster.reduce_exchange (runtime/replicas.py)


@dataclass(frozen=True)
class ClusterConfig:
    scheduler: str = ""  # address; empty: an embedded LocalCluster
    scheduler_file: str = ""
    resource: str = "GPU"
    placement_timeout: float = 60.0
    max_restarts: int = 3
    credits: int = 0  # per-edge flow-control window; 0 = the schedule's bound
    stop_timeout: float = 10.0  # a stage still running this long after the stop is cancelled, its worker avoided
    spare_workers: int = 0  # an embedded local cluster starts this many workers beyond one per stage
    # The stage-to-stage transport backend: "stream" (tcp://, tls:// with a TLS Security) or "ucx"
    # (ucx:// through ucxx, the pipetrain[ucx] extra: runtime/transport/ucx.py).
    transport: str = "stream"
    # Replicated pipelines: the gradient bucket a stage's replicas exchange as one message, sent as
    # soon as the update's last backward has finished it (torch stages; runtime/replicas.py).
    reduce_bucket_mib: float = 1.0
    # How a stage's replicas sum their gradients (runtime/replicas.py): "direct" (each sends its whole
    # part to each other one), "scatter" (each sums a d-th and shares that sum), "auto": scatter from
    # d = 3 where a stage has 4 MiB of gradients or more.
    reduce_exchange: str = "auto"

    def __post_init__(self) -> None:
        _check(self.transport in TRANSPORTS, "cluster.transport",
               f"{self.transport!r} is not one of {', '.join(TRANSPORTS)}")
        mib = self.reduce_bucket_mib
        _check(isinstance(mib, (int, float)) and not isinstance(mib, bool) and mib > 0, "cluster.reduce_bucket_mib",
               f"must be > 0 (MiB of gradients per message), got {self.reduce_bucket_mib!r}")
        _check(self.reduce_exchange in REDUCE_EXCHANGES, "cluster.reduce_exchange",
               f"{self.reduce_exchange!r} is not one of {', '.join(REDUCE_EXCHANGES)}")

    @property
    def reduce_bucket_bytes(self) -> int:
        return max(1, int(self.reduce_bucket_mib * (1 << 20)))


@dataclass(frozen=True)
class ObserveConfig:
    tensorboard: bool = False  # also TensorBoard event files in RUN_DIR/tensorboard/ (the tensorboardX package)


@dataclass(frozen=True)
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optimizer: Optimizer = field(default_factory=Optimizer)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    observe: ObserveConfig = field(default_factory=ObserveConfig)
    run_dir: str = "runs/job"
    # No job-wide seed: nothing would read it. A model's or a data source's
    # seed is one of its own kwargs (model.kwargs, data.kwargs), where it acts.

    def validate(self) -> "JobConfig":
        _require(self.model.entry, "model.entry", "an import path like 'models.gpt:build'")
        _require(self.data.train, "data.train", "an import path like 'models.text:train_source'")
        _check(self.model.remat in REMAT, "model.remat", f"{self.model.remat!r} is not one of {', '.join(REMAT)}")
        if self.model.ties is not None:  # the form now; the names once the model is built (pipetrain.ties)
            from types import SimpleNamespace

            from pipetrain.ties import declared_ties

            declared_ties(SimpleNamespace(ties=self.model.ties))
        _check(self.model.precision in PRECISIONS, "model.precision",
               f"{self.model.precision!r} is not one of {', '.join(PRECISIONS)}")
        _check(self.partition.stages >= 1, "partition.stages", "must be >= 1")
        _check(self.partition.replicas >= 1, "partition.replicas", "must be >= 1 (copies of the pipeline)")
        _check(self.partition.method in ("uniform", "params", "flops", "profile"), "partition.method",
               f"{self.partition.method!r} is not one of uniform, params, flops, profile")
        _check(self.schedule.name in SCHEDULES, "schedule.name",
               f"{self.schedule.name!r} is not one of {', '.join(SCHEDULES)}")
        _check(self.schedule.microbatches >= 1, "schedule.microbatches", "must be >= 1")
        _check(self.schedule.steps >= 1, "schedule.steps", "must be >= 1")
        _check(self.schedule.accumulate >= 1, "schedule.accumulate", "must be >= 1")
        _check(self.schedule.correction in CORRECTIONS, "schedule.correction",
               f"{self.schedule.correction!r} is not one of {', '.join(CORRECTIONS)}")
        _check(self.schedule.correction == "none" or self.schedule.name in ASYNC_SCHEDULES, "schedule.correction",
               f"{self.schedule.name} has no delayed gradients to correct; only {', '.join(ASYNC_SCHEDULES)} do")
        _check(self.checkpoint.every >= 0, "checkpoint.every", "must be >= 0 (0 turns checkpoints off)")
        _check(self.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
        _check(self.checkpoint.seconds >= 0, "checkpoint.seconds", "must be >= 0 (0 turns time-based checkpoints off)")
        _check(self.cluster.max_restarts >= 0, "cluster.max_restarts", "must be >= 0")
        _check(self.cluster.stop_timeout > 0, "cluster.stop_timeout", "must be > 0 (seconds)")
        _check(self.cluster.spare_workers >= 0, "cluster.spare_workers", "must be >= 0")
        _check(not (self.cluster.scheduler and self.cluster.scheduler_file), "cluster.scheduler",
               "give cluster.scheduler or cluster.scheduler_file, not both")
        _check(self.data.eval_microbatches >= 0, "data.eval_microbatches", "must be >= 0")
        _check(self.data.eval_every >= 0, "data.eval_every", "must be >= 0 (steps; 0: only before and after training)")
        _check(not self.data.eval_every or bool(self.data.heldout), "data.eval_every",
               "evaluates on held-out data: give data.heldout")
        _check(not self.data.eval_every or self.data.eval_microbatches >= 1, "data.eval_every",
               "needs data.eval_microbatches >= 1")
        _check(isinstance(self.observe.tensorboard, bool), "observe.tensorboard",
               f"must be true or false, got {self.observe.tensorboard!r}")
        return self

    def checkpoint_url(self) -> str:
        from pipetrain.rundir import CHECKPOINTS_DIR  # rundir imports this module

        return self.checkpoint.dir or str(Path(self.run_dir) / CHECKPOINTS_DIR)


def _require(value: str, name: str, what: str) -> None:
    _check(bool(value), name, f"is required: {what}")


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


def _build(cls: type, raw: Any, path: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path or 'config'}: expected a table, got {type(raw).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"{path + '.' if path else ''}{unknown[0]}: unknown field; known: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in raw.items():
        full = f"{path}.{name}" if path else name
        ftype = _field_type(cls, name)
        if is_dataclass(ftype):
            kwargs[name] = _build(ftype, value, full)
            continue
        if isinstance(ftype, type) and ftype in (int, float, str, bool, dict, tuple):
            value = _coerce(value, ftype, full)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        message = str(e)
        raise ConfigError(message if path and message.startswith(path + ".")
                          else f"{path or 'config'}: {message}") from None


def _field_type(cls: type, name: str) -> Any:
    hint = typing.get_type_hints(cls)[name]
    return typing.get_origin(hint) or hint


def _coerce(value: Any, ftype: type, name: str) -> Any:
    if ftype is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if ftype is tuple and isinstance(value, list):
        return tuple(value)
    if not isinstance(value, ftype) or (ftype is int and isinstance(value, bool)):
        raise ConfigError(f"{name}: expected {ftype.__name__}, got {type(value).__name__} {value!r}")
    return value


def read_raw(path: str | Path, overrides: dict | None = None) -> dict:
    """The config file as a dict, with ``--set field=value`` overrides applied."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    for dotted, value in (overrides or {}).items():
        table = raw
        *parents, leaf = dotted.split(".")
        if not all(parents) or not leaf:
            raise ConfigError(f"--set {dotted}={value}: {dotted!r} is not a field name like schedule.steps")
        for depth, p in enumerate(parents):
            table = table.setdefault(p, {})
            if not isinstance(table, dict):
                field = ".".join(parents[: depth + 1])
                raise ConfigError(f"--set {dotted}: {path}: {field} is a value, not a table with fields")
        table[leaf] = value
    return raw


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``--set FIELD=VALUE`` arguments as {field: value}; the value is JSON when it
    parses as JSON (numbers, booleans, quoted strings, lists), else the text itself."""
    import json

    overrides = {}
    for item in items:
        dotted, sep, text = item.partition("=")
        if not sep or not dotted.strip():
            raise ConfigError(f"--set {item}: expected FIELD=VALUE, e.g. --set schedule.steps=20")
        try:
            overrides[dotted.strip()] = json.loads(text)
        except json.JSONDecodeError:
            overrides[dotted.strip()] = text
    return overrides


def from_dict(raw: dict, *, origin: str = "config") -> JobConfig:
    try:
        return _build(JobConfig, raw, "").validate()
    except ConfigError as e:
        raise ConfigError(f"{origin}: {e}") from None


def load(path: str | Path, overrides: dict | None = None) -> JobConfig:
    return from_dict(read_raw(path, overrides), origin=str(path))


def resolve(entry: str, field_name: str) -> Any:
    """Import ``module:attr`` naming the config field on failure."""
    module_name, sep, attr = entry.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{field_name}: {entry!r} is not of the form 'module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{field_name}: cannot import module {module_name!r}: {e}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{field_name}: module {module_name!r} has no attribute {attr!r}") from None

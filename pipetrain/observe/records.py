"""The metrics log's records, typed: one frozen dataclass per kind of line in ``metrics.jsonl``.

A run's driver writes them (``MetricsLog.write``: the job core's ``WriteRecord``
instructions, and ``fit``'s start and end) and ``pipetrain report`` / ``trace``
read them back (``read_records``): one definition for the writer, the file and
the reader, as ``runtime/messages.py`` is for the control plane.

The file format is JSON lines, each ``{"time": ..., "type": TYPE, <fields>}``,
every field always written (None where nothing is known). Reading is lenient
where the file may come from another version: a field an older one did not
write reads as its default, or None; a key a newer one added is ignored; a
type this version does not know reads as an ``UnknownRecord`` holding its
values. A line that is not a JSON object with a "type" is an error naming the
file and the line, except a last line cut short (a killed writer, or one still
writing), which is left out.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pipetrain.errors import PipetrainError

__all__ = ["CheckpointMissedRecord", "CheckpointRecord", "CheckpointRequestRecord", "EndRecord", "ErrorRecord",
           "EvalRecord",
           "FailedRecord", "InterruptedRecord", "MetricsFormatError", "PlacementRecord", "Record",
           "RecoveredRecord", "RecoveryRecord", "ResumeRecord", "StartRecord", "StepRecord", "UnknownRecord",
           "read_records", "record_from_json", "records_of"]

R = TypeVar("R", bound="Record")


class MetricsFormatError(PipetrainError, ValueError):
    """A line of a metrics log that is not a record (the message names the file and the line)."""


@dataclass(frozen=True, kw_only=True)
class Record:
    """One line of the metrics log; ``time`` (seconds since the epoch) is stamped by ``MetricsLog.write``."""

    TYPE: ClassVar[str] = ""
    time: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """{"type": TYPE, <fields>}, without the time: how ``FitResult.history`` and ``recoveries`` hold records."""
        return {"type": self.TYPE, **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "time"}}

    def to_json(self) -> dict[str, Any]:
        """The line as written: {"time": ..., "type": TYPE, <fields>}."""
        return {"time": self.time, **self.as_dict()}

    @classmethod
    def from_json(cls: type[R], data: Mapping[str, Any]) -> R:
        """From a dict as ``to_json`` (or ``as_dict``) gives it; see the module doc for what may be missing."""
        values = {}
        for f in fields(cls):
            if f.name in data:
                values[f.name] = data[f.name]
            elif f.default is MISSING and f.default_factory is MISSING:
                values[f.name] = None  # not written by the version that wrote the file
        return cls(**values)


# -- the run ------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class StartRecord(Record):
    """``fit`` began: what it runs. ``heldout_loss``: None since the stages evaluate on the workers (the
    ``EvalRecord`` of step 0 holds the loss before training); logs of earlier versions hold it here."""

    TYPE: ClassVar[str] = "start"
    schedule: str
    stages: int
    steps: int
    microbatches: int
    heldout_loss: float | None
    executor: str
    replicas: int | None = None  # copies of the pipeline (None: one, a log from before replicas)


@dataclass(frozen=True, kw_only=True)
class StepRecord(Record):
    """Every stage finished step ``step``: its mean loss, the rate since the previous step, each stage's busy share."""

    TYPE: ClassVar[str] = "step"
    step: int
    loss: float | None
    samples_per_s: float | None
    busy: list[float]
    stage0_done: float | None = None  # when stage 0 reported the step (the dask executor's; None: the reference)
    lr: float | None = None  # the LR of the update that closed the step (runtime/step_metrics.py)
    grad_norm: float | None = None  # the gradient norm that update clipped by (clip_norm set; else None)


@dataclass(frozen=True, kw_only=True)
class EvalRecord(Record):
    """The stages' forward-only pass over the held-out micro-batches after ``step`` steps (0: before
    training; schedule/evaluation.py says which weights each stage used): their mean loss."""

    TYPE: ClassVar[str] = "eval"
    step: int
    heldout_loss: float | None


@dataclass(frozen=True, kw_only=True)
class EndRecord(Record):
    """``fit`` returned: the held-out loss after training, and what this call trained (``steps_run`` of ``steps``)."""

    TYPE: ClassVar[str] = "end"
    heldout_loss: float | None
    wall_seconds: float
    samples_per_s: float
    samples: int
    steps: int
    steps_run: int


# -- checkpoints ----------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class CheckpointRecord(Record):
    """The checkpoint at micro-batch ``cut`` is committed."""

    TYPE: ClassVar[str] = "checkpoint"
    cut: int
    generation: int
    commit_seconds: float


@dataclass(frozen=True, kw_only=True)
class CheckpointRequestRecord(Record):
    """A time-based checkpoint asked of the stages, at a cut ahead of the furthest step reported."""

    TYPE: ClassVar[str] = "checkpoint-request"
    cut: int
    furthest_step: int


@dataclass(frozen=True, kw_only=True)
class CheckpointMissedRecord(Record):
    """A stage heard of the requested cut after passing it (the cut is asked again later)."""

    TYPE: ClassVar[str] = "checkpoint-missed"
    cut: int
    stage: int


# -- placement, losses and recoveries ------------------------------------------

@dataclass(frozen=True, kw_only=True)
class PlacementRecord(Record):
    """Where ``generation``'s stages run: stage (as a string) -> worker address, and -> its host."""

    TYPE: ClassVar[str] = "placement"
    generation: int
    workers: dict[str, str]
    hosts: dict[str, str]


@dataclass(frozen=True, kw_only=True)
class _Loss(Record):
    """What a recovery's records share: the loss, and where the job rolled back to."""

    generation: int  # the new generation
    stage: int | None  # the first stage lost
    worker: str | None
    stages: list[int]
    workers: list[str]
    reason: str
    worker_died: bool
    rollback_to: int  # the micro-batch the new generation starts at
    checkpoint: str | None  # the checkpoint it starts from (None: the beginning)
    skipped_checkpoints: list[dict]  # newer step directories passed over: {"cut", "why"}
    detected_at: float
    stop_seconds: float


@dataclass(frozen=True, kw_only=True)
class RecoveryRecord(_Loss):
    """A stage was lost; the job rolls back and goes on as a new generation."""

    TYPE: ClassVar[str] = "recovery"


@dataclass(frozen=True, kw_only=True)
class RecoveredRecord(_Loss):
    """The new generation's first micro-batch is back at stage 0: the recovery is over, and what it took."""

    TYPE: ClassVar[str] = "recovered"
    place_seconds: float | None = None
    placed_at: float | None = None
    workers_after: dict[str, str] | None = None  # the new placement: stage (as a string) -> worker
    load_seconds: float
    startup_seconds: float
    warmup_seconds: float
    ready_at: float
    first_microbatch_at: float
    total_seconds: float  # loss detected -> first micro-batch done

    def __post_init__(self) -> None:  # the job core's recoveries key stages by int, a JSON object by string
        if self.workers_after is not None:
            object.__setattr__(self, "workers_after", {str(s): w for s, w in self.workers_after.items()})


@dataclass(frozen=True, kw_only=True)
class ResumeRecord(Record):
    """A resumed job starts as ``generation`` from the checkpoint at micro-batch ``rollback_to``."""

    TYPE: ClassVar[str] = "resume"
    generation: int
    rollback_to: int
    checkpoint: str


@dataclass(frozen=True, kw_only=True)
class ErrorRecord(Record):
    """A stage's courier failed (its shard write or a report); ``stage``, ``worker``, ``cut`` where it said."""

    TYPE: ClassVar[str] = "error"
    stage: int | None = None
    worker: str | None = None
    cut: int | None = None
    error: str


@dataclass(frozen=True, kw_only=True)
class FailedRecord(Record):
    """The job cannot go on: what was lost, why it ends, and the checkpoint to resume from."""

    TYPE: ClassVar[str] = "failed"
    stages: list[int]
    workers: list[str]
    reason: str
    why: str
    checkpoint: str | None


@dataclass(frozen=True, kw_only=True)
class InterruptedRecord(Record):
    """Ctrl-C: the job ends; ``checkpoint`` is the one to resume from."""

    TYPE: ClassVar[str] = "interrupted"
    generation: int
    checkpoint: str | None


@dataclass(frozen=True, kw_only=True)
class UnknownRecord(Record):
    """A line of a type this version does not know (a newer one wrote it): its type and values, kept."""

    kind: str
    values: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.kind, **self.values}


_TYPES: dict[str, type[Record]] = {cls.TYPE: cls for cls in (
    StartRecord, StepRecord, EvalRecord, EndRecord, CheckpointRecord, CheckpointRequestRecord,
    CheckpointMissedRecord,
    PlacementRecord, RecoveryRecord, RecoveredRecord, ResumeRecord, ErrorRecord, FailedRecord,
    InterruptedRecord)}


def record_from_json(data: Any) -> Record:
    """The typed record of one decoded line; ValueError when it is not a JSON object with a string "type"."""
    if not isinstance(data, dict):
        raise ValueError(f"not a JSON object but {type(data).__name__}")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise ValueError('no "type"' if kind is None else f'"type" is {kind!r}, not a string')
    cls = _TYPES.get(kind)
    if cls is None:
        return UnknownRecord(kind=kind, time=data.get("time"),
                             values={k: v for k, v in data.items() if k not in ("type", "time")})
    return cls.from_json(data)


def read_records(path: str | Path, *, skip_malformed: bool = False) -> list[Record]:
    """Every record of a metrics log, in order ([] when there is no file). A malformed line raises
    ``MetricsFormatError`` naming the file and line (``skip_malformed``: it is left out instead),
    but for a last line cut short, which is always left out."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    lines = text.split("\n")  # a complete log ends with "\n": the last piece is "" or a line cut short
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            out.append(record_from_json(json.loads(line)))
        except ValueError as e:
            if skip_malformed or number == len(lines):
                continue
            raise MetricsFormatError(f"{path}:{number}: not a metrics record ({e})") from None
    return out


def records_of(records: Iterable[Record], kind: type[R]) -> list[R]:
    """The records of one type, in order."""
    return [r for r in records if isinstance(r, kind)]

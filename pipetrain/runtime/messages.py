"""Control-plane messages: what a stage reports to its driver, typed, and how they travel.

A stage builds one of these (``runtime/worker.py``) and ``StageControl.report``
sends ``to_wire()``, a dict of plain values, which is what Dask's ``Queue``
carries through the scheduler. The driver turns every dict it drains back
into its type with ``report_from_message``, and the job core takes each type
as an event (``runtime/core.py``): one definition for the sender, the wire
and the receiver.

Anything with a client on the scheduler can put into a job's queue, so a
message is checked before it is used: an unknown kind, a missing field or a
value of the wrong type gives None (the driver drops it), never an exception.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

__all__ = ["CourierError", "CutMissed", "EvalReport", "FirstBackward", "PeerLostReport", "Report", "ShardWritten",
           "StageDone", "StageReady", "StepReport", "report_from_message"]


@dataclass(frozen=True)
class Report:
    """A stage's report on the control plane of ``generation``."""

    KIND: ClassVar[str] = ""
    generation: int
    stage: int | None  # None only for a courier failure that could not say which stage
    now: float = field(default=0.0, kw_only=True)  # when the driver received it (report_from_message)

    def to_wire(self) -> dict:
        body = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "now"}
        return {"type": self.KIND, **body}


@dataclass(frozen=True)
class StepReport(Report):
    """The stage's busy time over a step it finished, and the losses it computed since the last report."""

    KIND: ClassVar[str] = "step"
    step: int  # -1: only carries losses (the last stage's flush)
    busy: float
    wall: float
    time: float
    losses: dict[int, float] = field(default_factory=dict)
    grad_norms: dict[int, float] = field(default_factory=dict)  # update version -> the norm it clipped by


@dataclass(frozen=True)
class EvalReport(Report):
    """The last stage's mean held-out loss of the eval block after ``step`` steps (schedule/evaluation.py)."""

    KIND: ClassVar[str] = "eval"
    step: int
    loss: float


@dataclass(frozen=True)
class ShardWritten(Report):
    """The stage's checkpoint shard for ``cut`` is durable."""

    KIND: ClassVar[str] = "shard"
    cut: int
    record: dict  # ShardRecord.to_dict()
    seconds: float = 0.0


@dataclass(frozen=True)
class StageReady(Report):
    """Built, loaded and connected to its neighbours: it starts its schedule."""

    KIND: ClassVar[str] = "ready"
    time: float
    seconds: float = 0.0  # task start to ready
    load_seconds: float = 0.0
    build_seconds: float = 0.0
    connect_seconds: float = 0.0


@dataclass(frozen=True)
class PeerLostReport(Report):
    """The stage's neighbour vanished; it waits for the stop (counts as failing with PeerLost)."""

    KIND: ClassVar[str] = "peer-lost"
    reason: str
    time: float = 0.0


@dataclass(frozen=True)
class FirstBackward(Report):
    """The stage's first backward of this generation is done (the end of a recovery, at stage 0)."""

    KIND: ClassVar[str] = "first"
    k: int
    time: float


@dataclass(frozen=True)
class CutMissed(Report):
    """The stage heard of a requested cut after passing it."""

    KIND: ClassVar[str] = "missed"
    cut: int


@dataclass(frozen=True)
class CourierError(Report):
    """The stage's courier failed: a shard write (which names ``cut`` and ``worker``) or a report."""

    KIND: ClassVar[str] = "error"
    error: str
    worker: str | None = None
    cut: int | None = None


@dataclass(frozen=True)
class StageDone(Report):
    """Sent before the task returns: every earlier report of the stage has arrived."""

    KIND: ClassVar[str] = "done"
    seconds: float = 0.0


_KINDS: dict[str, type[Report]] = {cls.KIND: cls for cls in
                                   (StepReport, ShardWritten, StageReady, PeerLostReport, FirstBackward, CutMissed,
                                    CourierError, StageDone, EvalReport)}
_NUMBER = (int, float)
# What each annotated field may hold on the wire (bool is an int in Python: refused where a number is meant).
_ACCEPTS: dict[str, tuple[type, ...]] = {"int": (int,), "float": _NUMBER, "str": (str,), "dict": (dict,),
                                         "int | None": (int, type(None)), "str | None": (str, type(None)),
                                         "dict[int, float]": (dict,)}


def report_from_message(message: Any, generation: int, now: float) -> Report | None:
    """The typed report of a dict drained from ``generation``'s queue (whose name, not the
    message, says the generation); None when it is not a well-formed report."""
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        return None
    cls = _KINDS.get(message["type"])
    if cls is None:
        return None
    values: dict[str, Any] = {"generation": generation, "now": now}
    for f in fields(cls):
        if f.name in ("generation", "now"):
            continue
        if f.name not in message:
            if f.default is MISSING and f.default_factory is MISSING:
                return None
            continue
        value = message[f.name]
        accepts = _ACCEPTS.get(str(f.type), (object,))
        if isinstance(value, bool) or not isinstance(value, accepts):
            return None
        values[f.name] = float(value) if accepts is _NUMBER else value
    if cls is StepReport:
        try:
            values["losses"] = {int(k): float(v) for k, v in values.get("losses", {}).items()}
        except (TypeError, ValueError):
            return None
    return cls(**values)

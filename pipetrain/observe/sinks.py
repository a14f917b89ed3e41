"""Where a run's typed records go besides ``metrics.jsonl``: TensorBoard, and callbacks.

``MetricsLog(path, sinks=[...])`` hands every record it writes, stamped with
its time, to each sink's ``write`` in order, and ``MetricsLog.close`` closes
them. A sink that raises does not stop the run: ``MetricsLog`` logs one
warning per sink (naming it and the record's type) and goes on handing it
the records that follow.

- ``TensorBoardSink(logdir)``: TensorBoard event files written by
  ``tensorboardX`` (``pip install pipetrain[observe]``), with the step number
  as the global step: per step record the loss, samples/s, each stage's busy
  share (``busy/stage0`` ...) and any other numeric field a step record
  carries (a list of numbers as ``FIELD/stageN``); the held-out loss of each
  eval record (``heldout_loss`` at its step; a start or end record's, from
  logs that carry it there, where no eval record gave that step's); the
  count of recoveries so far (``recoveries``) and a text line for each
  recovery, resume, failure or interruption.
- ``CallbackSink(fn)``: calls ``fn(record)`` with every ``Record``
  (``observe/records.py``): how ``fit(..., callbacks=[fn])`` reaches MLflow,
  W&B or anything else.
"""
from __future__ import annotations

from collections.abc import Callable
from numbers import Real
from pathlib import Path
from typing import Any, Protocol

from pipetrain.observe.records import (CheckpointRecord, EndRecord, EvalRecord, FailedRecord, InterruptedRecord,
                                       RecoveredRecord, RecoveryRecord, Record, ResumeRecord, StartRecord,
                                       StepRecord)

__all__ = ["CallbackSink", "Sink", "TensorBoardSink"]

# Step-record fields that are not a metric of the step: its number, and wall-clock instants.
_NOT_SCALARS = frozenset({"step", "time", "stage0_done"})


class Sink(Protocol):
    name: str

    def write(self, record: Record) -> None: ...

    def close(self) -> None: ...


class CallbackSink:
    """Calls ``fn(record)`` with every record the run writes, in order."""

    def __init__(self, fn: Callable[[Record], Any]):
        if not callable(fn):
            raise TypeError(f"a metrics callback must be callable, got {type(fn).__name__} {fn!r}")
        self.fn = fn
        self.name = f"callback {getattr(fn, '__qualname__', None) or repr(fn)}"

    def write(self, record: Record) -> None:
        self.fn(record)

    def close(self) -> None:
        pass


class TensorBoardSink:
    """TensorBoard event files in ``logdir`` (``RUN_DIR/tensorboard/``), written with ``tensorboardX``."""

    def __init__(self, logdir: str | Path, *, flush_every_record: bool = True):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ImportError("[observe] tensorboard = true needs the tensorboardX package: "
                              "pip install 'pipetrain[observe]' (or tensorboardX)") from None
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.name = f"TensorBoard ({self.logdir})"
        self._writer = SummaryWriter(logdir=str(self.logdir))
        self._flush = flush_every_record  # a job killed mid-run keeps what it logged
        self._recoveries = 0
        self._step = 0  # the newest step logged: where an event between steps is drawn
        self._heldout_steps: set[int] = set()  # steps whose held-out loss an eval record gave

    def write(self, record: Record) -> None:
        w, t = self._writer, record.time
        if isinstance(record, StepRecord):
            self._step = int(record.step)
            for name, value in record.as_dict().items():
                if name in _NOT_SCALARS:
                    continue
                if _is_number(value):
                    w.add_scalar(name, float(value), self._step, walltime=t)
                elif isinstance(value, (list, tuple)) and value and all(_is_number(v) for v in value):
                    for stage, v in enumerate(value):
                        w.add_scalar(f"{name}/stage{stage}", float(v), self._step, walltime=t)
        elif isinstance(record, EvalRecord):
            if _is_number(record.heldout_loss) and int(record.step) not in self._heldout_steps:
                self._heldout_steps.add(int(record.step))
                w.add_scalar("heldout_loss", float(record.heldout_loss), int(record.step), walltime=t)
        elif isinstance(record, StartRecord):
            if _is_number(record.heldout_loss):
                w.add_scalar("heldout_loss", float(record.heldout_loss), 0, walltime=t)
        elif isinstance(record, EndRecord):
            if _is_number(record.heldout_loss) and int(record.steps) not in self._heldout_steps:
                w.add_scalar("heldout_loss", float(record.heldout_loss), int(record.steps), walltime=t)
            w.add_scalar("run/samples_per_s", float(record.samples_per_s), int(record.steps), walltime=t)
            w.add_scalar("run/wall_seconds", float(record.wall_seconds), int(record.steps), walltime=t)
        elif isinstance(record, RecoveryRecord):
            self._recoveries += 1
            w.add_scalar("recoveries", self._recoveries, self._step, walltime=t)
            w.add_text("events", f"recovery to generation {record.generation}: {record.reason} (stages "
                       f"{record.stages}); rolled back to micro-batch {record.rollback_to}", self._step, walltime=t)
        elif isinstance(record, RecoveredRecord):
            w.add_scalar("recovery/total_seconds", float(record.total_seconds), self._step, walltime=t)
        elif isinstance(record, CheckpointRecord):
            w.add_scalar("checkpoint/commit_seconds", float(record.commit_seconds), self._step, walltime=t)
        elif isinstance(record, ResumeRecord):
            w.add_text("events", f"resumed as generation {record.generation} from micro-batch {record.rollback_to}",
                       self._step, walltime=t)
        elif isinstance(record, FailedRecord):
            w.add_text("events", f"failed: {record.why} ({record.reason})", self._step, walltime=t)
        elif isinstance(record, InterruptedRecord):
            w.add_text("events", "interrupted", self._step, walltime=t)
        if self._flush:
            w.flush()

    def close(self) -> None:
        self._writer.close()


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)

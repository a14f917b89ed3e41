"""One error hierarchy, and the one question recovery asks of an error: would a restart cure it?

``retryable`` answers it. The machinery around a stage (a vanished peer, a
stop, a timeout, a lost worker or connection, a stale generation) can fail
and work the next time; a stage's own computation on its data fails the same
way every time, and so does a checkpoint that cannot be written. The job core
(``runtime/core.py``) asks ``is_retryable`` and never looks at class names.

Every error pipetrain raises derives from ``PipetrainError`` (and from the
builtin a caller would expect: ``ValueError`` for bad input, ``RuntimeError``
otherwise): the transport's and ``links.Stopped`` are ``RetryableError``s,
``StaleGenerationError`` says it is retryable, the config's, the schedule's,
placement's, the checkpoint store's and a stage's boundary check are not.
Errors from outside (Python's, Dask's) are judged by their type
(``_machinery_types``).
"""
from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence

__all__ = [
    "CheckpointDirInUse",
    "JobFailed",
    "JobInterrupted",
    "PipetrainError",
    "RetryableError",
    "StageLost",
    "cannot_write_checkpoints",
    "is_retryable",
    "is_worker_death",
    "short_error",
]


class PipetrainError(Exception):
    """Base of pipetrain's errors. ``retryable``: whether a restart may cure it."""

    retryable: bool = False


class RetryableError(PipetrainError):
    """The machinery around the computation failed; a restart may cure it."""

    retryable = True


class JobFailed(PipetrainError, RuntimeError):
    """The job ended without finishing; the message says why and where to resume.

    ``retryable`` is per instance: True when running it again unchanged may
    succeed (the scheduler went away), False when it cannot (a computation
    error, an unwritable checkpoint, the restart bound reached, Ctrl-C).
    """

    def __init__(self, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


class CheckpointDirInUse(JobFailed):
    """A new run was pointed at checkpoints another run owns."""


class JobInterrupted(JobFailed):
    """The user stopped the job (Ctrl-C); it can be resumed from its last checkpoint."""


class StageLost(RetryableError, RuntimeError):
    """One or more stages of the running generation are gone.

    ``detected_at`` is given, not read from a clock, so the core that decides
    on it stays free of time; ``deterministic`` marks a loss caused by the
    stage's own computation, which a restart would only repeat.
    """

    def __init__(self, stages: Sequence[int], workers: Sequence[str], reason: str, *, worker_died: bool,
                 deterministic: bool = False, unwritable: bool = False, detected_at: float = 0.0):
        where = ", ".join(f"stage {s} on worker {w}" for s, w in zip(stages, workers))
        super().__init__(f"{where}: {reason}" if where else reason)
        self.stages, self.workers, self.reason = list(stages), list(workers), reason
        self.worker_died = worker_died
        self.deterministic = deterministic
        self.unwritable = unwritable  # its worker cannot write the checkpoint location
        self.detected_at = detected_at
        self.retryable = not deterministic

    @property
    def stage(self) -> int | None:
        return self.stages[0] if self.stages else None

    @property
    def worker(self) -> str | None:
        return self.workers[0] if self.workers else None


def short_error(error: BaseException) -> str:
    """``Type: message``, cut at 400 characters: for reports and recovery records."""
    text = f"{type(error).__name__}: {error}"
    return text if len(text) < 400 else text[:400] + "..."


def is_retryable(error: BaseException) -> bool:
    """Whether a restart may cure ``error``: ours say so themselves, the others by their type."""
    if isinstance(error, PipetrainError):
        return error.retryable
    return isinstance(error, _machinery_types())


def cannot_write_checkpoints(error: BaseException | None) -> bool:
    """Whether a stage failed its probe of the checkpoint location (``worker.CheckpointUnwritable``)."""
    unwritable = _optional_type("pipetrain.runtime.worker", "CheckpointUnwritable")
    return error is not None and unwritable is not None and isinstance(error, unwritable)


def is_worker_death(error: BaseException | None) -> bool:
    """Whether Dask gave up on the task because its worker died (``KilledWorker``)."""
    killed = _optional_type("distributed", "KilledWorker")
    return error is not None and killed is not None and isinstance(error, killed)


@functools.cache
def _machinery_types() -> tuple[type[BaseException], ...]:
    """The errors from outside pipetrain that a restart may cure (distributed's imported
    lazily: it may be absent where the core is tested)."""
    found: list[type[BaseException]] = [
        asyncio.CancelledError,  # a BaseException: a cancelled task or wait, not the stage's maths
        TimeoutError,
        OSError,  # sockets, files, and distributed's CommClosedError (an OSError)
        MemoryError,  # the worker's memory, not the data: another worker may have enough
    ]
    for module, name in [
        ("distributed", "KilledWorker"),
        ("distributed.comm.core", "CommClosedError"),
    ]:
        cls = _optional_type(module, name)
        if cls is not None:
            found.append(cls)
    return tuple(found)


@functools.cache
def _optional_type(module: str, name: str) -> type[BaseException] | None:
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None

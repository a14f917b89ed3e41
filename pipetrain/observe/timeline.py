"""Reading a run directory back: per-stage event arrays, metrics, the schedule that ran.

Shared by ``trace.py`` (timeline trace, Gantt chart, measured vs simulated
bubble) and ``report.py`` (loss and throughput plots). Nothing here imports
matplotlib or a framework; the directory's names come from ``pipetrain.rundir``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from pipetrain.observe.records import Record, StartRecord, read_records, records_of
from pipetrain.rundir import EVENTS_DIR, JOB_FILE, METRICS_FILE

R = TypeVar("R", bound=Record)

EVENT_DTYPE = np.dtype([("kind", "U6"), ("k", "i8"), ("version", "i8"), ("start", "f8"), ("end", "f8")])
# "W": the weight gradients of a split backward, after its SEND_B (runtime/interpreter.py);
# not a schedule action, but work the stage does.
COMPUTE_KINDS = ("F", "B", "W")
BUSY_KINDS = ("F", "B", "W", "U", "E", "R")  # what a stage's "busy share" counts: work (held-out forwards
# too, as the simulator counts them, and the replicas' sum), not waiting or moving bytes
KINDS = ("F", "B", "W", "U", "C", "SEND_F", "RECV_F", "SEND_B", "RECV_B")


@dataclass(frozen=True)
class RunInfo:
    """What ran: the schedule's arguments as far as the run directory tells them."""

    schedule: str | None
    num_stages: int
    microbatches: int | None
    steps: int | None
    accumulate: int
    checkpoint_every: int | None
    first_microbatch: int
    replicas: int = 1  # num_stages counts tasks: stages x replicas (replica r's stage s at r * p + s)

    def title(self) -> str:
        name = self.schedule or "unknown schedule"
        m = f", {self.microbatches} micro-batches/step" if self.microbatches else ""
        return f"{name}, {self.num_stages} stage{'s' if self.num_stages != 1 else ''}{m}"


def require_run_dir(run_dir: str | Path) -> Path:
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {path} does not exist")
    return path


def load_events(run_dir: str | Path) -> list[np.ndarray]:
    """``RUN_DIR/events/stage-{s}.npy`` for s = 0, 1, ... (no pickle); a clear error when absent or malformed."""
    path = require_run_dir(run_dir)
    folder = path / EVENTS_DIR
    files = sorted(folder.glob("stage-*.npy"), key=lambda f: _stage_number(f))
    if not files:
        raise FileNotFoundError(f"{folder}: no stage-*.npy event files (did the run finish on the dask executor?)")
    numbers = [_stage_number(f) for f in files]
    if numbers != list(range(len(files))):
        raise ValueError(f"{folder}: event files for stages {numbers}, expected stage-0 .. stage-{len(files) - 1}")
    events = []
    for f in files:
        try:
            array = np.load(f, allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{f}: not a plain numpy event array ({e})") from e
        missing = [name for name in EVENT_DTYPE.names if array.dtype.names is None or name not in array.dtype.names]
        if missing:
            raise ValueError(f"{f}: event array lacks field(s) {missing}; expected dtype {EVENT_DTYPE}")
        events.append(array)
    return events


def _stage_number(f: Path) -> int:
    try:
        return int(f.stem.split("-", 1)[1])
    except (IndexError, ValueError):
        raise ValueError(f"{f}: event files are named stage-<index>.npy") from None


def load_metrics(run_dir: str | Path) -> list[Record]:
    """The run's metrics log, typed (``observe/records.py``); [] when it has none."""
    return read_records(Path(run_dir) / METRICS_FILE)


def first_of(metrics: list[Record], kind: type[R]) -> R | None:
    """The first record of a type (the start, the end), or None."""
    return next(iter(records_of(metrics, kind)), None)


def run_info(run_dir: str | Path, events: list[np.ndarray], metrics: list[Record]) -> RunInfo:
    """job.json's schedule section if present, else the metrics' start record, with gaps filled from the events."""
    config: dict = {}
    job_file = Path(run_dir) / JOB_FILE
    if job_file.exists():
        try:
            config = json.loads(job_file.read_text()).get("config", {}) or {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{job_file}: not valid JSON ({e})") from e
    sched = dict(config.get("schedule", {}) or {})
    start = first_of(metrics, StartRecord)
    name = sched.get("name") or (start.schedule if start else None)
    every = (config.get("checkpoint", {}) or {}).get("every") or None
    stage0 = events[0] if events else np.zeros(0, EVENT_DTYPE)
    forwards = stage0["k"][stage0["kind"] == "F"]
    accumulate = int(sched.get("accumulate") or 0)
    if not accumulate and name == "pipedream":
        # not recorded by the Python API: one U per `accumulate` backwards
        updates = int(np.sum(stage0["kind"] == "U"))
        accumulate = max(1, round(int(np.sum(stage0["kind"] == "B")) / updates)) if updates else 1
    replicas = int((config.get("partition", {}) or {}).get("replicas") or (start.replicas if start else 1) or 1)
    return RunInfo(schedule=name, num_stages=len(events), replicas=replicas,
                   microbatches=sched.get("microbatches") or (start.microbatches if start else None),
                   steps=sched.get("steps") or (start.steps if start else None), accumulate=accumulate or 1,
                   checkpoint_every=every, first_microbatch=int(forwards.min()) if forwards.size else 0)


def run_start(events: list[np.ndarray]) -> float:
    starts = [float(e["start"].min()) for e in events if e.size]
    return min(starts) if starts else 0.0


def run_end(events: list[np.ndarray]) -> float:
    ends = [float(e["end"].max()) for e in events if e.size]
    return max(ends) if ends else 0.0


def event_name(kind: str, k: int, version: int) -> str:
    """``F3``, ``B0``, ``U4`` (the version it produces), ``C16`` (the cut), ``RECV_F3``: as the schedule prints."""
    return f"{kind}{version if kind == 'U' else k}"


def time_unit(seconds: float) -> tuple[str, float]:
    """("ms", 1000) for short spans, ("s", 1) otherwise: axis labels stay readable."""
    return ("ms", 1000.0) if seconds < 10 else ("s", 1.0)


def save_figure(plt, fig, path: str | Path) -> Path:
    """Write a matplotlib figure as PNG (creating the folder) and close it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target

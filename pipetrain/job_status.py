"""`pipetrain status` and `pipetrain logs`: a run directory, read back for people.

Both read the run directory only (job.json, metrics.jsonl, summary.json and a
detached job's driver.log), so they work without a scheduler and on attached
runs too; given a scheduler, status also asks it about a detached job's
driver task, which is the one thing the directory cannot tell: whether the
driver that last wrote there is still alive.
"""
from __future__ import annotations

import json
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from pipetrain import rundir
from pipetrain.detached import ACTIVE
from pipetrain.observe import records as rec
from pipetrain.driver_log import (CANCELLED, FAILED, FINAL_STATES, FINISHED, SUBMITTED, attempts, last_state,
                                  read_lines)

_PROGRESS_LINE = re.compile(r"^\[[#.]+\] step \d+/\d+")  # observe.progress's; the step records say it all
_ENDED = (rec.EndRecord, rec.FailedRecord, rec.InterruptedRecord)


def read_metrics(run_dir: str | Path, offset: int = 0) -> tuple[list[rec.Record], int]:
    """The typed records of RUN_DIR/metrics.jsonl from byte ``offset`` on (whole lines only), and the
    offset after: ``observe.records``' reader, from where ``logs -f`` left off."""
    try:
        with (Path(run_dir) / rundir.METRICS_FILE).open("rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    complete = data[: data.rfind(b"\n") + 1]
    records = []
    for line in complete.decode(errors="replace").splitlines():
        try:
            records.append(rec.record_from_json(json.loads(line)))
        except ValueError:  # a line cut short by a killed driver
            continue
    return records, offset + len(complete)


# -- status ---------------------------------------------------------------------

def status_lines(run_dir: str, job_id: str, *, task: tuple[str | None, str | None] | None = None,
                 at: str = "--scheduler ADDR") -> list[str]:
    """What ``pipetrain status`` prints. ``task``: the scheduler's (state, worker) of the
    job's driver task, or None when no scheduler was asked; ``at``: how to name the scheduler."""
    job = rundir.load_job(run_dir)
    records, _ = read_metrics(run_dir)
    hint = resume_hint(run_dir, at)
    rows = [("job", f"{job_id} (from {job.get('source') or 'an unrecorded config'})"), ("run directory", run_dir),
            ("state", _state(run_dir, records, task, hint))]
    starts, steps_done = rec.records_of(records, rec.StartRecord), rec.records_of(records, rec.StepRecord)
    steps = starts[-1].steps if starts else None
    if steps_done:
        last = steps_done[-1]
        rows.append(("progress", f"step {last.step + 1} of {steps or '?'}, loss {_num(last.loss)}"))
    checkpoints = rec.records_of(records, rec.CheckpointRecord)
    if checkpoints:
        rows.append(("checkpoint", f"latest at micro-batch {checkpoints[-1].cut} "
                                   f"(generation {checkpoints[-1].generation})"))
    recoveries = len(rec.records_of(records, rec.RecoveryRecord))
    driver_runs = attempts(run_dir)
    rows.append(("restarts", f"{recoveries} recover{'y' if recoveries == 1 else 'ies'} of stages"
                             + (f", {driver_runs - 1} of the driver" if driver_runs else "")))
    width = max(len(k) for k, _ in rows)
    return [f"{k:<{width}}  {v}" for k, v in rows]


def resume_hint(run_dir: str, at: str = "--scheduler ADDR") -> str:
    """How to continue a stopped run: detached again if a detached driver ran it."""
    if last_state(run_dir) is not None:
        return f"`pipetrain submit --resume {run_dir} {at}` (or `pipetrain resume {run_dir} {at}`)"
    return f"`pipetrain resume {run_dir}`"


def _state(run_dir: str, records: list[rec.Record], task: tuple | None, hint: str) -> str:
    task_state, worker = task or (None, None)
    driver = last_state(run_dir)
    if task_state == "processing" and driver and driver[0] == SUBMITTED:
        return (f"starting: its driver task is assigned to worker {worker} (a driver worker runs one driver per "
                f"unit of pipetrain-driver it declares)")
    if task_state == "processing":
        return f"running: its driver is on worker {worker}"
    if task_state in ACTIVE:
        why = " (no worker can take it: is the driver worker down?)" if task_state == "no-worker" else ""
        return f"waiting: its driver task is {task_state}{why}"
    if (Path(run_dir) / rundir.SUMMARY_FILE).exists() and (driver is None or driver[0] == FINISHED):
        return "finished"
    if driver is None:  # an attached run (`pipetrain train`): its metrics log says how far it got
        last = records[-1] if records else None
        if isinstance(last, rec.EndRecord):
            return "finished"
        if isinstance(last, (rec.FailedRecord, rec.InterruptedRecord)):
            return f"{last.TYPE}; resumable from its last checkpoint: {hint}"
        return "not a detached job; unless its `pipetrain train` still runs, it stopped: " + hint
    name, detail, _ = driver
    if name == CANCELLED:
        return f"cancelled; resumable: {hint}"
    if name == FAILED:
        return f"failed: {detail}"
    if task is None:
        return f"{name} ({detail}), as its driver last wrote; --scheduler asks the cluster whether it still runs"
    return f"stopped: its driver is gone (the scheduler has no task for it); resumable: {hint}"


def _num(x: Any) -> str:
    return "-" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)


# -- logs -----------------------------------------------------------------------

def render_record(r: rec.Record, steps: int | None = None) -> str:
    """One metrics record as a line of text."""
    if isinstance(r, rec.StartRecord):
        heldout = f"; held-out loss {_num(r.heldout_loss)}" if r.heldout_loss is not None else ""
        return (f"start: {r.stages}-stage '{r.schedule}' pipeline, {r.steps} steps of "
                f"{r.microbatches} micro-batches{heldout}")
    if isinstance(r, rec.StepRecord):
        parts = [f"step {(r.step or 0) + 1}{f'/{steps}' if steps else ''}", f"loss {_num(r.loss)}"]
        if r.samples_per_s:
            parts.append(f"{r.samples_per_s:,.0f} samples/s")
        if r.busy:
            parts.append("busy " + " ".join(f"{b:.0%}" for b in r.busy))
        return "  ".join(parts)
    if isinstance(r, rec.EvalRecord):
        when = "before training" if r.step == 0 else f"after step {r.step}"
        return f"eval {when}: held-out loss {_num(r.heldout_loss)}"
    if isinstance(r, rec.PlacementRecord):
        where = ", ".join(f"stage {s} on {w}" for s, w in (r.workers or {}).items())
        return f"placement (generation {r.generation}): {where}"
    if isinstance(r, rec.CheckpointRecord):
        return f"checkpoint committed at micro-batch {r.cut} (generation {r.generation})"
    if isinstance(r, rec.ResumeRecord):
        return f"resumed as generation {r.generation} from the checkpoint at micro-batch {r.rollback_to}"
    if isinstance(r, rec.RecoveryRecord):
        return (f"recovery: {r.reason} (stages {r.stages}); generation {r.generation} rolls back to "
                f"micro-batch {r.rollback_to}")
    if isinstance(r, rec.RecoveredRecord):
        return f"recovered: {_num(r.total_seconds)} s from the loss to the first micro-batch"
    if isinstance(r, rec.FailedRecord):
        return f"failed: {r.reason}; {r.why}"
    if isinstance(r, rec.InterruptedRecord):
        return f"interrupted (generation {r.generation}); last checkpoint {r.checkpoint}"
    if isinstance(r, rec.EndRecord):
        heldout = f"; held-out loss {_num(r.heldout_loss)}" if r.heldout_loss is not None else ""
        return f"end: {r.steps_run} steps, {r.samples} samples in {_num(r.wall_seconds)} s{heldout}"
    rest = {k: v for k, v in r.to_json().items() if k not in ("time", "type")}
    kind = r.kind if isinstance(r, rec.UnknownRecord) else r.TYPE
    return f"{kind}: {json.dumps(rest, default=str)}"


def show_logs(run_dir: str, *, follow: bool = False, say: Callable[[str], None] = print, poll: float = 0.5) -> None:
    """The metrics log and the driver's lines, merged in time order; ``follow`` keeps
    printing what is added until the job ends (its driver's final state, or an
    attached run's last record)."""
    metrics_at = driver_at = 0
    steps: int | None = None
    driver_state: str | None = None
    last: rec.Record | None = None
    while True:
        records, metrics_at = read_metrics(run_dir, metrics_at)
        lines, driver_at = read_lines(run_dir, driver_at)
        entries = []
        # A detached driver's notes already name the placement, in the same words.
        detached = (Path(run_dir) / rundir.DRIVER_LOG).exists()
        for r in records:
            steps = r.steps if isinstance(r, rec.StartRecord) else steps
            last = r
            if not (detached and isinstance(r, rec.PlacementRecord)):
                entries.append((r.time or 0.0, 0, render_record(r, steps)))
        for line in lines:
            driver_state = line.state[0] if line.state else driver_state
            if not _PROGRESS_LINE.match(line.text):
                entries.append((line.time, 1, line.text))
        for t, _, text in sorted(entries, key=lambda e: e[:2]):
            say(f"{datetime.fromtimestamp(t).strftime('%H:%M:%S')}  {text}")
        ended = driver_state in FINAL_STATES if driver_state else isinstance(last, _ENDED)
        if not follow or ended:
            return
        time.sleep(poll)

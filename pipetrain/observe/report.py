"""`pipetrain report RUN_DIR`: loss and throughput plots of a run, and a short text summary.

Reads only ``RUN_DIR/metrics.jsonl`` (and ``job.json`` when present), so it
works on a run that is still going or one that failed. After a recovery the
driver replays the rolled-back steps: the log then holds those steps twice,
and the loss plot draws each generation as its own segment so the replay is
visible rather than a zig-zag.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipetrain.observe.records import (
    CheckpointRecord,
    EndRecord,
    ErrorRecord,
    EvalRecord,
    Record,
    RecoveryRecord,
    StartRecord,
    StepRecord,
    records_of,
)
from pipetrain.observe.timeline import first_of, load_metrics, require_run_dir, save_figure
from pipetrain.rundir import JOB_FILE, LOSS_PLOT, METRICS_FILE, THROUGHPUT_PLOT

REPORT_SIZE_PX = (1100, 520)  # width, height of loss.png and throughput.png
RECOVERY_COLOUR = "#C44E52"


def _schedule_facts(run: Path, metrics: list[Record]) -> dict:
    start = first_of(metrics, StartRecord)
    facts = ({"schedule": start.schedule, "stages": start.stages, "microbatches": start.microbatches,
              "steps": start.steps} if start else {})
    job_file = run / JOB_FILE
    if job_file.exists():
        sched = (json.loads(job_file.read_text()).get("config", {}) or {}).get("schedule", {}) or {}
        facts.update({"schedule": sched.get("name", facts.get("schedule")),
                      "microbatches": sched.get("microbatches", facts.get("microbatches")),
                      "steps": sched.get("steps", facts.get("steps"))})
    return facts


def _samples_per_step(metrics: list[Record], facts: dict) -> tuple[float, str]:
    """(x per step, axis name): samples when the end record tells the total, else micro-batches, else steps."""
    end = first_of(metrics, EndRecord)
    steps = facts.get("steps")
    if steps and end and end.samples_per_s and end.wall_seconds:
        return end.samples_per_s * end.wall_seconds / steps, "samples seen"
    if facts.get("microbatches"):
        return float(facts["microbatches"]), "micro-batches seen"
    return 1.0, "steps done"


def _segments(metrics: list[Record]) -> list[list[StepRecord]]:
    """Step records split at each recovery: one list per generation."""
    out: list[list[StepRecord]] = [[]]
    for r in metrics:
        if isinstance(r, RecoveryRecord):
            out.append([])
        elif isinstance(r, StepRecord) and isinstance(r.step, int) and r.step >= 0:
            out[-1].append(r)
    return out


def _heldout(metrics: list[Record], total_steps: int) -> list[tuple[int, float]]:
    """(step, held-out loss) of each step evaluated, in step order: the eval records (the
    first of each step), else, in a log written before the stages evaluated on the workers,
    the start record's (step 0) and the end record's (the last step)."""
    found: dict[int, float] = {}
    for r in records_of(metrics, EvalRecord):
        if isinstance(r.step, int) and _number(r.heldout_loss):
            found.setdefault(r.step, r.heldout_loss)
    if not found:
        start, end = first_of(metrics, StartRecord), first_of(metrics, EndRecord)
        for step, r in ((0, start), (total_steps, end)):
            if r is not None and _number(r.heldout_loss):
                found[step] = r.heldout_loss
    return sorted(found.items())


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _figure(plt):
    w, h = REPORT_SIZE_PX
    fig = plt.figure(figsize=(w / 100, h / 100), dpi=100)
    ax = fig.add_axes((0.08, 0.12, 0.89, 0.78))
    return fig, ax


def plot_loss(run_dir: str | Path, path: str | Path) -> Path:
    """Training loss per step against samples seen; held-out loss at every evaluation; recoveries marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = require_run_dir(run_dir)
    metrics = load_metrics(run)
    facts = _schedule_facts(run, metrics)
    per_step, x_name = _samples_per_step(metrics, facts)
    fig, ax = _figure(plt)
    segments = _segments(metrics)
    for g, seg in enumerate(segments):
        xs = [(r.step + 1) * per_step for r in seg if _number(r.loss)]
        ys = [r.loss for r in seg if _number(r.loss)]
        if xs:
            label = "training loss (mean over the step's micro-batches)" if g == 0 else None
            ax.plot(xs, ys, color="#4C72B0", marker="o" if len(xs) <= 40 else None, markersize=3, label=label,
                    alpha=1.0 if g == len(segments) - 1 else 0.55)
    total_steps = facts.get("steps") or max((r.step + 1 for seg in segments for r in seg), default=0)
    held = [(step * per_step, y) for step, y in _heldout(metrics, total_steps)]
    if held:
        ax.plot(*zip(*held), linestyle="-" if len(held) > 2 else "none", marker="D", markersize=6,
                color="#DD8452", label="held-out loss (evaluated on the stages)")
        for x, y in (held[0], held[-1]):
            ax.annotate(f"{y:.3g}", (x, y), textcoords="offset points", xytext=(6, 6), color="#DD8452", fontsize=9)
    seen_before = [max((r.step + 1 for r in seg), default=0) * per_step for seg in segments]
    for i, r in enumerate(records_of(metrics, RecoveryRecord)):
        x = seen_before[i] if i < len(seen_before) else 0.0
        _mark_recovery(ax, x, r, f"back to micro-batch {r.rollback_to}", index=i)
    ax.set_xlabel(x_name)
    ax.set_ylabel("loss")
    ax.set_title(f"loss: {_title(facts)}", fontsize=11)
    ax.grid(alpha=0.3)
    ax.set_xlim(left=0)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize=9)
    return save_figure(plt, fig, path)


def plot_throughput(run_dir: str | Path, path: str | Path) -> Path:
    """Samples/s per step against time since the run started; the run's overall rate; recoveries marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = require_run_dir(run_dir)
    metrics = load_metrics(run)
    facts = _schedule_facts(run, metrics)
    timed = [r for r in metrics if _number(r.time)]
    origin = min((r.time for r in timed), default=0.0)
    steps = [r for r in records_of(timed, StepRecord) if _number(r.samples_per_s)]
    fig, ax = _figure(plt)
    if steps:
        ax.plot([r.time - origin for r in steps], [r.samples_per_s for r in steps], color="#4C72B0",
                marker="o" if len(steps) <= 40 else None, markersize=3, label="per step")
    end = first_of(metrics, EndRecord)
    whole_run = end.samples_per_s if end and _number(end.samples_per_s) else None
    if whole_run is not None:
        ax.axhline(whole_run, color="#55A868", linestyle=":", label=f"whole run: {whole_run:,.0f}")
    for i, r in enumerate(records_of(timed, RecoveryRecord)):
        _mark_recovery(ax, r.time - origin, r, f"stopped {r.stop_seconds or 0:.2g} s", index=i)
    ax.set_xlabel("time since the run started (s)")
    ax.set_ylabel("throughput (samples/s)")
    peaks = [r.samples_per_s for r in steps] + [whole_run or 0.0]
    ax.set_ylim(0, max(peaks) * 1.15 or 1.0)  # headroom so the curve and the recovery labels stay clear
    ax.set_xlim(left=0)
    ax.set_title(f"throughput: {_title(facts)}", fontsize=11)
    ax.grid(alpha=0.3)
    if not steps:
        ax.text(0.5, 0.5, f"no per-step throughput in {METRICS_FILE}", transform=ax.transAxes, ha="center")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=9)
    return save_figure(plt, fig, path)


def _mark_recovery(ax, x: float, r: RecoveryRecord, detail: str, *, index: int) -> None:
    ax.axvline(x, color=RECOVERY_COLOUR, linestyle="--", linewidth=1.3)
    # successive recoveries step down so their labels never overprint each other
    ax.text(x, 0.98 - 0.13 * (index % 5),
            f" recovery g{r.generation}:\n stage {r.stage} lost,\n {detail}",
            transform=ax.get_xaxis_transform(), color=RECOVERY_COLOUR, fontsize=8, va="top")


def _title(facts: dict) -> str:
    parts = [str(facts.get("schedule") or "unknown schedule")]
    if facts.get("stages"):
        parts.append(f"{facts['stages']} stages")
    if facts.get("microbatches"):
        parts.append(f"{facts['microbatches']} micro-batches/step")
    return ", ".join(parts)


def summary(run_dir: str | Path) -> str:
    """A few lines: what ran, loss first -> last, held-out loss, throughput, checkpoints, recoveries."""
    run = require_run_dir(run_dir)
    metrics = load_metrics(run)
    if not metrics:
        raise FileNotFoundError(f"{run / METRICS_FILE}: missing or empty")
    facts = _schedule_facts(run, metrics)
    start, end = first_of(metrics, StartRecord), first_of(metrics, EndRecord)
    steps = records_of(metrics, StepRecord)
    losses = [r.loss for r in steps if _number(r.loss)]
    lines = [f"run {run}: {_title(facts)}, {facts.get('steps', '?')} steps"
             + (f" ({start.executor} executor)" if start and start.executor else "")
             + ("" if end else " - not finished (no end record)")]
    if losses:
        lines.append(f"training loss {losses[0]:.4g} -> {losses[-1]:.4g} over {len(steps)} step records")
    held = _heldout(metrics, facts.get("steps") or len(steps))
    if held:
        lines.append(f"held-out loss {held[0][1]:.4g} -> {held[-1][1]:.4g}"
                     + (f" ({len(held)} evaluations, after steps {held[0][0]}-{held[-1][0]})" if len(held) > 2 else ""))
    rates = [r.samples_per_s for r in steps if _number(r.samples_per_s)]
    if end and _number(end.samples_per_s):
        rate = f"throughput {end.samples_per_s:,.0f} samples/s over {end.wall_seconds or 0:.3g} s"
        lines.append(rate + (f"; median per step {np.median(rates):,.0f}" if rates else ""))
    elif rates:
        lines.append(f"throughput median per step {np.median(rates):,.0f} samples/s")
    busy = [r.busy for r in steps if r.busy]
    if busy:
        lines.append("busy share per stage (last step) " + " ".join(f"{b:.0%}" for b in busy[-1]))
    checkpoints = records_of(metrics, CheckpointRecord)
    if checkpoints:
        lines.append(f"checkpoints: {len(checkpoints)} committed, last at micro-batch {checkpoints[-1].cut}")
    recoveries = records_of(metrics, RecoveryRecord)
    if not recoveries:
        lines.append("recoveries: none")
    else:
        lines.append(f"recoveries: {len(recoveries)}")
        for r in recoveries:
            lines.append(f"  generation {r.generation}: stage {r.stage} on {r.worker} lost ({r.reason}); "
                         f"rolled back to micro-batch {r.rollback_to}, stopped {r.stop_seconds or 0:.3g} s")
    errors = records_of(metrics, ErrorRecord)
    if errors:
        lines.append(f"errors reported by stages: {len(errors)}")
    return "\n".join(lines)


def report_command(run_dir: str | Path) -> int:
    """Write RUN_DIR/loss.png and RUN_DIR/throughput.png; print the summary. Returns 0."""
    run = require_run_dir(run_dir)
    text = summary(run)
    loss = plot_loss(run, run / LOSS_PLOT)
    throughput = plot_throughput(run, run / THROUGHPUT_PLOT)
    print(text)
    print(f"\nwrote {loss} and {throughput}")
    return 0

"""`pipetrain trace RUN_DIR`: where is the bubble, which stage is slow, what waits on what.

From the per-stage event arrays of a run (``RUN_DIR/events/stage-{s}.npy``)
this writes a Chrome/Perfetto trace (one track per stage, plus a driver track
for recoveries and checkpoint commits), a Gantt chart PNG of stage x time, and
prints per stage the measured busy share and bubble next to the simulator's
prediction for the same schedule with the measured costs.

Measured and simulated figures use the same definitions: a stage is busy while
it runs F, B or U; the span is the run's first event start to its last event
end on any stage; bubble = 1 - sum(busy) / (stages * span).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipetrain.observe.records import CheckpointRecord, RecoveryRecord, StepRecord, records_of
from pipetrain.observe.timeline import (
    BUSY_KINDS,
    RunInfo,
    event_name,
    load_events,
    load_metrics,
    require_run_dir,
    run_end,
    run_info,
    run_start,
    save_figure,
    time_unit,
)
from pipetrain.rundir import GANTT_PLOT, TRACE_FILE

KIND_STYLE = {  # kind: (legend label, colour, hatch)
    "F": ("forward", "#4C72B0", None),
    "B": ("backward", "#DD8452", None),
    "W": ("weight gradients", "#C9A227", None),
    "U": ("update", "#55A868", None),
    "C": ("checkpoint snapshot", "#8172B3", None),
    "E": ("held-out forward", "#937860", None),
    "SEND_F": ("send activation", "#A1C9F4", None),
    "SEND_B": ("send gradient", "#FFD0A8", None),
    "RECV_F": ("wait for activation", "#E5E5E5", "////"),
    "RECV_B": ("wait for gradient", "#BDBDBD", "\\\\\\\\"),
    # replicated pipelines: the gradient exchange before each update (schedule/replicas.py)
    "SEND_R": ("send to replicas", "#D0BBFF", None),
    "RECV_R": ("wait for replicas", "#DCC6E0", "xx"),
    "R": ("replica sum", "#6F4E9C", None),
}
GANTT_WIDTH_PX = 1400
STEADY_STATE_MIN_MICROBATCHES = 33  # runs with more micro-batches than this get a steady-state window by default


def gantt_size(num_stages: int) -> tuple[int, int]:
    """The Gantt PNG's (width, height) in pixels."""
    return GANTT_WIDTH_PX, 190 + 44 * num_stages


# --- Chrome / Perfetto trace -------------------------------------------------------------------

def write_chrome_trace(run_dir: str | Path, *, path: str | Path | None = None) -> Path:
    """Write the run's timeline as Chrome trace-event JSON (``RUN_DIR/trace.json`` by default).

    One thread track per stage ("stage s"), complete events named like ``F3``
    with category = kind and args {k, version}; a "driver" track with
    recoveries (global instant events) and checkpoint commits; counter tracks
    for loss and samples/s. Times are microseconds from the run's start.
    """
    run = require_run_dir(run_dir)
    events, metrics = load_events(run), load_metrics(run)
    info = run_info(run, events, metrics)
    timed = [r for r in metrics if isinstance(r.time, (int, float))]  # every line MetricsLog wrote
    origin = min([run_start(events)] + [float(r.time) for r in timed])
    driver = info.num_stages

    def us(t: float) -> float:
        return round((t - origin) * 1e6, 3)

    out: list[dict] = [{"ph": "M", "pid": 0, "tid": 0, "name": "process_name",
                        "args": {"name": f"pipetrain {info.title()}"}}]
    for s in range(info.num_stages + 1):
        label = f"stage {s}" if s < driver else "driver"
        out.append({"ph": "M", "pid": 0, "tid": s, "name": "thread_name", "args": {"name": label}})
        out.append({"ph": "M", "pid": 0, "tid": s, "name": "thread_sort_index", "args": {"sort_index": s}})
    for s, stage_events in enumerate(events):
        for e in stage_events:  # execution order is kept: a viewer sorts by ts, ties keep file order
            kind, k, version = str(e["kind"]), int(e["k"]), int(e["version"])
            out.append({"ph": "X", "pid": 0, "tid": s, "name": event_name(kind, k, version), "cat": kind,
                        "ts": us(float(e["start"])), "dur": round(max(0.0, float(e["end"] - e["start"])) * 1e6, 3),
                        "args": {"k": k, "version": version}})
    for r in records_of(timed, RecoveryRecord):
        out.append({"ph": "i", "s": "g", "pid": 0, "tid": driver, "ts": us(float(r.time)), "cat": "recovery",
                    "name": f"recovery: stage {r.stage} lost, rollback to micro-batch {r.rollback_to}",
                    "args": {key: getattr(r, key) for key in ("generation", "stage", "worker", "reason",
                                                              "rollback_to", "stop_seconds")}})
    for r in records_of(timed, CheckpointRecord):
        out.append({"ph": "i", "s": "t", "pid": 0, "tid": driver, "ts": us(float(r.time)), "cat": "checkpoint",
                    "name": f"checkpoint committed at cut {r.cut}", "args": {"cut": r.cut, "generation": r.generation}})
    for r in records_of(timed, StepRecord):
        for key in ("loss", "samples_per_s"):
            value = getattr(r, key)
            if isinstance(value, (int, float)):
                out.append({"ph": "C", "pid": 0, "tid": driver, "ts": us(float(r.time)), "name": key,
                            "args": {key: value}})
    trace = {"traceEvents": out, "displayTimeUnit": "ms",
             "otherData": {"schedule": info.schedule or "", "stages": info.num_stages,
                           "microbatches": info.microbatches or 0, "origin_unix_seconds": origin}}
    target = Path(path) if path else run / TRACE_FILE
    target.write_text(json.dumps(trace, separators=(",", ":")))
    return target


# --- measured vs simulated ---------------------------------------------------------------------

@dataclass(frozen=True)
class StageFigures:
    stage: int
    forward_median: float | None   # seconds
    backward_median: float | None
    busy_seconds: float             # F + B + U
    busy_share: float               # busy / span
    waiting_share: float            # RECV time / span: waiting for input
    predicted_busy_share: float | None


@dataclass(frozen=True)
class TraceFigures:
    info: RunInfo
    span: float                 # seconds, first event start to last event end
    bubble: float               # measured, over all stages
    stages: tuple[StageFigures, ...]
    send_cost: float            # the message latency fed to the simulator
    predicted_makespan: float | None
    predicted_bubble: float | None
    prediction_note: str = ""   # why there is no prediction, when there is none

    def render(self) -> str:
        unit, scale = time_unit(max(self.span, self.predicted_makespan or 0.0))
        head = ("stage", f"F median {unit}", f"B median {unit}", "busy", "sim busy", "bubble", "sim bubble",
                "waiting (RECV)")
        rows = [head]
        for f in self.stages:
            rows.append((str(f.stage), _num(f.forward_median, scale), _num(f.backward_median, scale),
                         f"{f.busy_share:.1%}", _pct(f.predicted_busy_share), f"{1 - f.busy_share:.1%}",
                         _pct(None if f.predicted_busy_share is None else 1 - f.predicted_busy_share),
                         f"{f.waiting_share:.1%}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = [f"trace of {self.info.title()}", ""]
        lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
        total = f"span {self.span * scale:.4g} {unit}   bubble {self.bubble:.1%} measured"
        if self.predicted_bubble is not None:
            total += (f", {self.predicted_bubble:.1%} simulated (makespan {self.predicted_makespan * scale:.4g} {unit}"
                      f" with the measured median F/B per stage and send latency {self.send_cost * scale:.3g} {unit})")
        else:
            total += f"; no simulation: {self.prediction_note}"
        return "\n".join(lines + ["", total])


def measured_figures(run_dir: str | Path) -> TraceFigures:
    """Per-stage busy share and the measured bubble, next to the simulator's for the same schedule and costs."""
    run = require_run_dir(run_dir)
    events, metrics = load_events(run), load_metrics(run)
    info = run_info(run, events, metrics)
    span = run_end(events) - run_start(events)
    p = info.num_stages
    busy = [_total(e, BUSY_KINDS) for e in events]
    waiting = [_total(e, ("RECV_F", "RECV_B")) for e in events]
    fwd = [_median(e, "F") for e in events]
    bwd = [_backward_median(e) for e in events]
    send_cost = message_latency(events)
    report, note = _simulate(info, fwd, bwd, send_cost)
    stages = tuple(StageFigures(
        stage=s, forward_median=fwd[s], backward_median=bwd[s], busy_seconds=busy[s],
        busy_share=busy[s] / span if span > 0 else 0.0, waiting_share=waiting[s] / span if span > 0 else 0.0,
        predicted_busy_share=(report.busy[s % len(report.busy)] / report.makespan
                              if report and report.makespan else None))
        for s in range(p))
    bubble = 1.0 - sum(busy) / (p * span) if span > 0 and p else 0.0
    return TraceFigures(info=info, span=span, bubble=bubble, stages=stages, send_cost=send_cost,
                        predicted_makespan=report.makespan if report else None,
                        predicted_bubble=report.bubble_fraction if report else None, prediction_note=note)


def message_latency(events: list[np.ndarray]) -> float:
    """Median time from a SEND's start to the end of its RECV, over messages the receiver was waiting for.

    That is what the simulator's ``send_cost`` means (a RECV completes at the
    send's start plus the cost). Messages that arrived before the receiver
    asked tell only an upper bound, so they are left out unless none waited;
    then the median SEND duration stands in.
    """
    latencies, sends = [], []
    for s, e in enumerate(events):
        starts = {("F", int(r["k"])): float(r["start"]) for r in e[e["kind"] == "SEND_F"]}
        starts.update({("B", int(r["k"])): float(r["start"]) for r in e[e["kind"] == "SEND_B"]})
        sends += [float(r["end"] - r["start"]) for r in e if str(r["kind"]).startswith("SEND")]
        for direction, receiver in (("F", s + 1), ("B", s - 1)):
            if not 0 <= receiver < len(events):
                continue
            recv = events[receiver][events[receiver]["kind"] == f"RECV_{direction}"]
            for r in recv:
                sent = starts.get((direction, int(r["k"])))
                if sent is not None and float(r["start"]) <= sent <= float(r["end"]):
                    latencies.append(float(r["end"]) - sent)
    if latencies:
        return float(np.median(latencies))
    return float(np.median(sends)) if sends else 0.0


def _simulate(info: RunInfo, fwd: list, bwd: list, send_cost: float):
    from pipetrain.schedule.builders import ScheduleError, ScheduleSpec
    from pipetrain.schedule.simulator import simulate

    if not (info.schedule and info.microbatches and info.steps):
        return None, "the run directory does not say which schedule ran (no job.json, no start record)"
    if any(c is None or c <= 0 for c in fwd + bwd):
        return None, "a stage recorded no F or no B with a positive duration"
    p, d = info.num_stages // info.replicas, info.replicas  # (replicas: every one runs replica 0's schedule)
    try:
        schedule = ScheduleSpec(info.schedule, num_stages=p, microbatches=info.microbatches, steps=info.steps,
                                accumulate=info.accumulate,
                                checkpoint_every=info.checkpoint_every // d if info.checkpoint_every else None,
                                first_microbatch=info.first_microbatch, replicas=d).build()
        return simulate(schedule, forward_cost=fwd[:p], backward_cost=bwd[:p], send_cost=send_cost), ""
    except ScheduleError as e:
        return None, f"could not rebuild the schedule: {e}"


def _total(e: np.ndarray, kinds: tuple[str, ...]) -> float:
    chosen = e[np.isin(e["kind"], kinds)]
    return float(np.sum(chosen["end"] - chosen["start"]))


def _backward_median(e: np.ndarray) -> float | None:
    """A backward's median time, its split-off weight gradients (W) included."""
    b, w = _median(e, "B"), _median(e, "W")
    return b + w if b is not None and w is not None else b


def _median(e: np.ndarray, kind: str) -> float | None:
    chosen = e[e["kind"] == kind]
    return float(np.median(chosen["end"] - chosen["start"])) if chosen.size else None


def _num(x: float | None, scale: float) -> str:
    return "-" if x is None else f"{x * scale:.3g}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


# --- Gantt chart -------------------------------------------------------------------------------

def steady_state_window(events: list[np.ndarray], info: RunInfo) -> tuple[float, float, str] | None:
    """(start, end, description) in absolute seconds of a steady-state slice, or None for a short run.

    The slice spans a run of micro-batches from the middle of the run, aligned
    to a step: from stage 0's forward of the first to stage 0's backward of the
    last, so every stage's work on them (and the bubbles between) is inside.
    """
    stage0 = events[0]
    forwards = np.sort(stage0["k"][stage0["kind"] == "F"])
    if forwards.size < STEADY_STATE_MIN_MICROBATCHES:
        return None
    m, p = info.microbatches or 1, info.num_stages
    width = max(2 * m, 2 * p, 8)
    if width * 2 > forwards.size:
        return None
    first = int(forwards[0]) + (forwards.size - width) // 2
    first -= (first - int(forwards[0])) % m
    last = first + width - 1
    f_row = stage0[(stage0["kind"] == "F") & (stage0["k"] == first)]
    b_row = stage0[(stage0["kind"] == "B") & (stage0["k"] == last)]
    if not f_row.size or not b_row.size:
        return None
    return float(f_row["start"][0]), float(b_row["end"][0]), f"steady-state window: micro-batches {first}-{last}"


def plot_gantt(run_dir: str | Path, path: str | Path, *, window: tuple[float, float] | None = None) -> Path:
    """PNG Gantt chart: stage x time, one colour per action kind (``gantt_size(stages)`` pixels).

    ``window``: (start, end) in seconds from the first event; by default the
    whole run, or a steady-state slice of a long run (said so in the title).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    run = require_run_dir(run_dir)
    events, metrics = load_events(run), load_metrics(run)
    info = run_info(run, events, metrics)
    origin, end = run_start(events), run_end(events)
    unit, scale = time_unit(end - origin)
    if window is not None:
        lo, hi = origin + float(window[0]), origin + float(window[1])
        if not hi > lo:
            raise ValueError(f"window: end must be after start, got {window!r}")
        where = f"window {window[0] * scale:.4g}-{window[1] * scale:.4g} {unit} of {(end - origin) * scale:.4g} {unit}"
    else:
        steady = steady_state_window(events, info)
        lo, hi = (steady[0], steady[1]) if steady else (origin, end)
        where = f"{steady[2]} of {int(np.sum(events[0]['kind'] == 'F'))}" if steady else "whole run"

    p = info.num_stages
    width_px, height_px = gantt_size(p)
    fig = plt.figure(figsize=(width_px / 100, height_px / 100), dpi=100)
    top, bottom = 1 - 60 / height_px, 95 / height_px
    ax = fig.add_axes((0.07, bottom, 0.91, top - bottom))
    span = max(hi - lo, 1e-12)
    px_per_second = width_px * 0.91 / span
    present: list[str] = []
    for s, stage_events in enumerate(events):
        inside = stage_events[(stage_events["end"] >= lo) & (stage_events["start"] <= hi)]
        for kind, (label, colour, hatch) in KIND_STYLE.items():
            chosen = inside[inside["kind"] == kind]
            if not chosen.size:
                continue
            if kind not in present:
                present.append(kind)
            starts = np.clip(chosen["start"], lo, hi)
            widths = np.clip(chosen["end"], lo, hi) - starts
            # a zero-length action still shows as a hairline
            bars = [((a - origin) * scale, max(w * scale, 0.6 / px_per_second * scale)) for a, w in zip(starts, widths)]
            # hatches take the edge colour: grey on waits, white separators between work boxes
            ax.broken_barh(bars, (s - 0.4, 0.8), facecolors=colour, edgecolor="#8C8C8C" if hatch else "white",
                           linewidth=0.3 if hatch else 0.6, hatch=hatch)
            if kind in ("F", "B", "W"):
                for row, a, w in zip(chosen, starts, widths):
                    text = str(int(row["k"]))
                    if w * px_per_second >= 7 * len(text) + 4:
                        ax.text((a + w / 2 - origin) * scale, s, text, ha="center", va="center", fontsize=8,
                                color="white")
    recoveries = [r for r in records_of(metrics, RecoveryRecord) if isinstance(r.time, (int, float))]
    for r in recoveries:
        t = float(r.time)
        if lo <= t <= hi:
            ax.axvline((t - origin) * scale, color="#C44E52", linewidth=1.5, linestyle="--")
            ax.text((t - origin) * scale, -0.6, f" recovery: stage {r.stage} lost", color="#C44E52",
                    fontsize=8, va="bottom")
    ax.set_xlim((lo - origin) * scale, (hi - origin) * scale)
    ax.set_ylim(p - 0.5, -0.5 - (0.4 if recoveries else 0))
    ax.set_yticks(range(p), [f"stage {s}" for s in range(p)])
    ax.set_xlabel(f"time since the run's first event ({unit})")
    ax.set_ylabel("pipeline stage")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title(f"pipeline timeline: {info.title()} ({where})", fontsize=11)
    handles = [Patch(facecolor=KIND_STYLE[k][1], hatch=KIND_STYLE[k][2], edgecolor="#777777", label=KIND_STYLE[k][0])
               for k in KIND_STYLE if k in present]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9,
               bbox_to_anchor=(0.5, 0.0))
    return save_figure(plt, fig, path)


# --- the command -------------------------------------------------------------------------------

def trace_command(run_dir: str | Path) -> int:
    """Write RUN_DIR/trace.json and RUN_DIR/gantt.png; print the per-stage table. Returns 0."""
    run = require_run_dir(run_dir)
    trace = write_chrome_trace(run)
    gantt = plot_gantt(run, run / GANTT_PLOT)
    print(measured_figures(run).render())
    print(f"\nwrote {trace} (open in ui.perfetto.dev or chrome://tracing) and {gantt}")
    return 0

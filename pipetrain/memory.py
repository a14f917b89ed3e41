"""Per-stage peak memory in bytes: what a stage holds as its schedule runs.

A pure function of the partition (parameter bytes, the activation bytes one
micro-batch keeps on each layer), the schedule (how many weight versions and
how many micro-batches' activations a stage holds at its peak: the
simulator's static figures) and the optimizer (its state slots and a delay
correction's). It is an estimate of what the stage's tensors need, not of
the framework around them (an interpreter, compiled code, allocator slack):
``bench/memory.py`` measures real peaks against it.

What a stage holds at its peak::

    weights        versions x parameter bytes   (stashed versions: pipedream, 2bw)
    optimizer      slots x parameter bytes      (adam: mu and nu; momentum: trace)
    gradients      parameter bytes              (the accumulator between updates)
    correction     dcasgd-a: one mean square; predict: one step per held version
    activations    live micro-batches x what one keeps, + one micro-batch's
                   recompute under remat

``remat`` is the rematerialization the stage would run with: ``"none"``
keeps every layer's saved tensors for each live micro-batch; ``"stage"``
keeps only the stage's input and recomputes the rest during the backward
(one micro-batch's worth at a time); ``"layer"`` keeps each layer's input
and recomputes one layer at a time.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipetrain.errors import PipetrainError

REMAT = ("none", "stage", "layer")
_OPTIMIZER_SLOTS = {"sgd": 0, "momentum": 1, "adam": 2, "adamw": 2}


class MemoryEstimateError(PipetrainError, ValueError):
    """An estimate asked for with inputs that do not describe one job."""


@dataclass(frozen=True)
class StageMemoryEstimate:
    """One stage's peak bytes, by what holds them."""

    stage: int
    weight_versions: int  # peak number of versions held
    weights: int
    optimizer: int
    gradients: int
    correction: int
    live_microbatches: int  # peak number of micro-batches between their F and B
    activations: int  # kept for the live micro-batches, plus one recompute under remat
    remat: str

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.gradients + self.correction + self.activations

    def as_dict(self) -> dict[str, int | str]:
        return {"stage": self.stage, "weight_versions": self.weight_versions, "weights": self.weights,
                "optimizer": self.optimizer, "gradients": self.gradients, "correction": self.correction,
                "live_microbatches": self.live_microbatches, "activations": self.activations,
                "remat": self.remat, "total": self.total}


@dataclass(frozen=True)
class LayerBytes:
    """What one layer costs in memory for one micro-batch."""

    params: int  # bytes of its parameters (one version)
    saved: int  # bytes its backward keeps from the forward (its saved tensors)
    input: int  # bytes of its input (what remat keeps instead)


def estimate_memory(layers: Sequence[Sequence[LayerBytes]], schedule: Any, *, optimizer: Any = None,
                    remat: str = "none") -> tuple[StageMemoryEstimate, ...]:
    """Each stage's peak bytes. ``layers[s]``: the LayerBytes of stage s's layers;
    ``schedule``: a ``pipetrain.schedule.Schedule`` with one action list per stage;
    ``optimizer``: a ``pipetrain.Optimizer`` (None or an optax transformation:
    counted as Adam, the common case, since its state cannot be read from here)."""
    from pipetrain.schedule.simulator import check_schedule

    if remat not in REMAT:
        raise MemoryEstimateError(f"remat: {remat!r} is not one of {', '.join(REMAT)}")
    if len(layers) != schedule.num_stages:
        raise MemoryEstimateError(f"memory estimate: {len(layers)} stages of layers for a schedule of "
                                  f"{schedule.num_stages} stages")
    name = getattr(optimizer, "name", "adam")
    slots = _OPTIMIZER_SLOTS.get(name, 2)
    correction = getattr(optimizer, "correction", "none")
    figures = check_schedule(schedule)
    out = []
    for s, (stage_layers, held) in enumerate(zip(layers, figures)):
        param_bytes = sum(layer.params for layer in stage_layers)
        versions = held.peak_stashed_versions
        live = held.peak_live_activations
        corr = {"dcasgd-a": param_bytes, "predict": versions * param_bytes}.get(correction, 0)
        out.append(StageMemoryEstimate(
            stage=s, weight_versions=versions, weights=versions * param_bytes, optimizer=slots * param_bytes,
            gradients=param_bytes, correction=corr, live_microbatches=live,
            activations=_activations(stage_layers, live, remat), remat=remat))
    return tuple(out)


def _activations(layers: Sequence[LayerBytes], live: int, remat: str) -> int:
    if not layers or live == 0:
        return 0
    if remat == "none":
        return live * sum(layer.saved for layer in layers)
    if remat == "stage":
        # each live micro-batch keeps the stage's input; its backward recomputes the whole stage
        return live * layers[0].input + sum(layer.saved for layer in layers)
    # "layer": each live micro-batch keeps every layer's input; one layer is recomputed at a time
    return live * sum(layer.input for layer in layers) + max(layer.saved for layer in layers)


def partition_layer_bytes(part: Any) -> list[list[LayerBytes]]:
    """The LayerBytes of every stage of a ``pipetrain.partitioning.Partition``."""
    return [[LayerBytes(params=p, saved=sv, input=i) for p, sv, i in
             zip(s.layer_param_bytes, s.layer_saved_bytes, s.layer_input_bytes)] for s in part.stages]


def format_estimates(estimates: Sequence[StageMemoryEstimate], *, limits: Sequence[int | None] | None = None) -> str:
    """The per-stage table ``pipetrain partition --schedule`` and ``simulate --model`` print."""
    rows = [("stage", "versions", "weights", "optimizer", "grads", "correction", "live mb", "activations",
             "total") + (("worker memory",) if limits else ())]
    for i, e in enumerate(estimates):
        row = (str(e.stage), str(e.weight_versions), format_bytes(e.weights), format_bytes(e.optimizer),
               format_bytes(e.gradients), format_bytes(e.correction), str(e.live_microbatches),
               format_bytes(e.activations), format_bytes(e.total))
        if limits:
            limit = limits[i]
            row += ("unlimited" if limit is None else f"{format_bytes(limit)} ({e.total / limit:.0%} used)",)
        rows.append(row)
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    remat = estimates[0].remat if estimates else "none"
    return "\n".join([f"Peak memory per stage (tensors only; remat {remat!r}):", *lines])


def format_bytes(b: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} TiB"  # pragma: no cover - the loop returns at GiB

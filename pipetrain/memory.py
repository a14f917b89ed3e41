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

``remat`` is the rematerialization the stage runs with: ``"none"`` keeps
every layer's saved tensors for each live micro-batch; ``"stage"`` keeps
only the stage's input (and, for JAX, copies of the parameters the
recomputation reads) and recomputes the rest during the backward, one
micro-batch's worth at a time; ``"layer"`` keeps what each checkpointed
layer keeps (its input, for JAX its parameters too) and recomputes one layer
at a time.

Under precision "bf16" (``pipetrain.stages.precision``) the partition's
figures are already the bfloat16 ones: boundary tensors (the transport's
buffers) and activations kept for a backward take 2 bytes per element, while
weights, optimizer state, gradients and corrections stay float32 masters, 4.
What a backward keeps is measured the way each framework keeps it (a torch
stage also keeps the bfloat16 copy of a weight its input gradient reads; XLA
keeps the float32 weight and casts it again in the backward).
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


def check_remat(remat: Any, where: str) -> str:
    """``remat`` if it is one of REMAT; else a ValueError naming ``where`` it was given."""
    if remat not in REMAT:
        raise ValueError(f"{where}: remat must be one of {', '.join(map(repr, REMAT))}, got {remat!r}")
    return remat


def apply_remat(model: Any, remat: str) -> Any:
    """``model`` (and each part of a MixedSequential) set to build stages with ``remat``."""
    check_remat(remat, "remat")
    models = list(model.parts) if hasattr(model, "parts") else [model]
    for m in models:
        if not hasattr(m, "remat"):
            raise MemoryEstimateError(f"remat: {type(m).__name__} has no remat option (JaxSequential, "
                                      f"TorchSequential and KerasSequential have)")
    for m in models:
        m.remat = remat
    return model


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
    activations: int  # what the live micro-batches keep for their backwards
    remat: str
    recompute: int = 0  # under remat: what one backward's recomputation holds while it runs
    buffers: int = 0  # boundary tensors the transport may hold: credits x (in + out) per direction

    @property
    def stage_tensors(self) -> int:
        """What the stage object itself holds from one action to the next."""
        return self.weights + self.optimizer + self.gradients + self.correction + self.activations

    @property
    def between_actions(self) -> int:
        """With the transport's buffers (a recomputation's tensors live only inside a backward)."""
        return self.stage_tensors + self.buffers

    @property
    def total(self) -> int:
        return self.between_actions + self.recompute

    def as_dict(self) -> dict[str, int | str]:
        return {"stage": self.stage, "weight_versions": self.weight_versions, "weights": self.weights,
                "optimizer": self.optimizer, "gradients": self.gradients, "correction": self.correction,
                "live_microbatches": self.live_microbatches, "activations": self.activations,
                "recompute": self.recompute, "buffers": self.buffers, "remat": self.remat, "total": self.total}


@dataclass(frozen=True)
class LayerBytes:
    """What one layer costs in memory for one micro-batch."""

    params: int  # bytes of its parameters (one version)
    saved: int  # bytes its backward keeps from the forward (its saved tensors)
    input: int  # bytes of its input
    # Whether what remat keeps includes a copy of the parameters the recomputation
    # reads: so for JAX, whose VJP residuals are jit outputs (buffers of their own);
    # torch's and Keras' checkpoints keep references to their arguments.
    param_copies: bool = False

    @property
    def kept_under_remat(self) -> int:
        return self.input + (self.params if self.param_copies else 0)


def estimate_memory(layers: Sequence[Sequence[LayerBytes]], schedule: Any, *, optimizer: Any = None,
                    remat: str = "none", credits: int | None = None,
                    boundary_bytes: Sequence[tuple[int, int]] | None = None) -> tuple[StageMemoryEstimate, ...]:
    """Each stage's peak bytes. ``layers[s]``: the LayerBytes of stage s's layers;
    ``schedule``: a ``pipetrain.schedule.Schedule`` with one action list per stage;
    ``optimizer``: a ``pipetrain.Optimizer`` (None or an optax transformation:
    counted as Adam, the common case, since its state cannot be read from here).
    ``boundary_bytes[s]``: (input, output) bytes of one micro-batch at stage s; with
    them, ``buffers`` bounds what the Dask transport holds: up to ``credits``
    (default stages + 1, the runtime's) messages each way on each edge, received
    and not yet read or sent and not yet acknowledged."""
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
    p = schedule.num_stages
    credits = p + 1 if credits is None else credits
    out = []
    for s, (stage_layers, held) in enumerate(zip(layers, figures)):
        param_bytes = sum(layer.params for layer in stage_layers)
        versions = held.peak_stashed_versions
        live = held.peak_live_activations
        corr = {"dcasgd-a": param_bytes, "predict": versions * param_bytes}.get(correction, 0)
        out.append(StageMemoryEstimate(
            stage=s, weight_versions=versions, weights=versions * param_bytes, optimizer=slots * param_bytes,
            gradients=param_bytes, correction=corr, live_microbatches=live,
            activations=live * kept_per_microbatch(stage_layers, remat) if stage_layers else 0, remat=remat,
            recompute=_recompute(stage_layers, live, remat),
            buffers=_buffers(boundary_bytes[s], s, p, credits) if boundary_bytes else 0))
    return tuple(out)


def _buffers(boundary: tuple[int, int], s: int, p: int, credits: int) -> int:
    """Activations in and gradients out on the edge from s - 1, activations out and
    gradients in on the edge to s + 1: each way up to ``credits`` of them."""
    inputs, outputs = boundary
    return credits * 2 * ((inputs if s > 0 else 0) + (outputs if s < p - 1 else 0))


def _recompute(layers: Sequence[LayerBytes], live: int, remat: str) -> int:
    """A backward under remat "stage" recomputes one micro-batch's whole stage; under
    "layer" one layer at a time."""
    if not layers or live == 0 or remat == "none":
        return 0
    if remat == "stage":
        return sum(layer.saved for layer in layers)
    return max(layer.saved for layer in layers)


def kept_per_microbatch(layers: Sequence[LayerBytes], remat: str) -> int:
    """What one micro-batch between its F and B keeps: every layer's saved tensors;
    under remat "layer" what each checkpointed layer keeps; under "stage" the
    stage's input plus what else its layers' checkpoints keep (their parameters)."""
    if remat == "none":
        return sum(layer.saved for layer in layers)
    if remat == "layer":
        return sum(layer.kept_under_remat for layer in layers)
    return layers[0].input + sum(layer.kept_under_remat - layer.input for layer in layers)


def partition_layer_bytes(part: Any) -> list[list[LayerBytes]]:
    """The LayerBytes of every stage of a ``pipetrain.partitioning.Partition``."""
    copies = _param_copies(part.model)
    return [[LayerBytes(params=p, saved=sv, input=i, param_copies=copies[s.start + j])
             for j, (p, sv, i) in enumerate(zip(s.layer_param_bytes, s.layer_saved_bytes, s.layer_input_bytes))]
            for s in part.stages]


def _param_copies(model: Any) -> list[bool]:
    """Per layer of ``model``: whether it is a JAX layer (see ``LayerBytes.param_copies``)."""
    if hasattr(model, "parts"):
        return [copies for part in model.parts for copies in _param_copies(part)]
    return [getattr(model, "framework", None) == "jax" and hasattr(model, "_trace")] * len(model.layer_names())


def placement_needs(part: Any, schedule: Any, *, optimizer: Any, credits: int | None = None) -> list[int]:
    """Each stage's estimated peak bytes for placement (``StageNeed.memory_bytes``):
    the estimate of ``schedule`` (a Schedule) where the partition has per-layer
    figures, else its stages' ``memory_bytes`` (parameters + one micro-batch)."""
    if not all(s.layer_param_bytes for s in part.stages):
        return [getattr(s, "memory_bytes", 0) or 0 for s in part.stages]
    remat = getattr(part.model, "remat", "none")
    if hasattr(part.model, "parts"):
        remat = next((m.remat for m in part.model.parts if getattr(m, "remat", "none") != "none"), "none")
    estimates = estimate_memory(partition_layer_bytes(part), schedule, optimizer=optimizer, remat=remat,
                                credits=credits, boundary_bytes=partition_boundary_bytes(part))
    return [e.total for e in estimates]


def partition_boundary_bytes(part: Any) -> list[tuple[int, int]]:
    """(input, output) bytes of one micro-batch at every stage of a Partition."""
    return [(s.layer_input_bytes[0] if s.layer_input_bytes else 0, s.output_bytes) for s in part.stages]


def format_estimates(estimates: Sequence[StageMemoryEstimate], *, limits: Sequence[int | None] | None = None) -> str:
    """The per-stage table ``pipetrain partition --schedule`` and ``simulate --model`` print."""
    rows = [("stage", "versions", "weights", "optimizer", "grads", "correction", "live mb", "activations",
             "recompute", "buffers", "total") + (("worker memory",) if limits else ())]
    for i, e in enumerate(estimates):
        row = (str(e.stage), str(e.weight_versions), format_bytes(e.weights), format_bytes(e.optimizer),
               format_bytes(e.gradients), format_bytes(e.correction), str(e.live_microbatches),
               format_bytes(e.activations), format_bytes(e.recompute), format_bytes(e.buffers),
               format_bytes(e.total))
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

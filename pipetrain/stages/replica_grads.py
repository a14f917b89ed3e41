"""What the replica reduction (``runtime/replicas.py``) needs from a stage: its accumulated
gradients as host arrays, and a way to put the replicas' sum back. Kept out of the adapters,
like ``stages/ties.py``, whose accumulator access it shares.

A stage of any kind may offer the two methods itself (the synthetic sleep stage does)::

    accumulated_gradients() -> (dict[name, np.ndarray], count)
    set_accumulated_gradients(grads: dict[name, np.ndarray], count: int)

otherwise the JAX, torch and Keras adapters' own accumulators are read and written. The sums
move as host numpy arrays of the accumulator's dtype (float32 also under bf16 compute), so
adding the replicas' parts is one numpy addition per parameter: the same bits in every
framework and process.

A stage whose backward can say when each parameter's sum is final (``backward_streaming``,
torch stages) has its gradients cut into buckets (``buckets``), so the reduction sends the first
ones while the update's last backward still computes the rest, as DDP's gradient buckets do.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pipetrain.stages import ties as framework


def names(stage: Any) -> tuple[str, ...]:
    """The accumulator's parameter names, in the stage's own fixed order."""
    if stage.framework == "jax":
        from pipetrain.stages import jax_trees

        return tuple(n for n, _ in jax_trees.named_leaves(stage._acc))
    if stage.framework == "torch":
        return tuple(stage._names)
    if stage.framework == "tf":
        return tuple(stage._all_names)
    raise NotImplementedError(f"stage {stage.spec.index}: replicas need the accumulated gradients of a "
                              f"{stage.framework!r} stage: give it accumulated_gradients() and "
                              f"set_accumulated_gradients() (pipetrain.stages.replica_grads)")


def read(stage: Any, *, copy: bool = True, only: tuple[str, ...] | None = None
         ) -> tuple[dict[str, np.ndarray], int]:
    """The gradient sums accumulated since the last update, by name, and their count: host copies,
    or with ``copy=False`` views of the accumulator where it is on the host (see ``write``).
    ``only``: just these names (a bucket), for stages that stream their backward."""
    if hasattr(stage, "accumulated_gradients"):
        grads, count = stage.accumulated_gradients()
        return {n: np.asarray(g) for n, g in grads.items() if only is None or n in only}, int(count)
    keys = names(stage) if only is None else only
    return dict(zip(keys, framework.read_grads(stage, keys, copy=copy))), framework.accumulated(stage)


# How many gradient bytes one bucket holds at least (its last parameter may take it past this).
# DDP's first bucket is 1 MiB too; on these hosts a message costs about 0.15 ms besides its bytes,
# so buckets much smaller than this would spend more on messages than the overlap wins.
BUCKET_BYTES = 1 << 20


def buckets(stage: Any, *, bucket_bytes: int | None = None) -> tuple[tuple[str, ...], ...]:
    """The stage's gradients as the replica reduction sends them: groups of parameter names, one
    message each, in the order the stage's backward tends to finish them (``gradient_order``:
    the last layer's first), each at least ``bucket_bytes`` but the last. A pure function of the
    stage's parameters, so every replica cuts the same buckets. A stage that cannot stream its
    backward (no ``backward_streaming``, or ``streams_gradients`` False) sends one bucket:
    everything, once its backward is done."""
    bucket_bytes = BUCKET_BYTES if bucket_bytes is None else bucket_bytes
    if not hasattr(stage, "backward_streaming") or not getattr(stage, "streams_gradients", True):
        return (tuple(read(stage, copy=False)[0]),)
    order = list(stage.gradient_order())
    sizes = {name: g.nbytes for name, g in read(stage, copy=False)[0].items()}
    if sorted(order) != sorted(sizes):
        raise ValueError(f"stage {stage.spec.index}: gradient_order() names {sorted(order)[:4]}..., its "
                         f"accumulator {sorted(sizes)[:4]}...")
    out: list[tuple[str, ...]] = []
    current: list[str] = []
    filled = 0
    for name in order:
        current.append(name)
        filled += sizes[name]
        if filled >= bucket_bytes:
            out.append(tuple(current))
            current, filled = [], 0
    if current:
        out.append(tuple(current))
    return tuple(out)


def write(stage: Any, grads: dict[str, np.ndarray], count: int, *, copy: bool = True) -> None:
    """Replace the accumulated sums by ``grads`` and their count by ``count`` (the replicas' totals):
    the next update applies ``grads / count``.

    The views ``read(copy=False)`` gives stay valid after this: every adapter replaces its
    accumulator here and at the first backward after the update (``TorchStage._accumulate``),
    and changes in place only the one it holds, so the views read before keep their values. With
    ``copy=False`` a torch stage keeps ``grads``' writable arrays themselves as its accumulator."""
    if hasattr(stage, "set_accumulated_gradients"):
        stage.set_accumulated_gradients(grads, count)
        return
    framework.write_grads(stage, grads, copy=copy)
    if stage.framework == "jax":
        stage._count = int(count)
    else:
        stage._accumulated = int(count)

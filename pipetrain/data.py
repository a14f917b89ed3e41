"""Deterministic micro-batch sources: micro-batch id k -> (inputs, targets).

Stage 0 calls ``inputs(k)``, the last stage ``targets(k)``: labels never travel
through the pipeline, and both read the same k from the same deterministic
order, so a resumed run reads exactly the micro-batches it would have read.
A source must be picklable (it is shipped to the workers) and cheap to build.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from pipetrain.tree import flatten, unflatten

Tree = Any


@runtime_checkable
class MicrobatchSource(Protocol):
    microbatch_size: int

    def inputs(self, k: int) -> Tree: ...

    def targets(self, k: int) -> Tree: ...


def _leading(tree: Tree) -> int:
    leaves, _ = flatten(tree)
    if not leaves:
        raise ValueError("data: an empty pytree has no samples")
    sizes = {int(x.shape[0]) for x in leaves}
    if len(sizes) != 1:
        raise ValueError(f"data: arrays disagree on the number of samples: {sorted(sizes)}")
    return sizes.pop()


def check_numeric(tree: Tree, what: str) -> None:
    """Refuse string, bytes and object arrays (ValueError naming ``what``): stages
    exchange numeric tensors only, so text must become numbers (token ids) first."""
    leaves, _ = flatten(tree)
    for i, leaf in enumerate(leaves):
        kind = getattr(getattr(leaf, "dtype", None), "kind", None)  # numpy and dask; torch dtypes have none
        if isinstance(leaf, (str, bytes)) or kind in ("U", "S", "O"):
            name = f"leaf {i} of {what}" if len(leaves) > 1 else what
            held = f"dtype {leaf.dtype}" if kind else type(leaf).__name__
            raise ValueError(f"{name} holds {held} ({'objects' if kind == 'O' else 'text'}): a pipeline passes "
                             f"only numeric arrays; encode text as numbers first (e.g. token ids, as "
                             f"models.text.encode does)")


class ArraySource:
    """Samples from indexable arrays (numpy, dask, memory-mapped, ...).

    Micro-batch k of size b takes positions ``[j*b, (j+1)*b)`` of a permutation
    of the samples drawn from ``(seed, epoch)``, where epoch and j follow from
    k. Only those rows are read: with dask arrays, only the chunks that hold
    them are computed, on whichever worker asks. A final partial micro-batch
    of an epoch is dropped, so every micro-batch has the same shape.
    """

    def __init__(self, inputs: Tree, targets: Tree, *, microbatch_size: int, shuffle: bool = True, seed: int = 0):
        check_numeric(inputs, "ArraySource inputs")
        check_numeric(targets, "ArraySource targets")
        n = _leading(inputs)
        if _leading(targets) != n:
            raise ValueError(f"data: inputs have {n} samples but targets have {_leading(targets)}")
        if microbatch_size < 1 or microbatch_size > n:
            raise ValueError(f"data: microbatch_size={microbatch_size} must be in 1..{n} (the number of samples)")
        self._inputs, self._targets = inputs, targets
        self.num_samples = n
        self.microbatch_size = microbatch_size
        self.shuffle, self.seed = shuffle, seed
        self.microbatches_per_epoch = n // microbatch_size

    def indices(self, k: int) -> np.ndarray:
        if k < 0:
            raise IndexError(f"micro-batch id must be >= 0, got {k}")
        epoch, j = divmod(k, self.microbatches_per_epoch)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        # Sorted within the micro-batch so chunked stores read runs of rows.
        return np.sort(order[j * self.microbatch_size : (j + 1) * self.microbatch_size])

    def _take(self, tree: Tree, k: int) -> Tree:
        idx = self.indices(k)
        leaves, structure = flatten(tree)
        return unflatten(structure, [_rows(x, idx) for x in leaves])

    def inputs(self, k: int) -> Tree:
        return self._take(self._inputs, k)

    def targets(self, k: int) -> Tree:
        return self._take(self._targets, k)


def _rows(array: Any, idx: np.ndarray) -> np.ndarray:
    rows = array[idx]
    if hasattr(rows, "compute"):  # dask: compute just the chunks that hold idx
        rows = rows.compute(scheduler="synchronous")
    return np.asarray(rows)


class ReplicaSource:
    """What replica ``replica`` of ``replicas`` reads (``schedule/replicas.py``): its local
    micro-batch j is the job's micro-batch ``j * replicas + replica`` of ``source``."""

    def __init__(self, source: Any, *, replica: int, replicas: int):
        if not 0 <= replica < replicas:
            raise ValueError(f"replica {replica} is not one of 0..{replicas - 1}")
        self.source, self.replica, self.replicas = source, replica, replicas
        self.microbatch_size = source.microbatch_size

    def global_id(self, k: int) -> int:
        return k * self.replicas + self.replica

    def inputs(self, k: int) -> Tree:
        return self.source.inputs(self.global_id(k))

    def targets(self, k: int) -> Tree:
        return self.source.targets(self.global_id(k))

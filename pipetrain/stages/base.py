"""The Stage protocol and the model protocol every framework adapter implements.

A *model* is a sequence of layers (``SequentialModel``) plus a loss that runs
on the last stage. ``pipetrain.partition`` cuts it into contiguous layer
ranges; ``model.build_stage`` turns one range into a ``Stage``, the object the
executors (reference and Dask) drive action by action.

Boundaries between stages carry *pytrees*: a single array, or tuples, lists
and str-keyed dicts of arrays (see ``pipetrain.tree``). A stage accepts any
framework's arrays (numpy, JAX, torch, TF) and converts them to its own with
``pipetrain.stages.tensors`` (DLPack where it can); it returns its own
framework's arrays. The runtime turns them into numpy for the wire.

Weight versions: a stage holds one or more versions of its parameters, keyed
by an int. ``forward(k, x, version=v)`` uses version v and remembers it for
``backward(k, ...)`` (weight stashing). ``update(new_version=u)`` applies the
gradients accumulated since the last update, averaged over the number of
backwards accumulated, with the stage's optimizer, to the *latest* version
and stores the result as version u. ``release(v)`` drops a version the
schedule will not read again. Initial parameters are version 0 and are a
function of (model seed, global layer index) only, so any partition of a
model starts from the same weights.

State: ``state_dict()`` is a flat ``name -> numpy array`` map (no pickle, ready
for safetensors) holding every retained version (``v{version}/{param}``),
the optimizer state (``opt/...``), the gradient accumulator (``acc/...``), a
delay correction's state (``corr/...``, ``pipetrain.stages.corrections``) and
small scalars (``meta/...`` as 0-d arrays). ``load_state_dict`` restores it
exactly, so a stage rebuilt from a checkpoint computes bit-identical numbers.
It must be called between micro-batches (no forward without its backward).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from pipetrain.errors import PipetrainError

Tree = Any  # a pytree of arrays: see pipetrain.tree


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one array crossing a boundary."""

    shape: tuple[int, ...]
    dtype: str  # numpy-style name: "float32", "bfloat16", "int32", ...

    @property
    def nbytes(self) -> int:
        from pipetrain.tree import itemsize

        return int(np.prod(self.shape, dtype=np.int64)) * itemsize(self.dtype)

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(map(str, self.shape))}]"


@dataclass(frozen=True)
class StageSpec:
    """Which slice of the model a stage owns: layers [start, end)."""

    index: int
    num_stages: int
    start: int
    end: int

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1


@runtime_checkable
class Stage(Protocol):
    spec: StageSpec
    framework: str  # "jax" | "torch" | "tf"

    def forward(self, k: int, inputs: Tree, *, version: int, targets: Tree | None = None) -> Tree:
        """Run micro-batch k. The last stage gets ``targets`` and returns the
        loss (a float, the mean over the micro-batch); other stages return
        their output pytree. Keeps what backward needs. A stage whose
        ``correction`` attribute is set (not "none") also takes ``delay=``,
        micro-batch k's delay from ``Schedule.delays``, and needs it."""

    def backward(self, k: int, grad_outputs: Tree | None = None) -> Tree | None:
        """Backward of micro-batch k (the last stage takes None: d loss = 1).
        Accumulates parameter gradients; returns the gradient of the inputs
        (None on the first stage, whose inputs are data). A stage whose
        ``split_backward`` is "always" or "auto" also offers it in two halves,
        ``backward_input(k, grad_outputs)`` then ``backward_weights(k)``, which
        the interpreter runs around the SEND_GRAD (runtime/interpreter.py)."""

    def update(self, *, new_version: int, grad_scale: float = 1.0) -> None:
        """Apply the mean of the gradients accumulated since the last update, times
        ``grad_scale`` (clipping by norm: ``pipetrain.schedule.norms``), to the latest
        version, as version ``new_version``."""

    def grad_sq_norm(self) -> float:
        """The sum of the squares of the mean gradients the next update applies (a
        float computed in float64 over host copies in a fixed order,
        ``pipetrain.optim.squared_norm``; 0.0 with nothing accumulated). A stage
        with ``clip_norm`` set needs it; a split backward's weight halves are done."""

    def release(self, version: int) -> None: ...

    def versions(self) -> tuple[int, ...]: ...

    def state_dict(self) -> dict[str, np.ndarray]: ...

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None: ...

    def evaluate(self, inputs: Tree, *, targets: Tree | None = None) -> Tree:
        """Forward with the latest version, keeping nothing (held-out loss)."""


@runtime_checkable
class SequentialModel(Protocol):
    """A model as a sequence of layers, cut into stages by ``partition``."""

    framework: str

    def layer_names(self) -> list[str]: ...

    def layer_param_counts(self) -> list[int]: ...

    def trace_specs(self, example_input: Tree) -> list[Tree]:
        """Output spec (pytree of TensorSpec) of every layer for this input.
        Raises ``PartitionError`` naming the layer whose input does not fit."""

    def layer_costs(self, method: str, example_input: Tree, *, repeats: int = 5) -> list[float]:
        """Per-layer cost: ``"flops"`` (compiler estimate of forward+backward)
        or ``"profile"`` (median measured seconds of forward+backward)."""

    def build_stage(self, spec: StageSpec, *, optimizer: Any) -> Stage: ...


class PartitionError(PipetrainError, ValueError):
    """A partition request that cannot be met; the message names the stage/layer."""


def stage_ranges(boundaries: Sequence[int], num_layers: int) -> list[tuple[int, int]]:
    """[0, b1), [b1, b2), ..., [bk, num_layers) from the interior boundaries."""
    edges = [0, *boundaries, num_layers]
    return list(zip(edges[:-1], edges[1:]))

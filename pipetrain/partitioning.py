"""Cut a model into contiguous stages: cost model, balanced split, report.

``partition(model, num_stages, *, method, example_input)`` talks only to the
``SequentialModel`` protocol, so JAX, torch and Keras models share it; a
plain list of JAX layers is wrapped in ``JaxSequential`` first (JAX is
imported only then). The per-layer cost comes from ``method``:

- ``"uniform"``: 1 per layer (balances the layer count);
- ``"params"``: the layer's parameter count;
- ``"flops"``: the framework's compiler estimate of forward + backward;
- ``"profile"``: measured seconds of forward + backward (median of ``repeats``);
- ``"explicit"`` (or any method with ``boundaries=``): the given cut points.

The balanced split minimizes the cost of the slowest stage exactly, by
dynamic programming over contiguous splits (as the PipeDream and Alpa
partitioners do); among the splits that reach that bottleneck it takes the
one with the smallest sum of squared stage costs, so the other stages are
balanced too. With ``count_transfer=True`` a stage also pays for sending its
output: ``output bytes / bandwidth``, with ``bandwidth`` in bytes per unit of
cost (bytes per second for ``"profile"``).

Each stage's ``memory_bytes`` estimates its peak need on one worker: its
parameter bytes plus the activations of one micro-batch it keeps for backward
(the outputs of its layers). Multiply by the in-flight micro-batches and
weight versions of a schedule for the full picture.

``precision="bf16"`` (``pipetrain.stages.precision``) partitions a copy of
the model set to compute in bfloat16: its boundary specs are the wire's
(float leaves bfloat16), and so are the bytes the stages send and keep.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipetrain.stages.base import PartitionError, StageSpec, TensorSpec, stage_ranges
from pipetrain.tree import Tree, flatten
from pipetrain.stages.precision import lowered, model_precision, with_precision
from pipetrain.stages.saved_bytes import input_bytes, layer_saved_bytes

METHODS = ("uniform", "params", "flops", "profile", "explicit")
DEFAULT_BANDWIDTH = 10e9  # bytes per unit of cost: ~a 100 Gb/s link when costs are seconds


@dataclass(frozen=True)
class StagePlan:
    """One stage of a Partition: layers [start, end) and what they cost."""

    index: int
    start: int
    end: int
    layer_names: tuple[str, ...]
    params: int
    cost: float  # compute cost of the stage's layers, in the method's unit
    transfer_cost: float  # cost of sending its output (0 unless count_transfer)
    input_specs: Tree  # pytree of TensorSpec the stage receives
    output_specs: Tree  # pytree of TensorSpec it sends (the model output on the last stage)
    output_bytes: int
    memory_bytes: int  # parameter bytes + what one micro-batch keeps for its backward
    # per layer, for pipetrain.memory's schedule-aware estimate (bytes; one micro-batch)
    layer_param_bytes: tuple[int, ...] = ()
    layer_saved_bytes: tuple[int, ...] = ()
    layer_input_bytes: tuple[int, ...] = ()

    @property
    def total_cost(self) -> float:
        return self.cost + self.transfer_cost


@dataclass(frozen=True)
class Partition:
    """A model cut into stages; ``str()`` prints the table."""

    model: Any
    method: str  # "uniform" | "params" | "flops" | "profile" | "explicit"
    cost_method: str  # where the cost column comes from (the method, or "uniform" for explicit)
    stages: tuple[StagePlan, ...]
    count_transfer: bool = False
    bandwidth: float = DEFAULT_BANDWIDTH

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def precision(self) -> str:
        """"fp32" or "bf16": what the stages compute in and send (``stages/precision.py``)."""
        return model_precision(self.model)

    @property
    def boundaries(self) -> tuple[int, ...]:
        """Interior cut points: stage s > 0 starts at layer ``boundaries[s - 1]``."""
        return tuple(s.start for s in self.stages[1:])

    @property
    def bottleneck(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.total_cost)

    def specs(self) -> list[StageSpec]:
        return [StageSpec(index=s.index, num_stages=self.num_stages, start=s.start, end=s.end) for s in self.stages]

    def __str__(self) -> str:
        return _render(self)


def partition(model: Any, num_stages: int, *, method: str = "uniform", example_input: Tree,
              boundaries: Sequence[int] | None = None, count_transfer: bool = False,
              bandwidth: float = DEFAULT_BANDWIDTH, repeats: int = 5, loss: Any = None,
              precision: str | None = None) -> Partition:
    """Cut ``model`` into ``num_stages`` contiguous stages.

    ``model``: a SequentialModel (``JaxSequential``, ``TorchSequential``,
    ``KerasSequential``, ``MixedSequential``), or a list of JAX layers
    (``pipetrain.Layer``, Flax NNX modules), taken as
    ``JaxSequential(layers, loss=loss)`` (see ``as_model``).
    ``boundaries``: interior cut points (``num_stages - 1`` increasing layer
    indices); given, they fix the split and ``method`` only fills the cost
    column (``"explicit"`` then means one unit per layer).
    ``precision``: "fp32" or "bf16" for every stage (a copy of ``model`` set so);
    None: the model's own (its constructor's ``precision=``, default "fp32").
    """
    model = as_model(model, loss=loss)
    if precision is not None:
        model = with_precision(model, precision)
    precision = model_precision(model)  # (checked before any tracing: a mixed model's parts must agree)
    if not isinstance(num_stages, int) or num_stages < 1:
        raise PartitionError(f"partition: num_stages must be an int >= 1, got {num_stages!r}")
    if method not in METHODS:
        raise PartitionError(f"partition: method {method!r} is not one of {', '.join(METHODS)}")
    if method == "explicit" and boundaries is None:
        raise PartitionError("partition: method 'explicit' needs boundaries=[...]")
    if bandwidth <= 0:
        raise PartitionError(f"partition: bandwidth must be > 0, got {bandwidth}")
    names = list(model.layer_names())
    n = len(names)
    if num_stages > n:
        raise PartitionError(f"partition: {num_stages} stages for a model of {n} layers: stage {n} would have "
                             f"no layer (at most one stage per layer)")
    if boundaries is not None:
        _check_boundaries(list(boundaries), num_stages, names)

    out_specs = [lowered(specs, precision) for specs in _trace(model, example_input, boundaries, n)]
    params = [int(p) for p in model.layer_param_counts()]
    cost_method = "uniform" if method == "explicit" else method
    costs = _layer_costs(model, cost_method, example_input, params, repeats)
    out_bytes = [_bytes(s) for s in out_specs]
    transfer = [out_bytes[i] / bandwidth if count_transfer else 0.0 for i in range(n)]
    transfer[-1] = 0.0  # the last stage sends nothing

    cuts = list(boundaries) if boundaries is not None else balanced_boundaries(costs, num_stages, transfer=transfer,
                                                                      required=getattr(model, "required_cuts", ()))
    param_bytes = _param_bytes(model, params)
    saved = _saved_bytes(model, example_input, out_bytes)
    inputs = input_bytes(_specs_of(example_input), out_specs)
    plans = []
    for s, (a, b) in enumerate(stage_ranges(cuts, n)):
        plans.append(StagePlan(
            index=s, start=a, end=b, layer_names=tuple(names[a:b]), params=sum(params[a:b]),
            cost=float(sum(costs[a:b])), transfer_cost=transfer[b - 1],
            input_specs=out_specs[a - 1] if a else _specs_of(example_input), output_specs=out_specs[b - 1],
            output_bytes=out_bytes[b - 1], memory_bytes=sum(param_bytes[a:b]) + sum(saved[a:b]),
            layer_param_bytes=tuple(param_bytes[a:b]), layer_saved_bytes=tuple(saved[a:b]),
            layer_input_bytes=tuple(inputs[a:b])))
    return Partition(model=model, method="explicit" if boundaries is not None else method,
                     cost_method=cost_method, stages=tuple(plans), count_transfer=count_transfer,
                     bandwidth=bandwidth)


# ---------------------------------------------------------------- what counts as a model

_MODELS = "a JaxSequential, TorchSequential, KerasSequential or MixedSequential"
_PROTOCOL = ("layer_names", "layer_param_counts", "trace_specs")  # what partition calls


def as_model(model: Any, *, loss: Any = None) -> Any:
    """``model`` itself if it is a SequentialModel; a list (or tuple) of JAX
    layers as ``JaxSequential(layers, loss=loss)``. Without ``loss`` such a
    model partitions (shapes and costs need none) but cannot train: its loss
    raises, saying to give one. Anything else is a ``TypeError`` that says
    what to pass."""
    if isinstance(model, (list, tuple)):
        return _jax_model(list(model), loss)
    if loss is not None:
        raise TypeError(f"partition: loss= is only for a list of layers; {_what(model)} carries its own loss")
    if all(callable(getattr(model, name, None)) for name in _PROTOCOL):
        return model
    if isinstance(model, Partition):
        raise TypeError("partition: model is already a Partition; pass it to pipetrain.fit as it is, or "
                        "partition its .model again")
    hint = _foreign_hint(model)
    raise TypeError(f"partition: model is {_what(model)}, not a model{'; ' + hint if hint else ''}. Pass "
                    f"{_MODELS}, or a list of JAX layers (pipetrain.Layer or Flax NNX modules)")


def _jax_model(layers: list, loss: Any) -> Any:
    if not layers:
        raise ValueError("partition: the list of layers is empty")
    for i, item in enumerate(layers):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            item = item[1]
        if all(callable(getattr(item, name, None)) for name in _PROTOCOL):
            raise TypeError(f"partition: item {i} of the list is a model ({_what(item)}), not a layer; chain "
                            "models, of one framework or several, with "
                            "pipetrain.stages.mixed.MixedSequential([model, model, ...])")
        hint = _foreign_hint(item)
        if hint:
            raise TypeError(f"partition: a list is taken as JAX layers, but item {i} is {_what(item)}; {hint}")
    from pipetrain.stages.jax_stage import JaxSequential

    return JaxSequential(layers, loss=_NoLoss() if loss is None else loss)


class _NoLoss:
    """The loss of a list of layers partitioned without ``loss=``: training it says what to do."""

    def __call__(self, outputs: Any, targets: Any) -> Any:
        raise TypeError("this model was given as a plain list of layers without a loss, so it cannot compute "
                        "one: build it as pipetrain.JaxSequential(layers, loss=...) or call "
                        "pipetrain.partition(layers, ..., loss=...)")

    def __repr__(self) -> str:
        return "<no loss: a list of layers partitioned without loss=>"


def _frameworks(obj: Any) -> set[str]:
    return {getattr(c, "__module__", "").partition(".")[0] for c in type(obj).__mro__}


def _foreign_hint(obj: Any) -> str:
    """What to wrap a torch or Keras object in, found without importing either."""
    roots = _frameworks(obj)
    if "torch" in roots:
        return "wrap torch modules as pipetrain.TorchSequential([module, ...], loss=...)"
    if roots & {"keras", "tensorflow", "tf_keras"}:
        return "wrap Keras layers as pipetrain.KerasSequential([layer, ...], loss=...)"
    return ""


def _what(obj: Any) -> str:
    kind = type(obj)
    root = kind.__module__.partition(".")[0]
    return f"a {kind.__name__}" if root in ("builtins", "pipetrain") else f"a {root} {kind.__name__}"


# ---------------------------------------------------------------- checks and costs

def _check_boundaries(cuts: list, num_stages: int, names: list[str]) -> None:
    n = len(names)
    if len(cuts) != num_stages - 1:
        raise PartitionError(f"partition: {len(cuts)} boundaries make {len(cuts) + 1} stages, but num_stages is "
                             f"{num_stages} (give num_stages - 1 interior cut points)")
    previous = 0
    for s, cut in enumerate(cuts, start=1):
        if isinstance(cut, bool) or not hasattr(cut, "__index__") or not 0 < cut < n:
            raise PartitionError(f"partition: boundary {cut!r} (start of stage {s}) is out of range: cut points "
                                 f"lie in 1..{n - 1} for a model of {n} layers")
        if cut <= previous:
            raise PartitionError(f"partition: boundaries must be strictly increasing: stage {s} would start at "
                                 f"layer {cut} ({names[cut]}), not after stage {s - 1}'s start {previous} "
                                 f"(stage {s - 1} would be empty)")
        previous = cut


def _trace(model: Any, example_input: Tree, boundaries: Sequence[int] | None, n: int) -> list[Tree]:
    try:
        specs = list(model.trace_specs(example_input))
    except PartitionError as err:
        layer = getattr(err, "layer", None)
        if boundaries is None or layer is None:
            raise
        stage = sum(1 for cut in boundaries if cut <= layer)
        raise PartitionError(f"stage {stage}: {err}") from err
    if len(specs) != n:
        raise PartitionError(f"partition: trace_specs gave {len(specs)} specs for {n} layers")
    return specs


def _layer_costs(model: Any, method: str, example_input: Tree, params: list[int], repeats: int) -> list[float]:
    if method == "uniform":
        return [1.0] * len(params)
    if method == "params":
        return [float(p) for p in params]
    costs = [float(c) for c in model.layer_costs(method, example_input, repeats=repeats)]
    if len(costs) != len(params) or any(c < 0 for c in costs):
        raise PartitionError(f"partition: layer_costs({method!r}) gave {costs}: expected {len(params)} costs >= 0")
    return costs


def _param_bytes(model: Any, params: list[int]) -> list[int]:
    """Per-layer parameter bytes where the model says (``layer_param_bytes``), else 4 per parameter."""
    if hasattr(model, "layer_param_bytes"):
        return [int(b) for b in model.layer_param_bytes()]
    return [4 * p for p in params]


def _saved_bytes(model: Any, example_input: Tree, out_bytes: list[int]) -> list[int]:
    """Per layer: what one micro-batch keeps for its backward (``stages/saved_bytes.py``);
    a model of another kind counts its outputs."""
    if getattr(model, "framework", None) not in ("jax", "torch", "mixed"):
        return list(out_bytes)
    saved = layer_saved_bytes(model, example_input, out_bytes)
    if len(saved) != len(out_bytes):
        raise PartitionError(f"partition: saved bytes for {len(saved)} layers of {len(out_bytes)}")
    return saved


def _bytes(specs: Tree) -> int:
    return sum(leaf.nbytes for leaf in flatten(specs)[0] if isinstance(leaf, TensorSpec))


def _specs_of(example_input: Tree) -> Tree:
    from pipetrain.tree import dtype_name, tree_map

    return tree_map(lambda x: x if isinstance(x, TensorSpec) else TensorSpec(tuple(x.shape), dtype_name(x)),
                    example_input)


# ---------------------------------------------------------------- the balanced split

def balanced_boundaries(costs: Sequence[float], num_stages: int, *, transfer: Sequence[float] | None = None,
                        required: Sequence[int] = ()) -> list[int]:
    """Interior cut points minimizing the bottleneck stage cost exactly.

    A stage [a, b) costs ``sum(costs[a:b]) + transfer[b - 1]``. First a DP
    finds the optimal bottleneck B; a second DP picks, among splits whose
    every stage costs at most B, the one with the smallest sum of squares.
    O(num_stages * n^2). ``required``: cut points every split must have (a
    stage may not straddle them, e.g. the framework boundaries of a mixed model).
    """
    n = len(costs)
    if not 1 <= num_stages <= n:
        raise PartitionError(f"partition: cannot cut {n} layers into {num_stages} non-empty stages")
    if num_stages < len(required) + 1:
        raise PartitionError(f"partition: the model must be cut at layers {list(required)} (between its parts), "
                             f"so it needs at least {len(required) + 1} stages, not {num_stages}")
    transfer = list(transfer) if transfer is not None else [0.0] * n
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def stage_cost(a: int, b: int) -> float:
        if any(a < c < b for c in required):
            return float("inf")
        return prefix[b] - prefix[a] + (transfer[b - 1] if b < n else 0.0)

    bottleneck = _min_bottleneck(stage_cost, n, num_stages)
    limit = bottleneck + 1e-9 * max(abs(bottleneck), 1.0)
    return _min_squares_under(stage_cost, n, num_stages, limit)


def _min_bottleneck(stage_cost, n: int, stages: int) -> float:
    inf = float("inf")
    # best[s][j]: smallest bottleneck of layers [0, j) cut into s stages
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for j in range(s, n - (stages - s) + 1):
            best[s][j] = min(max(best[s - 1][i], stage_cost(i, j)) for i in range(s - 1, j))
    return best[stages][n]


def _min_squares_under(stage_cost, n: int, stages: int, limit: float) -> list[int]:
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    choice = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for j in range(s, n - (stages - s) + 1):
            for i in range(s - 1, j):
                c = stage_cost(i, j)
                if c <= limit and best[s - 1][i] + c * c < best[s][j]:
                    best[s][j], choice[s][j] = best[s - 1][i] + c * c, i
    cuts, j = [], n
    for s in range(stages, 1, -1):
        j = choice[s][j]
        cuts.append(j)
    return cuts[::-1]


# ---------------------------------------------------------------- the table

def _render(p: Partition) -> str:
    slowest = p.bottleneck
    top = slowest.total_cost or 1.0
    unit = {"uniform": "layers", "params": "params", "flops": "FLOPs", "profile": "s"}[p.cost_method]
    rows = [("stage", "layers", "params", f"cost ({unit})", "share", "output", "out bytes", "memory")]
    for s in p.stages:
        cost = _num(s.cost) + (f" +{_num(s.transfer_cost)} xfer" if s.transfer_cost else "")
        rows.append((str(s.index), _layer_range(s), f"{s.params:,}", cost, f"{s.total_cost / top:.0%}",
                     _abbrev(_spec_text(s.output_specs), 32), _size(s.output_bytes), _size(s.memory_bytes)))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    header = (f"Partition: {sum(s.end - s.start for s in p.stages)} layers in {p.num_stages} stages, "
              f"method {p.method!r}, bottleneck stage {slowest.index}"
              + (f", transfer counted at {p.bandwidth:.3g} B/unit" if p.count_transfer else "")
              + (f", precision {p.precision}" if p.precision != "fp32" else ""))
    return "\n".join([header, *lines])


def _layer_range(s: StagePlan) -> str:
    names = list(s.layer_names)
    shown = ", ".join(names) if len(names) <= 3 else f"{names[0]}, ..., {names[-1]}"
    span = f"{s.start}" if s.end - s.start == 1 else f"{s.start}-{s.end - 1}"
    return f"{span} {_abbrev(shown, 36)}"


def _abbrev(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def _spec_text(specs: Tree) -> str:
    leaves, _ = flatten(specs)
    return ", ".join(str(x) for x in leaves) if len(leaves) != 1 else str(leaves[0])


def _num(x: float) -> str:
    return f"{x:,.0f}" if x == int(x) and abs(x) < 1e7 else f"{x:.3g}"


def _size(b: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return f"{b} B"

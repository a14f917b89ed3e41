"""JAX adapter: a model as a sequence of JAX layers, cut into stages.

A layer is a ``pipetrain.stages.jax_layers.Layer`` (an ``init``/``apply``
pair of pure functions) or a Flax NNX module, given either as a factory
``rngs -> module`` (built with ``nnx.Rngs(layer_key(seed, i))``) or as a
built instance (its parameters are taken as they are). ``("name", item)``
names a layer; otherwise a Layer keeps its ``name`` and an NNX module is
named after its class. NNX modules become plain Layers with
``nnx.split``/``nnx.merge``; only their ``nnx.Param`` variables are state
(a module holding other variables, RNG streams or batch statistics, is
refused: a pure stage cannot carry their in-place updates).

Initial parameters of layer i are ``init(layer_key(seed, i), x_spec)`` with
``layer_key(seed, i) = fold_in(key(seed), i)``, run eagerly, so every
partition (and the unpartitioned oracle) starts from the same weights. ``init``
needs the layer's input spec, so the model needs to know its input: pass
``example_input=`` to ``JaxSequential``, or let the first ``trace_specs`` call
(which ``partition`` always makes) record it. Only the spec (shapes, dtypes)
is kept, never arrays, and no jitted function lives on the model: it pickles
with cloudpickle for Dask workers.

A stage keeps the VJP of each forward until its backward: ``forward`` is
``jit(lambda p, x: jax.vjp(apply, p, x))`` (the VJP function is a pytree of
residuals, so it leaves and re-enters jit), ``backward`` is a jitted call of
that VJP plus the gradient accumulation. Both compile once per input shape;
``JaxStage.trace_counts`` counts the traces. Integer leaves of a boundary
pytree (token ids, masks) are not differentiated: their input gradient is
None, and a None output gradient means zeros.

``remat`` (``pipetrain.memory.REMAT``): ``"layer"`` wraps each layer's apply
in ``jax.checkpoint``, ``"stage"`` the stage's whole apply, so the VJP a
forward keeps holds the inputs of what is recomputed instead of every
intermediate; the backward recomputes them. The gradients are the same
numbers (the same operations run again).

``precision`` (``pipetrain.stages.precision``): under ``"bf16"`` each layer
casts its float32 parameters and its input to bfloat16 inside the jitted
forward, so the VJP gives float32 gradients of the float32 masters; the
stage's outputs leave as bfloat16, the last stage's enter the loss as float32.
"""
from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pipetrain.memory import check_remat
from pipetrain.optim import Optimizer, squared_norm
from pipetrain.stages import corrections
from pipetrain.stages.base import PartitionError, StageSpec
from pipetrain.stages import jax_trees as trees
from pipetrain.stages.jax_layers import Layer
from pipetrain.stages.jax_optim import as_optax
from pipetrain.stages.precision import JaxCasts, check_masters, check_precision
from pipetrain.stages.jax_trees import LayerLike
from pipetrain.stages.tensors import to_jax
from pipetrain.stages.versions import VersionedParams
from pipetrain.tree import Tree



def layer_key(seed: int, index: int) -> jax.Array:
    """The PRNG key layer ``index`` is initialized from."""
    return jax.random.fold_in(jax.random.key(seed), index)


# ---------------------------------------------------------------- the model

class JaxSequential:
    """A SequentialModel of JAX layers (see the module docstring).

    ``JaxSequential(layers, *, loss, seed=0, example_input=None)``:
    ``loss(outputs, targets) -> scalar`` (mean over the micro-batch) runs on
    the last stage; ``example_input`` (arrays or TensorSpecs) fixes the input
    signature that initialization needs, else the first ``trace_specs`` does.
    """

    framework = "jax"

    def __init__(self, layers: Sequence[LayerLike], *, loss: Callable[[Any, Any], Any], seed: int = 0,
                 example_input: Tree | None = None, remat: str = "none", precision: str = "fp32"):
        self._layers = [trees.as_layer(item, i) for i, item in enumerate(layers)]
        if not self._layers:
            raise ValueError("JaxSequential: no layers given")
        self.loss = loss
        self.seed = seed
        self.remat = check_remat(remat, "JaxSequential")
        self.precision = check_precision(precision, "JaxSequential")
        self.input_spec: Tree | None = (None if example_input is None
                                        else trees.tensor_specs(trees.abstract(example_input)))
        self._traced: dict[str, list[tuple]] = {}

    def __len__(self) -> int:
        return len(self._layers)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_traced": {}}  # abstract traces are cheap to redo

    @property
    def layers(self) -> tuple[Layer, ...]:
        return tuple(self._layers)

    def layer_names(self) -> list[str]:
        """Layer names, made unique as ``"{index}:{name}"`` where a name repeats."""
        names = [layer.name for layer in self._layers]
        repeated = {n for n in names if names.count(n) > 1}
        return [f"{i}:{n}" if n in repeated else n for i, n in enumerate(names)]

    # ------------------------------------------------------------ shapes

    def _trace(self, example_input: Tree | None = None) -> list[tuple]:
        """Per layer (input, params, output) as ShapeDtypeStruct trees, all abstract."""
        if example_input is None:
            if self.input_spec is None:
                raise PartitionError("JaxSequential: the input signature is unknown; pass example_input= "
                                     "to JaxSequential or call partition()/trace_specs() first")
            example_input = self.input_spec
        x = trees.abstract(example_input)
        cache_key = repr(x)
        if cache_key in self._traced:
            return self._traced[cache_key]
        names, rows = self.layer_names(), []
        for i, layer in enumerate(self._layers):
            try:
                p = jax.eval_shape(layer.init, layer_key(self.seed, i), x)
                out = jax.eval_shape(layer.apply, p, x)
            except Exception as err:
                came_from = f"the output of layer {i - 1} ({names[i - 1]})" if i else "the model input"
                error = PartitionError(f"layer {i} ({names[i]}): its input {trees.show(x)}, {came_from}, "
                                       f"does not fit: {type(err).__name__}: {err}")
                error.layer = i
                raise error from err
            rows.append((x, p, out))
            x = out
        self._traced[cache_key] = rows
        return rows

    def trace_specs(self, example_input: Tree) -> list[Tree]:
        rows = self._trace(example_input)
        if self.input_spec is None:
            self.input_spec = trees.tensor_specs(trees.abstract(example_input))
        return [trees.tensor_specs(out) for _, _, out in rows]

    def layer_param_counts(self) -> list[int]:
        return [trees.size(p) for _, p, _ in self._trace()]

    def layer_param_bytes(self) -> list[int]:
        """Bytes of each layer's parameters (an optional extension ``partition`` reads)."""
        return [trees.nbytes(p) for _, p, _ in self._trace()]

    # ------------------------------------------------------------ costs

    def layer_costs(self, method: str, example_input: Tree, *, repeats: int = 5) -> list[float]:
        if method == "flops":
            rows = zip(self._layers, self._trace(example_input))
            return [trees.flops(layer.apply, p, x) for layer, (x, p, _) in rows]
        if method == "profile":
            return self._profile(example_input, repeats=repeats)
        raise ValueError(f"layer_costs: method must be 'flops' or 'profile', got {method!r}")

    def _profile(self, example_input: Tree, *, repeats: int) -> list[float]:
        if repeats < 1:
            raise ValueError(f"layer_costs: repeats must be >= 1, got {repeats}")
        rows = self._trace(example_input)
        x = trees.concrete(example_input)
        costs = []
        for i, (layer, (x_spec, _, _)) in enumerate(zip(self._layers, rows)):
            params = layer.init(layer_key(self.seed, i), x_spec)
            step = jax.jit(trees.forward_backward(layer.apply))
            jax.block_until_ready(step(params, x))  # compile and warm up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                jax.block_until_ready(step(params, x))
                times.append(time.perf_counter() - start)
            costs.append(statistics.median(times))
            x = jax.jit(layer.apply)(params, x)
        return costs

    # ------------------------------------------------------------ stages

    def init_params(self, start: int = 0, end: int | None = None) -> dict[str, Any]:
        """Initial parameters of layers [start, end), keyed by layer name."""
        end = len(self) if end is None else end
        rows, names = self._trace(), self.layer_names()
        return {names[i]: self._layers[i].init(layer_key(self.seed, i), rows[i][0]) for i in range(start, end)}

    def build_stage(self, spec: StageSpec, *, optimizer: Optimizer | optax.GradientTransformation) -> JaxStage:
        if not 0 <= spec.start < spec.end <= len(self):
            raise PartitionError(f"stage {spec.index}: layers [{spec.start}, {spec.end}) outside the model's "
                                 f"{len(self)} layers")
        names = self.layer_names()[spec.start:spec.end]
        return JaxStage(spec, layers=list(zip(names, self._layers[spec.start:spec.end])),
                        params=self.init_params(spec.start, spec.end), loss=self.loss, optimizer=optimizer,
                        remat=getattr(self, "remat", "none"), precision=getattr(self, "precision", "fp32"))


# ---------------------------------------------------------------- the stage

class JaxStage(VersionedParams):
    """One contiguous slice of a JaxSequential; see ``pipetrain.stages.base.Stage``.

    Parameters are a dict ``{layer name: layer params}``; each weight version
    is one such dict. ``trace_counts`` counts how often each jitted function
    was traced (compiled), by name.
    """

    framework = "jax"

    def __init__(self, spec: StageSpec, *, layers: list[tuple[str, Layer]], params: dict[str, Any],
                 loss: Callable, optimizer: Optimizer | optax.GradientTransformation, remat: str = "none",
                 precision: str = "fp32"):
        self.spec = spec
        self.remat = check_remat(remat, f"stage {spec.index}")
        self.precision = check_precision(precision, f"stage {spec.index}")
        self._casts = JaxCasts(self.precision, jnp, jax.tree_util.tree_map)
        if self._casts.on:
            check_masters(((n, str(a.dtype)) for n, a in trees.named_leaves(params)), f"stage {spec.index}")
        self._layers = layers
        self._loss = loss
        self._tx = as_optax(optimizer)
        self.clip_norm = getattr(optimizer, "clip_norm", None) or None  # (the interpreter's grad_scale)
        leaves = jax.tree_util.tree_leaves(params)
        self.device = next(iter(leaves[0].devices())) if leaves else jax.devices()[0]
        # Everything lives committed on one device, so every jitted call sees the same
        # argument placement and hits one cache entry.
        params = jax.device_put(params, self.device)
        self._versions: dict[int, dict[str, Any]] = {0: params}
        self._latest = 0
        self._opt_state = jax.device_put(self._tx.init(params), self.device)
        self._acc = self._zeros(params)
        self._count = 0
        self._pending: dict[int, tuple[int, Any, Any, int]] = {}  # k -> (version, vjp, output spec, delay)
        self._corr = corrections.StageCorrection(
            optimizer, params, map=jax.tree_util.tree_map, sqrt=jnp.sqrt, compile=jax.jit,
            zeros_like=lambda p: jax.device_put(jnp.zeros_like(p), self.device))
        self.correction = self._corr.name
        self.trace_counts: Counter[str] = Counter()
        self._forward_jit = jax.jit(self._forward_fn)
        self._backward_jit = jax.jit(self._backward_fn)
        self._update_jit = jax.jit(self._update_fn)
        self._mean_jit = jax.jit(self._mean_fn)
        self._evaluate_jit = jax.jit(self._evaluate_fn)

    def _here(self, tree: Tree) -> Tree:
        """Any framework's arrays as JAX arrays on this stage's device. DLPack keeps a
        torch/TF array where it was (a CPU tensor stays on the CPU), and jit refuses
        to mix devices, so the arrays are moved next to the parameters (no-op there)."""
        return jax.device_put(to_jax(tree), self.device)

    def _zeros(self, tree: Tree) -> Tree:
        return jax.device_put(jax.tree_util.tree_map(jnp.zeros_like, tree), self.device)

    def _where(self, k: int | None = None) -> str:
        return f"stage {self.spec.index}" + (f", micro-batch {k}" if k is not None else "")

    # ------------------------------------------------------------ pure functions (traced once per shape)

    def _apply(self, params: dict[str, Any], x: Tree) -> Tree:
        for name, layer in self._layers:
            apply = self._casts.layer(layer.apply)  # (bf16: the casts recomputed under remat too)
            apply = jax.checkpoint(apply) if self.remat == "layer" else apply
            x = apply(params[name], x)
        return self._casts.outputs(x, last=self.spec.is_last)

    def _differentiated_apply(self, params: dict[str, Any], x: Tree) -> Tree:
        """``_apply`` as a forward that its VJP will differentiate: under remat "stage"
        the VJP keeps only the stage's inputs and recomputes the rest."""
        return jax.checkpoint(self._apply)(params, x) if self.remat == "stage" else self._apply(params, x)

    def _forward_fn(self, params, x, targets):
        self.trace_counts["forward"] += 1
        # The first stage's inputs are data: no gradient with respect to them. Integer
        # leaves are never differentiated; they travel as the VJP's auxiliary output.
        x_ints = None if self.spec.is_first else trees.ints(x)

        def head(p, *x_floats):
            out = self._differentiated_apply(p, x if self.spec.is_first else trees.merge(x_floats[0], x_ints))
            if self.spec.is_last:
                return self._loss(out, targets), None
            return trees.floats(out), trees.ints(out)

        primals = (params,) if self.spec.is_first else (params, trees.floats(x))
        out_floats, vjp, out_ints = jax.vjp(head, *primals, has_aux=True)
        return (out_floats if self.spec.is_last else trees.merge(out_floats, out_ints)), vjp

    def _backward_fn(self, vjp, cotangent, acc, correct):
        self.trace_counts["backward"] += 1
        grads = vjp(cotangent)
        weights, mean_square = grads[0], None
        if correct is not None:  # DC-ASGD: (w_now, w_used, its mean square or None)
            weights, mean_square = self._corr.rule(weights, *correct)
        acc = jax.tree_util.tree_map(jnp.add, acc, weights)
        return acc, (None if self.spec.is_first else grads[1]), mean_square

    def _mean_fn(self, acc, count):
        return jax.tree_util.tree_map(lambda g: (g / count).astype(g.dtype), acc)

    def _update_fn(self, params, opt_state, acc, count, scale):
        self.trace_counts["update"] += 1
        mean = self._mean_fn(acc, count)
        if scale is not None:  # clipping (None: not clipped, and the same compiled update as without it)
            mean = jax.tree_util.tree_map(lambda g: g * scale.astype(g.dtype), mean)
        updates, opt_state = self._tx.update(mean, opt_state, params)
        # The fresh accumulator comes out of the same compiled call: one
        # dispatch instead of one zeros_like per parameter after every update.
        zeros = jax.tree_util.tree_map(jnp.zeros_like, acc)
        return optax.apply_updates(params, updates), opt_state, zeros

    def _evaluate_fn(self, params, x, targets):
        self.trace_counts["evaluate"] += 1
        out = self._apply(params, x)
        return self._loss(out, targets) if targets is not None else out

    # ------------------------------------------------------------ Stage protocol

    def forward(self, k: int, inputs: Tree, *, version: int, targets: Tree | None = None,
                delay: int | None = None) -> Tree:
        if k in self._pending:
            raise RuntimeError(f"{self._where(k)}: forward twice without its backward")
        delay = self._corr.delay(delay, self._where(k))
        params = self._corr.forward_weights(self._params(version, k), version=version, delay=delay)
        if self.spec.is_last and targets is None:
            raise ValueError(f"{self._where(k)}: the last stage needs targets to compute the loss")
        x = self._here(inputs)
        out, vjp = self._forward_jit(params, x, self._here(targets) if self.spec.is_last else None)
        if self.spec.is_last:
            if jnp.shape(out) != ():
                raise ValueError(f"{self._where(k)}: loss must return a scalar, got shape {jnp.shape(out)}")
            self._pending[k] = (version, vjp, jax.ShapeDtypeStruct((), out.dtype), delay)
            return float(out)
        out_spec = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), out)
        self._pending[k] = (version, vjp, out_spec, delay)
        # Wait for the result here, not in whatever reads it next: the
        # executors time each action, and a stage's busy share and the
        # pipeline trace should show compute as compute, not as a slow send.
        return jax.block_until_ready(out)

    def backward(self, k: int, grad_outputs: Tree | None = None) -> Tree | None:
        if k not in self._pending:
            raise RuntimeError(f"{self._where(k)}: backward of a micro-batch that was never forwarded "
                               f"(in flight: {sorted(self._pending)})")
        version, vjp, out_spec, delay = self._pending[k]
        if self.spec.is_last:
            cotangent = jnp.ones((), out_spec.dtype)
        else:
            cotangent = self._cotangent(k, out_spec, grad_outputs)
        correct, mean_square = None, self._corr.state.get("ms")
        if self._corr.corrects_gradients and (delay or mean_square is not None):
            correct = (self._versions[self._latest], self._versions[version], mean_square)
        self._acc, grad_inputs, mean_square = jax.block_until_ready(
            self._backward_jit(vjp, cotangent, self._acc, correct))
        if mean_square is not None:
            self._corr.state["ms"] = mean_square
        del self._pending[k]
        self._count += 1
        return grad_inputs

    def _cotangent(self, k: int, out_spec: Tree, grad_outputs: Tree) -> Tree:
        """The output gradient in the outputs' float structure and dtypes (None -> zeros)."""
        def leaf(spec: Any, g: Any) -> Any:
            if not trees.inexact(spec):
                return None
            if g is None:
                return jnp.zeros(spec.shape, spec.dtype)
            g = self._here(g)
            if tuple(g.shape) != tuple(spec.shape):
                raise ValueError(f"{self._where(k)}: output gradient of shape {tuple(g.shape)} for an output "
                                 f"of shape {tuple(spec.shape)}")
            return g.astype(spec.dtype)
        try:
            return jax.tree_util.tree_map(leaf, out_spec, grad_outputs)
        except (ValueError, TypeError) as err:
            if str(err).startswith(self._where(k)):
                raise
            raise ValueError(f"{self._where(k)}: output gradient does not match the outputs "
                             f"{trees.show(out_spec)}: {err}") from err

    def grad_sq_norm(self) -> float:
        """The squared norm of the mean gradients the next update applies (float64, leaf order)."""
        if self._count == 0:
            return 0.0
        mean = self._mean_jit(self._acc, jnp.asarray(self._count, jnp.float32))
        return squared_norm(jax.device_get(jax.tree_util.tree_leaves(mean)))

    def update(self, *, new_version: int, grad_scale: float = 1.0) -> None:
        if new_version in self._versions:
            raise ValueError(f"{self._where()}: weight version {new_version} exists already")
        latest = self._versions[self._latest]
        if self._count == 0:  # nothing accumulated: the new version is the latest, unchanged
            self._versions[new_version] = latest
            self._corr.after_update(self._latest, new_version, latest, None)
        else:
            self._versions[new_version], self._opt_state, self._acc = jax.block_until_ready(self._update_jit(
                latest, self._opt_state, self._acc, jnp.asarray(self._count, jnp.float32),
                None if grad_scale == 1.0 else jnp.asarray(grad_scale, jnp.float32)))
            self._corr.after_update(self._latest, new_version, latest, self._versions[new_version])
        self._latest = new_version  # (with nothing accumulated, the accumulator is still zeros)
        self._count = 0

    def evaluate(self, inputs: Tree, *, targets: Tree | None = None) -> Tree:
        """Latest weights, nothing kept: the loss (float) on the last stage given targets,
        else the outputs (JAX arrays; the last stage's predictions without targets)."""
        params = self._versions[self._latest]
        targets = self._here(targets) if self.spec.is_last and targets is not None else None
        out = self._evaluate_jit(params, self._here(inputs), targets)
        return float(out) if targets is not None else out

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict[str, np.ndarray]:
        state: dict[str, np.ndarray] = {}
        for v, params in self._versions.items():
            state.update({f"v{v}/{name}": np.array(x) for name, x in trees.named_leaves(params)})
        state.update({f"opt/{name}": np.array(x) for name, x in trees.named_leaves(self._opt_state)})
        state.update({f"acc/{name}": np.array(x) for name, x in trees.named_leaves(self._acc)})
        corr = {**self._corr.state, **{f"step/v{v}": tree for v, tree in self._corr.steps.items()}}
        for slot, tree in corr.items():
            state.update({f"corr/{slot}/{name}": np.array(x) for name, x in trees.named_leaves(tree)})
        state["meta/versions"] = np.array(sorted(self._versions), np.int64)
        state["meta/latest"] = np.array(self._latest, np.int64)
        state["meta/count"] = np.array(self._count, np.int64)
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        for meta in ("meta/versions", "meta/latest", "meta/count"):
            if meta not in state:
                raise KeyError(f"{self._where()}: state has no {meta!r}")
        versions = [int(v) for v in np.asarray(state["meta/versions"]).reshape(-1)]
        template = self._versions[self._latest]
        used: set[str] = {"meta/versions", "meta/latest", "meta/count"}
        restored = {v: self._restore(state, f"v{v}/", template, used) for v in versions}
        opt_state = self._restore(state, "opt/", self._opt_state, used)
        acc = self._restore(state, "acc/", self._acc, used)
        corr = {slot: self._restore(state, f"corr/{slot}/", tree, used) for slot, tree in self._corr.state.items()}
        steps = {v: self._restore(state, f"corr/step/v{v}/", template, used) for v in versions if self._corr.predicts}
        unexpected = sorted(set(state) - used)
        if unexpected:
            raise KeyError(f"{self._where()}: unexpected state keys {unexpected[:5]}")
        latest = int(state["meta/latest"])
        if latest not in restored:
            raise ValueError(f"{self._where()}: meta/latest is {latest}, not one of the versions {versions}")
        self._versions, self._opt_state, self._acc = restored, opt_state, acc
        self._corr.state, self._corr.steps = corr, steps
        self._latest, self._count = latest, int(state["meta/count"])
        self._pending.clear()

    def _restore(self, state: dict[str, np.ndarray], prefix: str, template: Tree, used: set[str]) -> Tree:
        paths, treedef = jax.tree_util.tree_flatten_with_path(template)
        leaves = []
        for path, like in paths:
            key = prefix + trees.path_name(path)
            if key not in state:
                raise KeyError(f"{self._where()}: state has no {key!r}")
            a = np.asarray(state[key])
            if a.shape != tuple(like.shape) or a.dtype != np.dtype(like.dtype):
                raise ValueError(f"{self._where()}: state {key!r} is {a.dtype}{list(a.shape)}, "
                                 f"expected {np.dtype(like.dtype)}{list(like.shape)}")
            leaves.append(jax.device_put(np.array(a), self.device))
            used.add(key)
        return jax.tree_util.tree_unflatten(treedef, leaves)

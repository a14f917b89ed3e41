"""TensorFlow / Keras 3 adapter: a model as a list of Keras layers, cut into stages.

Each layer is called as ``layer(x)`` with ``x`` the whole boundary pytree and
returns the next one; ``loss(outputs, targets) -> scalar tf tensor`` (mean over
the micro-batch) runs on the last stage. Keras must run on the TensorFlow
backend.

Building: Keras layers create their weights when they first see an input, so
the model needs the shape of its input: ``input_spec=`` (an example pytree of
arrays or ``TensorSpec``) or, failing that, the example last given to
``trace_specs`` / ``layer_costs`` (what ``pipetrain.partition`` does). Each
layer is re-created from its config under ``keras.utils.set_random_seed(
layer_seed(seed, index))`` and built, so every partition starts from the same
weights; a layer given already built keeps its weights (copied). Setting the
seed resets Keras', TF's, numpy's and Python's global RNGs, as Keras does.

Weight stashing: a stage holds ``{version: {name: tf tensor}}`` and runs each
layer with ``layer.stateless_call(values, ...)``, so the variables themselves
are never assigned and any number of versions can be alive. Each forward runs
under its own ``tf.GradientTape`` watching that version's tensors and the
inputs; backward calls ``tape.gradient(outputs, params + inputs,
output_gradients=...)``. Non-trainable variables (BatchNorm statistics, seed
generators) are constants: not versioned, not checkpointed, updates dropped.

Precision (``pipetrain.stages.precision``): under ``"bf16"`` a stage's
layers are put on the ``mixed_bfloat16`` policy (float32 variables, bfloat16
compute) and each ``stateless_call`` runs in its autocast scope with its
inputs cast, so the tape gives float32 gradients of the float32 masters.

The optimizer is a small functional sgd / momentum / adam / adamw on tf
tensors in optax's order of operations rather than ``keras.optimizers``:
a Keras optimizer assigns into the variables it was built for and keeps its
slots per variable, which does not fit several live versions, and Keras' Adam
adds epsilon to sqrt(v) *before* bias correction (the paper's "epsilon hat"),
so it would not match a JAX or torch stage with the same ``Optimizer``.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from pipetrain.memory import check_remat
from pipetrain.optim import Optimizer, squared_norm, tensor_state, tensor_step
from pipetrain.stages import corrections, flat_state
from pipetrain.stages.precision import KerasCasts, check_masters, check_precision
from pipetrain.stages.versions import VersionedParams
from pipetrain.stages.base import PartitionError, StageSpec, TensorSpec
from pipetrain.stages.tensors import to_numpy, to_tf
from pipetrain.tree import Tree, dtype_name, flatten, pair_with_gradients, tree_map, unflatten

LayerLike = keras.layers.Layer | Callable[[], keras.layers.Layer]


def layer_seed(seed: int, index: int) -> int:
    """The Keras seed a layer is created under: a function of (model seed, global layer index)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint32)[0] >> 1)


def _spec_of(x: Any) -> TensorSpec:
    if isinstance(x, TensorSpec):
        return x
    if isinstance(x, keras.KerasTensor):
        return TensorSpec(tuple(x.shape), str(x.dtype))
    return TensorSpec(tuple(x.shape), dtype_name(x))


def _symbolic(spec: TensorSpec) -> keras.KerasTensor:
    return keras.KerasTensor(spec.shape, dtype=spec.dtype)


class KerasSequential:
    """A SequentialModel of Keras layers: a ``keras.Sequential`` (or a slice of
    one, ``model.layers[a:b]``), or a list of layers and layer factories."""

    framework = "tf"

    def __init__(self, layers: keras.Sequential | Sequence[LayerLike], *, loss: Callable[[Any, Any], Any],
                 seed: int = 0, input_spec: Tree | None = None, device: str | None = None, remat: str = "none",
                 precision: str = "fp32"):
        if keras.backend.backend() != "tensorflow":
            raise RuntimeError(f"KerasSequential needs the tensorflow Keras backend, not {keras.backend.backend()!r}"
                               " (set KERAS_BACKEND=tensorflow)")
        self._layers = list(layers.layers) if isinstance(layers, keras.Sequential) else list(layers)
        if not self._layers:
            raise ValueError("KerasSequential: no layers given")
        for i, layer in enumerate(self._layers):
            if not (isinstance(layer, keras.layers.Layer) or callable(layer)):
                raise TypeError(f"KerasSequential: layer {i} is {type(layer).__name__}, not a Keras layer or a factory")
        self.loss = loss
        self.seed = seed
        self.remat = check_remat(remat, "KerasSequential")
        self.precision = check_precision(precision, "KerasSequential")
        self.device = device
        self.input_spec = None if input_spec is None else tree_map(_spec_of, input_spec)

    def __len__(self) -> int:
        return len(self._layers)

    def make_layer(self, index: int, input_spec: Tree) -> tuple[keras.layers.Layer, Tree]:
        """A fresh layer ``index`` built for ``input_spec``, and its symbolic output."""
        given = self._layers[index]
        keras.utils.set_random_seed(layer_seed(self.seed, index))
        if isinstance(given, keras.layers.Layer):
            layer = type(given).from_config(given.get_config())
        else:
            layer = given()
            if not isinstance(layer, keras.layers.Layer):
                raise TypeError(f"KerasSequential: factory of layer {index} returned {type(layer).__name__}")
        try:
            out = layer(tree_map(lambda s: _symbolic(_spec_of(s)), input_spec))
        except Exception as err:
            shown = tree_map(lambda s: str(_spec_of(s)), input_spec)
            raise PartitionError(f"layer {index}:{type(layer).__name__}: input {shown} does not fit: {err}") from err
        if isinstance(given, keras.layers.Layer) and given.built:
            layer.set_weights(given.get_weights())
        return layer, out

    def _traced(self, example_input: Tree | None, upto: int) -> list[tuple[keras.layers.Layer, Tree, Tree]]:
        """(layer, input spec, output spec) of layers [0, upto)."""
        if example_input is not None:
            self.input_spec = tree_map(_spec_of, example_input)
        if self.input_spec is None:
            raise PartitionError("KerasSequential: input shape unknown; pass input_spec= or call trace_specs first")
        x, out = self.input_spec, []
        for i in range(upto):
            layer, y = self.make_layer(i, x)
            y = tree_map(_spec_of, y)
            out.append((layer, x, y))
            x = y
        return out

    def layer_names(self) -> list[str]:
        names = []
        for i, layer in enumerate(self._layers):
            cls = type(layer).__name__ if isinstance(layer, keras.layers.Layer) else None
            if cls is None:
                keras.utils.set_random_seed(layer_seed(self.seed, i))
                cls = type(layer()).__name__
            names.append(f"{i}:{cls}")
        return names

    def layer_param_counts(self) -> list[int]:
        return [sum(int(np.prod(v.shape)) for v in layer.trainable_variables)
                for layer, _, _ in self._traced(None, len(self))]

    def trace_specs(self, example_input: Tree) -> list[Tree]:
        return [y for _, _, y in self._traced(example_input, len(self))]

    def layer_costs(self, method: str, example_input: Tree, *, repeats: int = 5) -> list[float]:
        if method == "flops":
            return self._flops(example_input)
        if method != "profile":
            raise ValueError(f"layer_costs: method must be 'flops' or 'profile', got {method!r}")
        x = to_tf(example_input)
        costs = []
        with self._device():
            for layer, _, _ in self._traced(example_input, len(self)):
                times = []
                for r in range(repeats + 1):  # the first run builds TF's kernels
                    start = time.perf_counter()
                    with tf.GradientTape() as tape:
                        leaves = [t for t in flatten(x)[0] if t.dtype.is_floating]
                        tape.watch(leaves)
                        out = layer(x)
                    roots = [t for t in flatten(out)[0] if t.dtype.is_floating]
                    grads = tape.gradient(roots, [*layer.trainable_variables, *leaves])
                    _ = [g.numpy() for g in grads if g is not None]  # wait for the work
                    if r:
                        times.append(time.perf_counter() - start)
                costs.append(statistics.median(times))
                x = out
        return costs

    def _flops(self, example_input: Tree) -> list[float]:
        """Floating-point operations of each layer's forward and backward (its
        weights' and inputs' gradients), counted by TensorFlow's graph profiler
        on the traced function: nothing runs."""
        from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

        costs = []
        quiet = tf.get_logger().level
        tf.get_logger().setLevel("ERROR")  # the v1 profiler announces its own deprecation on every call
        try:
            with self._device():
                for layer, x_spec, y_spec in self._traced(example_input, len(self)):
                    # The output gradients are inputs, as in a pipeline (a constant
                    # seed could be folded away).
                    @tf.function
                    def forward_backward(x, dy, layer=layer):
                        with tf.GradientTape() as tape:
                            leaves = [t for t in flatten(x)[0] if t.dtype.is_floating]
                            tape.watch(leaves)
                            out = layer(x)
                        roots = [t for t in flatten(out)[0] if t.dtype.is_floating]
                        # The outputs too: a linear layer's gradients do not read
                        # them, and the graph would drop the forward.
                        return out, tape.gradient(roots, [*layer.trainable_variables, *leaves], output_gradients=dy)

                    x_sig = tree_map(lambda t: tf.TensorSpec(t.shape, t.dtype), x_spec)
                    dy_sig = [tf.TensorSpec(t.shape, t.dtype) for t in flatten(y_spec)[0]
                              if tf.as_dtype(t.dtype).is_floating]
                    traced = forward_backward.get_concrete_function(x_sig, dy_sig)
                    graph = convert_variables_to_constants_v2(traced).graph
                    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
                    options["output"] = "none"
                    costs.append(float(tf.compat.v1.profiler.profile(graph=graph, options=options).total_float_ops))
        finally:
            tf.get_logger().setLevel(quiet)
        return costs

    def _device(self):
        return tf.device(self.device) if self.device else contextlib.nullcontext()

    def build_stage(self, spec: StageSpec, *, optimizer: Optimizer) -> KerasStage:
        if not 0 <= spec.start < spec.end <= len(self):
            raise PartitionError(f"stage {spec.index}: layers [{spec.start}, {spec.end}) "
                                 f"outside the model's {len(self)} layers")
        with self._device():
            traced = self._traced(None, spec.end)[spec.start:]
        layers = {spec.start + i: layer for i, (layer, _, _) in enumerate(traced)}
        return KerasStage(spec, layers, loss=self.loss, optimizer=optimizer, device=self.device,
                          remat=getattr(self, "remat", "none"), precision=getattr(self, "precision", "fp32"))


class KerasStage(VersionedParams):
    """One contiguous slice of a KerasSequential; see ``pipetrain.stages.base.Stage``."""

    framework = "tf"

    def __init__(self, spec: StageSpec, layers: dict[int, keras.layers.Layer], *, loss: Callable,
                 optimizer: Optimizer, device: str | None = None, remat: str = "none", precision: str = "fp32"):
        self.spec = spec
        self.remat = check_remat(remat, f"stage {spec.index}")
        self._casts = KerasCasts(check_precision(precision, f"stage {spec.index}"), tf)
        for layer in layers.values():
            if self._casts.on:
                check_masters(((v.path, str(v.dtype)) for v in layer.trainable_variables), f"stage {spec.index}")
            self._casts.adopt(layer)
        self.loss = loss
        self.device = device
        self._layers = layers
        self._names: dict[int, list[str]] = {i: _variable_names(i, layer) for i, layer in layers.items()}
        initial = {n: tf.identity(v.value) for i, layer in layers.items()
                   for n, v in zip(self._names[i], layer.trainable_variables)}
        self._all_names = sorted(initial)
        self._versions: dict[int, dict[str, tf.Tensor]] = {0: initial}
        self._latest = 0
        self._opt = _TensorOptimizer(optimizer)
        self.clip_norm = optimizer.clip_norm or None  # (the interpreter's grad_scale)
        self._opt_state = self._opt.init(initial)
        self._acc = {n: tf.zeros_like(p) for n, p in initial.items()}
        self._accumulated = 0
        self._pending: dict[int, tuple] = {}
        self._corr = corrections.StageCorrection(optimizer, initial, map=corrections.dict_map,
                                                 zeros_like=tf.zeros_like, sqrt=tf.sqrt)
        self.correction = self._corr.name

    def _device(self):
        return tf.device(self.device) if self.device else contextlib.nullcontext()

    def _run(self, params: dict[str, tf.Tensor], x: Tree) -> Tree:
        for i in self._layers:
            x = self._run_layer(i, params, x)
        return self._casts.outputs(x, last=self.spec.is_last)

    def _run_layer(self, i: int, params: dict[str, tf.Tensor], x: Tree) -> Tree:
        layer = self._layers[i]
        values = [params[n] for n in self._names[i]]
        with self._casts.scope():
            return layer.stateless_call(values, [v.value for v in layer.non_trainable_variables],
                                        self._casts.compute(x))[0]

    def _differentiated_run(self, params: dict[str, tf.Tensor], x: Tree) -> Tree:
        """``_run`` as the forward the tape differentiates, under ``tf.recompute_grad``
        per stage or per layer when ``remat`` says so."""
        if self.remat == "none":
            return self._run(params, x)
        if self.remat == "stage":
            return _recomputed(self._run, params, x)
        for i in self._layers:
            own = {n: params[n] for n in self._names[i]}
            x = _recomputed(lambda p, y, i=i: self._run_layer(i, p, y), own, x)
        return self._casts.outputs(x, last=self.spec.is_last)

    # ------------------------------------------------------------ compute

    def forward(self, k: int, inputs: Tree, *, version: int, targets: Tree | None = None,
                delay: int | None = None) -> Tree:
        if k in self._pending:
            raise RuntimeError(f"stage {self.spec.index}: forward of micro-batch {k} twice without its backward")
        delay = self._corr.delay(delay, f"stage {self.spec.index}, micro-batch {k}")
        with self._device():
            params = self._corr.forward_weights(self._params(version), version=version, delay=delay)
            x = to_tf(inputs)
            x_leaves = flatten(x)[0]
            watched = [t for t in x_leaves if t.dtype.is_floating] if not self.spec.is_first else []
            tape = tf.GradientTape()
            with tape:
                tape.watch([params[n] for n in self._all_names] + watched)
                out = self._differentiated_run(params, x)
                if self.spec.is_last:
                    out = self.loss(out, to_tf(targets))
        self._pending[k] = (tape, params, x, watched, out, version, delay)
        return float(out) if self.spec.is_last else out

    def backward(self, k: int, grad_outputs: Tree | None = None) -> Tree | None:
        if k not in self._pending:
            raise RuntimeError(f"stage {self.spec.index}: backward of micro-batch {k} without its forward")
        tape, params, x, watched, out, version, delay = self._pending.pop(k)
        with self._device():
            if self.spec.is_last:
                roots, seeds = [out], [tf.ones_like(out)]
            else:
                roots, seeds = _roots_and_seeds(out, to_tf(grad_outputs), self.spec.index)
            wrt = [params[n] for n in self._all_names] + watched
            grads = tape.gradient(roots, wrt, output_gradients=seeds,
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO) if roots and wrt else []
            weights = {n: tf.convert_to_tensor(g) for n, g in zip(self._all_names, grads)}
            weights = self._corr.correct(weights, now=self._params(self._latest), used=self._params(version),
                                         delay=delay)
            for name, g in weights.items():
                self._acc[name] = self._acc[name] + g
        self._accumulated += 1
        if self.spec.is_first:
            return None
        input_grads = iter(grads[len(self._all_names):])
        x_leaves, structure = flatten(x)
        return unflatten(structure, [next(input_grads) if t.dtype.is_floating else None for t in x_leaves])

    def grad_sq_norm(self) -> float:
        """The squared norm of the mean gradients the next update applies (float64, variable order)."""
        if self._accumulated == 0:
            return 0.0
        with self._device():
            return squared_norm(to_numpy(self._acc[n] / self._accumulated) for n in self._all_names)

    def update(self, *, new_version: int, grad_scale: float = 1.0) -> None:
        if new_version in self._versions:
            raise ValueError(f"stage {self.spec.index}: weight version {new_version} exists already")
        latest = self._params(self._latest)
        if self._accumulated == 0:
            self._versions[new_version] = dict(latest)  # nothing to apply
            self._corr.after_update(self._latest, new_version, latest, None)
        else:
            with self._device():
                mean = {n: g / self._accumulated for n, g in self._acc.items()}
                if grad_scale != 1.0:  # clipping
                    mean = {n: g * tf.cast(grad_scale, g.dtype) for n, g in mean.items()}
                self._versions[new_version], self._opt_state = self._opt.step(latest, mean, self._opt_state)
                self._corr.after_update(self._latest, new_version, latest, self._versions[new_version])
        self._latest = new_version
        self._acc = {n: tf.zeros_like(g) for n, g in self._acc.items()}
        self._accumulated = 0

    def evaluate(self, inputs: Tree, *, targets: Tree | None = None) -> Tree:
        with self._device():
            out = self._run(self._params(self._latest), to_tf(inputs))
            return float(self.loss(out, to_tf(targets))) if self.spec.is_last else out

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict[str, np.ndarray]:
        return flat_state.pack(self._versions, self._opt_state, self._acc, latest=self._latest,
                               accumulated=self._accumulated, to_numpy=_numpy_copy,
                               correction={**corrections.flat(self._corr.state), **self._corr.flat_steps()})

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        def convert(key: str, a: np.ndarray, like: tf.Tensor) -> tf.Tensor:
            if a.shape != tuple(like.shape) or str(a.dtype) != like.dtype.name:
                raise ValueError(f"stage {self.spec.index}: state {key!r} is {a.dtype}{list(a.shape)}, "
                                 f"expected {like.dtype.name}{list(like.shape)}")
            with self._device():
                return tf.identity(to_tf(a))

        restored = flat_state.unpack(state, stage=self.spec.index, names=self._all_names,
                                     template=self._versions[self._latest], opt_template=self._opt_state,
                                     convert=convert, correction_template=corrections.flat(self._corr.state),
                                     steps=self._corr.predicts)
        self._versions, self._opt_state, self._acc = restored.versions, restored.opt_state, restored.acc
        self._latest, self._accumulated = restored.latest, restored.accumulated
        self._corr.state = corrections.unflat(restored.correction, self._corr.state)
        self._corr.steps = restored.steps
        self._pending.clear()


# ---------------------------------------------------------------- optimizer

def _recomputed(fn: Callable, params: dict[str, tf.Tensor], x: Tree) -> Tree:
    """``fn(params, x)`` whose backward recomputes it (``tf.recompute_grad``), which
    takes and gives flat tensors: the parameters and x's leaves go in as arguments."""
    names = sorted(params)
    leaves, structure = flatten(x)

    @tf.recompute_grad
    def flat(*args):
        return fn(dict(zip(names, args[:len(names)])), unflatten(structure, list(args[len(names):])))

    return flat(*[params[n] for n in names], *leaves)


class _TensorOptimizer:
    """``pipetrain.optim.Optimizer`` as pure functions on tf tensor maps, in optax's order."""

    def __init__(self, opt: Optimizer):
        if not isinstance(opt, Optimizer):
            raise TypeError(f"Keras stage: optimizer must be a pipetrain.optim.Optimizer, got {type(opt).__name__}")
        self.opt = opt

    def init(self, params: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return tensor_state(self.opt, params, zeros_like=tf.zeros_like, count=tf.zeros((), tf.int64))

    def step(self, params, grads, state):
        return tensor_step(self.opt, params, grads, state, square=tf.square, sqrt=tf.sqrt,
                           power=lambda b, count, like: tf.pow(tf.constant(b, like.dtype), tf.cast(count, like.dtype)))


# ---------------------------------------------------------------- helpers

def _variable_names(index: int, layer: keras.layers.Layer) -> list[str]:
    """``"{layer index}.{variable name}"``; a name repeated inside the layer gets its position."""
    short = [v.name for v in layer.trainable_variables]
    return [f"{index}.{s}" if short.count(s) == 1 else f"{index}.{j}.{s}" for j, s in enumerate(short)]


def _roots_and_seeds(out: Tree, grad_outputs: Tree, stage: int) -> tuple[list, list]:
    """Each floating output leaf and its gradient (cast to the output's dtype)."""
    pairs = pair_with_gradients(out, grad_outputs, is_array=tf.is_tensor, stage=stage)
    pairs = [(o, tf.cast(g, o.dtype)) for o, g in pairs if o.dtype.is_floating]
    return [o for o, _ in pairs], [g for _, g in pairs]


def _numpy_copy(t: tf.Tensor) -> np.ndarray:
    return np.array(to_numpy(t), copy=True)

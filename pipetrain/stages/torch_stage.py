"""PyTorch adapter: a model as a list of ``nn.Module`` layers, cut into stages.

Each layer is called as ``layer(x)`` with ``x`` the whole boundary pytree (a
tensor, or a tuple / list / dict of them) and returns the next one. The loss
``loss(outputs, targets) -> scalar tensor`` (mean over the micro-batch) runs on
the last stage.

Weight stashing: a stage holds ``{version: {param name: tensor}}`` and runs
its layers with the tensors of the version a forward names in place of their
parameters (``torch_swap``, a lean ``torch.func.functional_call``), so
forward and backward of a micro-batch see the same weights however many
updates happen in between. Each forward builds its own autograd graph
from fresh leaf views of that version's tensors (views, not copies).

The optimizer is applied functionally on tensors (``torch_optim.py``) rather
than through ``torch.optim``: ``torch.optim`` updates the ``Parameter`` objects
it holds in place and keys its state by their identity, which is wrong when
several weight versions must stay alive, and its state would need pickling.
Here an update reads the latest version and writes new tensors for the new
one; the state is a flat map of tensors that checkpoints as is. The update
rules follow optax's (``optax.adam``/``adamw``/``sgd``) step by step, so a
torch stage and a JAX stage with the same ``Optimizer`` agree to rounding.

Rematerialization (``remat``, ``pipetrain.memory.REMAT``): ``"stage"`` runs
the forward under ``torch.utils.checkpoint`` (non-reentrant) as one
function of (parameters, input), ``"layer"`` each layer as one; autograd
then keeps only those inputs and recomputes the rest in the backward. The
parameters are arguments of what is checkpointed, not the modules' own, so
the recomputation reads the stashed version the forward read.

Precision (``pipetrain.stages.precision``): under ``"bf16"`` the parameters
(and float buffers) are cast to bfloat16 inside the graph of each forward, so
autograd returns float32 gradients of the float32 masters; see there why
explicit casts and not ``torch.autocast``.

Buffers (``register_buffer``) are constants: they are not versioned and not
checkpointed, so a layer that changes a buffer in forward (BatchNorm in
training mode) is not supported.
"""
from __future__ import annotations

import copy
from functools import partial
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from pipetrain.memory import check_remat
from pipetrain.optim import Optimizer, squared_norm
from pipetrain.stages import corrections, flat_state, torch_split_backward, torch_swap
from pipetrain.stages.precision import TorchCasts, check_masters, check_precision
from pipetrain.stages.torch_optim import TensorOptimizer as _TensorOptimizer
from pipetrain.stages.torch_trees import grad_leaf, input_gradient_tree, meta_tensor, numpy_copy
from pipetrain.stages.versions import VersionedParams
from pipetrain.stages.base import PartitionError, StageSpec, TensorSpec
from pipetrain.stages.tensors import to_torch
from pipetrain.tree import Tree, dtype_name, flatten, pair_with_gradients, tree_map

LayerLike = nn.Module | Callable[[], nn.Module]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def layer_seed(seed: int, index: int) -> int:
    """The torch seed a layer factory runs under: a function of (model seed, global layer index)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> 1)


class _Chain(nn.ModuleDict):
    """The stage's layers keyed by their global index, so parameter names are
    ``"{layer index}.{param}"`` in every partition."""

    def forward(self, x: Tree) -> Tree:
        for layer in self.values():
            x = layer(x)
        return x


def split_policy(value: bool | str) -> str:
    """``TorchSequential(split_backward=...)`` as the interpreter's policy: "never", "always" or "auto"."""
    policies = {False: "never", True: "always", "never": "never", "always": "always", "auto": "auto"}
    if not isinstance(value, (bool, str)) or value not in policies:
        raise ValueError(f"TorchSequential: split_backward must be True, False or 'auto', got {value!r}")
    return policies[value]


class TorchSequential:
    """A SequentialModel of torch layers.

    ``modules``: an ``nn.Sequential``, or a list whose items are modules or
    factories (``lambda: nn.Linear(4, 8)``). A factory runs under
    ``torch.manual_seed(layer_seed(seed, index))`` inside a forked RNG, so every
    partition of the model starts from the same weights; a module given
    already built keeps its weights (``seed`` does not touch it).

    ``split_backward``: whether stages after the first compute a backward's
    input gradient before its weight gradients, so the runtime sends it in
    between (``torch_split_backward``); the same bits as one fused backward.

    - ``"auto"`` (default): only the backward the previous stage waits for to
      end its step, the last one before the update of a flush schedule (gpipe,
      1f1b). There the earlier send comes off the bubble between two steps;
      elsewhere the stages are busy anyway and a split only costs its
      bookkeeping (about +10% of a backward on small CPU kernels).
    - ``True``: every backward that sends a gradient.
    - ``False``: none.

    ``bench/vs_torch_pipelining.py`` measures all three.
    """

    framework = "torch"

    def __init__(self, modules: nn.Sequential | Sequence[LayerLike], *, loss: Callable[[Any, Any], Any],
                 seed: int = 0, device: str | None = None, split_backward: bool | str = "auto",
                 remat: str = "none", precision: str = "fp32"):
        self._layers: list[LayerLike] = (list(modules.children()) if isinstance(modules, nn.Sequential)
                                         else list(modules))
        if not self._layers:
            raise ValueError("TorchSequential: no layers given")
        for i, layer in enumerate(self._layers):
            if not (isinstance(layer, nn.Module) or callable(layer)):
                raise TypeError(f"TorchSequential: layer {i} is {type(layer).__name__}, not an nn.Module or a factory")
        self.loss = loss
        self.seed = seed
        self.device = device
        self.split_backward = split_policy(split_backward)
        self.remat = check_remat(remat, "TorchSequential")
        self.precision = check_precision(precision, "TorchSequential")
        self._meta: dict[int, nn.Module] = {}

    def __len__(self) -> int:
        return len(self._layers)

    def make_layer(self, index: int, *, device: str | torch.device = "cpu") -> nn.Module:
        """A fresh copy of layer ``index`` on ``device`` (its initial weights)."""
        layer = self._layers[index]
        if isinstance(layer, nn.Module):
            return copy.deepcopy(layer).to(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(layer_seed(self.seed, index))
            with torch.device(device):
                built = layer()
        if not isinstance(built, nn.Module):
            raise TypeError(f"TorchSequential: factory of layer {index} returned {type(built).__name__}, "
                            "not an nn.Module")
        return built.to(device)

    def _meta_layer(self, index: int) -> nn.Module:
        if index not in self._meta:
            self._meta[index] = self.make_layer(index, device="meta")
        return self._meta[index]

    def layer_names(self) -> list[str]:
        return [f"{i}:{type(self._meta_layer(i)).__name__}" for i in range(len(self))]

    def layer_param_counts(self) -> list[int]:
        return [sum(p.numel() for p in self._meta_layer(i).parameters()) for i in range(len(self))]

    def trace_specs(self, example_input: Tree) -> list[Tree]:
        x = tree_map(meta_tensor, example_input)
        specs = []
        for i in range(len(self)):
            x = self._run_layer_checked(self._meta_layer(i), i, x)
            specs.append(tree_map(lambda t: TensorSpec(tuple(t.shape), dtype_name(t)), x))
        return specs

    def _run_layer_checked(self, layer: nn.Module, i: int, x: Tree) -> Tree:
        try:
            with torch.no_grad():
                return layer(x)
        except Exception as err:
            shown = tree_map(lambda t: str(TensorSpec(tuple(t.shape), dtype_name(t))), x)
            raise PartitionError(f"layer {self.layer_names()[i]}: input {shown} does not fit: {err}") from err

    def layer_costs(self, method: str, example_input: Tree, *, repeats: int = 5) -> list[float]:
        from pipetrain.stages import torch_costs

        if method == "flops":
            return torch_costs.layer_flops(self, example_input)
        if method == "profile":
            return torch_costs.layer_profile(self, example_input, repeats=repeats)
        raise ValueError(f"layer_costs: method must be 'flops' or 'profile', got {method!r}")

    def build_stage(self, spec: StageSpec, *, optimizer: Optimizer) -> TorchStage:
        if not 0 <= spec.start < spec.end <= len(self):
            raise PartitionError(f"stage {spec.index}: layers [{spec.start}, {spec.end}) "
                                 f"outside the model's {len(self)} layers")
        device = torch.device(self.device or default_device())
        chain = _Chain({str(i): self.make_layer(i, device=device) for i in range(spec.start, spec.end)})
        return TorchStage(spec, chain, loss=self.loss, optimizer=optimizer, device=device,
                          split_backward=self.split_backward, remat=getattr(self, "remat", "none"),
                          precision=getattr(self, "precision", "fp32"))


class TorchStage(VersionedParams):
    """One contiguous slice of a TorchSequential; see ``pipetrain.stages.base.Stage``."""

    framework = "torch"

    def __init__(self, spec: StageSpec, chain: nn.Module, *, loss: Callable, optimizer: Optimizer,
                 device: torch.device, split_backward: str = "auto", remat: str = "none",
                 precision: str = "fp32"):
        self.spec = spec
        self.remat = check_remat(remat, f"stage {spec.index}")
        self._casts = TorchCasts(check_precision(precision, f"stage {spec.index}"), torch)
        if self._casts.on:
            check_masters(((n, dtype_name(p)) for n, p in chain.named_parameters()), f"stage {spec.index}")
        self.device = device
        self.loss = loss
        self._chain = chain
        self._opt = _TensorOptimizer(optimizer)
        self.clip_norm = optimizer.clip_norm or None  # (the interpreter's grad_scale)
        initial = {name: p.detach().clone() for name, p in chain.named_parameters()}
        self._names = sorted(initial)
        self._versions: dict[int, dict[str, torch.Tensor]] = {0: initial}
        self._latest = 0
        self._opt_state = self._opt.init(initial)
        self._acc = {n: torch.zeros_like(p) for n, p in initial.items()}
        self._accumulated = 0
        self._pending: dict[int, tuple] = {}
        self._corr = corrections.StageCorrection(optimizer, initial, map=corrections.dict_map,
                                                 zeros_like=torch.zeros_like, sqrt=torch.sqrt)
        self.correction = self._corr.name
        # k -> (the weights F k read, its delay): DC-ASGD's w_used, kept by reference because a split
        # backward's weight half runs after the schedule has released that version.
        self._read: dict[int, tuple[dict, int]] = {}
        # A stage with inputs to differentiate can let its input gradient leave
        # before it computes its weight gradients (see torch_split_backward);
        # the interpreter picks which backwards by this policy. The first
        # stage has no input gradient to send.
        can_split = not spec.is_first and torch_split_backward.available()
        self.split_backward = split_policy(split_backward) if can_split else "never"
        self._weights_pending: dict[int, torch_split_backward.PendingWeights | None] = {}

    # ------------------------------------------------------------ compute

    def _run(self, params: dict[str, torch.Tensor], x: Tree, *, remat: str | None = None) -> Tree:
        """The stage's layers on ``x`` with ``params`` (a weight version's leaf views)."""
        remat, casts = self.remat if remat is None else remat, self._casts
        x = casts.compute(x)
        if remat == "none":
            return casts.outputs(_call_with(self._chain, params, x, casts), last=self.spec.is_last)
        from torch.utils.checkpoint import checkpoint

        if remat == "stage":
            out = checkpoint(_call_with, self._chain, params, x, casts, use_reentrant=False)
            return casts.outputs(out, last=self.spec.is_last)
        for name, layer in self._chain.items():
            prefix = name + "."
            own = {n[len(prefix):]: p for n, p in params.items() if n.startswith(prefix)}
            x = checkpoint(_call_with, layer, own, x, casts, use_reentrant=False)
        return casts.outputs(x, last=self.spec.is_last)

    def forward(self, k: int, inputs: Tree, *, version: int, targets: Tree | None = None,
                delay: int | None = None) -> Tree:
        if k in self._pending:
            raise RuntimeError(f"stage {self.spec.index}: forward of micro-batch {k} twice without its backward")
        delay = self._corr.delay(delay, f"stage {self.spec.index}, micro-batch {k}")
        weights = self._corr.forward_weights(self._params(version), version=version, delay=delay)
        params = {n: p.detach().requires_grad_(p.is_floating_point()) for n, p in weights.items()}
        if self._corr.corrects_gradients:
            self._read[k] = (self._params(version), delay)
        x = to_torch(inputs, device=self.device)
        if not self.spec.is_first:
            x = tree_map(grad_leaf, x)
        with torch.enable_grad():
            out = self._run(params, x)
            if self.spec.is_last:
                out = self.loss(out, to_torch(targets, device=self.device))
        self._pending[k] = (params, x, out)
        if self.spec.is_last:
            return float(out.detach())
        return tree_map(torch.Tensor.detach, out)

    def backward(self, k: int, grad_outputs: Tree | None = None) -> Tree | None:
        if self.split_backward == "always":
            grad_inputs = self.backward_input(k, grad_outputs)
            self.backward_weights(k)
            return grad_inputs
        return self._fused_backward(k, *self._take_pending(k), grad_outputs)

    def backward_input(self, k: int, grad_outputs: Tree | None = None) -> Tree:
        """The first half of a split backward: the gradient of the inputs only.
        ``backward_weights(k)`` must follow before any other call on this stage."""
        params, x, out = self._take_pending(k)
        x_leaves, x_structure = flatten(x)
        wrt = [t for t in x_leaves if t.requires_grad]
        if not wrt:  # only integer inputs: nothing to send early, one fused backward
            self._weights_pending[k] = None
            return self._fused_backward(k, params, x, out, grad_outputs)
        roots, seeds = self._roots(out, grad_outputs, seed_loss=False)
        grads, self._weights_pending[k] = torch_split_backward.input_gradients(roots, seeds, wrt, params)
        return input_gradient_tree(x_leaves, x_structure, grads)

    def _take_pending(self, k: int) -> tuple:
        if k not in self._pending:
            raise RuntimeError(f"stage {self.spec.index}: backward of micro-batch {k} without its forward")
        return self._pending.pop(k)

    def _roots(self, out: Tree, grad_outputs: Tree | None, *, seed_loss: bool) -> tuple[list, list | None]:
        if self.spec.is_last:  # the loss, seeded with 1 (None lets the split seed it itself)
            return [out], [torch.ones_like(out)] if seed_loss else None
        pairs = pair_with_gradients(out, to_torch(grad_outputs, device=self.device),
                                    is_array=lambda t: isinstance(t, torch.Tensor), stage=self.spec.index)
        pairs = [(o, g.to(o.dtype)) for o, g in pairs if o.requires_grad]
        return [o for o, _ in pairs], [g for _, g in pairs]

    def _fused_backward(self, k: int, params: dict, x: Tree, out: Tree, grad_outputs: Tree | None,
                        on_final: Callable[[str], None] | None = None) -> Tree | None:
        roots, seeds = self._roots(out, grad_outputs, seed_loss=True)
        trainable = [n for n in self._names if params[n].requires_grad]
        x_leaves, x_structure = flatten(x)
        x_wrt = [t for t in x_leaves if t.requires_grad]
        wrt = [params[n] for n in trainable] + x_wrt
        if roots and wrt and (self._accumulated or on_final) and not self._corr.corrects_gradients:
            # Autograd adds each weight gradient into the accumulator itself, as it is made (the
            # leaf's .grad is the accumulator: AccumulateGrad's in-place add, the same bits as
            # ``acc += g``), while the gradient is still in cache; a separate pass afterwards
            # reads both back from memory. Streaming (``on_final``), a hook hears each sum as
            # soon as it is final; the first backward after an update lets autograd make it.
            first = self._accumulated == 0
            hooks = [params[n].register_post_accumulate_grad_hook(partial(self._final, n, first, on_final))
                     for n in trainable] if on_final else []
            for n in trainable:
                params[n].grad = None if first else self._acc[n]
            try:
                torch.autograd.backward(roots, grad_tensors=seeds, inputs=wrt)
            finally:
                for hook in hooks:
                    hook.remove()
            for n in trainable if first else ():
                if params[n].grad is None:  # not reached by this loss: a zero gradient, as _accumulate has it
                    self._acc[n].zero_()
            self._accumulated += 1
            x_grads = [t.grad for t in x_wrt]
        else:
            grads = torch.autograd.grad(roots, wrt, grad_outputs=seeds, allow_unused=True) if roots and wrt else []
            self._accumulate(k, zip(trainable, grads))
            x_grads = grads[len(trainable):]
        return None if self.spec.is_first else input_gradient_tree(x_leaves, x_structure, x_grads)

    def _final(self, name: str, first: bool, on_final: Callable[[str], None], leaf: torch.Tensor) -> None:
        if first:
            self._acc[name] = leaf.grad
        on_final(name)

    def backward_streaming(self, k: int, grad_outputs: Tree | None, on_final: Callable[[str], None]) -> Tree | None:
        """``backward``, calling ``on_final(name)`` as soon as each parameter's accumulated sum is
        final, so the replica reduction sends it while the rest of the backward runs
        (``runtime/replicas.py``). A split backward, or a correction that changes every gradient
        (DC-ASGD) after the backward, reports nothing: its sums are sent after it."""
        if self.split_backward == "always" or self._corr.corrects_gradients:
            return self.backward(k, grad_outputs)
        return self._fused_backward(k, *self._take_pending(k), grad_outputs, on_final=on_final)

    @property
    def streams_gradients(self) -> bool:
        """Whether the replica reduction should send buckets during the backward: on the host only.
        A bucket leaves as a host copy made in the hook, which on a GPU would wait for the kernels
        queued so far and stall the rest of the backward (an asynchronous copy is not built)."""
        return self.device.type == "cpu"

    def gradient_order(self) -> list[str]:
        """The parameters in the order a backward finishes their gradients, roughly: the last layer's first."""
        return [name for name, _ in reversed(list(self._chain.named_parameters()))]

    def backward_weights(self, k: int) -> None:
        """The second half of a split backward: accumulate micro-batch k's weight gradients."""
        if k not in self._weights_pending:
            raise RuntimeError(f"stage {self.spec.index}: weight gradients of micro-batch {k} without its "
                               f"backward_input")
        pending = self._weights_pending.pop(k)
        if pending is not None:
            self._accumulate(k, torch_split_backward.weight_gradients(pending))

    def _accumulate(self, k: int, named_grads: Any) -> None:
        first = self._accumulated == 0
        if self._corr.corrects_gradients:
            used, delay = self._read.pop(k)
            grads = dict(named_grads)  # DC-ASGD corrects every parameter: no path is a zero gradient
            grads = {n: torch.zeros_like(self._acc[n]) if grads.get(n) is None else grads[n] for n in self._names}
            named_grads = self._corr.correct(grads, now=self._params(self._latest), used=used, delay=delay).items()
        for name, g in named_grads:
            # The first gradient after an update becomes the accumulator: no
            # zeroing pass at the update and no add here (a pass over every
            # parameter each, about 7% of a backward on the benchmark MLP).
            if g is None:
                if first:
                    self._acc[name].zero_()
            elif first:
                self._acc[name] = g
            else:
                self._acc[name] += g
        self._accumulated += 1

    def grad_sq_norm(self) -> float:
        """The squared norm of the mean gradients the next update applies (float64, name order)."""
        self._check_weights_done("the gradient norm")
        if self._accumulated == 0:
            return 0.0
        return squared_norm((self._acc[n] / self._accumulated).to(torch.float64).cpu().numpy() for n in self._names)

    def _check_weights_done(self, what: str) -> None:
        if self._weights_pending:
            raise RuntimeError(f"stage {self.spec.index}: {what} with the weight gradients of micro-batches "
                               f"{sorted(self._weights_pending)} not computed (call backward_weights first)")

    def update(self, *, new_version: int, grad_scale: float = 1.0) -> None:
        self._check_weights_done("update")
        if new_version in self._versions:
            raise ValueError(f"stage {self.spec.index}: weight version {new_version} exists already")
        latest = self._params(self._latest)
        if self._accumulated == 0:
            # Nothing to apply: the new version is the latest one, unchanged.
            self._versions[new_version] = dict(latest)
            self._corr.after_update(self._latest, new_version, latest, None)
        else:
            # The accumulator holds the sum of the gradients; the optimizer
            # averages it (folded into its first pass where it can). The next
            # backward replaces it (see backward), so it needs no zeroing.
            self._versions[new_version], self._opt_state = self._opt.step(latest, self._acc, self._opt_state,
                                                                          summed=self._accumulated,
                                                                          scale=grad_scale)
            self._corr.after_update(self._latest, new_version, latest, self._versions[new_version])
        self._latest = new_version
        self._accumulated = 0

    def evaluate(self, inputs: Tree, *, targets: Tree | None = None) -> Tree:
        with torch.no_grad():
            out = self._run(self._params(self._latest), to_torch(inputs, device=self.device), remat="none")
            if self.spec.is_last:
                return float(self.loss(out, to_torch(targets, device=self.device)))
        return out

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict[str, np.ndarray]:
        if self._weights_pending:
            raise RuntimeError(f"stage {self.spec.index}: state_dict between backward_input and backward_weights "
                               f"of micro-batches {sorted(self._weights_pending)}")
        # With nothing accumulated the accumulator holds stale values (the next
        # backward overwrites them): a checkpoint stores zeros, its meaning.
        acc = self._acc if self._accumulated else {n: torch.zeros_like(t) for n, t in self._acc.items()}
        return flat_state.pack(self._versions, self._opt_state, acc, latest=self._latest,
                               accumulated=self._accumulated, to_numpy=numpy_copy,
                               correction={**corrections.flat(self._corr.state), **self._corr.flat_steps()})

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        def convert(key: str, a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
            t = to_torch(a, device=self.device).clone()
            if t.shape != like.shape or t.dtype != like.dtype:
                raise ValueError(f"stage {self.spec.index}: state {key!r} is {dtype_name(t)}{list(t.shape)}, "
                                 f"expected {dtype_name(like)}{list(like.shape)}")
            return t

        restored = flat_state.unpack(state, stage=self.spec.index, names=self._names,
                                     template=self._versions[self._latest], opt_template=self._opt_state,
                                     convert=convert, correction_template=corrections.flat(self._corr.state),
                                     steps=self._corr.predicts)
        self._versions, self._opt_state, self._acc = restored.versions, restored.opt_state, restored.acc
        self._latest, self._accumulated = restored.latest, restored.accumulated
        self._corr.state = corrections.unflat(restored.correction, self._corr.state)
        self._corr.steps = restored.steps
        self._pending.clear()
        self._weights_pending.clear()
        self._read.clear()


# ---------------------------------------------------------------- helpers

def _call_with(module: nn.Module, params: dict[str, torch.Tensor], x: Tree, casts: TorchCasts) -> Tree:
    """``module(x)`` with ``params`` in place of its own (what remat checkpoints; under
    bf16 the casts to the compute dtype inside it, so a recomputation redoes them)."""
    return torch_swap.call_with(module, casts.module_values(module, params), x)

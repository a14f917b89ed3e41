"""What tied weights (``pipetrain.ties``) need from each framework's stage, kept out of the adapters.

Every function dispatches on the stage's (or model's) ``framework`` and
reaches into the adapter's own bookkeeping, which is small and alike in the
three: the gradient accumulator (``_acc``: a tree of JAX arrays; a dict of
torch / TF tensors by name), how many backwards it holds (``_count`` /
``_accumulated``), and the names the state uses. The tied gradients move as
host numpy arrays of the parameter's dtype: the sum of two copies' gradients
is then one numpy addition, the same bits in every framework and process.

Parameters (the copies' initial values) go through ``state_dict`` and
``load_state_dict``, which every stage has; that runs once, on a fresh stage.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

from pipetrain.optim import squared_norm
from pipetrain.stages.base import StageSpec, TensorSpec
from pipetrain.tree import dtype_name


# ---------------------------------------------------------------- names and shapes, from the model

def layer_param_specs(model: Any, layer: int) -> dict[str, TensorSpec]:
    """Layer ``layer``'s parameters as its stage's state names them, with their specs."""
    framework = getattr(model, "framework", None)
    if hasattr(model, "part_of"):  # a mixed model: the part's own names, layers counted within the part
        i, part = model.part_of(StageSpec(0, 1, layer, layer + 1))
        return layer_param_specs(part, layer - model.offsets[i])
    if framework == "jax":
        from pipetrain.stages import jax_trees

        params = model._trace()[layer][1]
        prefix = model.layer_names()[layer]
        return {f"{prefix}/{name}" if name else prefix: TensorSpec(tuple(x.shape), dtype_name(x))
                for name, x in jax_trees.named_leaves(params)}
    if framework == "torch":
        built = model.make_layer(layer, device="cpu")
        return {f"{layer}.{name}": TensorSpec(tuple(p.shape), str(p.dtype).removeprefix("torch."))
                for name, p in built.named_parameters()}
    if framework == "tf":
        from pipetrain.stages.tf_stage import _variable_names

        built = model._traced(None, layer + 1)[layer][0]
        return {name: TensorSpec(tuple(v.shape), v.dtype if isinstance(v.dtype, str) else v.dtype.name)
                for name, v in zip(_variable_names(layer, built), built.trainable_variables)}
    raise NotImplementedError(f"tied weights: a {type(model).__name__} model (framework {framework!r}) does not "
                              f"say what its parameters are named")


# ---------------------------------------------------------------- parameters, through the state

def read_param(stage: Any, name: str) -> np.ndarray:
    state = stage.state_dict()
    key = f"v{int(state['meta/latest'])}/{name}"
    if key not in state:
        raise KeyError(f"stage {stage.spec.index}: has no parameter {name!r} (state key {key!r})")
    return np.array(state[key], copy=True)


def write_params(stage: Any, values: dict[str, np.ndarray]) -> None:
    """Set the latest version's ``values`` (a fresh stage: nothing in flight)."""
    state = stage.state_dict()
    latest = int(state["meta/latest"])
    for name, value in values.items():
        key = f"v{latest}/{name}"
        if key not in state:
            raise KeyError(f"stage {stage.spec.index}: has no parameter {name!r} (state key {key!r})")
        state[key] = np.asarray(value, dtype=state[key].dtype).reshape(state[key].shape)
    stage.load_state_dict(state)


# ---------------------------------------------------------------- accumulated gradients

def accumulated(stage: Any) -> int:
    return int(stage._count if stage.framework == "jax" else stage._accumulated)


def read_grads(stage: Any, names: tuple[str, ...], *, copy: bool = True) -> list[np.ndarray]:
    """The accumulated (summed, not averaged) gradients of ``names``, as host copies; with
    ``copy=False`` as views where the accumulator is on the host (JAX and torch), for a caller
    that knows the stage replaces its accumulator rather than changing it from here on."""
    if stage.framework == "jax":
        from pipetrain.stages import jax_trees

        leaves = dict(jax_trees.named_leaves(stage._acc))
        return [np.array(leaves[n], copy=True) if copy else np.asarray(leaves[n]) for n in names]
    if stage.framework == "torch":
        views = [stage._acc[n].detach().cpu().numpy() for n in names]
        return [v.copy() for v in views] if copy else views
    if stage.framework == "tf":
        return [np.array(stage._acc[n].numpy(), copy=True) for n in names]
    raise NotImplementedError(f"tied weights: no gradient access for a {stage.framework!r} stage")


def write_grads(stage: Any, values: dict[str, np.ndarray], *, copy: bool = True) -> None:
    """Replace the accumulated gradients of the names in ``values`` (between backwards and the update).
    With ``copy=False`` a torch stage takes the writable arrays it is given as its accumulator (the
    update may change them in place): for a caller that hands over arrays no one else uses."""
    if stage.framework == "jax":
        import jax

        from pipetrain.stages import jax_trees

        def put(path: tuple, leaf: Any) -> Any:
            name = jax_trees.path_name(path)
            return jax.device_put(values[name], stage.device) if name in values else leaf

        stage._acc = jax.tree_util.tree_map_with_path(put, stage._acc)
    elif stage.framework == "torch":
        import torch

        for n, v in values.items():
            owned = v if not copy and isinstance(v, np.ndarray) and v.flags.writeable else np.array(v, copy=True)
            stage._acc[n] = torch.from_numpy(owned).to(stage._acc[n].device)
    elif stage.framework == "tf":
        import tensorflow as tf

        for n, v in values.items():
            stage._acc[n] = tf.constant(v)
    else:
        raise NotImplementedError(f"tied weights: no gradient access for a {stage.framework!r} stage")


def grad_sq_norm_without(stage: Any, skip: tuple[str, ...]) -> float:
    """``stage.grad_sq_norm()`` leaving out ``skip`` (copies counted at their tie's first copy),
    by the same formula and in the same order as each adapter's own."""
    if not skip:
        return stage.grad_sq_norm()
    count = accumulated(stage)
    if count == 0:
        return 0.0
    if stage.framework == "jax":
        import jax
        import jax.numpy as jnp

        from pipetrain.stages import jax_trees

        mean = stage._mean_jit(stage._acc, jnp.asarray(count, jnp.float32))
        return squared_norm(jax.device_get([x for n, x in jax_trees.named_leaves(mean) if n not in skip]))
    if stage.framework == "torch":
        import torch

        return squared_norm((stage._acc[n] / count).to(torch.float64).cpu().numpy()
                            for n in stage._names if n not in skip)
    if stage.framework == "tf":
        from pipetrain.stages.tensors import to_numpy

        return squared_norm(to_numpy(stage._acc[n] / count) for n in stage._all_names if n not in skip)
    raise NotImplementedError(f"tied weights: no gradient access for a {stage.framework!r} stage")


# ---------------------------------------------------------------- pipedream: a tie carried on the F/B messages
# (runtime/tie_carry.py). Each adapter's forward of k reads its weight version once, from
# ``stage._versions[version]`` (a tree of JAX arrays, or a dict of torch / TF tensors by name), and keeps
# what it read for k's backward (JAX: the VJP closed over it; torch: the leaf views autograd differentiates;
# Keras: the tensors its tape watched). So a value swapped into that version for the forward's duration is
# also the one k's backward differentiates, its gradient lands in the accumulator under the copy's own name,
# and the version every other micro-batch reads is put back untouched.

CARRIED_FRAMEWORKS = ("jax", "torch", "tf")


def check_carried_holder(stage: Any, what: str) -> None:
    """Refuse a holder the carried tie is not built for."""
    if stage.framework not in CARRIED_FRAMEWORKS:
        raise NotImplementedError(f"stage {stage.spec.index}: tied weights under pipedream ({what}) are "
                                  f"implemented for JAX, torch and Keras stages, not {stage.framework!r} ones; "
                                  f"use gpipe, 1f1b or 2bw with this model")
    if getattr(stage, "split_backward", "never") == "always":
        # A split backward's weight gradients come after its input gradient is sent, and so after
        # the head's gradient of the tie would have to ride down on it.
        raise NotImplementedError(f"stage {stage.spec.index}: tied weights under pipedream ({what}) on a stage "
                                  f"with split_backward='always' are not implemented; use 'auto' or False")


def param_at(stage: Any, version: int, name: str) -> np.ndarray:
    """Weight version ``version``'s parameter ``name`` as a host copy."""
    check_carried_holder(stage, "reading the owner's value")
    if stage.framework == "jax":
        from pipetrain.stages import jax_trees

        leaves = dict(jax_trees.named_leaves(stage._params(version)))
        return np.array(leaves[name], copy=True)
    value = stage._params(version)[name]
    if stage.framework == "torch":
        return value.detach().cpu().numpy().copy()
    return np.array(value.numpy(), copy=True)


@contextmanager
def params_replaced(stage: Any, version: int, values: dict[str, np.ndarray]) -> Iterator[None]:
    """Within the block, weight version ``version`` reads ``values`` (by name) instead of its own;
    the version itself is left as it was."""
    check_carried_holder(stage, "using the owner's value")
    if not values:
        yield
        return
    own = stage._params(version)
    stage._versions[version] = _with_values(stage, own, values)
    try:
        yield
    finally:
        stage._versions[version] = own


def _with_values(stage: Any, own: Any, values: dict[str, np.ndarray]) -> Any:
    """A new version tree: ``own`` with ``values`` in place of the named tensors (own's dtype and device)."""
    if stage.framework == "jax":
        import jax

        from pipetrain.stages import jax_trees

        def put(path: tuple, leaf: Any) -> Any:
            name = jax_trees.path_name(path)
            return (jax.device_put(np.asarray(values[name], dtype=leaf.dtype), stage.device) if name in values
                    else leaf)

        return jax.tree_util.tree_map_with_path(put, own)
    missing = sorted(set(values) - set(own))
    if missing:
        raise KeyError(f"stage {stage.spec.index}: has no parameters {missing} to replace")
    if stage.framework == "torch":
        import torch

        return {**own, **{n: torch.from_numpy(np.array(v, dtype=own[n].detach().cpu().numpy().dtype))
                          .to(own[n].device) for n, v in values.items()}}
    import tensorflow as tf

    with stage._device():
        return {**own, **{n: tf.constant(np.asarray(v), dtype=own[n].dtype) for n, v in values.items()}}

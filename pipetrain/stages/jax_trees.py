"""What the JAX adapter uses besides its model and stage: NNX modules as
Layers, specs and pytree plumbing, and per-layer costs (split from
``jax_stage.py`` so that it stays short; nothing here holds state)."""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pipetrain.stages.base import TensorSpec
from pipetrain.stages.jax_layers import Layer
from pipetrain.stages.tensors import to_jax
from pipetrain.tree import Tree, dtype_name
from pipetrain.tree import tree_map as boundary_map

LayerLike = Layer | nnx.Module | Callable[[nnx.Rngs], nnx.Module] | tuple[str, Any]


# ---------------------------------------------------------------- NNX modules as Layers

def as_layer(item: LayerLike, index: int) -> Layer:
    name = None
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
        name, item = item
    if isinstance(item, Layer):
        return item if name is None else dataclasses.replace(item, name=name)
    if isinstance(item, nnx.Module):
        graphdef, params = _split_params(item, index)
        # numpy, not device arrays: the model object travels to Dask workers.
        init = functools.partial(_instance_init, jax.device_get(params))
        return Layer(name or type(item).__name__, init, functools.partial(_nnx_apply, graphdef))
    if callable(item):
        abstract = nnx.eval_shape(lambda: item(nnx.Rngs(0)))
        if not isinstance(abstract, nnx.Module):
            raise TypeError(f"JaxSequential: factory of layer {index} returned {type(abstract).__name__}, "
                            "not an nnx.Module")
        graphdef, _ = _split_params(abstract, index)
        return Layer(name or type(abstract).__name__, functools.partial(_factory_init, item),
                     functools.partial(_nnx_apply, graphdef))
    raise TypeError(f"JaxSequential: layer {index} is {type(item).__name__}; expected a Layer, an nnx.Module, "
                    "a factory rngs -> nnx.Module, or a (name, one of those) tuple")


def _split_params(module: nnx.Module, index: int) -> tuple[Any, Any]:
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    if jax.tree_util.tree_leaves(rest):
        kinds = sorted({type(v).__name__ for v in jax.tree_util.tree_leaves(
            rest, is_leaf=lambda x: isinstance(x, nnx.Variable))})
        raise TypeError(f"JaxSequential: layer {index} ({type(module).__name__}) holds non-parameter NNX "
                        f"variables ({', '.join(kinds)}); only nnx.Param state is supported")
    return graphdef, params


def _instance_init(params: Any, key: Any, x_spec: Any) -> Any:
    return jax.tree_util.tree_map(jnp.asarray, params)


def _factory_init(factory: Callable, key: Any, x_spec: Any) -> Any:
    return nnx.split(factory(nnx.Rngs(key)), nnx.Param, ...)[1]


def _nnx_apply(graphdef: Any, params: Any, x: Any) -> Any:
    return nnx.merge(graphdef, params)(x)


# ---------------------------------------------------------------- specs and pytrees

def abstract(example_input: Tree) -> Tree:
    """Any framework's arrays, TensorSpecs or ShapeDtypeStructs -> ShapeDtypeStructs."""
    def leaf(x: Any) -> jax.ShapeDtypeStruct:
        if isinstance(x, TensorSpec):
            return jax.ShapeDtypeStruct(tuple(x.shape), jnp.dtype(x.dtype))
        return jax.ShapeDtypeStruct(tuple(x.shape), jnp.dtype(dtype_name(x)))
    return boundary_map(leaf, example_input)


def tensor_specs(tree: Tree) -> Tree:
    return jax.tree_util.tree_map(lambda s: TensorSpec(tuple(s.shape), jnp.dtype(s.dtype).name), tree)


def show(tree: Tree) -> str:
    return str(jax.tree_util.tree_map(str, tensor_specs(tree)))


def inexact(x: Any) -> bool:
    return jnp.issubdtype(x.dtype, jnp.inexact)


def floats(tree: Tree) -> Tree:
    """The differentiable leaves; None where a leaf is an integer (or bool)."""
    return jax.tree_util.tree_map(lambda a: a if inexact(a) else None, tree)


def ints(tree: Tree) -> Tree:
    return jax.tree_util.tree_map(lambda a: None if inexact(a) else a, tree)


def merge(floats: Tree, ints: Tree) -> Tree:
    return jax.tree_util.tree_map(lambda f, i: i if f is None else f, floats, ints,
                                  is_leaf=lambda x: x is None)


def nbytes(tree: Tree) -> int:
    return sum(int(np.prod(a.shape, dtype=np.int64)) * jnp.dtype(a.dtype).itemsize
               for a in jax.tree_util.tree_leaves(tree))


def size(tree: Tree) -> int:
    return sum(int(np.prod(a.shape, dtype=np.int64)) for a in jax.tree_util.tree_leaves(tree))


def path_name(path: tuple) -> str:
    """``('dense0', 'w')``-style keys as ``dense0/w``; an NNX Variable's ``.value`` is left out."""
    parts = []
    for entry in path:
        if isinstance(entry, jax.tree_util.DictKey):
            parts.append(str(entry.key))
        elif isinstance(entry, jax.tree_util.SequenceKey):
            parts.append(str(entry.idx))
        elif isinstance(entry, jax.tree_util.GetAttrKey):
            if entry.name != "value":
                parts.append(entry.name)
        elif isinstance(entry, jax.tree_util.FlattenedIndexKey):
            parts.append(str(entry.key))
        else:
            parts.append(str(entry))
    return "/".join(parts)


def named_leaves(tree: Tree) -> list[tuple[str, Any]]:
    return [(path_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


# ---------------------------------------------------------------- per-layer costs

def forward_backward(apply: Callable) -> Callable:
    """A layer's forward and backward (ones as output gradient), for costing."""
    def step(params, x):
        xi = ints(x)

        def f(p, xf):
            return floats(apply(p, merge(xf, xi)))

        out, vjp = jax.vjp(f, params, floats(x))
        return vjp(jax.tree_util.tree_map(jnp.ones_like, out))
    return step


def flops(apply: Callable, params: Any, x: Any) -> float:
    analysis = jax.jit(forward_backward(apply)).lower(params, x).compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per computation
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0))


def concrete(example_input: Tree) -> Tree:
    """Arrays for profiling: the example itself, or standard normals / zeros for specs."""
    rng = np.random.default_rng(0)

    def leaf(x: Any) -> Any:
        if isinstance(x, (TensorSpec, jax.ShapeDtypeStruct)):
            dtype = jnp.dtype(x.dtype)
            if jnp.issubdtype(dtype, jnp.inexact):
                return jnp.asarray(rng.standard_normal(x.shape), dtype)
            return jnp.zeros(x.shape, dtype)
        return to_jax(x)
    return boundary_map(leaf, example_input)

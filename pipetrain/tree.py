"""Framework-free pytrees for stage boundaries, the wire and checkpoints.

A tree is an array (any framework), None, or a tuple / list / str-keyed dict
of trees. ``flatten`` gives the leaves in a fixed order and a JSON-able
structure; ``unflatten`` inverts it. Dict keys are visited sorted, like JAX.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

Tree = Any
LEAF = "*"


def flatten(tree: Tree) -> tuple[list[Any], Any]:
    leaves: list[Any] = []

    def walk(t: Tree) -> Any:
        if isinstance(t, tuple):
            return {"t": [walk(x) for x in t]}
        if isinstance(t, list):
            return {"l": [walk(x) for x in t]}
        if isinstance(t, dict):
            for key in t:
                if not isinstance(key, str):
                    raise TypeError(f"pytree dict keys must be str, got {key!r}")
            return {"d": {key: walk(t[key]) for key in sorted(t)}}
        if t is None:
            return None
        leaves.append(t)
        return LEAF

    return leaves, walk(tree)


def unflatten(structure: Any, leaves: list[Any]) -> Tree:
    it = iter(leaves)

    def build(s: Any) -> Tree:
        if s is None:
            return None
        if s == LEAF:
            return next(it)
        if "t" in s:
            return tuple(build(x) for x in s["t"])
        if "l" in s:
            return [build(x) for x in s["l"]]
        return {key: build(v) for key, v in s["d"].items()}

    out = build(structure)
    if next(it, None) is not None:
        raise ValueError("unflatten: more leaves than the structure holds")
    return out


def tree_map(fn: Callable[[Any], Any], tree: Tree) -> Tree:
    leaves, structure = flatten(tree)
    return unflatten(structure, [fn(x) for x in leaves])


def paths(tree: Tree, prefix: str = "") -> list[str]:
    """Readable names of the leaves, in flatten order: ``[0]``, ``['mask']`` ..."""
    if isinstance(tree, (tuple, list)):
        return [p for i, x in enumerate(tree) for p in paths(x, f"{prefix}[{i}]")]
    if isinstance(tree, dict):
        return [p for key in sorted(tree) for p in paths(tree[key], f"{prefix}[{key!r}]")]
    if tree is None:
        return []
    return [prefix or "<value>"]


def pair_with_gradients(out: Tree, grads: Tree, *, is_array: Callable[[Any], bool],
                        stage: int) -> list[tuple[Any, Any]]:
    """``(output leaf, its gradient)`` for every leaf of ``out`` that ``grads``
    gives a gradient (None gives none: an int output), checking that the two
    trees match and each pair has one shape; the errors name the stage and the
    leaf. ``is_array`` says which objects are the framework's arrays."""
    pairs: list[tuple[Any, Any]] = []

    def walk(o: Tree, g: Tree, where: str) -> None:
        if g is None or o is None:
            return
        if isinstance(o, (tuple, list)) and isinstance(g, (tuple, list)) and len(o) == len(g):
            for i, (oi, gi) in enumerate(zip(o, g)):
                walk(oi, gi, f"{where}[{i}]")
        elif isinstance(o, dict) and isinstance(g, dict) and set(o) == set(g):
            for key in sorted(o):
                walk(o[key], g[key], f"{where}[{key!r}]")
        elif is_array(o) and is_array(g):
            if tuple(o.shape) != tuple(g.shape):
                raise ValueError(f"stage {stage}: gradient of output {where or '<value>'} has shape "
                                 f"{tuple(g.shape)}, the output {tuple(o.shape)}")
            pairs.append((o, g))
        else:
            raise ValueError(f"stage {stage}: grad_outputs {paths(grads)} do not match the outputs {paths(out)}"
                             f" at {where or '<value>'}")

    walk(out, grads, "")
    return pairs


def itemsize(dtype: str) -> int:
    if dtype == "bfloat16":
        return 2
    return np.dtype(dtype).itemsize


_DTYPE_NAMES: dict[Any, str] = {}  # once per dtype: numpy computes a dtype's name in Python, every time


def dtype_name(array: Any) -> str:
    """numpy-style dtype name of any framework's array ("bfloat16" included)."""
    dtype = array.dtype
    try:
        return _DTYPE_NAMES[dtype]
    except (KeyError, TypeError):  # not seen yet, or a framework's dtype that cannot be a key
        pass
    name = str(getattr(dtype, "name", dtype)).replace("torch.", "").replace("<dtype: '", "").rstrip("'>")
    try:
        _DTYPE_NAMES[dtype] = name
    except TypeError:
        pass
    return name

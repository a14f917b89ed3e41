"""``module(x)`` with other tensors in place of its parameters and buffers: what
``torch.func.functional_call`` does, without its per-call generality.

``functional_call`` resolves every name through the module tree, checks the
names, finds tied tensors and swaps through ``setattr`` on each call: about
0.25 ms per forward on the bench MLP (5 Linear layers), 10-15% of that forward,
and a stage runs one forward per micro-batch. Here the slots each name fills
(which submodule's ``_parameters`` or ``_buffers`` entry, and every alias of a
tied tensor) are found once per module, and a call writes the entries, runs
``module(x)`` and puts the originals back. The result is the same computation
on the same tensors: the same bits (``tests/test_torch_swap.py``).

Like ``functional_call`` this changes the module while it runs: one call at a
time per module, which a stage's compute thread is.
"""
from __future__ import annotations

import weakref
from typing import Any

from torch import nn

# module -> {name: [(owner's _parameters or _buffers dict, key), ...]}, found on first use.
_SLOTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def slots(module: nn.Module) -> dict[str, list[tuple[dict, str]]]:
    """Every name ``named_parameters()`` / ``named_buffers()`` gives, with each slot it fills:
    a tensor shared by several submodules (tied weights) fills all of their slots."""
    found = _SLOTS.get(module)
    if found is None:
        found = {}
        for kind in ("_parameters", "_buffers"):
            canonical: dict[int, str] = {}  # id(tensor) -> the name the deduplicating iterator gives it
            for prefix, owner in module.named_modules(remove_duplicate=False):
                for key, tensor in getattr(owner, kind).items():
                    if tensor is None:
                        continue
                    name = canonical.setdefault(id(tensor), f"{prefix}.{key}" if prefix else key)
                    found.setdefault(name, []).append((getattr(owner, kind), key))
        _SLOTS[module] = found
    return found


def call_with(module: nn.Module, values: dict[str, Any], x: Any) -> Any:
    """``module(x)`` with ``values`` ({name: tensor}) in place of those parameters and buffers."""
    table = slots(module)
    saved = []
    try:
        for name, tensor in values.items():
            try:
                places = table[name]
            except KeyError:
                raise KeyError(f"{type(module).__name__} has no parameter or buffer {name!r}") from None
            for owner, key in places:
                saved.append((owner, key, owner[key]))
                owner[key] = tensor
        return module(x)
    finally:
        for owner, key, original in reversed(saved):
            owner[key] = original

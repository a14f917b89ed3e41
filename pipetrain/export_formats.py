"""The writers of `pipetrain export` (``pipetrain.export``), one per format.

Each takes the merged checkpoint (``export.Merged``) and a path, imports its
framework only when it runs, and returns the path of its sidecar (or None).

- ``safetensors``: one file, written here byte for byte as the safetensors
  format lays it out (bfloat16 and float8 as their own dtypes, which
  ``safetensors.numpy`` cannot store), the source checkpoint in its
  ``__metadata__`` and in a JSON sidecar ``{out}.json``;
- ``torch``: ``torch.save`` of the state_dict of ``unpartitioned_torch(model)``
  (``nn.Sequential`` of the model's layers; buffers, constants that no stage
  checkpoints, as the layers are built);
- ``flax``: ``flax.serialization.to_bytes`` of the params pytree
  ``{layer name: layer params}`` in the ``JaxSequential``'s own structure:
  ``flax.serialization.from_bytes(model.init_params(), data)`` restores it;
- ``keras``: ``save_weights`` of ``unpartitioned_keras(model, input)`` (a
  ``keras.Sequential`` of the model's layers, built for its input), so
  ``load_weights`` of the same model restores it.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

_SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}


def sidecar_path(out: str) -> str:
    return f"{out}.json"


def _error(message: str) -> Exception:
    from pipetrain.export import ExportError

    return ExportError(message)


def _write_bytes(out: str, data: bytes) -> None:
    """Write through a temporary file, so a failed export leaves no torn artifact."""
    tmp = Path(f"{out}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- safetensors

def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata}
    blobs, offset = [], 0
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        code = _SAFETENSORS_DTYPES.get(array.dtype.name)
        if code is None or array.dtype.byteorder == ">":
            raise _error(f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot store")
        data = array.tobytes(order="C")
        header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def write_safetensors(merged: Any, out: str) -> str:
    from pipetrain.export import dumps, sidecar_record

    record = sidecar_record(merged, "safetensors")
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in record.items()}
    _write_bytes(out, safetensors_bytes({**merged.weights, **merged.optimizer}, metadata))
    side = sidecar_path(out)
    _write_bytes(side, dumps({**record, "tensors": len(merged.weights) + len(merged.optimizer)}).encode())
    return side


# ---------------------------------------------------------------- torch

def unpartitioned_torch(model: Any) -> Any:
    """The whole ``TorchSequential`` as one ``nn.Sequential`` (its initial weights):
    its state_dict names are the stages' parameter names."""
    from torch import nn

    return nn.Sequential(*[model.make_layer(i) for i in range(len(model))])


def write_torch(merged: Any, out: str) -> None:
    import torch

    module = unpartitioned_torch(merged.model)
    params = {name for name, _ in module.named_parameters()}
    state = module.state_dict()
    missing, unexpected = sorted(params - set(merged.weights)), sorted(set(merged.weights) - set(state))
    if missing or unexpected:
        raise _error(f"{merged.checkpoint} does not fit {merged.cfg.model.entry}: missing {missing[:5]}, "
                     f"unexpected {unexpected[:5]}")
    out_state = {}
    for name, tensor in state.items():
        if name not in merged.weights:  # a buffer: a constant the stages never change
            out_state[name] = tensor
            continue
        a = np.array(merged.weights[name])
        t = torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16) if a.dtype.name == "bfloat16" \
            else torch.from_numpy(a)
        if tuple(t.shape) != tuple(tensor.shape):
            raise _error(f"{merged.checkpoint}: {name} is {list(t.shape)}, the model's is {list(tensor.shape)}")
        out_state[name] = t
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        torch.save(out_state, tmp)
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)


# ---------------------------------------------------------------- flax

def nested(weights: dict[str, np.ndarray]) -> dict[str, Any]:
    """``{"a/b/c": x}`` as ``{"a": {"b": {"c": x}}}``."""
    tree: dict[str, Any] = {}
    for name, array in weights.items():
        *path, leaf = name.split("/")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise _error(f"parameter {name!r} lies under another parameter")
        node[leaf] = array
    return tree


def write_flax(merged: Any, out: str) -> None:
    """The params pytree in the model's own structure (layers without parameters too),
    so ``from_bytes(model.init_params(), data)`` restores every leaf."""
    import jax
    from flax import serialization

    from pipetrain.stages.jax_trees import path_name

    model = merged.model
    if model.input_spec is None:
        model.trace_specs(_example_input(merged))
    paths, treedef = jax.tree_util.tree_flatten_with_path(jax.eval_shape(model.init_params))
    names = [path_name(p) for p, _ in paths]
    missing, unexpected = sorted(set(names) - set(merged.weights)), sorted(set(merged.weights) - set(names))
    if missing or unexpected:
        raise _error(f"{merged.checkpoint} does not fit {merged.cfg.model.entry}: missing {missing[:5]}, "
                     f"unexpected {unexpected[:5]}")
    leaves = []
    for name, (_, like) in zip(names, paths):
        a = np.asarray(merged.weights[name])
        if tuple(a.shape) != tuple(like.shape):
            raise _error(f"{merged.checkpoint}: {name} is {list(a.shape)}, the model's is {list(like.shape)}")
        leaves.append(a)
    _write_bytes(out, serialization.to_bytes(jax.tree_util.tree_unflatten(treedef, leaves)))


# ---------------------------------------------------------------- keras

def unpartitioned_keras(model: Any, example_input: Any) -> Any:
    """The whole ``KerasSequential`` as one ``keras.Sequential``, its layers built for
    ``example_input`` (arrays or TensorSpecs) with their initial weights."""
    import keras

    from pipetrain.stages.tf_stage import _spec_of
    from pipetrain.tree import flatten

    leaves, _ = flatten(example_input)
    if len(leaves) != 1 or leaves[0] is not example_input:
        raise _error("a keras.Sequential takes one input array; this model's input is a pytree of "
                     f"{len(leaves)} arrays: export it as --format safetensors")
    spec = _spec_of(example_input)
    layers, x = [], example_input
    for i in range(len(model)):
        layer, x = model.make_layer(i, x)
        layers.append(layer)
    return keras.Sequential([keras.Input(shape=spec.shape[1:], dtype=spec.dtype), *layers])


def _example_input(merged: Any) -> Any:
    model = merged.model
    if getattr(model, "input_spec", None) is not None:
        return model.input_spec
    from pipetrain.job import build_source

    cfg = merged.cfg
    return build_source(cfg.data.train, "data.train", cfg.data.kwargs).inputs(0)


def write_keras(merged: Any, out: str) -> None:
    from pipetrain.stages.tf_stage import _variable_names

    if not str(out).endswith(".weights.h5"):
        raise _error(f"{out}: Keras writes weights only to a file whose name ends in .weights.h5")
    seq = unpartitioned_keras(merged.model, _example_input(merged))
    expected = set()
    for i, layer in enumerate(seq.layers):
        for name, variable in zip(_variable_names(i, layer), layer.trainable_variables):
            expected.add(name)
            if name not in merged.weights:
                raise _error(f"{merged.checkpoint} has no weight {name!r} of {merged.cfg.model.entry}")
            a = np.asarray(merged.weights[name])
            if tuple(a.shape) != tuple(variable.shape):
                raise _error(f"{merged.checkpoint}: {name} is {list(a.shape)}, the model's is {list(variable.shape)}")
            variable.assign(a)
    unexpected = sorted(set(merged.weights) - expected)
    if unexpected:
        raise _error(f"{merged.checkpoint} holds weights {unexpected[:5]} that {merged.cfg.model.entry} has not")
    seq.save_weights(out, overwrite=True)

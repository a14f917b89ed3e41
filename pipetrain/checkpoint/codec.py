"""A stage's flat ``name -> numpy array`` state to safetensors bytes and back.

safetensors' numpy API knows the plain numpy dtypes only; the ml_dtypes ones
(bfloat16, the float8s) are stored as an unsigned integer view of the same
width, and their real dtype names are kept in the file's ``__metadata__`` so a
shard stays self-describing. Decoding never runs code: the format is a JSON
header plus raw little-endian bytes, parsed by safetensors (Rust).
"""
from __future__ import annotations

import json
import struct
from collections.abc import Mapping

import numpy as np

from pipetrain.errors import PipetrainError

# What safetensors.numpy can store natively (its _TYPES table).
_NATIVE = frozenset(
    ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
     "float16", "float32", "float64"]
)
_VIEW_OF_WIDTH = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_DTYPES_KEY = "pipetrain.dtypes"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


class ShardFormatError(PipetrainError, ValueError):
    """Bytes that are not a shard pipetrain wrote (or a tensor it cannot store)."""


def encode_state(state: Mapping[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    tensors: dict[str, np.ndarray] = {}
    viewed: dict[str, str] = {}
    for name, value in state.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ShardFormatError(f"tensor name {name!r} cannot be stored in a safetensors shard")
        # Not np.ascontiguousarray: it turns 0-d arrays into shape (1,).
        array = np.asarray(value)
        if not array.flags.c_contiguous:
            array = array.copy(order="C")
        dtype_name = array.dtype.name
        if dtype_name not in _NATIVE:
            if not _is_ml_dtype(dtype_name) or array.dtype.itemsize not in _VIEW_OF_WIDTH:
                raise ShardFormatError(
                    f"tensor {name!r} has dtype {dtype_name}, which a checkpoint shard cannot store"
                )
            viewed[name] = dtype_name
            array = array.view(_VIEW_OF_WIDTH[array.dtype.itemsize])
        tensors[name] = array
    metadata = {_DTYPES_KEY: json.dumps(viewed, sort_keys=True)} if viewed else None
    return save(tensors, metadata=metadata)


def decode_state(data: bytes, *, source: str = "shard") -> dict[str, np.ndarray]:
    """Parse shard bytes (already checksum-verified by the caller)."""
    from safetensors.numpy import load

    viewed = _viewed_dtypes(data, source=source)
    try:
        tensors = load(data)
    except Exception as err:  # safetensors raises its own SafetensorError
        raise ShardFormatError(f"{source} is not a valid safetensors file: {err}") from err
    out: dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        if name in viewed:
            array = array.view(_ml_dtype(viewed[name], source=source))
        out[name] = array
    return out


def tensor_index(state: Mapping[str, np.ndarray]) -> dict[str, dict]:
    """name -> {dtype, shape}: what the shard record lists, for humans and checks."""
    return {
        name: {"dtype": np.asarray(a).dtype.name, "shape": list(np.shape(a))}
        for name, a in sorted(state.items())
    }


def _viewed_dtypes(data: bytes, *, source: str) -> dict[str, str]:
    if len(data) < 8:
        raise ShardFormatError(f"{source} is too short to be a safetensors file ({len(data)} bytes)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(_MAX_HEADER, len(data) - 8):
        raise ShardFormatError(f"{source} has a header length ({header_len}) beyond the file")
    try:
        header = json.loads(data[8 : 8 + header_len])
        meta = header.get("__metadata__") or {}
        viewed = json.loads(meta[_DTYPES_KEY]) if _DTYPES_KEY in meta else {}
    except (ValueError, AttributeError, TypeError) as err:
        raise ShardFormatError(f"{source} has an unreadable safetensors header: {err}") from err
    if not isinstance(viewed, dict):
        raise ShardFormatError(f"{source} has a malformed {_DTYPES_KEY} entry")
    return viewed


def _is_ml_dtype(name: str) -> bool:
    try:
        import ml_dtypes
    except ImportError:
        return False
    scalar_type = getattr(ml_dtypes, name, None)
    return isinstance(scalar_type, type) and issubclass(scalar_type, np.generic)


def _ml_dtype(name: str, *, source: str) -> np.dtype:
    if not _is_ml_dtype(name):
        raise ShardFormatError(f"{source} records dtype {name!r}, which is not an ml_dtypes type")
    import ml_dtypes

    return np.dtype(getattr(ml_dtypes, name))

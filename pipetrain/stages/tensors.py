"""Move pytrees of arrays between numpy, JAX, PyTorch and TensorFlow.

Same device, no copy where the frameworks allow it: DLPack between JAX,
torch and TF (bfloat16 included, all three carry it), and the buffer shared
directly with numpy. numpy cannot put bfloat16 (``ml_dtypes.bfloat16``) in a
DLPack capsule, so numpy <-> torch/TF bf16 travels as a ``uint16`` view and is
bit-cast on the other side (a view, not a copy). Every framework import is
lazy and the source framework is read from ``type(x).__module__``, so a
JAX-only process never imports torch or TensorFlow.

Where a copy happens (and the tests pin each case down):

- a non-contiguous input (a transposed torch tensor, a strided numpy slice) is
  made contiguous first: that is a copy, the only layout the wire and
  TensorFlow accept;
- numpy -> JAX on CPU shares the buffer only when it is 64-byte aligned (an
  XLA CPU requirement); otherwise JAX copies it;
- a read-only numpy array -> TF is copied: DLPack (as numpy exports it) cannot
  mark a buffer read-only, so numpy refuses to export it;
- any CPU buffer -> TF that is not 64-byte aligned is copied: TF's kernels
  assume that alignment and would abort the process (see ``TF_ALIGN``);
- a change of device (``to_torch(device="cuda")`` of a CPU array, or
  ``to_numpy`` of a GPU array) is a transfer, hence a copy.

A result that shares memory with its input aliases it: do not mutate the
input afterwards. Results are never mutated in place by pipetrain.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from pipetrain.tree import Tree, tree_map

# TensorFlow's CPU kernels (Eigen, oneDNN) assume 64-byte-aligned buffers, and
# tf.experimental.dlpack.from_dlpack does not check: a misaligned CPU buffer
# aborts the process (``Check failed: IsAligned()``) in the first matmul. So a
# misaligned buffer going to TF is copied into an aligned one.
TF_ALIGN = 64


def framework_of(x: Any) -> str:
    """"numpy" | "jax" | "torch" | "tf" | "keras" | "python", read without importing anything."""
    module = type(x).__module__ or ""
    root = module.split(".", 1)[0]
    if root in ("jax", "jaxlib"):
        return "jax"
    if root == "torch":
        return "torch"
    if root == "tensorflow":
        return "tf"
    if root == "keras":  # a keras.Variable on the TF backend: its .value is a tf.Variable
        return "keras"
    if root == "numpy" or root == "ml_dtypes":
        return "numpy"
    return "python"


def _is_bf16(x: Any) -> bool:
    return "bfloat16" in str(getattr(x, "dtype", ""))


def _bf16_numpy_dtype():
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def _contiguous_numpy(a: Any) -> np.ndarray:
    a = np.asarray(a)
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)  # copy: say so in the docstring


# ---------------------------------------------------------------- to numpy

def to_numpy(tree: Tree) -> Tree:
    """Every leaf as a C-contiguous numpy array (bfloat16 as ml_dtypes.bfloat16)."""
    return tree_map(_leaf_to_numpy, tree)


def _leaf_to_numpy(x: Any) -> np.ndarray:
    kind = framework_of(x)
    if kind == "torch":
        return _torch_to_numpy(x)
    if kind == "jax":
        # On CPU np.asarray shares the XLA buffer (read-only); on GPU it copies to host.
        return _contiguous_numpy(np.asarray(x))
    if kind in ("tf", "keras"):
        return _tf_to_numpy(x)
    return _contiguous_numpy(x)


def _torch_to_numpy(t: Any) -> np.ndarray:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if _is_bf16(t):
        import torch

        return t.view(torch.uint16).numpy().view(_bf16_numpy_dtype())
    return t.numpy()


def _tf_to_numpy(x: Any) -> np.ndarray:
    import tensorflow as tf

    x = tf.convert_to_tensor(x.value if framework_of(x) == "keras" else x)
    if "CPU" not in (x.device or "CPU"):
        return x.numpy()
    try:
        if x.dtype == tf.bfloat16:
            return np.from_dlpack(tf.bitcast(x, tf.uint16)).view(_bf16_numpy_dtype())
        return np.from_dlpack(x)
    except (BufferError, TypeError, RuntimeError):
        return x.numpy()  # a dtype DLPack cannot carry (string, ...): copy


# ---------------------------------------------------------------- to torch

def to_torch(tree: Tree, *, device: Any = None) -> Tree:
    """Every leaf as a contiguous torch tensor, on ``device`` if given (else where it is)."""
    return tree_map(lambda x: _leaf_to_torch(x, device), tree)


def _leaf_to_torch(x: Any, device: Any) -> Any:
    import torch

    kind = framework_of(x)
    if kind == "torch":
        t = x
    elif kind in ("jax", "tf", "keras"):
        if kind == "keras":
            x = x.value
        if kind in ("tf", "keras"):
            import tensorflow as tf

            x = tf.convert_to_tensor(x)
        t = torch.from_dlpack(x)
    else:
        a = _contiguous_numpy(x)
        if a.flags.writeable:  # (catch_warnings costs ~10 us: a forward's inputs pay it per leaf)
            t = _from_numpy(a, torch)
        else:
            with warnings.catch_warnings():
                # A read-only array (from the wire, or from a JAX buffer) is shared
                # as is: pipetrain never writes into a stage's inputs.
                warnings.simplefilter("ignore", UserWarning)
                t = _from_numpy(a, torch)
    t = t.contiguous()
    if device is not None and t.device != torch.device(device):
        t = t.to(device)
    return t


def _from_numpy(a: np.ndarray, torch: Any) -> Any:
    if a.dtype == _bf16_numpy_dtype():
        return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(a)


# ---------------------------------------------------------------- to JAX

def to_jax(tree: Tree) -> Tree:
    """Every leaf as a JAX array (on the source's device for DLPack sources)."""
    return tree_map(_leaf_to_jax, tree)


def _leaf_to_jax(x: Any) -> Any:
    import jax

    kind = framework_of(x)
    if kind == "jax":
        return x
    if kind == "torch":
        return jax.dlpack.from_dlpack(x.detach().contiguous())
    if kind in ("tf", "keras"):
        import tensorflow as tf

        return jax.dlpack.from_dlpack(tf.convert_to_tensor(x.value if kind == "keras" else x))
    # numpy: device_put takes any dtype (bf16 included, read-only too) and, on
    # CPU, shares a 64-byte-aligned buffer instead of copying it.
    return jax.device_put(_contiguous_numpy(x))


# ---------------------------------------------------------------- to TF

def to_tf(tree: Tree) -> Tree:
    """Every leaf as a TF tensor (bfloat16 as tf.bfloat16)."""
    return tree_map(_leaf_to_tf, tree)


def _leaf_to_tf(x: Any) -> Any:
    import tensorflow as tf

    kind = framework_of(x)
    if kind == "tf":
        return tf.convert_to_tensor(x)  # a tf.Variable reads its value; a tensor is returned as is
    if kind == "keras":
        return tf.convert_to_tensor(x.value)
    if kind == "torch":
        t = x.detach().contiguous()
        if t.device.type == "cpu" and t.data_ptr() % TF_ALIGN:
            t = t.clone()  # copy: see TF_ALIGN (a slice past the start of its storage)
        return tf.experimental.dlpack.from_dlpack(t.__dlpack__())
    if kind == "jax":
        if next(iter(x.devices())).platform == "cpu" and x.unsafe_buffer_pointer() % TF_ALIGN:
            return tf.convert_to_tensor(np.asarray(x))
        return tf.experimental.dlpack.from_dlpack(x.__dlpack__())
    a = _contiguous_numpy(x)
    if not a.flags.writeable or a.__array_interface__["data"][0] % TF_ALIGN:
        # copy: numpy will not export a read-only buffer, and TF must not get a misaligned one
        return tf.convert_to_tensor(a)
    try:
        if a.dtype == _bf16_numpy_dtype():
            return tf.bitcast(tf.experimental.dlpack.from_dlpack(a.view(np.uint16).__dlpack__()), tf.bfloat16)
        return tf.experimental.dlpack.from_dlpack(a.__dlpack__())
    except (BufferError, TypeError, RuntimeError):
        return tf.convert_to_tensor(a)  # a dtype DLPack cannot carry: copy

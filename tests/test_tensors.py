"""Which conversions share memory and which copy, for float32 and bfloat16.

Memory is compared by data pointer, so a "no copy" claim could fail. TF cases
live in test_tf_stage.py (TensorFlow is slow to import).
"""
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

from pipetrain.stages.tensors import framework_of, to_jax, to_numpy, to_torch

DTYPES = ["float32", "bfloat16"]


def np_ptr(a):
    return a.__array_interface__["data"][0]


def aligned_numpy(shape, dtype, align=64):
    """A numpy array on a 64-byte boundary (XLA CPU shares only those)."""
    dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    buf = np.empty(n + align, np.uint8)
    off = (-np_ptr(buf)) % align
    a = buf[off:off + n].view(dtype).reshape(shape)
    a[...] = np.arange(a.size, dtype=np.float32).reshape(shape).astype(dtype)
    return a


def torch_dtype(name):
    return getattr(torch, name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_to_torch_shares_memory(dtype):
    a = aligned_numpy((8, 16), dtype)
    t = to_torch(a)
    assert t.dtype == torch_dtype(dtype)
    assert t.data_ptr() == np_ptr(a)
    np.testing.assert_array_equal(to_numpy(t).astype(np.float32), a.astype(np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_to_numpy_shares_memory(dtype):
    t = torch.arange(32, dtype=torch.float32).reshape(4, 8).to(torch_dtype(dtype))
    a = to_numpy(t)
    assert str(a.dtype) == dtype
    assert np_ptr(a) == t.data_ptr()


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_jax_round_trip_shares_memory(dtype):
    t = torch.arange(64, dtype=torch.float32).reshape(8, 8).to(torch_dtype(dtype))
    j = to_jax(t)
    assert str(j.dtype) == dtype
    assert j.unsafe_buffer_pointer() == t.data_ptr()
    back = to_torch(j)
    assert back.data_ptr() == t.data_ptr()
    assert torch.equal(back, t)


@pytest.mark.parametrize("dtype", DTYPES)
def test_jax_to_numpy_shares_memory(dtype):
    j = jnp.arange(64, dtype=jnp.float32).reshape(8, 8).astype(dtype)
    a = to_numpy(j)
    assert str(a.dtype) == dtype
    assert np_ptr(a) == j.unsafe_buffer_pointer()


@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_to_jax_shares_only_aligned_buffers(dtype):
    a = aligned_numpy((16, 16), dtype)
    assert to_jax(a).unsafe_buffer_pointer() == np_ptr(a)
    # 4 bytes past a 64-byte boundary: XLA CPU copies.
    big = aligned_numpy((16 * 16 + 32,), dtype)
    offset = 4 // big.itemsize
    misaligned = big[offset:offset + 256].reshape(16, 16)
    j = to_jax(misaligned)
    assert j.unsafe_buffer_pointer() != np_ptr(misaligned)
    np.testing.assert_array_equal(np.asarray(j), misaligned)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs_are_copied_contiguous(dtype):
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6).to(torch_dtype(dtype)).t()
    assert not t.is_contiguous()
    for out in (to_numpy(t), to_torch(t)):
        ptr = np_ptr(out) if isinstance(out, np.ndarray) else out.data_ptr()
        assert ptr != t.data_ptr()  # a copy, as documented
    assert to_numpy(t).flags.c_contiguous and to_torch(t).is_contiguous()
    assert torch.equal(to_torch(t), t)
    a = aligned_numpy((6, 4), dtype).T
    assert to_numpy(a).flags.c_contiguous and np_ptr(to_numpy(a)) != np_ptr(a)
    np.testing.assert_array_equal(np.asarray(to_jax(a)), a)


def test_pytrees_keep_structure_and_read_only_numpy_is_shared_with_torch():
    a = aligned_numpy((4, 4), "float32")
    a.flags.writeable = False  # what the wire hands us
    tree = {"x": a, "pair": (jnp.ones(3), torch.zeros(2)), "none": None}
    out = to_torch(tree)
    assert set(out) == {"x", "pair", "none"} and out["none"] is None
    assert isinstance(out["pair"], tuple) and all(isinstance(v, torch.Tensor) for v in out["pair"])
    assert out["x"].data_ptr() == np_ptr(a)
    assert [framework_of(v) for v in to_jax(tree)["pair"]] == ["jax", "jax"]


def test_requires_grad_tensor_is_detached():
    t = torch.ones(3, requires_grad=True)
    assert to_jax(t).unsafe_buffer_pointer() == t.data_ptr()
    assert np_ptr(to_numpy(t)) == t.data_ptr()


def test_framework_of_reads_module_names():
    assert framework_of(np.ones(1)) == "numpy"
    assert framework_of(np.float32(1)) == "numpy"
    assert framework_of(jnp.ones(1)) == "jax"
    assert framework_of(torch.ones(1)) == "torch"
    assert framework_of(1.0) == "python"


def test_jax_only_process_never_imports_torch_or_tensorflow():
    code = (
        "import sys, numpy as np\n"
        "from pipetrain.stages.tensors import to_jax, to_numpy\n"
        "x = to_numpy(to_jax({'a': np.ones((2, 2), np.float32)}))\n"
        "assert 'jax' in sys.modules\n"
        "bad = [m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_jax_array_through_a_torch_function_and_back():
    x = jnp.linspace(-1, 1, 12, dtype=jnp.float32).reshape(3, 4)
    t = to_torch(x)
    assert t.data_ptr() == x.unsafe_buffer_pointer()
    y = to_jax(torch.tanh(t) * 2)
    np.testing.assert_allclose(np.asarray(y), np.tanh(np.asarray(x)) * 2, rtol=1e-6)
    assert jax.devices()[0].platform == "cpu"

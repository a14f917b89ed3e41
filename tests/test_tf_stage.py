"""KerasSequential / KerasStage against plain GradientTape, optax, torch and JAX twins;
TF tensor conversions (TensorFlow is slow to import, so they live here)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
import torch
from torch import nn

from pipetrain.optim import Optimizer
from pipetrain.stages.base import (
    PartitionError,
    SequentialModel,
    Stage,
    StageSpec,
    TensorSpec,
)
from pipetrain.stages.tensors import to_jax, to_numpy, to_tf, to_torch
from pipetrain.stages.tf_stage import KerasSequential, _TensorOptimizer
from pipetrain.stages.torch_stage import TorchSequential
from tests.test_tensors import aligned_numpy
from stage_helpers import assert_state_round_trip, batch, optimizer_and_optax_twin, pipeline_step, stages

RTOL = 1e-5
X_SPEC = TensorSpec((8, 16), "float32")


def tf_ptr(t):
    return torch.from_dlpack(t).data_ptr()  # torch reads TF's buffer through DLPack, no copy


def np_ptr(a):
    return a.__array_interface__["data"][0]


def loss_fn(logits, labels):
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(tf.cast(labels, tf.int32), logits))


def mlp(seed=0, input_spec=X_SPEC):
    layers = [lambda: keras.layers.Dense(32), lambda: keras.layers.Activation("tanh"),
              lambda: keras.layers.Dense(32), lambda: keras.layers.Activation("tanh"), lambda: keras.layers.Dense(4)]
    return KerasSequential(layers, loss=loss_fn, seed=seed, input_spec=input_spec)


def all_params(stages_, version):
    return {n: np.array(t) for s in stages_ for n, t in s.params(version).items()}


def dense_params(p):
    """[(kernel [in, out], bias)] of the three Dense layers, from a stage's named params."""
    return [(p[f"{i}.kernel"], p[f"{i}.bias"]) for i in (0, 2, 4)]


def reference_grads(params, xs, ys):
    """Mean loss gradient of the unpartitioned MLP, plain TF ops under one GradientTape."""
    ws = [tf.Variable(params[n]) for n in sorted(params)]
    named = dict(zip(sorted(params), ws))
    with tf.GradientTape() as tape:
        total = 0.0
        for x, y in zip(xs, ys):
            h = x
            for i, (w, b) in enumerate(dense_params(named)):
                h = h @ w + b
                h = tf.tanh(h) if i < 2 else h
            total += loss_fn(h, y) / len(xs)
    return {n: g.numpy() for n, g in zip(sorted(params), tape.gradient(total, ws))}


# ---------------------------------------------------------------- conversions

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tf_conversions_share_memory(dtype):
    t = tf.cast(tf.reshape(tf.range(64, dtype=tf.float32), (8, 8)), dtype)
    a = to_numpy(t)
    assert str(a.dtype) == dtype and np_ptr(a) == tf_ptr(t)
    assert to_torch(t).data_ptr() == tf_ptr(t)
    assert to_jax(t).unsafe_buffer_pointer() == tf_ptr(t)
    tt = torch.arange(64, dtype=torch.float32).reshape(8, 8).to(getattr(torch, dtype))
    assert tf_ptr(to_tf(tt)) == tt.data_ptr() and to_tf(tt).dtype.name == dtype
    j = jnp.arange(64, dtype=jnp.float32).reshape(8, 8).astype(dtype)
    assert tf_ptr(to_tf(j)) == j.unsafe_buffer_pointer() and to_tf(j).dtype.name == dtype
    n = aligned_numpy((8, 8), dtype)
    assert tf_ptr(to_tf(n)) == np_ptr(n) and to_tf(n).dtype.name == dtype
    np.testing.assert_array_equal(to_numpy(to_tf(n)), n)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tf_copies_misaligned_buffers_instead_of_aborting(dtype):
    """TF kernels assume 64-byte alignment; a shared misaligned buffer aborts the process."""
    big = aligned_numpy((8 * 16 + 32,), dtype)
    n = big[8:8 + 128].reshape(8, 16)  # 16 or 32 bytes past a 64-byte boundary
    t = torch.from_numpy(
        np.ascontiguousarray(big.astype(np.float32)[8:8 + 128]).reshape(8, 16)).to(getattr(torch, dtype))
    t = torch.cat([torch.zeros(4, dtype=t.dtype), t.flatten()])[4:].reshape(8, 16)  # storage offset 8 or 16 bytes
    for src, ptr in ((n, np_ptr(n)), (t, t.data_ptr())):
        assert ptr % 64
        x = to_tf(src)
        assert tf_ptr(x) % 64 == 0 and tf_ptr(x) != ptr
        y = tf.matmul(tf.cast(x, tf.float32), tf.ones((16, 4)))  # would abort on the shared buffer
        np.testing.assert_allclose(y.numpy(), np.asarray(src, np.float32) @ np.ones((16, 4), np.float32)
                                   if isinstance(src, np.ndarray) else t.float().numpy() @ np.ones((16, 4)), rtol=1e-2)


def test_tf_copies_read_only_and_non_contiguous_numpy():
    n = np.arange(64, dtype=np.float32).reshape(8, 8)
    n.flags.writeable = False
    assert tf_ptr(to_tf(n)) != np_ptr(n)  # numpy will not export a read-only buffer
    s = np.arange(64, dtype=np.float32).reshape(8, 8).T
    assert tf_ptr(to_tf(s)) != np_ptr(s)
    np.testing.assert_array_equal(to_numpy(to_tf(s)), s)
    t = torch.ones(4, 6).t()
    np.testing.assert_array_equal(to_numpy(to_tf(t)), t.numpy())


# ---------------------------------------------------------------- the model

def test_protocols_and_model_description():
    model = mlp(input_spec=None)
    assert isinstance(model, SequentialModel)
    with pytest.raises(PartitionError, match="input shape unknown"):
        model.build_stage(StageSpec(0, 1, 0, 5), optimizer=Optimizer())
    assert model.layer_names() == ["0:Dense", "1:Activation", "2:Dense", "3:Activation", "4:Dense"]
    specs = model.trace_specs(np.zeros((8, 16), np.float32))
    assert specs[0] == TensorSpec((8, 32), "float32") and specs[-1] == TensorSpec((8, 4), "float32")
    assert model.layer_param_counts() == [16 * 32 + 32, 0, 32 * 32 + 32, 0, 32 * 4 + 4]
    assert isinstance(stages(model, [2])[0], Stage)


def test_trace_names_the_layer_that_does_not_fit():
    model = KerasSequential([keras.layers.Dense(4), keras.layers.Reshape((2, 3))], loss=loss_fn)
    with pytest.raises(PartitionError, match=r"layer 1:Reshape: input float32\[8,4\] does not fit"):
        model.trace_specs(TensorSpec((8, 16), "float32"))


def test_layer_costs():
    model = mlp()
    costs = model.layer_costs("profile", np.zeros((8, 16), np.float32), repeats=2)
    assert len(costs) == 5 and all(c > 0 for c in costs)
    flops = model.layer_costs("flops", np.zeros((8, 16), np.float32))
    assert len(flops) == 5 and all(f >= 0 for f in flops)


def test_every_partition_starts_from_the_same_weights():
    whole = all_params(stages(mlp(seed=3), []), 0)
    split = all_params(stages(mlp(seed=3), [1, 3]), 0)
    assert whole.keys() == split.keys() and all(np.array_equal(whole[n], split[n]) for n in whole)
    assert not np.array_equal(whole["0.kernel"], all_params(stages(mlp(seed=4), []), 0)["0.kernel"])
    built = keras.layers.Dense(4)
    built.build((None, 16))
    given = KerasSequential([built], loss=loss_fn, input_spec=X_SPEC)
    np.testing.assert_array_equal(all_params(stages(given, []), 0)["0.kernel"], built.kernel.numpy())


@pytest.mark.parametrize("boundaries", [[2], [1, 4]])
def test_split_gradients_and_update_equal_unpartitioned(boundaries):
    ss = stages(mlp(), boundaries, Optimizer("sgd", lr=0.1))
    v0 = all_params(ss, 0)
    xs, ys = zip(*(batch(k) for k in range(2)))
    for k in range(2):
        pipeline_step(ss, k, xs[k], ys[k])
    for s in ss:
        s.update(new_version=1)
    v1 = all_params(ss, 1)
    for n, g in reference_grads(v0, xs, ys).items():
        np.testing.assert_allclose(v1[n], v0[n] - 0.1 * g, rtol=RTOL, atol=1e-7)


def test_weight_stashing_backward_uses_the_forward_version():
    ss = stages(mlp(), [2], Optimizer("sgd", lr=0.5))
    v0 = all_params(ss, 0)
    pipeline_step(ss, 0, *batch(0))
    x1, y1 = batch(1)
    h = to_numpy(ss[0].forward(1, x1, version=0))
    ss[1].forward(1, h, version=0, targets=y1)
    for s in ss:
        s.update(new_version=1)
    assert not np.array_equal(all_params(ss, 1)["0.kernel"], v0["0.kernel"])
    ss[0].backward(1, to_numpy(ss[1].backward(1)))
    acc = {n[len("acc/"):]: a for s in ss for n, a in s.state_dict().items() if n.startswith("acc/")}
    for n, g in reference_grads(v0, [x1], [y1]).items():
        np.testing.assert_allclose(acc[n], g, rtol=RTOL, atol=1e-7)
    wrong = reference_grads(all_params(ss, 1), [x1], [y1])
    assert not np.allclose(acc["0.kernel"], wrong["0.kernel"], rtol=1e-3)


def test_state_dict_round_trip_is_bit_exact():
    opt = Optimizer("adam", lr=1e-2)
    a = stages(mlp(), [2], opt)
    for k in range(3):
        pipeline_step(a, k, *batch(k), version=k)
        for s in a:
            s.update(new_version=k + 1)
    pipeline_step(a, 9, *batch(9), version=2)  # accumulated, not applied yet
    saved = [s.state_dict() for s in a]
    assert {"meta/versions", "opt/mu/0.kernel", "v2/0.kernel", "acc/0.kernel"} <= set(saved[0])
    b = stages(mlp(seed=7), [2], opt)  # other weights, all overwritten by the load
    assert_state_round_trip(a, b, saved)


class Split(keras.layers.Layer):
    def call(self, h):
        return h, 2 * h, tf.range(tf.shape(h)[0])


class Merge(keras.layers.Layer):
    def build(self, input_shape):
        self.scale = self.add_weight(shape=(), initializer="ones", name="scale")

    def call(self, x):
        a, b, positions = x
        return tf.tanh(a) * self.scale + b + 0 * tf.cast(positions[0], a.dtype)


def test_tuple_boundary_gradients_equal_one_stage():
    model = KerasSequential([lambda: keras.layers.Dense(32), Split, Merge, lambda: keras.layers.Dense(4)],
                            loss=loss_fn, input_spec=X_SPEC)
    assert model.trace_specs(X_SPEC)[1] == (TensorSpec((8, 32), "float32"), TensorSpec((8, 32), "float32"),
                                            TensorSpec((8,), "int32"))
    x, y = batch(0)
    results = []
    for boundaries in ([], [2]):
        ss = stages(model, boundaries, Optimizer("sgd", lr=1.0))
        pipeline_step(ss, 0, x, y)
        if boundaries:
            h = ss[0].forward(1, x, version=0)
            assert isinstance(h, tuple) and len(h) == 3
            ss[1].forward(1, to_numpy(h), version=0, targets=y)
            g = ss[1].backward(1)
            assert isinstance(g, tuple) and g[2] is None
            ss[0].backward(1, to_numpy(g))
        else:
            pipeline_step(ss, 1, x, y)
        for s in ss:
            s.update(new_version=1)
        results.append(all_params(ss, 1))
    for n in results[0]:
        np.testing.assert_allclose(results[1][n], results[0][n], rtol=RTOL, atol=1e-7)


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam", "adamw"])
def test_optimizer_matches_optax(name):
    opt, tx = optimizer_and_optax_twin(name)
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((5, 3)).astype(np.float32)
    ours, tp, jx = _TensorOptimizer(opt), {"w": tf.constant(w0)}, {"w": jnp.asarray(w0)}
    t_state, j_state = ours.init(tp), tx.init(jx)
    for _ in range(6):
        g = rng.standard_normal((5, 3)).astype(np.float32) * 1e-3
        tp, t_state = ours.step(tp, {"w": tf.constant(g)}, t_state)
        updates, j_state = tx.update({"w": jnp.asarray(g)}, j_state, jx)
        jx = optax.apply_updates(jx, updates)
    np.testing.assert_allclose(tp["w"].numpy(), np.asarray(jx["w"]), rtol=1e-6, atol=1e-7)


def test_keras_adam_differs_from_optax_where_eps_matters():
    """Why the stage does not use keras.optimizers.Adam: it adds eps to sqrt(v)
    before bias correction, which moves small-gradient steps visibly."""
    w0 = np.ones((4,), np.float32)
    var = keras.Variable(w0)
    keras_adam = keras.optimizers.Adam(learning_rate=1e-2, epsilon=1e-3)
    ours = _TensorOptimizer(Optimizer("adam", lr=1e-2, eps=1e-3))
    p, state = {"w": tf.constant(w0)}, None
    state = ours.init(p)
    g = np.full((4,), 1e-3, np.float32)
    keras_adam.apply_gradients([(tf.constant(g), var)])
    p, state = ours.step(p, {"w": tf.constant(g)}, state)
    ours_step, keras_step = w0 - p["w"].numpy(), w0 - var.numpy()
    np.testing.assert_allclose(ours_step, 1e-2 * 1e-3 / (1e-3 + 1e-3), rtol=1e-4)  # optax: eps after correction
    assert abs(keras_step[0] - ours_step[0]) > 1e-4


# ---------------------------------------------------------------- twins

def jax_mlp_loss(params, x, y):
    h = x
    for i, (w, b) in enumerate(params):
        h = h @ w + b
        if i < len(params) - 1:
            h = jnp.tanh(h)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(h), y[:, None], axis=1))


def torch_twin(keras_params):
    layers = []
    for i, (w, b) in enumerate(dense_params(keras_params)):
        linear = nn.Linear(*w.shape)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(w.T.copy()))  # torch: [out, in]
            linear.bias.copy_(torch.from_numpy(b))
        layers += [linear, nn.Tanh()] if i < 2 else [linear]
    return TorchSequential(nn.Sequential(*layers),
                           loss=lambda logits, y: nn.functional.cross_entropy(logits, y.long()), device="cpu")


@pytest.mark.slow
def test_jax_torch_keras_twins_agree():
    """The same MLP, weights copied from Keras, in JAX, torch and Keras: same loss
    and gradients; then a mixed chain JAX layer 0 -> torch 1-2 -> Keras 3-4
    with arrays crossing by DLPack gives the all-JAX gradients too."""
    (keras_stage,) = stages(mlp(), [])
    p = all_params([keras_stage], 0)
    x, y = batch(0)
    jparams = [(jnp.asarray(w), jnp.asarray(b)) for w, b in dense_params(p)]
    loss_jax, grads_jax = jax.value_and_grad(jax_mlp_loss)(jparams, jnp.asarray(x), jnp.asarray(y))
    expected = {f"{i}.{part}": np.asarray(g) for i, layer in zip((0, 2, 4), grads_jax)
                for part, g in zip(("kernel", "bias"), layer)}

    loss_keras = keras_stage.forward(0, x, version=0, targets=y)
    keras_stage.backward(0)
    acc = {n[len("acc/"):]: a for n, a in keras_stage.state_dict().items() if n.startswith("acc/")}
    np.testing.assert_allclose(loss_keras, float(loss_jax), rtol=RTOL)
    for n, g in expected.items():
        np.testing.assert_allclose(acc[n], g, rtol=1e-4, atol=1e-6)

    (torch_stage,) = stages(torch_twin(p), [])
    loss_torch = torch_stage.forward(0, x, version=0, targets=y)
    torch_stage.backward(0)
    t_acc = {n[len("acc/"):]: a for n, a in torch_stage.state_dict().items() if n.startswith("acc/")}
    np.testing.assert_allclose(loss_torch, float(loss_jax), rtol=RTOL)
    for (i, part), torch_part in zip([(i, part) for i in (0, 2, 4) for part in ("kernel", "bias")],
                                     [f"{i}.{q}" for i in (0, 2, 4) for q in ("weight", "bias")]):
        g = t_acc[torch_part].T if part == "kernel" else t_acc[torch_part]
        np.testing.assert_allclose(g, expected[f"{i}.{part}"], rtol=1e-4, atol=1e-6)

    # Mixed: JAX layer 0, torch layers 1-2 (Tanh, Linear), Keras layers 3-4 (tanh, Dense).
    torch_mid = torch_twin(p).build_stage(StageSpec(1, 3, 1, 3), optimizer=Optimizer("sgd", lr=1.0))
    keras_tail = mlp().build_stage(StageSpec(2, 3, 3, 5), optimizer=Optimizer("sgd", lr=1.0))
    h0, vjp = jax.vjp(lambda w, b: jnp.asarray(x) @ w + b, *jparams[0])
    h1 = torch_mid.forward(0, h0, version=0)  # JAX array in, torch tensor out
    loss_mixed = keras_tail.forward(0, h1, version=0, targets=y)  # torch tensor in
    g1 = keras_tail.backward(0)
    g0 = torch_mid.backward(0, g1)  # TF tensor in
    gw, gb = vjp(to_jax(g0))
    np.testing.assert_allclose(loss_mixed, float(loss_jax), rtol=RTOL)
    np.testing.assert_allclose(np.asarray(gw), expected["0.kernel"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gb), expected["0.bias"], rtol=1e-4, atol=1e-6)

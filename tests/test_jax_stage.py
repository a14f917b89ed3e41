"""JaxSequential / JaxStage against plain jax.grad, optax and Flax NNX."""
import cloudpickle
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from oracles import initial_params

from models.layers import activation, apply_sequence, cross_entropy, dense
from pipetrain.optim import Optimizer
from pipetrain.stages.base import (
    PartitionError,
    SequentialModel,
    Stage,
    StageSpec,
    TensorSpec,
    stage_ranges,
)
from pipetrain.stages.jax_layers import Layer
from pipetrain.stages.jax_stage import JaxSequential, as_optax, layer_key

SGD = Optimizer("sgd", lr=0.1)


def mlp_layers(dtype="float32"):
    return [dense(32, dtype=dtype, name="d0"), activation("tanh", name="t0"), dense(32, dtype=dtype, name="d1"),
            activation("tanh", name="t1"), dense(4, dtype=dtype, name="d2")]


def batch(k, n=8, dtype=np.float32):
    rng = np.random.default_rng(k)
    return rng.standard_normal((n, 16)).astype(dtype), rng.integers(0, 4, n).astype(np.int32)


def model(layers=None, **kw):
    return JaxSequential(layers or mlp_layers(), loss=cross_entropy, example_input=batch(0)[0], **kw)


def stages(m, boundaries, opt=SGD):
    ranges = stage_ranges(boundaries, len(m))
    return [m.build_stage(StageSpec(i, len(ranges), a, b), optimizer=opt) for i, (a, b) in enumerate(ranges)]


def run_microbatch(ss, k, x, y, version=0):
    for st in ss[:-1]:
        x = st.forward(k, x, version=version)
    loss = ss[-1].forward(k, x, version=version, targets=y)
    g = None
    for st in reversed(ss):
        g = st.backward(k, g)
    return loss


def oracle_grads(layers, params, batches):
    def loss(p, x, y):
        return cross_entropy(apply_sequence(layers, p, x), y)
    grads = [jax.grad(loss)(params, jnp.asarray(x), jnp.asarray(y)) for x, y in batches]
    return jax.tree_util.tree_map(lambda *g: sum(g) / len(g), *grads)


def acc_of(stage, count):
    """The stage's accumulated gradient (a sum), per layer, divided by count."""
    return {name: jax.tree_util.tree_map(lambda a: a / count, tree) for name, tree in stage._acc.items()}


# ---------------------------------------------------------------- protocol and init

def test_protocols_and_names():
    m = model()
    assert isinstance(m, SequentialModel)
    assert m.layer_names() == ["d0", "t0", "d1", "t1", "d2"]
    assert m.layer_param_counts() == [16 * 32 + 32, 0, 32 * 32 + 32, 0, 32 * 4 + 4]
    assert isinstance(stages(m, [2])[0], Stage)
    dup = JaxSequential([dense(4, name="d"), dense(4, name="d")], loss=cross_entropy)
    assert dup.layer_names() == ["0:d", "1:d"]


def test_initial_params_depend_only_on_seed_and_global_index():
    m = model(seed=3)
    want = initial_params(mlp_layers(), batch(0)[0], seed=3)
    for boundaries in ([], [2], [1, 3]):
        for st in stages(m, boundaries):
            for i in range(st.spec.start, st.spec.end):
                name = m.layer_names()[i]
                for a, b in zip(jax.tree_util.tree_leaves(st.params(0)[name]), jax.tree_util.tree_leaves(want[i])):
                    np.testing.assert_array_equal(a, b)


def test_input_signature_is_learned_from_the_first_trace_and_pickles():
    m = JaxSequential(mlp_layers(), loss=cross_entropy)
    with pytest.raises(PartitionError, match="input signature is unknown"):
        m.layer_param_counts()
    specs = m.trace_specs(batch(0)[0])
    assert specs[0] == TensorSpec((8, 32), "float32") and specs[-1] == TensorSpec((8, 4), "float32")
    m2 = cloudpickle.loads(cloudpickle.dumps(m))
    assert m2.layer_param_counts() == m.layer_param_counts()
    assert m2.input_spec == TensorSpec((8, 16), "float32")


def test_trace_error_names_the_layer_its_predecessor_and_the_input():
    bad = [dense(8, name="a"), activation("tanh", name="act"),
           Layer("needs5", lambda k, s: {"w": jnp.zeros((5, 2))}, lambda p, x: x @ p["w"])]
    m = JaxSequential(bad, loss=cross_entropy)
    with pytest.raises(PartitionError, match=r"layer 2 \(needs5\).*float32\[4,8\].*layer 1 \(act\)") as err:
        m.trace_specs(np.zeros((4, 3), np.float32))
    assert err.value.layer == 2
    with pytest.raises(PartitionError, match=r"layer 0 \(a\).*the model input"):
        JaxSequential([dense(8, name="a")], loss=cross_entropy).trace_specs(np.zeros((), np.float32))


# ---------------------------------------------------------------- numerics

@pytest.mark.parametrize("boundaries", [[], [2], [1, 4]])
def test_gradients_and_sgd_update_equal_jax_grad_of_the_whole_model(boundaries):
    m = model()
    ss = stages(m, boundaries)
    batches = [batch(1), batch(2)]
    losses = [run_microbatch(ss, k, x, y) for k, (x, y) in enumerate(batches)]
    params0 = initial_params(mlp_layers(), batches[0][0])
    want = oracle_grads(mlp_layers(), params0, batches)
    names = m.layer_names()
    for st in ss:
        got = acc_of(st, 2)
        for i in range(st.spec.start, st.spec.end):
            for a, b in zip(jax.tree_util.tree_leaves(got[names[i]]), jax.tree_util.tree_leaves(want[i])):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    want_loss = float(cross_entropy(apply_sequence(mlp_layers(), params0, batches[0][0]), batches[0][1]))
    assert losses[0] == pytest.approx(want_loss, rel=1e-6)
    for st in ss:
        st.update(new_version=1)
        for i in range(st.spec.start, st.spec.end):
            for a, p, g in zip(jax.tree_util.tree_leaves(st.params(1)[names[i]]),
                               jax.tree_util.tree_leaves(params0[i]), jax.tree_util.tree_leaves(want[i])):
                np.testing.assert_allclose(a, p - 0.1 * g, rtol=1e-5, atol=1e-7)
        assert st.versions() == (0, 1)


def test_adam_update_equals_optax_adam():
    m = model()
    (st,) = stages(m, [], Optimizer("adam", lr=0.01))
    params0 = st.params(0)
    x, y = batch(1)
    run_microbatch([st], 0, x, y)
    st.update(new_version=1)
    g = jax.grad(lambda p: cross_entropy(st._apply(p, jnp.asarray(x)), y))(params0)
    tx = optax.adam(0.01)
    updates, _ = tx.update(g, tx.init(params0), params0)
    for a, b in zip(jax.tree_util.tree_leaves(st.params(1)),
                    jax.tree_util.tree_leaves(optax.apply_updates(params0, updates))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    tx_given = optax.sgd(0.5)
    assert as_optax(tx_given) is tx_given
    with pytest.raises(TypeError, match="optimizer"):
        as_optax("adam")


def test_weight_stashing_backward_uses_the_forward_version():
    m = model()
    first, last = stages(m, [2])
    (x0, y0), (x1, y1) = batch(1), batch(2)
    # k=0 forward at v0 on both stages; k=1 runs fully and is applied (v1) before k=0's backward
    h0 = first.forward(0, x0, version=0)
    last.forward(0, h0, version=0, targets=y0)
    run_microbatch([first, last], 1, x1, y1)
    for st in (first, last):
        st.update(new_version=1)
    g = last.backward(0)
    first.backward(0, g)
    params0 = initial_params(mlp_layers(), x0)
    want = oracle_grads(mlp_layers(), params0, [(x0, y0)])  # at v0, not v1
    for st in (first, last):
        got = acc_of(st, 1)
        for i in range(st.spec.start, st.spec.end):
            for a, b in zip(jax.tree_util.tree_leaves(got[m.layer_names()[i]]), jax.tree_util.tree_leaves(want[i])):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert not np.allclose(first.params(1)["d0"]["w"], first.params(0)["d0"]["w"])


def test_compiles_once_per_input_shape():
    first, last = stages(model(), [2])
    for k in range(3):
        run_microbatch([first, last], k, *batch(k))
    for st in (first, last):
        assert st.trace_counts["forward"] == 1 and st.trace_counts["backward"] == 1
        assert st._forward_jit._cache_size() == 1 and st._backward_jit._cache_size() == 1
    run_microbatch([first, last], 3, *batch(3, n=4))  # a new micro-batch size: one more compile each
    run_microbatch([first, last], 4, *batch(4, n=4))
    for st in (first, last):
        assert st.trace_counts["forward"] == 2 and st.trace_counts["backward"] == 2
    for v in (1, 2):
        for st in (first, last):
            st.update(new_version=v)
    assert first.trace_counts["update"] == 1


def test_evaluate_matches_forward_and_keeps_nothing():
    first, last = stages(model(), [3])
    x, y = batch(5)
    loss = last.forward(0, first.forward(0, x, version=0), version=0, targets=y)
    assert last.evaluate(first.evaluate(x), targets=y) == pytest.approx(loss, rel=1e-6)
    assert isinstance(first.evaluate(x), jax.Array)
    assert first.evaluate(x).shape == (8, 32)
    assert sorted(last._pending) == [0]


def test_torch_inputs_arrive_through_dlpack():
    torch = pytest.importorskip("torch")
    first, last = stages(model(), [2])
    x, y = batch(6)
    out = first.forward(0, torch.from_numpy(x), version=0)
    assert isinstance(out, jax.Array)
    loss = last.forward(0, torch.from_numpy(np.array(out)), version=0, targets=torch.from_numpy(y))
    g = last.backward(0)
    assert isinstance(g, jax.Array) and g.shape == (8, 32)
    assert first.backward(0, torch.from_numpy(np.array(g))) is None
    assert np.isfinite(loss)


# ---------------------------------------------------------------- pytree boundaries

def _split_tuple():
    return Layer("split", lambda k, s: {"w": jax.random.normal(k, (16, 8)) * 0.3},
                 lambda p, x: (jnp.tanh(x @ p["w"]), x[:, :8]))


def _to_dict():
    def apply(p, xs):
        a, b = xs
        return {"h": a * p["s"] + b, "mask": (b > 0).astype(jnp.int32)}
    return Layer("to_dict", lambda k, s: {"s": jnp.full((8,), 1.5)}, apply)


def _masked_head():
    def apply(p, d):
        return (d["h"] * d["mask"]) @ p["w"]
    return Layer("head", lambda k, s: {"w": jax.random.normal(k, (8, 4)) * 0.3}, apply)


@pytest.mark.parametrize("boundaries", [[1, 2], [2], [1]])
def test_tuple_and_dict_boundaries_with_integer_leaves(boundaries):
    layers = [_split_tuple(), _to_dict(), _masked_head()]
    m = JaxSequential(layers, loss=cross_entropy, example_input=batch(0)[0])
    specs = m.trace_specs(batch(0)[0])
    assert specs[1] == {"h": TensorSpec((8, 8), "float32"), "mask": TensorSpec((8, 8), "int32")}
    ss = stages(m, boundaries)
    x, y = batch(1)
    for st in ss[:-1]:
        x_in = x
        x = st.forward(0, x, version=0)
    ss[-1].forward(0, x, version=0, targets=y)
    g = None
    for st in reversed(ss):
        g = st.backward(0, g)
        if st.spec.index == len(ss) - 1 and st.spec.start == 2:  # the head received the dict
            assert g["mask"] is None and g["h"].shape == (8, 8)
    del x_in
    params0 = initial_params(layers, batch(1)[0])
    want = oracle_grads(layers, params0, [batch(1)])
    for st in ss:
        for i in range(st.spec.start, st.spec.end):
            for a, b in zip(jax.tree_util.tree_leaves(st._acc[m.layer_names()[i]]), jax.tree_util.tree_leaves(want[i])):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_output_gradient_of_the_wrong_shape_or_structure_names_stage_and_k():
    first, _ = stages(JaxSequential([_split_tuple(), _to_dict(), _masked_head()], loss=cross_entropy,
                                    example_input=batch(0)[0]), [1])
    first.forward(7, batch(1)[0], version=0)
    with pytest.raises(ValueError, match="stage 0, micro-batch 7.*shape"):
        first.backward(7, (jnp.zeros((8, 3)), jnp.zeros((8, 8))))
    with pytest.raises(ValueError, match="stage 0, micro-batch 7: output gradient does not match"):
        first.backward(7, {"a": jnp.zeros((8, 8))})


# ---------------------------------------------------------------- Flax NNX

def test_nnx_factories_and_instances():
    seed = 4
    built = nnx.Linear(32, 4, rngs=nnx.Rngs(123))
    layers = [lambda rngs: nnx.Linear(16, 32, rngs=rngs), ("act", activation("tanh")), ("out", built)]
    m = JaxSequential(layers, loss=cross_entropy, seed=seed, example_input=batch(0)[0])
    assert m.layer_names() == ["Linear", "act", "out"]
    assert m.layer_param_counts() == [16 * 32 + 32, 0, 32 * 4 + 4]
    m = cloudpickle.loads(cloudpickle.dumps(m))
    first, last = stages(m, [1])
    want0 = nnx.Linear(16, 32, rngs=nnx.Rngs(layer_key(seed, 0)))  # factory: key from (seed, index)
    np.testing.assert_array_equal(first.params(0)["Linear"]["kernel"][...], want0.kernel[...])
    np.testing.assert_array_equal(last.params(0)["out"]["kernel"][...], built.kernel[...])  # instance: as is
    x, y = batch(1)
    run_microbatch([first, last], 0, x, y)

    def loss(l0, l2):
        return cross_entropy(l2(jnp.tanh(l0(jnp.asarray(x)))), y)
    g0, g2 = nnx.grad(loss, argnums=(0, 1))(want0, built)
    np.testing.assert_allclose(first._acc["Linear"]["kernel"][...], g0.kernel[...], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(last._acc["out"]["bias"][...], g2.bias[...], rtol=1e-5, atol=1e-7)
    assert "v0/out/kernel" in last.state_dict()


def test_nnx_module_with_non_param_state_is_refused():
    with pytest.raises(TypeError, match="layer 1 .*Dropout.*non-parameter"):
        JaxSequential([activation("tanh"), nnx.Dropout(0.1, rngs=nnx.Rngs(0))], loss=cross_entropy)
    with pytest.raises(TypeError, match="layer 0 is int"):
        JaxSequential([3], loss=cross_entropy)


# ---------------------------------------------------------------- state

def _bf16_dense(out_features, name):
    """bfloat16 parameters (not only activations), to check they round-trip."""
    def init(key, x_spec):
        return {"w": (jax.random.normal(key, (x_spec.shape[-1], out_features)) * 0.2).astype(jnp.bfloat16)}
    return Layer(name, init, lambda p, x: x.astype(jnp.bfloat16) @ p["w"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_state_dict_round_trip_is_bit_exact(dtype):
    np_dtype = jnp.bfloat16 if dtype == "bfloat16" else np.float32
    layers = mlp_layers(dtype)
    if dtype == "bfloat16":
        layers[0] = _bf16_dense(32, "d0")
    m = JaxSequential(layers, loss=cross_entropy, example_input=batch(0, dtype=np_dtype)[0])
    opt = Optimizer("adam", lr=0.01)
    a = stages(m, [2], opt)
    for k in range(2):
        run_microbatch(a, k, *batch(k, dtype=np_dtype))
    for st in a:
        st.update(new_version=1)
    run_microbatch(a, 2, *batch(2, dtype=np_dtype))  # leave an accumulator behind
    states = [st.state_dict() for st in a]
    assert states[0]["v1/d0/w"].dtype == np.dtype(np_dtype)
    assert {"meta/count", "meta/latest", "opt/0/count", "acc/d0/w", "v0/d0/w"} <= set(states[0])
    b = stages(m, [2], opt)
    for st, state in zip(b, states):
        st.load_state_dict(state)
    for side in (a, b):
        for st in side:
            st.update(new_version=2)
        run_microbatch(side, 3, *batch(3, dtype=np_dtype))
    for sa, sb in zip(a, b):
        assert sa.versions() == sb.versions() == (0, 1, 2)
        sd_a, sd_b = sa.state_dict(), sb.state_dict()
        assert sd_a.keys() == sd_b.keys()
        for key in sd_a:
            assert sd_a[key].tobytes() == sd_b[key].tobytes() and sd_a[key].dtype == sd_b[key].dtype, key


def test_load_state_dict_errors_name_the_key():
    st, _ = stages(model(), [2])
    state = st.state_dict()
    with pytest.raises(KeyError, match="stage 0: state has no 'v0/d0/w'"):
        st.load_state_dict({k: v for k, v in state.items() if k != "v0/d0/w"})
    with pytest.raises(KeyError, match="unexpected state keys.*'v0/zzz'"):
        st.load_state_dict({**state, "v0/zzz": np.zeros(1)})
    with pytest.raises(ValueError, match="'v0/d0/b' is float64"):
        st.load_state_dict({**state, "v0/d0/b": np.zeros(32)})


# ---------------------------------------------------------------- errors

def test_protocol_misuse_names_stage_and_microbatch():
    first, last = stages(model(), [2])
    x, _y = batch(1)
    with pytest.raises(RuntimeError,
                       match="stage 1, micro-batch 4: backward of a micro-batch that was never forwarded"):
        last.backward(4)
    with pytest.raises(KeyError, match="stage 0, micro-batch 2: no weight version 5; held: \\(0,\\)"):
        first.forward(2, x, version=5)
    h = first.forward(2, x, version=0)
    with pytest.raises(RuntimeError, match="stage 0, micro-batch 2: forward twice"):
        first.forward(2, x, version=0)
    with pytest.raises(ValueError, match="stage 1, micro-batch 2: the last stage needs targets"):
        last.forward(2, h, version=0)
    with pytest.raises(ValueError, match="stage 0: cannot release weight version 0, the latest"):
        first.release(0)
    first.update(new_version=1)
    with pytest.raises(ValueError, match="stage 0: weight version 1 exists already"):
        first.update(new_version=1)
    first.release(0)
    assert first.versions() == (1,)
    with pytest.raises(PartitionError, match="stage 3: layers \\[4, 9\\)"):
        model().build_stage(StageSpec(3, 4, 4, 9), optimizer=SGD)


# ---------------------------------------------------------------- costs

def test_layer_costs_flops_and_profile():
    m = model()
    x = batch(0)[0]
    flops = m.layer_costs("flops", x)
    assert len(flops) == 5 and all(f >= 0 for f in flops)
    # forward + backward of a dense layer: ~3 matmuls of 2*b*in*out flops each
    assert flops[2] >= 2 * 2 * 8 * 32 * 32 and flops[2] > flops[1]
    profile = m.layer_costs("profile", x, repeats=3)
    assert len(profile) == 5 and all(t > 0 for t in profile)
    assert m.layer_costs("profile", TensorSpec((8, 16), "float32"), repeats=1)[0] > 0
    with pytest.raises(ValueError, match="'flops' or 'profile'"):
        m.layer_costs("guess", x)
    assert m.layer_param_bytes() == [4 * c for c in m.layer_param_counts()]

"""TorchSequential / TorchStage against plain autograd, optax and a plain-JAX twin."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
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
from pipetrain.stages.tensors import to_jax, to_numpy
from pipetrain.stages.torch_stage import TorchSequential, _TensorOptimizer
from stage_helpers import assert_state_round_trip, batch, optimizer_and_optax_twin, pipeline_step, stages

SIZES = [(16, 32), (32, 32), (32, 4)]
RTOL = 1e-5


def loss_fn(logits, labels):
    return nn.functional.cross_entropy(logits, labels.long())


def mlp(seed=0):
    layers = [lambda: nn.Linear(16, 32), nn.Tanh, lambda: nn.Linear(32, 32), nn.Tanh, lambda: nn.Linear(32, 4)]
    return TorchSequential(layers, loss=loss_fn, seed=seed, device="cpu")


def reference_grads(model, params, xs, ys):
    """Mean loss-gradient over micro-batches with one unpartitioned nn.Sequential."""
    net = nn.Sequential(*[model.make_layer(i) for i in range(len(model))])
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(params[name])
    net.zero_grad()
    for x, y in zip(xs, ys):
        (loss_fn(net(torch.from_numpy(x)), torch.from_numpy(y)) / len(xs)).backward()
    return {n: p.grad.clone() for n, p in net.named_parameters()}


def all_params(stages_, version):
    return {n: t for s in stages_ for n, t in s.params(version).items()}


def test_protocols_and_model_description():
    model = mlp()
    assert isinstance(model, SequentialModel)
    assert isinstance(stages(model, [2])[0], Stage)
    assert model.layer_names() == ["0:Linear", "1:Tanh", "2:Linear", "3:Tanh", "4:Linear"]
    assert model.layer_param_counts() == [16 * 32 + 32, 0, 32 * 32 + 32, 0, 32 * 4 + 4]
    specs = model.trace_specs(np.zeros((8, 16), np.float32))
    assert specs[0] == TensorSpec((8, 32), "float32") and specs[-1] == TensorSpec((8, 4), "float32")
    with pytest.raises(PartitionError, match="layer 0:Linear.*float32\\[8,15\\]"):
        model.trace_specs(TensorSpec((8, 15), "float32"))


def test_layer_costs():
    model = mlp()
    x = np.zeros((8, 16), np.float32)
    flops = model.layer_costs("flops", x)
    # Linear forward 2*b*i*o, backward twice that (input and weight gradients); Tanh is free.
    assert flops[0] == 3 * 2 * 8 * 16 * 32 and flops[1] == 0 and flops[4] == 3 * 2 * 8 * 32 * 4
    profile = model.layer_costs("profile", x, repeats=3)
    assert len(profile) == 5 and all(t > 0 for t in profile)
    with pytest.raises(ValueError, match="'flops' or 'profile'"):
        model.layer_costs("guess", x)


def test_every_partition_starts_from_the_same_weights():
    whole = all_params(stages(mlp(seed=3), []), 0)
    split = all_params(stages(mlp(seed=3), [1, 3]), 0)
    assert whole.keys() == split.keys() and all(torch.equal(whole[n], split[n]) for n in whole)
    other = all_params(stages(mlp(seed=4), []), 0)
    assert not torch.equal(whole["0.weight"], other["0.weight"])


@pytest.mark.parametrize("boundaries", [[2], [1, 4]])
def test_split_gradients_and_update_equal_unpartitioned(boundaries):
    model = mlp()
    ss = stages(model, boundaries, Optimizer("sgd", lr=0.1))
    v0 = all_params(ss, 0)
    xs, ys = zip(*(batch(k) for k in range(2)))
    losses = [pipeline_step(ss, k, xs[k], ys[k]) for k in range(2)]
    expected = reference_grads(model, v0, xs, ys)
    for s in ss:
        s.update(new_version=1)
    v1 = all_params(ss, 1)
    for n, g in expected.items():
        np.testing.assert_allclose(v1[n].numpy(), (v0[n] - 0.1 * g).numpy(), rtol=RTOL, atol=1e-7)
    assert all(np.isfinite(losses))


def test_weight_stashing_backward_uses_the_forward_version():
    model = mlp()
    ss = stages(model, [2], Optimizer("sgd", lr=0.5))
    v0 = all_params(ss, 0)
    (x0, y0), (x1, y1) = batch(0), batch(1)
    pipeline_step(ss, 0, x0, y0)
    # Micro-batch 1 runs forward at v0, then both stages move to v1, then backward.
    h = to_numpy(ss[0].forward(1, x1, version=0))
    ss[1].forward(1, h, version=0, targets=y1)
    for s in ss:
        s.update(new_version=1)
    assert not torch.equal(ss[0].params(1)["0.weight"], v0["0.weight"])
    g = ss[1].backward(1, None)
    ss[0].backward(1, to_numpy(g))
    expected = reference_grads(model, v0, [x1], [y1])
    acc = {n[len("acc/"):]: a for s in ss for n, a in s.state_dict().items() if n.startswith("acc/")}
    for n, grad in expected.items():
        np.testing.assert_allclose(acc[n], grad.numpy(), rtol=RTOL, atol=1e-7)
    wrong = reference_grads(model, all_params(ss, 1), [x1], [y1])
    assert not np.allclose(acc["0.weight"], wrong["0.weight"].numpy(), rtol=1e-3)


def test_state_dict_round_trip_is_bit_exact():
    model = mlp()
    opt = Optimizer("adamw", lr=1e-2, weight_decay=0.1)
    a = stages(model, [2], opt)
    for k in range(3):
        pipeline_step(a, k, *batch(k), version=k)
        for s in a:
            s.update(new_version=k + 1)
    x, y = batch(9)
    pipeline_step(a, 9, x, y, version=2)  # gradients accumulated from an old version, not applied yet
    saved = [s.state_dict() for s in a]
    assert "meta/versions" in saved[0] and "opt/mu/0.weight" in saved[0] and "v2/0.weight" in saved[0]
    b = stages(model, [2], opt)
    assert_state_round_trip(a, b, saved)
    with pytest.raises(KeyError, match="unexpected state keys"):
        b[0].load_state_dict({**saved[0], "v7/0.weight": saved[0]["v0/0.weight"]})


class Split(nn.Module):
    """h -> (h, 2h, int positions): a tuple boundary with an int leaf."""

    def forward(self, h):
        return h, 2 * h, torch.arange(h.shape[0], dtype=torch.int32)


class Merge(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        a, b, positions = x
        assert positions.dtype == torch.int32
        return torch.tanh(a) * self.scale + b


def test_tuple_boundary_gradients_equal_unpartitioned():
    model = TorchSequential([lambda: nn.Linear(16, 32), Split, Merge, lambda: nn.Linear(32, 4)], loss=loss_fn)
    assert model.trace_specs(TensorSpec((8, 16), "float32"))[1] == (
        TensorSpec((8, 32), "float32"), TensorSpec((8, 32), "float32"), TensorSpec((8,), "int32"))
    ss = stages(model, [2], Optimizer("sgd", lr=1.0))
    v0 = all_params(ss, 0)
    x, y = batch(0)
    h = ss[0].forward(0, x, version=0)
    assert isinstance(h, tuple) and len(h) == 3
    ss[1].forward(0, to_numpy(h), version=0, targets=y)
    g = ss[1].backward(0)
    assert isinstance(g, tuple) and g[2] is None
    assert ss[0].backward(0, to_numpy(g)) is None
    for s in ss:
        s.update(new_version=1)
    expected = reference_grads(model, v0, [x], [y])
    v1 = all_params(ss, 1)
    for n, grad in expected.items():
        np.testing.assert_allclose((v0[n] - v1[n]).numpy(), grad.numpy(), rtol=RTOL, atol=1e-6)



def _three_stage_run(split_backward, *, split_calls=False):
    """Three micro-batches through [Linear] | [Split, Merge, Tanh] | [Linear, Tanh, Linear]:
    the middle and last stages hold several layers, a tuple with an int leaf inside one."""
    layers = [lambda: nn.Linear(16, 32), Split, Merge, nn.Tanh, lambda: nn.Linear(32, 32), nn.Tanh,
              lambda: nn.Linear(32, 4)]
    model = TorchSequential(layers, loss=loss_fn, split_backward=split_backward)
    ss = stages(model, [1, 4], Optimizer("adam", lr=1e-2))
    sent = []
    for k in range(3):
        x, y = batch(k)
        h = to_numpy(ss[0].forward(k, x, version=0))
        h = to_numpy(ss[1].forward(k, h, version=0))
        ss[2].forward(k, h, version=0, targets=y)
        g = None
        for s in reversed(ss[1:]):
            if split_calls:
                g = s.backward_input(k, g)
                sent.append(to_numpy(g).copy())  # leaves before the weight gradients exist
                s.backward_weights(k)
            else:
                g = s.backward(k, g)
                sent.append(to_numpy(g).copy())
            g = to_numpy(g)
        ss[0].backward(k, g)
    for s in ss:
        s.update(new_version=1)
    return ss, sent


def test_split_backward_gives_the_same_bits_as_one_fused_backward():
    fused, fused_sent = _three_stage_run(False)
    assert [s.split_backward for s in fused] == ["never"] * 3
    for split_calls in (False, True):
        split, split_sent = _three_stage_run(True, split_calls=split_calls)
        # the first stage has no input gradient
        assert [s.split_backward for s in split] == ["never", "always", "always"]
        for a, b in zip(fused_sent, split_sent):
            np.testing.assert_array_equal(a, b)
        for sa, sb in zip(fused, split):
            for n, t in sa.params(1).items():
                assert torch.equal(t, sb.params(1)[n]), n


def test_split_backward_takes_a_policy_and_names_a_bad_one():
    assert [TorchSequential([nn.Tanh], loss=loss_fn, split_backward=v).split_backward
            for v in (False, True, "auto")] == ["never", "always", "auto"]
    assert TorchSequential([nn.Tanh], loss=loss_fn).split_backward == "auto"
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="split_backward must be True, False or 'auto', got"):
            TorchSequential([nn.Tanh], loss=loss_fn, split_backward=bad)


def test_split_backward_is_guarded():
    model = mlp()
    ss = stages(model, [2])
    x, y = batch(0)
    ss[1].forward(0, to_numpy(ss[0].forward(0, x, version=0)), version=0, targets=y)
    ss[1].backward_input(0)
    with pytest.raises(RuntimeError, match="stage 1: update with the weight gradients of micro-batches \\[0\\]"):
        ss[1].update(new_version=1)
    with pytest.raises(RuntimeError, match="state_dict between backward_input and backward_weights"):
        ss[1].state_dict()
    ss[1].backward_weights(0)
    with pytest.raises(RuntimeError, match="weight gradients of micro-batch 0 without its backward_input"):
        ss[1].backward_weights(0)
    ss[1].update(new_version=1)

@pytest.mark.parametrize("name", ["sgd", "momentum", "adam", "adamw"])
def test_optimizer_matches_optax(name):
    opt, tx = optimizer_and_optax_twin(name)
    rng = np.random.default_rng(0)
    p0 = {"w": rng.standard_normal((5, 3)).astype(np.float32)}
    ours, jx = _TensorOptimizer(opt), {"w": jnp.asarray(p0["w"])}
    tp = {"w": torch.from_numpy(p0["w"].copy())}
    t_state, j_state = ours.init(tp), tx.init(jx)
    for _ in range(6):
        g = {"w": rng.standard_normal((5, 3)).astype(np.float32) * 1e-3}
        tp, t_state = ours.step(tp, {"w": torch.from_numpy(g["w"])}, t_state)
        updates, j_state = tx.update({"w": jnp.asarray(g["w"])}, j_state, jx)
        jx = optax.apply_updates(jx, updates)
    np.testing.assert_allclose(tp["w"].numpy(), np.asarray(jx["w"]), rtol=1e-6, atol=1e-7)



@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_optimizer_takes_the_mean_of_summed_gradients(name):
    """The stage hands the optimizer the sum of its micro-batches' gradients:
    the step must equal one on their mean (SGD folds the 1/n into its step size)."""
    rng = np.random.default_rng(2)
    w0 = rng.standard_normal((5, 3)).astype(np.float32)
    grads = [rng.standard_normal((5, 3)).astype(np.float32) for _ in range(4)]
    ours = _TensorOptimizer(Optimizer(name, lr=1e-2))
    state = ours.init({"w": torch.from_numpy(w0)})
    summed, _ = ours.step({"w": torch.from_numpy(w0)}, {"w": torch.from_numpy(np.sum(grads, axis=0))}, state, summed=4)
    mean, _ = ours.step({"w": torch.from_numpy(w0)}, {"w": torch.from_numpy(np.mean(grads, axis=0))}, state)
    assert not np.allclose(summed["w"].numpy(), w0)
    np.testing.assert_allclose(summed["w"].numpy(), mean["w"].numpy(), rtol=1e-6, atol=1e-7)

def test_adam_matches_torch_optim_adam():
    """torch.optim.Adam puts eps where optax does (after the bias-corrected square
    root), so the two agree to float rounding; only the order of operations differs
    (torch folds the bias corrections into the step size and the denominator), which
    moves the accumulated displacement by a few 1e-5 of itself after 6 steps."""
    rng = np.random.default_rng(1)
    w0 = rng.standard_normal((5, 3)).astype(np.float32)
    param = nn.Parameter(torch.from_numpy(w0.copy()))
    ref = torch.optim.Adam([param], lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    ours = _TensorOptimizer(Optimizer("adam", lr=1e-2))
    p = {"w": torch.from_numpy(w0.copy())}
    state = ours.init(p)
    for _ in range(6):
        g = torch.from_numpy(rng.standard_normal((5, 3)).astype(np.float32) * 1e-3)
        param.grad = g.clone()
        ref.step()
        p, state = ours.step(p, {"w": g}, state)
    np.testing.assert_allclose(p["w"].numpy() - w0, param.detach().numpy() - w0, rtol=2e-4, atol=1e-7)


def jax_mlp_loss(params, x, y):
    h = x
    for i, (w, b) in enumerate(params):
        h = h @ w.T + b  # torch stores Linear weights as [out, in]
        if i < len(params) - 1:
            h = jnp.tanh(h)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(h), y[:, None], axis=1))


def test_plain_jax_twin_same_loss_and_gradients_with_jax_arrays_at_the_boundary():
    """JAX layer 0 feeds a torch stage (layers 1-4) through DLPack; its input
    gradient flows back into jax.vjp. Everything equals the all-JAX model."""
    model = mlp()
    (whole,) = stages(model, [])
    w = whole.params(0)
    jparams = [(to_jax(w[f"{i}.weight"]), to_jax(w[f"{i}.bias"])) for i in (0, 2, 4)]
    x, y = batch(0)
    jx, jy = jnp.asarray(x), jnp.asarray(y)
    loss_jax, grads_jax = jax.value_and_grad(jax_mlp_loss)(jparams, jx, jy)

    torch_tail = model.build_stage(StageSpec(1, 2, 1, 5), optimizer=Optimizer("sgd", lr=1.0))
    h, vjp = jax.vjp(lambda w0, b0: jx @ w0.T + b0, *jparams[0])
    loss_torch = torch_tail.forward(0, h, version=0, targets=jy)  # JAX arrays straight in
    g_h = torch_tail.backward(0)
    assert isinstance(g_h, torch.Tensor)
    g_w0, g_b0 = vjp(to_jax(g_h))
    np.testing.assert_allclose(loss_torch, float(loss_jax), rtol=RTOL)
    np.testing.assert_allclose(np.asarray(g_w0), np.asarray(grads_jax[0][0]), rtol=RTOL, atol=1e-7)
    np.testing.assert_allclose(np.asarray(g_b0), np.asarray(grads_jax[0][1]), rtol=RTOL, atol=1e-7)
    torch_tail.update(new_version=1)
    for (i, (gw, gb)) in zip((2, 4), grads_jax[1:]):
        step = {n: (torch_tail.params(0)[n] - torch_tail.params(1)[n]).numpy() for n in (f"{i}.weight", f"{i}.bias")}
        np.testing.assert_allclose(step[f"{i}.weight"], np.asarray(gw), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(step[f"{i}.bias"], np.asarray(gb), rtol=1e-4, atol=1e-7)


def test_clear_errors():
    ss = stages(mlp(), [2])
    with pytest.raises(RuntimeError, match="stage 0: backward of micro-batch 3 without its forward"):
        ss[0].backward(3, np.zeros((8, 32), np.float32))
    with pytest.raises(KeyError, match="stage 0: no weight version 4"):
        ss[0].forward(0, batch(0)[0], version=4)
    with pytest.raises(ValueError, match="cannot release weight version 0, the latest"):
        ss[0].release(0)

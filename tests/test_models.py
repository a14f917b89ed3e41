"""models/: the example layers, the GPT, the MLP and the text corpus.

The GPT is checked unpartitioned (init_sequence / apply_sequence), the oracle
that staged runs are compared against elsewhere.
"""
from __future__ import annotations

import math
import pickle
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from models import gpt, mlp, text
from models.layers import apply_sequence, dense, init_sequence

SMALL = {"context": 16, "d_model": 32, "n_heads": 4, "n_layers": 2}


def _gpt(batch=2, seed=0, **kw):
    layers = gpt.layers(**kw)
    spec = jax.ShapeDtypeStruct((batch, kw.get("context", 64)), jnp.int32)
    params = init_sequence(layers, spec, keys=jax.random.split(jax.random.key(seed), len(layers)))
    return layers, params


def _tokens(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, text.VOCAB_SIZE, shape), jnp.int32)


# ---- text corpus and CharWindows -------------------------------------------

def test_corpus_is_real_text_split_into_disjoint_parts():
    assert text.VOCAB_SIZE == 97
    ids = text.encode(text.corpus())
    assert len(ids) > 400_000
    assert (ids == text.UNKNOWN_ID).mean() < 1e-3  # the alphabet covers the text
    train, heldout = text.tokens("train"), text.tokens("heldout")
    assert len(train) + len(heldout) == len(ids)
    assert len(heldout) == pytest.approx(0.1 * len(ids), abs=1)
    np.testing.assert_array_equal(np.concatenate([train, heldout]), ids)
    assert "statement" in text.decode(heldout)
    with pytest.raises(ValueError, match="split"):
        text.tokens("test")


def test_encode_decode_round_trip_and_unknown():
    assert text.decode(text.encode("def f(x):\n    return x ~ 1")) == "def f(x):\n    return x ~ 1"
    assert text.encode("a\u00dfb").tolist() == [text.encode("a")[0], text.UNKNOWN_ID, text.encode("b")[0]]


def test_char_windows_are_deterministic_shifted_and_inside_their_split():
    src = text.CharWindows(split="train", context=32, microbatch_size=8, seed=3)
    x, y = src.inputs(5), src.targets(5)
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == np.int32
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # targets are the next characters
    again = pickle.loads(pickle.dumps(src))  # what a worker would hold
    np.testing.assert_array_equal(again.inputs(5), x)
    np.testing.assert_array_equal(again.targets(5), y)
    assert not np.array_equal(src.inputs(6), x)
    other_seed = text.CharWindows(split="train", context=32, microbatch_size=8, seed=4)
    assert not np.array_equal(other_seed.inputs(5), x)
    for split in text.SPLITS:
        s = text.CharWindows(split=split, context=32, microbatch_size=8)
        starts = s.starts(7)
        assert starts.max() + 32 < len(text.tokens(split))  # window and its target inside the split
        np.testing.assert_array_equal(s.inputs(7)[0], text.tokens(split)[starts[0] : starts[0] + 32])


def test_char_windows_cover_an_epoch_without_repeats_then_reshuffle():
    src = text.CharWindows(split="heldout", context=64, microbatch_size=512)
    per_epoch = src.microbatches_per_epoch
    epoch0 = np.concatenate([src.starts(k) for k in range(per_epoch)])
    assert len(np.unique(epoch0)) == len(epoch0) == per_epoch * 512
    assert not np.array_equal(src.starts(per_epoch), src.starts(0))


def test_heldout_batches_are_fixed():
    a = text.heldout_batches(3, context=16, microbatch_size=4)
    b = text.heldout_batches(3, context=16, microbatch_size=4)
    assert len(a) == 3
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.shape == ya.shape == (4, 16)
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(xa[:, 1:], ya[:, :-1])


def test_unigram_loss_is_plausible():
    heldout = text.unigram_loss("heldout")
    assert 2.0 < heldout < 4.6
    assert heldout < text.uniform_loss() - 1.0  # character frequencies carry real information
    assert text.unigram_loss("train") < text.uniform_loss()


# ---- GPT ---------------------------------------------------------------------

def test_gpt_layers_and_shapes():
    layers, params = _gpt(**SMALL)
    assert [layer.name for layer in layers] == ["embed", "block0", "block1", "head"]
    x = _tokens((2, 16))
    h = x
    for layer, p in zip(layers, params):
        h = layer.apply(p, h)
        assert h.dtype == jnp.float32
    assert h.shape == (2, 16, text.VOCAB_SIZE)
    shorter = apply_sequence(layers, params, x[:, :5])  # t < context works
    np.testing.assert_allclose(shorter, h[:, :5], rtol=1e-5, atol=1e-5)


def test_gpt_attention_is_causal():
    layers, params = _gpt(**SMALL)
    x = _tokens((2, 16))
    changed = x.at[:, 9].set((x[:, 9] + 1) % text.VOCAB_SIZE)
    a, b = apply_sequence(layers, params, x), apply_sequence(layers, params, changed)
    np.testing.assert_array_equal(a[:, :9], b[:, :9])  # the past cannot see the future
    assert not np.allclose(a[:, 9:], b[:, 9:])


def test_gpt_loss_at_init_is_near_uniform():
    layers, params = _gpt(batch=8)  # default sizes
    x, y = _tokens((8, 64), 1), _tokens((8, 64), 2)
    loss = float(gpt.loss_fn(apply_sequence(layers, params, x), y))
    assert abs(loss - math.log(text.VOCAB_SIZE)) < 0.05


def test_gpt_bfloat16_activations_track_float32():
    layers32, params = _gpt(**SMALL)
    layers16 = gpt.layers(**SMALL, dtype="bfloat16")
    x, y = _tokens((2, 16)), _tokens((2, 16), 1)
    assert layers16[1].apply(params[1], layers16[0].apply(params[0], x)).dtype == jnp.bfloat16
    loss32 = gpt.loss_fn(apply_sequence(layers32, params, x), y)
    loss16 = gpt.loss_fn(apply_sequence(layers16, params, x), y)
    assert loss16.dtype == jnp.float32
    assert abs(float(loss16) - float(loss32)) < 0.02


def test_gpt_init_follows_gpt2_scales():
    _, params = _gpt(**{**SMALL, "d_model": 128, "n_layers": 4})
    block = params[1]
    assert np.std(block["attn"]["qkv"]["w"]) == pytest.approx(0.02, rel=0.05)
    assert np.std(block["mlp"]["proj"]["w"]) == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert not np.any(block["mlp"]["fc"]["b"])


def test_gpt_layer_errors_name_the_layer():
    layers = gpt.layers(**SMALL)
    with pytest.raises(ValueError, match="layer block0.*32"):
        layers[1].init(jax.random.key(0), jax.ShapeDtypeStruct((2, 16, 48), jnp.float32))
    with pytest.raises(ValueError, match="layer embed.*16"):
        layers[0].init(jax.random.key(0), jax.ShapeDtypeStruct((2, 17), jnp.int32))
    with pytest.raises(ValueError, match="n_heads"):
        gpt.layers(d_model=30, n_heads=4)


def test_gpt_build_makes_a_sequential_model():
    pytest.importorskip("pipetrain.stages.jax_stage")
    model = gpt.build()
    assert model.layer_names() == ["embed", "block0", "block1", "block2", "block3", "head"]
    assert gpt.example_input().shape == (16, 64)


@pytest.mark.slow
def test_gpt_training_beats_the_unigram_baseline():
    """Default-size GPT, micro-batch 16, adam 1e-3: ~100 steps (~1,600 windows,
    ~10 s on 2 cores) already take the held-out loss well under unigram."""
    layers, params = _gpt(batch=16)

    def loss(p, x, y):
        return gpt.loss_fn(apply_sequence(layers, p, x), y)

    opt = optax.adam(1e-3)

    @jax.jit
    def step(p, s, x, y):
        g = jax.grad(loss)(p, x, y)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    evaluate = jax.jit(loss)
    heldout = text.heldout_batches(8)

    def heldout_loss(p):
        return float(np.mean([evaluate(p, x, y) for x, y in heldout]))

    src = text.CharWindows(split="train", microbatch_size=16)
    state, start = opt.init(params), time.perf_counter()
    for k in range(120):
        params, state = step(params, state, src.inputs(k), src.targets(k))
    final, baseline = heldout_loss(params), text.unigram_loss()
    print(f"120 steps in {time.perf_counter() - start:.1f} s: held-out {final:.3f}, unigram {baseline:.3f}")
    assert final < baseline - 0.3


# ---- MLP ---------------------------------------------------------------------

def test_mlp_dataset_is_deterministic_and_balanced_enough():
    x, y = mlp.dataset(2000, seed=1)
    assert x.shape == (2000, mlp.FEATURES) and x.dtype == np.float32 and y.dtype == np.int32
    np.testing.assert_array_equal(mlp.dataset(2000, seed=1)[1], y)
    assert not np.array_equal(mlp.dataset(2000, seed=2)[0], x)
    assert np.bincount(y, minlength=mlp.NUM_CLASSES).min() > 2000 / mlp.NUM_CLASSES / 3
    src = mlp.source(256, microbatch_size=32)
    assert src.inputs(3).shape == (32, mlp.FEATURES) and src.targets(3).shape == (32,)


def test_mlp_layers_and_a_quick_fit():
    layers = mlp.layers(sizes=(32, 32), num_classes=4)
    assert [layer.name for layer in layers] == ["dense0", "act0", "dense1", "act1", "dense2"]
    x, y = mlp.dataset(4096, seed=0)
    spec = jax.ShapeDtypeStruct(x.shape, jnp.float32)
    params = init_sequence(layers, spec, keys=jax.random.split(jax.random.key(0), len(layers)))
    assert apply_sequence(layers, params, x).shape == (4096, 4)

    def loss(p):
        return mlp.loss_fn(apply_sequence(layers, p, x), y)

    opt = optax.adam(1e-2)

    @jax.jit
    def step(p, s):
        u, s = opt.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    state = opt.init(params)
    for _ in range(200):
        params, state = step(params, state)
    xt, yt = mlp.dataset(1024, seed=9)
    accuracy = float(np.mean(np.argmax(apply_sequence(layers, params, xt), -1) == yt))
    assert accuracy > 0.8  # chance is about 0.3; the teacher caps a student near 0.87


def test_dense_rejects_the_wrong_width():
    layer = dense(4, name="probe")
    params = layer.init(jax.random.key(0), jax.ShapeDtypeStruct((2, 3), jnp.float32))
    with pytest.raises(ValueError, match="layer probe"):
        layer.apply(params, jnp.ones((2, 5)))

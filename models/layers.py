"""Plain JAX layers for the example models: factories that return ``Layer``s.

Each layer is an (init, apply) pair of pure functions (see
``pipetrain.stages.jax_layers``), one Layer per unit the partitioner may cut
between: the embedding, each transformer block, the head, each dense and each
activation. Parameters are stored in float32; ``dtype="bfloat16"`` runs the
matrix products in bfloat16 and passes bfloat16 activations between layers
(half the boundary bytes), while layer norms, softmax and logits stay float32.
``dtype=None`` (the default) computes in the dtype the parameters arrive in:
float32, or bfloat16 when a stage runs with ``precision="bf16"`` (which casts
the float32 masters before the layer sees them), so the pipeline's precision
decides; with float32 parameters it is the same computation as "float32".
Initialization follows GPT-2 / nanoGPT: N(0, 0.02) weights, zero biases, and
residual output projections scaled by 1/sqrt(2 * n_layers).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pipetrain.stages.jax_layers import Layer

GPT2_STD = 0.02


def _normal(key, shape, std):
    return std * jax.random.normal(key, shape, jnp.float32)


def _linear_init(key, fan_in, fan_out, std):
    return {"w": _normal(key, (fan_in, fan_out), std), "b": jnp.zeros((fan_out,), jnp.float32)}


def _linear(p, x, dtype):
    dtype = dtype or p["w"].dtype  # None: the parameters' dtype as they arrive
    return x.astype(dtype) @ p["w"].astype(dtype) + p["b"].astype(dtype)


def _layer_norm_init(d):
    return {"scale": jnp.ones((d,), jnp.float32), "bias": jnp.zeros((d,), jnp.float32)}


def _layer_norm(p, x, eps=1e-5):
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def _expect_features(name, shape, d):
    if len(shape) < 2 or shape[-1] != d:
        raise ValueError(f"layer {name}: expects input [..., {d}], got shape {tuple(shape)}")


def embedding(*, vocab_size: int, context: int, d_model: int, dtype: str | None = None, name: str = "embed") -> Layer:
    """int32 tokens [b, t] (t <= context) -> token + learned position embeddings [b, t, d]."""

    def check(shape):
        if len(shape) != 2 or shape[1] > context:
            raise ValueError(f"layer {name}: expects int tokens [batch, t <= {context}], got shape {tuple(shape)}")

    def init(key, x_spec):
        check(x_spec.shape)
        k_tok, k_pos = jax.random.split(key)
        return {"tokens": _normal(k_tok, (vocab_size, d_model), GPT2_STD),
                "positions": _normal(k_pos, (context, d_model), GPT2_STD)}

    def apply(params, x):
        check(x.shape)
        h = jnp.take(params["tokens"], x, axis=0) + params["positions"][: x.shape[1]]
        return h.astype(dtype or params["tokens"].dtype)

    return Layer(name, init, apply)


def _causal_self_attention(p, x, n_heads, dtype):
    b, t, d = x.shape
    head_dim = d // n_heads
    q, k, v = jnp.split(_linear(p["qkv"], x, dtype), 3, axis=-1)
    q, k, v = (a.reshape(b, t, n_heads, head_dim).transpose(0, 2, 1, 3) for a in (q, k, v))
    scores = (q @ k.swapaxes(-1, -2)).astype(jnp.float32) / math.sqrt(head_dim)
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    # The diagonal is always allowed, so no row is all-masked and softmax stays finite.
    weights = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1).astype(dtype)
    y = (weights @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
    return _linear(p["out"], y, dtype)


def decoder_block(*, d_model: int, n_heads: int, n_layers: int, mlp_ratio: int = 4,
                  dtype: str | None = None, name: str = "block") -> Layer:
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x)).

    ``n_layers`` (the model's block count) scales the residual projections."""
    if d_model % n_heads:
        raise ValueError(f"layer {name}: d_model={d_model} is not divisible by n_heads={n_heads}")
    hidden = mlp_ratio * d_model
    residual_std = GPT2_STD / math.sqrt(2 * n_layers)

    def init(key, x_spec):
        _expect_features(name, x_spec.shape, d_model)
        k = jax.random.split(key, 4)
        return {"ln1": _layer_norm_init(d_model),
                "attn": {"qkv": _linear_init(k[0], d_model, 3 * d_model, GPT2_STD),
                         "out": _linear_init(k[1], d_model, d_model, residual_std)},
                "ln2": _layer_norm_init(d_model),
                "mlp": {"fc": _linear_init(k[2], d_model, hidden, GPT2_STD),
                        "proj": _linear_init(k[3], hidden, d_model, residual_std)}}

    def apply(params, x):
        _expect_features(name, x.shape, d_model)
        dt = dtype or params["attn"]["qkv"]["w"].dtype
        x = x.astype(dt)
        x = x + _causal_self_attention(params["attn"], _layer_norm(params["ln1"], x), n_heads, dt)
        mlp = params["mlp"]
        h = jax.nn.gelu(_linear(mlp["fc"], _layer_norm(params["ln2"], x), dt))
        return (x + _linear(mlp["proj"], h, dt)).astype(dt)

    return Layer(name, init, apply)


def lm_head(*, d_model: int, vocab_size: int, dtype: str | None = None, name: str = "head",
            tied: bool = False) -> Layer:
    """Final layer norm + linear map to vocabulary logits (float32).

    ``tied``: the map is ``h @ tokens.T + b`` with ``tokens`` shaped like the
    embedding's token table [vocab, d], so the model can tie the two
    (``pipetrain.ties``: the GPT's ``tie_embeddings``)."""

    def init(key, x_spec):
        _expect_features(name, x_spec.shape, d_model)
        if tied:
            return {"ln": _layer_norm_init(d_model), "tokens": _normal(key, (vocab_size, d_model), GPT2_STD),
                    "b": jnp.zeros((vocab_size,), jnp.float32)}
        return {"ln": _layer_norm_init(d_model), "out": _linear_init(key, d_model, vocab_size, GPT2_STD)}

    def apply(params, x):
        _expect_features(name, x.shape, d_model)
        h = _layer_norm(params["ln"], x)
        if tied:  # (dtype None: the parameters' dtype as they arrive, as _linear does)
            dt = dtype or params["tokens"].dtype
            logits = h.astype(dt) @ params["tokens"].astype(dt).T + params["b"].astype(dt)
        else:
            logits = _linear(params["out"], h, dtype)
        return logits.astype(jnp.float32)

    return Layer(name, init, apply)


def dense(out_features: int, *, std: float | None = None, dtype: str | None = None, name: str = "dense") -> Layer:
    """x [..., n] -> x @ w + b [..., out_features]; n is read from the input spec.
    Weights N(0, std), std defaulting to 1/sqrt(n) (LeCun)."""

    def init(key, x_spec):
        if len(x_spec.shape) < 1:
            raise ValueError(f"layer {name}: expects input [..., features], got a scalar")
        fan_in = int(x_spec.shape[-1])
        return _linear_init(key, fan_in, out_features, std if std is not None else 1 / math.sqrt(fan_in))

    def apply(params, x):
        if x.shape[-1] != params["w"].shape[0]:
            raise ValueError(f"layer {name}: expects input [..., {params['w'].shape[0]}], got shape {tuple(x.shape)}")
        return _linear(params, x, dtype)

    return Layer(name, init, apply)


ACTIVATIONS = {"gelu": jax.nn.gelu, "relu": jax.nn.relu, "tanh": jnp.tanh, "silu": jax.nn.silu}


def activation(kind: str = "gelu", *, name: str | None = None) -> Layer:
    """An elementwise nonlinearity with no parameters."""
    if kind not in ACTIVATIONS:
        raise ValueError(f"activation: kind must be one of {sorted(ACTIVATIONS)}, got {kind!r}")
    fn = ACTIVATIONS[kind]
    return Layer(name or kind, lambda key, x_spec: {}, lambda params, x: fn(x))


def cross_entropy(logits, labels):
    """Mean cross-entropy (nats) of int labels [...] under logits [..., classes]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1).mean()


def init_sequence(layers, x_spec, *, keys) -> list:
    """Initialize layers in order, threading the input spec through them:
    the unpartitioned oracle (JaxSequential derives ``keys`` its own way)."""
    params = []
    for layer, key in zip(layers, keys, strict=True):
        p = layer.init(key, x_spec)
        params.append(p)
        x_spec = jax.eval_shape(layer.apply, p, x_spec)
    return params


def apply_sequence(layers, params, x):
    for layer, p in zip(layers, params, strict=True):
        x = layer.apply(p, x)
    return x

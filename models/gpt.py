"""The flagship model: a small character-level GPT (decoder-only transformer).

Layers: embedding, ``n_layers`` pre-LayerNorm blocks, final norm + head, so a
partition can cut between any two of them. With the defaults (d_model 128,
4 heads, 4 blocks, context 64; ~0.8 M parameters) a few minutes on 2 CPU cores
take the held-out loss of ``models.text`` clearly below its unigram baseline.
Config entry point: ``models.gpt:build``; data: ``models.text:CharWindows``.

``tie_embeddings=True``: the head computes ``logits = h @ E^T + b`` with its
own copy of the token table E, and the model declares the tie
``("embed/tokens", "head/tokens")`` (``pipetrain.ties``): trained as one shared
parameter, the copies on the first and last stage kept identical. The
default stays untied (its checkpoints keep loading).
"""
from __future__ import annotations

import numpy as np

from models import text
from models.layers import cross_entropy, decoder_block, embedding, lm_head
from pipetrain.stages.jax_layers import Layer


TIES = (("embed/tokens", "head/tokens"),)  # what a model built with tie_embeddings=True declares


def layers(*, vocab_size: int = text.VOCAB_SIZE, context: int = 64, d_model: int = 128, n_heads: int = 4,
           n_layers: int = 4, dtype: str | None = None, tie_embeddings: bool = False) -> list[Layer]:
    """[embed, block0, ..., block{n_layers-1}, head]: int32 tokens [b, t] -> logits [b, t, vocab]."""
    blocks = [decoder_block(d_model=d_model, n_heads=n_heads, n_layers=n_layers, dtype=dtype, name=f"block{i}")
              for i in range(n_layers)]
    return [embedding(vocab_size=vocab_size, context=context, d_model=d_model, dtype=dtype),
            *blocks,
            lm_head(d_model=d_model, vocab_size=vocab_size, dtype=dtype, tied=tie_embeddings)]


def loss_fn(logits, targets):
    """Mean next-token cross-entropy (nats/char) over batch and time."""
    return cross_entropy(logits, targets)


def build(*, vocab_size: int = text.VOCAB_SIZE, context: int = 64, d_model: int = 128, n_heads: int = 4,
          n_layers: int = 4, dtype: str | None = None, seed: int = 0, tie_embeddings: bool = False):
    from pipetrain.stages.jax_stage import JaxSequential

    model_layers = layers(vocab_size=vocab_size, context=context, d_model=d_model, n_heads=n_heads,
                          n_layers=n_layers, dtype=dtype, tie_embeddings=tie_embeddings)
    model = JaxSequential(model_layers, loss=loss_fn, seed=seed)
    if tie_embeddings:
        model.ties = TIES
    return model


def example_input(*, microbatch_size: int = 16, context: int = 64) -> np.ndarray:
    """A micro-batch of tokens with the right shape and dtype, for partitioning."""
    return np.zeros((microbatch_size, context), dtype=np.int32)

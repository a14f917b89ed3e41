"""A small MLP classifier and a deterministic synthetic data set for it.

The data come from a fixed random "teacher" network (the same for every
seed), so a student MLP can learn them well and the labels are reproducible:
``dataset(n, seed=s)`` draws inputs from ``s`` and labels them with the teacher.
"""
from __future__ import annotations

import numpy as np

from models.layers import activation, cross_entropy, dense
from pipetrain.stages.jax_layers import Layer

FEATURES = 16
NUM_CLASSES = 4
_TEACHER_SEED = 20240601


def layers(*, sizes: tuple[int, ...] = (64, 64), num_classes: int = NUM_CLASSES, kind: str = "gelu",
           dtype: str | None = None) -> list[Layer]:
    """dense(sizes[0]), act, ..., dense(num_classes); input width comes from the data."""
    out: list[Layer] = []
    for i, width in enumerate(sizes):
        out += [dense(width, dtype=dtype, name=f"dense{i}"), activation(kind, name=f"act{i}")]
    return [*out, dense(num_classes, dtype=dtype, name=f"dense{len(sizes)}")]


def loss_fn(logits, labels):
    """Mean cross-entropy of int32 class labels [b] under logits [b, classes]."""
    return cross_entropy(logits, labels)


def build(*, sizes: tuple[int, ...] = (64, 64), num_classes: int = NUM_CLASSES, kind: str = "gelu",
          dtype: str | None = None, seed: int = 0):
    from pipetrain.stages.jax_stage import JaxSequential

    return JaxSequential(layers(sizes=tuple(sizes), num_classes=num_classes, kind=kind, dtype=dtype),
                         loss=loss_fn, seed=seed)


def _teacher(features: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([_TEACHER_SEED, features, num_classes])
    hidden = 32
    return (rng.standard_normal((features, hidden)) / np.sqrt(features),
            rng.standard_normal((hidden, num_classes)) / np.sqrt(hidden))


def dataset(n: int, *, seed: int = 0, features: int = FEATURES, num_classes: int = NUM_CLASSES
            ) -> tuple[np.ndarray, np.ndarray]:
    """(x float32 [n, features], y int32 [n]): x ~ N(0, 1) from ``seed``, y the
    fixed teacher's argmax class."""
    x = np.random.default_rng([seed, n, features]).standard_normal((n, features))
    w1, w2 = _teacher(features, num_classes)
    y = np.argmax(np.tanh(x @ w1) @ w2, axis=-1)
    return x.astype(np.float32), y.astype(np.int32)


def source(n: int = 4096, *, microbatch_size: int = 32, seed: int = 0, features: int = FEATURES,
           num_classes: int = NUM_CLASSES):
    """``dataset`` wrapped as a MicrobatchSource (shuffled per epoch by ``seed``)."""
    from pipetrain.data import ArraySource

    x, y = dataset(n, seed=seed, features=features, num_classes=num_classes)
    return ArraySource(x, y, microbatch_size=microbatch_size, seed=seed)

"""The MLP of models/mlp.py as one pipeline in three frameworks.

Layers 0-1 (dense0, tanh) stay JAX, layers 2-3 (dense1, tanh) are torch
``nn.Linear``/``nn.Tanh``, layers 4-6 (dense2, tanh, dense3 + the loss) are
Keras ``Dense``/``Activation``. The torch and Keras layers start from the very
weights the all-JAX model initializes (copied across), so the mixed model and
``models.mlp.build(kind="tanh")`` are twins: same function, same gradients.

``build()`` is the model; ``jax_twin()`` the single-framework reference.
"""
from __future__ import annotations

import numpy as np

# models.mlp (and so JAX) is imported inside the functions: the torch and
# Keras parts pickle references to this module, and a torch or Keras stage
# process must not import JAX just to unpickle them.
SIZES = (32, 32, 32)
NUM_CLASSES = 4


def jax_twin(*, seed: int = 0):
    from models import mlp
    from pipetrain.stages.jax_stage import JaxSequential

    x, _ = mlp.dataset(8, seed=seed)
    return JaxSequential(mlp.layers(sizes=SIZES, kind="tanh"), loss=mlp.loss_fn, seed=seed, example_input=x)


def _torch_part(params: dict, *, seed: int, split_backward: bool | str = "auto"):
    import torch
    from torch import nn

    from pipetrain.stages.torch_stage import TorchSequential

    linear = nn.Linear(SIZES[0], SIZES[1])
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(np.asarray(params["dense1"]["w"]).T.copy()))
        linear.bias.copy_(torch.from_numpy(np.asarray(params["dense1"]["b"]).copy()))
    return TorchSequential([linear, nn.Tanh()], loss=None, seed=seed, split_backward=split_backward)


def _keras_loss(logits, labels):
    import tensorflow as tf

    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(labels, tf.int32),
                                                                         logits=logits))


def _keras_part(params: dict, *, seed: int):
    import keras

    from pipetrain.stages.tf_stage import KerasSequential

    layers = []
    for name, width, act in (("dense2", SIZES[2], "tanh"), ("dense3", NUM_CLASSES, None)):
        dense = keras.layers.Dense(width)
        dense.build((None, int(np.asarray(params[name]["w"]).shape[0])))
        dense.set_weights([np.asarray(params[name]["w"]), np.asarray(params[name]["b"])])
        layers.append(dense)
        if act:
            layers.append(keras.layers.Activation(act))
    return KerasSequential(layers, loss=_keras_loss, seed=seed)


def build(*, seed: int = 0, split_backward: bool | str = "auto"):
    """JAX -> torch -> Keras, initialized from the all-JAX twin's weights
    (``split_backward``: the torch stage's, see TorchSequential)."""
    from pipetrain.stages.mixed import MixedSequential

    from models import mlp
    from pipetrain.stages.jax_stage import JaxSequential

    twin = jax_twin(seed=seed)
    params = twin.init_params()
    jax_part = JaxSequential(list(twin.layers[:2]), loss=mlp.loss_fn, seed=seed)
    return MixedSequential([jax_part, _torch_part(params, seed=seed, split_backward=split_backward),
                            _keras_part(params, seed=seed)])


def example_input(**_):
    from models import mlp

    return mlp.dataset(16)[0]


def train_source(*, n: int = 4096, microbatch_size: int = 32, seed: int = 0):
    from models import mlp

    return mlp.source(n, microbatch_size=microbatch_size, seed=seed)


def heldout_source(*, n: int = 1024, microbatch_size: int = 32, seed: int = 0):
    from models import mlp

    return mlp.source(n, microbatch_size=microbatch_size, seed=seed + 1000)


def _torch_loss(logits, labels):
    import torch.nn.functional as functional

    return functional.cross_entropy(logits, labels.long())


def build_jax_torch(*, seed: int = 0):
    """JAX (layers 0-1) -> torch (dense1, tanh, dense2, tanh, dense3 + the loss): two parts, the
    same function as ``jax_twin`` (the torch layers start from its weights)."""
    import torch
    from torch import nn

    from models import mlp
    from pipetrain.stages.jax_stage import JaxSequential
    from pipetrain.stages.mixed import MixedSequential
    from pipetrain.stages.torch_stage import TorchSequential

    twin = jax_twin(seed=seed)
    params = twin.init_params()
    layers: list = []
    for name, (n_in, n_out), act in (("dense1", (SIZES[0], SIZES[1]), True), ("dense2", (SIZES[1], SIZES[2]), True),
                                     ("dense3", (SIZES[2], NUM_CLASSES), False)):
        linear = nn.Linear(n_in, n_out)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(np.asarray(params[name]["w"]).T.copy()))
            linear.bias.copy_(torch.from_numpy(np.asarray(params[name]["b"]).copy()))
        layers += [linear, nn.Tanh()] if act else [linear]
    jax_part = JaxSequential(list(twin.layers[:2]), loss=mlp.loss_fn, seed=seed)
    return MixedSequential([jax_part, TorchSequential(layers, loss=_torch_loss, seed=seed)])

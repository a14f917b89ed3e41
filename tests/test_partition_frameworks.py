"""`pipetrain.partition` on PyTorch and Keras models, with the JAX methods."""
import numpy as np
import pytest

from pipetrain.partitioning import partition

X = np.random.default_rng(0).standard_normal((16, 32), dtype=np.float32)


def _torch_mlp():
    from torch import nn

    from pipetrain.stages.torch_stage import TorchSequential

    widths = [32, 256, 256, 64, 64, 10]
    modules = []
    for a, b in zip(widths[:-1], widths[1:]):
        modules += [nn.Linear(a, b), nn.Tanh()]
    return TorchSequential(modules[:-1], loss=nn.functional.cross_entropy)


def _keras_mlp():
    import keras

    from pipetrain.stages.tf_stage import KerasSequential

    layers = [keras.layers.Dense(256, activation="tanh"), keras.layers.Dense(256, activation="tanh"),
              keras.layers.Dense(64, activation="tanh"), keras.layers.Dense(10)]
    return KerasSequential(layers, loss=lambda out, t: out)


@pytest.mark.parametrize("method", ["uniform", "params", "flops", "profile"])
def test_torch_model_partitions_with_every_method(method):
    part = partition(_torch_mlp(), 3, method=method, example_input=X, repeats=2)
    assert len(part.stages) == 3 and part.stages[-1].end == 9
    assert sum(s.params for s in part.stages) == (32 * 256 + 256 + 256 * 256 + 256 + 256 * 64 + 64
                                                  + 64 * 64 + 64 + 64 * 10 + 10)
    if method in ("params", "flops"):
        # The 256x256 layer (index 2) outweighs all the others together: the
        # optimal split's bottleneck is the stage that holds it.
        assert part.bottleneck.start <= 2 < part.bottleneck.end
    if method == "params":
        assert part.bottleneck.cost == 256 * 256 + 256
    assert "share" in str(part)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["uniform", "params", "flops", "profile"])
def test_keras_model_partitions(method):
    part = partition(_keras_mlp(), 2, method=method, example_input=X, repeats=2)
    assert [(s.start, s.end) for s in part.stages][0][0] == 0 and part.stages[-1].end == 4
    assert part.stages[-1].output_specs.shape == (16, 10)


def test_keras_flops_count_each_layers_forward_and_backward():
    # A Dense layer's forward is one matmul (2*b*i*o flops), its backward two
    # more (input and weight gradients); bias and tanh add O(b*o) on top.
    costs = _keras_mlp().layer_costs("flops", X)
    b = X.shape[0]
    for cost, (i, o) in zip(costs, [(32, 256), (256, 256), (256, 64), (64, 10)]):
        matmuls = 3 * 2 * b * i * o
        assert matmuls <= cost <= matmuls + 20 * b * o, (i, o, cost)
    part = partition(_keras_mlp(), 2, method="flops", example_input=X)
    assert part.bottleneck.start <= 1 < part.bottleneck.end  # the 256x256 layer dominates

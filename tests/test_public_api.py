"""The public API as a new user meets it: `import pipetrain` stays light, every
public name stays what it is whatever was imported before, and `partition` /
`fit` take a plain list of JAX layers."""
import importlib
import pkgutil
import subprocess
import sys

import numpy as np
import pytest

import pipetrain
from models.layers import activation, cross_entropy, dense

X = np.zeros((8, 16), np.float32)
Y = np.zeros((8,), np.int32)


def layers():
    return [dense(32, name="d0"), activation("tanh", name="t0"), dense(4, name="d1")]


def data():
    rng = np.random.default_rng(0)
    return pipetrain.ArraySource(rng.normal(size=(64, 16)).astype(np.float32),
                                 rng.integers(0, 4, 64).astype(np.int32), microbatch_size=8)


# ---------------------------------------------------------------- import pipetrain

def test_import_pipetrain_imports_no_framework_and_no_dask():
    code = ("import sys, pipetrain\n"
            "heavy = ('jax', 'torch', 'tensorflow', 'keras', 'flax', 'optax', 'dask', 'distributed')\n"
            "bad = [m for m in heavy if m in sys.modules]\n"
            "assert not bad, ('import pipetrain', bad)\n"
            "pipetrain.partition, pipetrain.Partition  # framework-free, resolved lazily\n"
            "bad = [m for m in heavy if m in sys.modules]\n"
            "assert not bad, ('pipetrain.partition', bad)\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_public_name_is_also_a_submodule():
    # Importing a submodule sets the package attribute of its name to the
    # module, which would shadow the lazily resolved public name for good.
    submodules = {m.name for m in pkgutil.iter_modules(pipetrain.__path__)}
    assert not submodules & set(pipetrain.__all__)


def test_public_names_survive_importing_every_submodule():
    for m in pkgutil.iter_modules(pipetrain.__path__):
        if m.name != "__main__":  # runs the command line
            importlib.import_module(f"pipetrain.{m.name}")
    for name in pipetrain.__all__:
        value = getattr(pipetrain, name)
        assert not isinstance(value, type(pipetrain)), f"pipetrain.{name} is a module"
    assert pipetrain.partition is importlib.import_module(pipetrain._LAZY["partition"]).partition


def test_partition_is_still_the_function_after_fit():
    from pipetrain.stages.jax_stage import JaxSequential

    model = JaxSequential(layers(), loss=cross_entropy)
    result = pipetrain.fit(model, data(), num_stages=2, steps=1, microbatches=2, schedule="gpipe",
                           executor="reference", progress=False)
    assert len(result.history) == 1
    part = pipetrain.partition(model, 2, method="params", example_input=X)
    assert isinstance(part, pipetrain.Partition) and part.num_stages == 2


# ---------------------------------------------------------------- a list of layers is a model

def test_partition_takes_a_list_of_jax_layers():
    part = pipetrain.partition(layers(), 3, method="params", example_input=X)
    assert type(part.model).__name__ == "JaxSequential"
    assert [s.layer_names for s in part.stages] == [("d0",), ("t0",), ("d1",)]
    assert part.stages[-1].output_specs.shape == (8, 4)


def test_a_list_with_a_loss_trains_and_one_without_says_what_to_give():
    part = pipetrain.partition(layers(), 2, method="params", example_input=X, loss=cross_entropy)
    assert part.model.loss is cross_entropy
    result = pipetrain.fit(part, data(), steps=1, microbatches=2, schedule="gpipe", executor="reference",
                           progress=False)
    assert np.isfinite(result.history[0]["loss"])
    with pytest.raises(TypeError, match=r"without a loss.*JaxSequential\(layers, loss=\.\.\.\)"):
        pipetrain.fit(layers(), data(), num_stages=2, steps=1, microbatches=2, schedule="gpipe",
                      executor="reference", progress=False)


def test_partition_takes_a_list_of_flax_nnx_modules():
    from flax import nnx

    modules = [nnx.Linear(16, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 4, rngs=nnx.Rngs(1))]
    part = pipetrain.partition(modules, 2, method="params", example_input=X)
    assert [s.params for s in part.stages] == [16 * 8 + 8, 8 * 4 + 4]


@pytest.mark.parametrize("model, match", [
    ({"d0": 1}, r"model is a dict, not a model\. Pass a JaxSequential, TorchSequential, KerasSequential or "
                r"MixedSequential, or a list of JAX layers \(pipetrain\.Layer or Flax NNX modules\)"),
    (None, r"model is a NoneType, not a model"),
    ([], r"the list of layers is empty"),
    ([3], r"layer 0 is int; expected a Layer, an nnx\.Module"),
])
def test_what_is_not_a_model_says_what_to_pass(model, match):
    with pytest.raises((TypeError, ValueError), match=match):
        pipetrain.partition(model, 1, example_input=X)


def test_a_partition_a_model_in_a_list_or_a_stray_loss_is_named():
    part = pipetrain.partition(layers(), 2, example_input=X)
    with pytest.raises(TypeError, match="already a Partition; pass it to pipetrain.fit"):
        pipetrain.partition(part, 2, example_input=X)
    with pytest.raises(TypeError, match=r"item 1 of the list is a model .*MixedSequential"):
        pipetrain.partition([dense(4), part.model], 2, example_input=X)
    with pytest.raises(TypeError, match="loss= is only for a list of layers; a JaxSequential carries its own"):
        pipetrain.partition(part.model, 2, example_input=X, loss=cross_entropy)


def test_torch_modules_are_pointed_to_torch_sequential():
    nn = pytest.importorskip("torch.nn")
    with pytest.raises(TypeError, match=r"a torch Sequential, not a model; wrap torch modules as "
                                        r"pipetrain\.TorchSequential"):
        pipetrain.partition(nn.Sequential(nn.Linear(16, 4)), 1, example_input=X)
    with pytest.raises(TypeError, match=r"taken as JAX layers, but item 0 is a torch Linear; wrap torch "
                                        r"modules as pipetrain\.TorchSequential"):
        pipetrain.partition([nn.Linear(16, 4)], 1, example_input=X)

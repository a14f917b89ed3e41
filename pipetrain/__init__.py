"""pipetrain: asynchronous pipeline-parallel training on Dask, JAX first.

Only the public API lives here. Everything that needs a framework (JAX,
torch, TensorFlow) or Dask is imported on first use, so ``import pipetrain``
is fast and imports no framework.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

from pipetrain.data import ArraySource, MicrobatchSource
from pipetrain.optim import Optimizer

__version__ = "0.1.0"

# Public name -> the module that defines it, imported on first use. No public
# name may also be a submodule's name (``pipetrain/partition.py`` once was):
# importing a submodule binds it as a package attribute, which then shadows
# ``__getattr__`` for good (tests/test_public_api.py checks this).
_LAZY = {
    "fit": "pipetrain.api",
    "FitResult": "pipetrain.api",
    "partition": "pipetrain.partitioning",
    "Partition": "pipetrain.partitioning",
    "build_schedule": "pipetrain.schedule.builders",
    "simulate": "pipetrain.schedule.simulator",
    "run_reference": "pipetrain.runtime.reference",
    "JaxSequential": "pipetrain.stages.jax_stage",
    "Layer": "pipetrain.stages.jax_layers",
    "TorchSequential": "pipetrain.stages.torch_stage",
    "KerasSequential": "pipetrain.stages.tf_stage",
}

__all__ = ["ArraySource", "MicrobatchSource", "Optimizer", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pipetrain' has no attribute {name!r}")

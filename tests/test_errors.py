"""One error hierarchy: every error pipetrain raises is a PipetrainError, and says whether a restart may cure it."""
import importlib
import inspect
import pkgutil

import pipetrain
from pipetrain.errors import PipetrainError, is_retryable

# Modules that import a framework (JAX, torch, TensorFlow) are left out: they define no error classes.
SKIP = ("pipetrain.stages.jax", "pipetrain.stages.torch", "pipetrain.stages.tf", "pipetrain.stages.mixed",
        "pipetrain.stages.corrections", "pipetrain.stages.tensors", "pipetrain.observe.dashboard")


def _error_classes():
    for info in pkgutil.walk_packages(pipetrain.__path__, "pipetrain."):
        if info.name.startswith(SKIP) or info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == info.name:
                yield cls


def test_every_error_pipetrain_defines_is_a_pipetrain_error():
    outside = sorted(f"{c.__module__}.{c.__name__}" for c in _error_classes() if not issubclass(c, PipetrainError))
    assert not outside, f"not in the hierarchy: {outside}"


def test_retryable_is_what_a_restart_could_cure():
    from pipetrain.checkpoint.manifest import CheckpointCorruptError, StaleGenerationError
    from pipetrain.config import ConfigError
    from pipetrain.runtime.links import Stopped
    from pipetrain.runtime.transport import PeerLost, Rejected, TransportTimeout
    from pipetrain.runtime.transport.wire import BoundaryMismatch
    from pipetrain.runtime.worker import CheckpointUnwritable

    for error in (PeerLost("x"), TransportTimeout("x"), Rejected("x"), Stopped("x"), StaleGenerationError("x"),
                  ConnectionResetError(), TimeoutError()):
        assert is_retryable(error), error
    for error in (ConfigError("x"), BoundaryMismatch("x"), CheckpointCorruptError("x"), CheckpointUnwritable("x"),
                  ValueError("a stage's own maths"), ZeroDivisionError()):
        assert not is_retryable(error), error

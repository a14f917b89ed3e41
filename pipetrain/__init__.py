"""pipetrain: asynchronous pipeline-parallel training on Dask, JAX first.

Only the public API lives here. Framework adapters (JAX, torch, TF) are
imported lazily, so ``import pipetrain`` is fast and imports no framework.
"""
from __future__ import annotations

__version__ = "0.1.0"

"""The embedded Dask cluster used when no scheduler is given.

One worker process per stage (plus spares), one thread each. XLA and BLAS
are kept to one thread per process: stages are already one process each,
and single-threaded kernels make CPU results independent of how many
processes share the machine, so the reference executor and the pipeline
agree bit for bit.
"""
from __future__ import annotations

import os
from typing import Any

DETERMINISTIC_ENV = {
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TF_NUM_INTRAOP_THREADS": "1",
    "TF_NUM_INTEROP_THREADS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", ""),
    # Stages of the embedded cluster share one host, and on a GPU host one
    # device: no process may grab most of its memory up front.
    "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
    # A worker that replaces a lost one (recovery), and every later run,
    # loads the stages' compiled programs from disk instead of compiling
    # again: measured 4.5 s -> 1.0 s for the flagship's first step.
    "JAX_COMPILATION_CACHE_DIR": os.environ.get(
        "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "pipetrain", "jax")),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
}


def single_thread_env() -> dict[str, str]:
    return {k: v for k, v in DETERMINISTIC_ENV.items() if v}


def start_local_cluster(n_workers: int, *, memory_limit: str | int = 0, dashboard: bool = False) -> Any:
    from distributed import LocalCluster

    return LocalCluster(
        n_workers=n_workers,
        threads_per_worker=1,
        processes=True,
        memory_limit=memory_limit,
        dashboard_address=":0" if dashboard else None,
        env=single_thread_env(),
        silence_logs=40,  # logging.ERROR: worker chatter would drown the progress line
    )

"""Data as users bring it: variable shapes and dask arrays, through the real runtime."""
import dask.array as da
import numpy as np
import pytest

from models import gpt, mlp
from models.varlen import AlternatingLength
from pipetrain.api import fit
from pipetrain.data import ArraySource
from pipetrain.optim import Optimizer
from pipetrain.partitioning import partition
from pipetrain.runtime.reference import build_stages, run_reference
from pipetrain.schedule.builders import build_schedule

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _small_gpt():
    return gpt.build(context=64, d_model=32, n_heads=2, n_layers=2)


def test_variable_sequence_lengths_compile_once_per_shape():
    source = AlternatingLength(lengths=(64, 32, 48))
    part = partition(_small_gpt(), 2, method="uniform", example_input=source.inputs(0))
    stages = build_stages(part, Optimizer("adam", lr=1e-3))
    run_reference(build_schedule("pipedream", num_stages=2, microbatches=6, steps=3), stages=stages, source=source)
    for stage in stages:
        # 18 micro-batches of three distinct lengths: three compiles each.
        assert stage.trace_counts["forward"] == 3, stage.trace_counts
        assert stage.trace_counts["backward"] == 3, stage.trace_counts


def test_variable_shapes_stream_through_dask_bit_for_bit(client):
    source = AlternatingLength(lengths=(64, 32))
    part = partition(_small_gpt(), 3, method="uniform", example_input=source.inputs(0))
    kwargs = dict(schedule="1f1b", microbatches=4, steps=3, optimizer=Optimizer("adam", lr=1e-3), progress=False)
    dask_run = fit(part, source, client=client, **kwargs)
    reference = fit(part, source, executor="reference", **kwargs)
    assert dask_run.losses == reference.losses
    for a, b in zip(dask_run.states, reference.states):
        assert all(np.array_equal(a[name], b[name]) for name in a)


def test_dask_array_source_reads_only_needed_chunks_on_the_workers(client, tmp_path):
    x, y = mlp.dataset(4096, seed=5)

    def recorded(block, block_info=None):
        # Each computed chunk leaves a mark: which process read which chunk.
        import os
        from pathlib import Path

        Path(tmp_path, f"{os.getpid()}-{block_info[0]['chunk-location'][0]}").touch()
        return block

    dx = da.from_array(x, chunks=(256, 16)).map_blocks(recorded, dtype=x.dtype)
    dy = da.from_array(y, chunks=256)
    lazy = ArraySource(dx, dy, microbatch_size=16, shuffle=False)
    eager = ArraySource(x, y, microbatch_size=16, shuffle=False)
    part = partition(mlp.build(), 2, example_input=lazy.inputs(0))
    kwargs = dict(schedule="pipedream", microbatches=4, steps=4, optimizer=Optimizer("adam", lr=1e-3), progress=False)
    from_dask = fit(part, lazy, client=client, **kwargs)
    assert from_dask.losses == fit(part, eager, executor="reference", **kwargs).losses

    import os

    marks = [name.split("-") for name in os.listdir(tmp_path)]
    # 16 micro-batches of 16 rows in order: rows 0..255, all in chunk 0 of 16.
    assert {chunk for _, chunk in marks} == {"0"}
    # The driver read one micro-batch (the partitioner's example); the rest
    # was read by stage 0's worker, never by the driver.
    readers = {int(pid) for pid, _ in marks}
    worker_pids = set(client.run(os.getpid).values())
    assert readers - {os.getpid()} and readers - {os.getpid()} <= worker_pids

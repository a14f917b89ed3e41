"""Placement compares each stage's estimated peak memory under the job's schedule
(pipetrain.memory) with the workers' memory limits, before any stage starts."""
import re

import pytest

from models import gpt, text
from pipetrain.errors import JobFailed

pytestmark = pytest.mark.cluster


def test_a_schedule_that_needs_more_than_the_workers_have_is_refused_at_placement():
    from distributed import Client, LocalCluster

    from pipetrain.api import fit
    from pipetrain.partitioning import partition

    data = text.CharWindows(split="train", microbatch_size=64)
    # gpipe holds a step's 32 micro-batches of a d_model-1024 block (about 20 GiB); the
    # parameters and one micro-batch (the rule before the estimate) fit in 2 GiB
    part = partition(gpt.build(d_model=1024, n_heads=8, n_layers=2), 2, method="params",
                     example_input=data.inputs(0))
    assert all(s.memory_bytes < 2**30 for s in part.stages)
    import dask

    # In-process workers share this process's memory: keep them from pausing on it, so the
    # refusal is the estimate's, not a paused worker's.
    with dask.config.set({"distributed.worker.memory.pause": False, "distributed.worker.memory.terminate": False,
                          "distributed.worker.memory.target": False, "distributed.worker.memory.spill": False}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=False, memory_limit="2GiB",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        with pytest.raises(JobFailed, match=r"cannot place stage \d \(needs memory [\d.]+ GiB\)") as info:
            fit(part, data, client=client, schedule="gpipe", microbatches=32, steps=1, placement_timeout=1,
                progress=False)
    text_ = str(info.value)
    assert "memory 2.0 GiB" in text_ and "too little memory" in text_, text_
    assert re.search(r"stage 0: memory \d\d\.\d GiB", text_) and re.search(r"stage 1: memory \d\d\.\d GiB", text_)

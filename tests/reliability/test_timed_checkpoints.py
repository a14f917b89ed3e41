"""Checkpoints every N seconds: at cuts the driver picks while the job runs.

Which cuts are taken depends on timing; what a cut holds does not: resuming
from any of them reproduces the uninterrupted run bit for bit.
"""
import numpy as np
import pytest

from models.synthetic import SleepData, SleepSequential
from pipetrain.api import fit
from pipetrain.checkpoint.store import CheckpointStore
from pipetrain.optim import Optimizer
from pipetrain.partitioning import partition
from pipetrain.runtime.reference import build_stages, run_reference
from pipetrain.schedule.builders import build_schedule

pytestmark = [pytest.mark.reliability, pytest.mark.slow]


@pytest.mark.parametrize("schedule", ["pipedream", "1f1b"])
def test_time_based_checkpoints_are_consistent_cuts(client, tmp_path, schedule):
    data = SleepData(nbytes=4 << 10)
    part = partition(SleepSequential(3, forward_ms=5, backward_ms=10), 3, method="uniform",
                     example_input=data.inputs(0))
    optimizer = Optimizer("sgd", lr=0.05)
    m, steps = 4, 70  # about 70 * 4 * 15 ms = 4 s of steady pipeline
    url = str(tmp_path / "checkpoints")
    run = fit(part, data, client=client, schedule=schedule, microbatches=m, steps=steps, optimizer=optimizer,
              checkpoint_dir=url, checkpoint_every=0, checkpoint_seconds=0.3, keep_checkpoints=10, progress=False)
    store = CheckpointStore(url)
    cuts = [info.cut for info in store.list() if info.status == "committed"]
    assert len(cuts) >= 2, cuts
    assert all(cut % m == 0 and 0 < cut < steps * m for cut in cuts)

    # Rebuild from the newest time-based cut and finish in one process: the
    # same final state as the uninterrupted distributed run.
    latest = store.latest()
    stages = build_stages(part, optimizer)
    for s, stage in enumerate(stages):
        stage.load_state_dict(store.load_shard(latest.cut, s))
    rest = run_reference(build_schedule(schedule, num_stages=3, microbatches=m, steps=steps,
                                        first_microbatch=latest.cut), stages=stages, source=data)
    assert rest.losses == {k: v for k, v in run.losses.items() if k >= latest.cut}
    for a, b in zip(run.states, rest.state_dicts()):
        assert all(np.array_equal(a[name], b[name]) for name in a)

"""SIGKILL a stage's worker in a job whose stages talk over ucx://: the neighbours see the loss through
UCX, the job recovers on fresh ucx endpoints, and its numbers are the uninterrupted run's bit for bit.
Skipped, with the reason, where ucxx does not import (the pipetrain[ucx] extra)."""
import pytest

from pipetrain.runtime.transport.ucx import ucx_available
from reliability.chaos import Fault, fired
from reliability.jobs import assert_bit_identical, assert_exactly_once, run

MISSING = ucx_available()
pytestmark = [pytest.mark.reliability, pytest.mark.slow, pytest.mark.cluster,
              pytest.mark.skipif(MISSING is not None, reason=f"ucxx does not import: {MISSING}")]

KILLS = [
    ("pipedream", Fault(1, "F", 13, after_commit=8), 8),  # a middle stage, during a forward
    ("1f1b", Fault(2, "F", 18, after_commit=16), 16),  # the last stage, during a forward
]


@pytest.mark.parametrize("schedule,fault,cut", KILLS, ids=[f"{s}-{f.name}" for s, f, _ in KILLS])
def test_killed_worker_over_ucx_recovers_bit_identical(client, tmp_path, schedule, fault, cut):
    pids = client.run(lambda: __import__("os").getpid())
    result, _ = run(client, tmp_path, schedule, [fault], job_id=f"ucx-kill-{fault.name}", transport="ucx")
    assert fired(tmp_path / "markers", fault) in pids.values(), "the fault did not fire in a worker process"
    assert len(result.recoveries) == 1
    recovery = result.recoveries[0]
    assert recovery["stage"] == fault.stage and recovery["worker_died"] and recovery["rollback_to"] == cut
    assert_bit_identical(result, schedule)
    assert_exactly_once(result)
    # the recovered generation's three stages ran UCX (its context exists only once an endpoint chose "ucx")
    assert sum(client.run(_ran_ucx).values()) >= 3


def _ran_ucx() -> bool:
    from pipetrain.runtime.transport.ucx import _Ucx

    return _Ucx._instance is not None

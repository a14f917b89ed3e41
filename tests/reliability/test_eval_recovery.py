"""A worker killed in a job that evaluates on its stages (schedule/evaluation.py): the eval
blocks after the rollback's cut run again, the job core logs each step's held-out loss
once, and every number (evals, losses, states) is the uninterrupted run's, bit for bit."""
from collections import Counter

import pytest

from pipetrain.api import fit
from pipetrain.observe.records import EvalRecord, read_records, records_of
from pipetrain.partitioning import partition
from reliability.chaos import Fault, fired
from reliability.jobs import DATA, STAGES, STEPS, assert_bit_identical, assert_exactly_once, job_kwargs, model, run

pytestmark = [pytest.mark.reliability, pytest.mark.slow, pytest.mark.cluster]

EVAL = dict(eval_every=1, eval_microbatches=3)


@pytest.mark.parametrize("schedule,fault,cut", [("pipedream", Fault(1, "F", 13, after_commit=8), 8),
                                                ("1f1b", Fault(2, "B", 17, after_commit=16), 16)])
def test_a_recovered_job_reports_each_eval_once_and_bit_identical(client, tmp_path, schedule, fault, cut):
    result, _ = run(client, tmp_path, schedule, [fault], heldout=DATA, job_id=f"eval-{fault.name}", **EVAL)
    assert fired(tmp_path / "markers", fault) is not None
    assert [r["rollback_to"] for r in result.recoveries] == [cut]
    assert_bit_identical(result, schedule)
    assert_exactly_once(result)

    part = partition(model(), STAGES, method="uniform", example_input=DATA.inputs(0))
    reference = fit(part, DATA, heldout=DATA, executor="reference", **job_kwargs(schedule), **EVAL)
    assert sorted(reference.evals) == list(range(STEPS + 1))
    assert result.evals == reference.evals
    logged = [r.step for r in records_of(read_records(tmp_path / "run" / "metrics.jsonl"), EvalRecord)]
    assert sorted(logged) == list(range(STEPS + 1)) and max(Counter(logged).values()) == 1

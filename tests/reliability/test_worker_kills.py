"""SIGKILL a stage's worker process at exact points; the job recovers and its
numbers are those of the uninterrupted run, bit for bit, every micro-batch
applied exactly once."""
import pytest

from reliability.chaos import Fault, fired
from reliability.jobs import assert_bit_identical, assert_exactly_once, run

pytestmark = [pytest.mark.reliability, pytest.mark.slow, pytest.mark.cluster]

# (schedule, fault, rollback cut): the fault waits for that commit, and no
# later cut can commit before the fault point, so the rollback is exact.
KILLS = [
    ("pipedream", Fault(1, "F", 13, after_commit=8), 8),    # a middle stage, during a forward
    ("pipedream", Fault(2, "B", 21, after_commit=16), 16),  # the last stage, during a backward
    ("pipedream", Fault(0, "C", 16, after_commit=8), 8),    # the first stage, while checkpoint 16 is written
    ("1f1b", Fault(2, "F", 18, after_commit=16), 16),
    ("1f1b", Fault(0, "B", 9, after_commit=8), 8),
    ("1f1b", Fault(1, "C", 24, after_commit=16), 16),
]


def compute_failures(client, job_id: str) -> list[str]:
    """The "Compute Failed" errors the workers logged for this job's tasks."""
    return [message for logs in client.get_worker_logs().values() for _, message in logs
            if "Compute Failed" in message and f"pipetrain-{job_id}-" in message]


@pytest.mark.parametrize("schedule,fault,cut", KILLS, ids=[f"{s}-{f.name}" for s, f, _ in KILLS])
def test_killed_worker_recovers_bit_identical(client, tmp_path, schedule, fault, cut, monkeypatch):
    pids = client.run(lambda: __import__("os").getpid())
    job_id = f"kill-{fault.name}"
    fenced_when_told = _generation_on_record_at_each_recovery(monkeypatch, tmp_path / "checkpoints")
    result, checkpoints = run(client, tmp_path, schedule, [fault], job_id=job_id)
    # The new generation owned the checkpoint directory before the recovery
    # was recorded: nothing of the old one can land there after the news.
    assert fenced_when_told == [1]

    killed = fired(tmp_path / "markers", fault)
    assert killed in pids.values(), "the fault did not fire in a worker process"
    assert len(result.recoveries) == 1
    recovery = result.recoveries[0]
    assert recovery["stage"] == fault.stage and recovery["worker_died"], recovery
    assert recovery["rollback_to"] == cut
    assert recovery["total_seconds"] > 0 and recovery["stop_seconds"] < 5
    if fault.kind == "C":
        # The torn checkpoint (shards of some stages, no marker) was passed over, and said so.
        assert [s["cut"] for s in recovery["skipped_checkpoints"]] == [fault.k]
        assert "not committed" in recovery["skipped_checkpoints"][0]["why"]
    assert_bit_identical(result, schedule)
    assert_exactly_once(result)
    # The neighbours that lost their peer, or were stopped for the recovery,
    # ended quietly: no error in the logs of the workers that survived.
    assert compute_failures(client, job_id) == []


def _generation_on_record_at_each_recovery(monkeypatch, checkpoints):
    """The generation the checkpoint directory records each time the driver writes a recovery record."""
    import json

    from pipetrain.checkpoint.manifest import GENERATION
    from pipetrain.observe.progress import MetricsLog
    from pipetrain.observe.records import RecoveryRecord

    seen, write = [], MetricsLog.write

    def spying_write(self, record):
        if isinstance(record, RecoveryRecord):
            seen.append(json.loads((checkpoints / GENERATION).read_text())["generation"])
        write(self, record)

    monkeypatch.setattr(MetricsLog, "write", spying_write)
    return seen

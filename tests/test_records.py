"""The metrics log's typed records: through a real file and back, files written before the types, bad lines."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from pipetrain.observe import records as rec
from pipetrain.observe.progress import MetricsLog
from pipetrain.observe.records import (
    CheckpointMissedRecord,
    CheckpointRecord,
    CheckpointRequestRecord,
    EndRecord,
    ErrorRecord,
    EvalRecord,
    FailedRecord,
    InterruptedRecord,
    MetricsFormatError,
    PlacementRecord,
    RecoveredRecord,
    RecoveryRecord,
    ResumeRecord,
    StartRecord,
    StepRecord,
    UnknownRecord,
    read_records,
    records_of,
)
from pipetrain.rundir import METRICS_FILE, completed_steps

W1, W3 = "tcp://10.0.0.1:4001", "tcp://10.0.0.3:4003"
LOSS = dict(generation=1, stage=1, worker=W1, stages=[1], workers=[W1], reason="worker left the cluster",
            worker_died=True, rollback_to=8, checkpoint="/ckpt/step-0000000008",
            skipped_checkpoints=[{"cut": 12, "why": "not committed"}], detected_at=1000.5, stop_seconds=0.25)

ONE_OF_EACH = [
    StartRecord(schedule="1f1b", stages=3, steps=4, microbatches=4, heldout_loss=2.5, executor="dask"),
    PlacementRecord(generation=0, workers={"0": W1, "1": W3}, hosts={"0": "10.0.0.1", "1": "10.0.0.3"}),
    StepRecord(step=0, loss=2.25, samples_per_s=None, busy=[0.5, 0.25], stage0_done=1000.0),
    StepRecord(step=1, loss=None, samples_per_s=None, busy=[]),  # the reference executor's
    CheckpointRequestRecord(cut=24, furthest_step=1),
    CheckpointMissedRecord(cut=24, stage=2),
    CheckpointRecord(cut=8, generation=0, commit_seconds=0.125),
    RecoveryRecord(**LOSS),
    RecoveredRecord(**LOSS, place_seconds=1.0, placed_at=1001.75, workers_after={"0": W3, "1": W1},
                    load_seconds=0.5, startup_seconds=0.75, warmup_seconds=1.5, ready_at=1002.5,
                    first_microbatch_at=1004.0, total_seconds=3.5),
    ResumeRecord(generation=3, rollback_to=8, checkpoint="/ckpt/step-0000000008"),
    ErrorRecord(stage=1, worker=W1, cut=8, error="stage 1 could not write its shard"),
    ErrorRecord(error="the courier could not report"),
    FailedRecord(stages=[], workers=[], reason="gone", why="lost the Dask scheduler", checkpoint=None),
    InterruptedRecord(generation=0, checkpoint="/ckpt/step-0000000004"),
    EndRecord(heldout_loss=None, wall_seconds=12.5, samples_per_s=160.0, samples=2000, steps=4, steps_run=4),
    EvalRecord(step=2, heldout_loss=1.75),
    UnknownRecord(kind="from-a-newer-version", values={"answer": 42}),
]


def test_every_record_type_round_trips_through_a_metrics_log(tmp_path):
    assert {type(r) for r in ONE_OF_EACH} == set(rec._TYPES.values()) | {UnknownRecord}
    log, before = MetricsLog(tmp_path / METRICS_FILE), time.time()
    for record in ONE_OF_EACH:
        log.write(record)
    log.write(replace(ONE_OF_EACH[0], time=123.5))  # a record with its own time keeps it
    got = read_records(tmp_path / METRICS_FILE)
    assert got == [replace(r, time=g.time) for r, g in zip(ONE_OF_EACH, got)] + [replace(ONE_OF_EACH[0], time=123.5)]
    assert all(before <= g.time <= time.time() for g in got[:-1])
    assert records_of(got, ErrorRecord) == [got[10], got[11]] and records_of(got, RecoveryRecord) == [got[7]]
    lines = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [line["type"] for line in lines[:3]] == ["start", "placement", "step"]
    assert lines[11] == {"time": got[11].time, "type": "error", "stage": None, "worker": None, "cut": None,
                         "error": "the courier could not report"}  # every field written, None where unknown
    assert lines[16] == {"time": got[16].time, "type": "from-a-newer-version", "answer": 42}


# A metrics.jsonl as the driver wrote it before the records were typed: a courier error
# without stage and worker, a reference-executor step without stage0_done, a newer type.
OLD_LOG = """\
{"time": 1000.0, "type": "start", "schedule": "pipedream", "stages": 2, "steps": 3, "microbatches": 4, \
"heldout_loss": null, "executor": "dask"}
{"time": 1000.1, "type": "placement", "generation": 0, "workers": {"0": "tcp://a:1", "1": "tcp://b:1"}, \
"hosts": {"0": "a", "1": "b"}}
{"time": 1001.0, "type": "step", "step": 0, "loss": 2.5, "samples_per_s": null, "busy": [0.5, 0.4], \
"stage0_done": 1000.9}
{"time": 1001.5, "type": "checkpoint", "cut": 4, "generation": 0, "commit_seconds": 0.01}
{"time": 1002.0, "type": "recovery", "generation": 1, "stage": 1, "worker": "tcp://b:1", "stages": [1], \
"workers": ["tcp://b:1"], "reason": "worker left the cluster", "worker_died": true, "rollback_to": 4, \
"checkpoint": "/c/step-0000000004", "skipped_checkpoints": [], "detected_at": 1001.9, "stop_seconds": 0.1}
{"time": 1003.0, "type": "recovered", "generation": 1, "stage": 1, "worker": "tcp://b:1", "stages": [1], \
"workers": ["tcp://b:1"], "reason": "worker left the cluster", "worker_died": true, "rollback_to": 4, \
"checkpoint": "/c/step-0000000004", "skipped_checkpoints": [], "detected_at": 1001.9, "stop_seconds": 0.1, \
"place_seconds": 0.2, "placed_at": 1002.2, "workers_after": {"0": "tcp://a:1", "1": "tcp://c:1"}, \
"load_seconds": 0.05, "startup_seconds": 0.3, "warmup_seconds": 0.4, "ready_at": 1002.6, \
"first_microbatch_at": 1003.0, "total_seconds": 1.1}
{"time": 1003.5, "type": "step", "step": 1, "loss": 2.0, "samples_per_s": null, "busy": []}
{"time": 1004.0, "type": "error", "cut": 8, "error": "stage ? could not write its shard"}
{"time": 1004.5, "type": "dashboard-snapshot", "busy": [0.9]}
{"time": 1005.0, "type": "end", "heldout_loss": 1.5, "wall_seconds": 5.0, "samples_per_s": 9.6, "samples": 48, \
"steps": 3, "steps_run": 3}
"""


def test_a_log_written_before_the_types_reads_into_them(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text(OLD_LOG)
    got = read_records(path)
    assert [type(r) for r in got] == [StartRecord, PlacementRecord, StepRecord, CheckpointRecord, RecoveryRecord,
                                      RecoveredRecord, StepRecord, ErrorRecord, UnknownRecord, EndRecord]
    assert got[0] == StartRecord(schedule="pipedream", stages=2, steps=3, microbatches=4, heldout_loss=None,
                                 executor="dask", time=1000.0)
    assert got[4].rollback_to == 4 and got[4].worker_died and got[5].total_seconds == 1.1
    assert got[5].workers_after == {"0": "tcp://a:1", "1": "tcp://c:1"}
    assert got[6] == StepRecord(step=1, loss=2.0, samples_per_s=None, busy=[], time=1003.5)  # stage0_done: None
    assert got[7] == ErrorRecord(cut=8, error="stage ? could not write its shard", time=1004.0)
    assert got[8] == UnknownRecord(kind="dashboard-snapshot", values={"busy": [0.9]}, time=1004.5)
    # Each line written again is the same line, but for the fields it left out (now there, as None).
    for line, record in zip(OLD_LOG.splitlines(), got):
        old, new = json.loads(line), record.to_json()
        assert {k: new[k] for k in old} == old and all(new[k] is None for k in set(new) - set(old))
    assert completed_steps(tmp_path) == 3


def test_a_malformed_line_names_the_file_and_the_line(tmp_path):
    path = tmp_path / METRICS_FILE
    good = '{"time": 1.0, "type": "checkpoint-request", "cut": 8, "furthest_step": 1}\n'
    for bad, why in (('{"time": 2.0, "type": "step", "st', "Unterminated string"), ("[1, 2]", "not a JSON object"),
                     ('{"time": 2.0}', 'no "type"'), ('{"type": 7}', '"type" is 7')):
        path.write_text(good + good + bad + "\n" + good)
        with pytest.raises(MetricsFormatError, match=f"^{re.escape(str(path))}:3: not a metrics record .*{why}"):
            read_records(path)
        assert len(read_records(path, skip_malformed=True)) == 3
    # A last line cut short (a killed driver, or one still writing) is no error: it is left out.
    path.write_text(good + good + '{"time": 3.0, "type": "che')
    assert read_records(path) == [CheckpointRequestRecord(cut=8, furthest_step=1, time=1.0)] * 2
    assert read_records(tmp_path / "none.jsonl") == []


def test_completed_steps_reads_past_a_torn_line(tmp_path):
    lines = OLD_LOG.splitlines()
    (tmp_path / METRICS_FILE).write_text("\n".join([lines[0], '{"time": 1000.5, "ty', lines[-1]]) + "\n")
    assert completed_steps(tmp_path) == 3


def test_the_observe_modules_import_no_framework():
    code = ("import sys, pipetrain.observe.trace, pipetrain.observe.report, pipetrain.observe.progress; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'jax', 'torch', 'tensorflow', 'keras', 'distributed', 'dask', 'matplotlib', 'fsspec'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_status_and_logs_show_an_eval_record_as_a_sentence():
    from pipetrain.job_status import render_record

    assert render_record(rec.EvalRecord(step=0, heldout_loss=4.5)) == "eval before training: held-out loss 4.5000"
    assert render_record(rec.EvalRecord(step=3, heldout_loss=2.25)).startswith("eval after step 3: held-out loss 2.2")

"""Paused stages: a hung stage is detected, and one of an old generation that
wakes up cannot write into the new run.

Two ways a paused (SIGSTOP) stage process meets recovery:

- Another worker dies while it is paused: the driver stops the generation,
  the paused stage cannot answer, so after ``stop_timeout`` its task is
  cancelled and its worker avoided; the run goes on as generation 1 without
  it. Then the old process wakes (SIGCONT) and carries on where it was: it
  tries to write its generation-0 shard into the checkpoint directory that
  generation 1 now owns (the store refuses: generation fencing), reports to
  generation 0's queue that nobody reads, sends to endpoints that are gone.
- It is the only problem: nothing fails, its neighbours just wait. The
  scheduler's ``worker_ttl`` (heartbeats missed) removes the silent worker,
  and the driver recovers as from any lost worker. (Under a nanny the
  removal also kills the paused process, so it never wakes.) We rely on the
  scheduler's heartbeats rather than a progress watchdog in the driver: every
  Dask workload already has them, while a watchdog would need a per-model
  idea of how long a micro-batch may take (a JIT compile takes minutes) and
  would fire on stages that are slow but fine. Production clusters should
  set ``distributed.scheduler.worker-ttl`` well below its 5-minute default.
"""
import json
import os
import signal
import threading
import time

import pytest
from distributed import Client, Queue

from reliability.chaos import Fault, fired
from reliability.conftest import WORKERS, start_cluster
from reliability.jobs import assert_bit_identical, assert_exactly_once, run
from reliability.test_recovery_paths import _stage_workers
from pipetrain.runtime.control import unbatched

pytestmark = [pytest.mark.reliability, pytest.mark.slow, pytest.mark.cluster]


def _wait_for(predicate, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline and not predicate():
        time.sleep(0.01)


def _sigcont(pid):
    try:
        os.kill(pid, signal.SIGCONT)
    except (ProcessLookupError, TypeError):
        pass


def test_woken_old_generation_stage_cannot_corrupt_the_new_run(client, tmp_path):
    # Stage 1 pauses while snapshotting checkpoint 16; then stage 2's worker is killed.
    fault = Fault(1, "C", 16, action="stop", after_commit=8)
    markers, checkpoints = tmp_path / "markers", tmp_path / "checkpoints"
    metrics = tmp_path / "run" / "metrics.jsonl"
    pids = client.run(os.getpid)
    seen: dict = {"generations": set()}

    def chaos():
        _wait_for(lambda: fired(markers, fault))
        os.kill(pids[_stage_workers(client)[2]], signal.SIGKILL)
        _wait_for(lambda: metrics.exists() and '"type": "recovery"' in metrics.read_text())
        _sigcont(fired(markers, fault))
        for _ in range(150):  # generation 1 is on its way to cut 16: no old shard may land there
            for record in checkpoints.glob("step-0000000016/stage-*.json"):
                seen["generations"].add(json.loads(record.read_text())["generation"])
            if "woke" in (markers / fault.name).read_text():
                seen.setdefault("woke", time.time())
            time.sleep(0.01)

    thread = threading.Thread(target=chaos)
    thread.start()
    try:
        result, _ = run(client, tmp_path, "pipedream", [fault], sleep_scale=10, job_id="pausedstage",
                        stop_timeout=2.0)
        finished = time.time()
    finally:
        thread.join()
        _sigcont(fired(markers, fault))
    stale = [m for m in unbatched(Queue("pipetrain/pausedstage/g0/reports", client=client).get(batch=True))
             if m.get("type") == "error"]

    (recovery,) = result.recoveries
    assert recovery["stage"] == 2 and recovery["rollback_to"] == 8
    assert recovery["stop_seconds"] >= 2.0, "the paused stage cannot have stopped by itself"
    assert seen.get("woke", finished + 1) < finished, "the old stage did not wake while the new run went on"
    assert 0 not in seen["generations"], "a generation-0 shard landed in the new run's checkpoint"
    assert stale and all("StaleGenerationError" in m["error"] for m in stale), stale
    for record in checkpoints.glob("step-*/stage-*.json"):
        assert json.loads(record.read_text())["generation"] == 1, record
    assert_bit_identical(result, "pipedream")
    assert_exactly_once(result)



def test_paused_stage_is_detected_by_worker_ttl(tmp_path):
    cluster = start_cluster(WORKERS, worker_ttl="2s")
    fault = Fault(1, "F", 13, action="stop", after_commit=8)
    try:
        with Client(cluster) as client:
            client.wait_for_workers(WORKERS, timeout=60)
            result, _ = run(client, tmp_path, "1f1b", [fault])
    finally:
        _sigcont(fired(tmp_path / "markers", fault))
        cluster.close()
    (recovery,) = result.recoveries
    assert recovery["stage"] == 1 and recovery["worker_died"] and recovery["rollback_to"] == 8
    assert_bit_identical(result, "1f1b")
    assert_exactly_once(result)

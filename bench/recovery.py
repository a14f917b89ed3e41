"""How long does a lost worker cost? Kill one stage's worker of the flagship job mid-run.

The flagship GPT of models/configs/demo.toml, 4-stage pipedream, on the
embedded kind of local cluster (one worker process per stage, one thread
each) plus one spare worker. Once the first checkpoint is committed and a
few more micro-batches have run, the bench SIGKILLs the worker process of
stage 1 and measures the time from the kill to the first micro-batch
completed after recovery (its backward back at stage 0), split into:

- detection: kill -> the driver sees the worker gone (or a task fail);
- stop: every stage of the old generation stopped (or abandoned);
- re-placement: a worker for the lost stage (the spare);
- start: submit, build the stage, rendezvous (excluding the load);
- load: read and verify the checkpoint shard (max over stages);
- warm-up/compile: ready -> the first micro-batch through all stages
  (the JIT compiles of forward and backward happen here).

    .venv/bin/python bench/recovery.py [--steps 24] [--every 32] [--stage 1]

Prints a table, then one JSON line with "recovery_s" (target <= 10 s).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from tempfile import TemporaryDirectory

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distributed import Client  # noqa: E402

from pipetrain import config as cfgmod  # noqa: E402
from pipetrain.api import fit  # noqa: E402
from pipetrain.config import resolve  # noqa: E402
from pipetrain.observe.records import CheckpointRecord, StepRecord, read_records, records_of  # noqa: E402
from pipetrain.partitioning import partition  # noqa: E402
from pipetrain.rundir import METRICS_FILE  # noqa: E402
from pipetrain.runtime.local import start_local_cluster  # noqa: E402

DEMO = Path(__file__).resolve().parent.parent / "models" / "configs" / "demo.toml"


def stage_worker(client: Client, stage: int) -> str | None:
    for address, keys in client.processing().items():
        if any(str(k).endswith(f"-g0-stage{stage}") for k in keys):
            return address
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=24, help="steps of 8 micro-batches")
    ap.add_argument("--every", type=int, default=32, help="checkpoint interval, micro-batches")
    ap.add_argument("--stage", type=int, default=1, help="the stage whose worker is killed")
    ap.add_argument("--after", type=int, default=12, help="micro-batches after the first commit before the kill")
    args = ap.parse_args()

    cfg = cfgmod.load(DEMO)
    model = resolve(cfg.model.entry, "model.entry")(**cfg.model.kwargs)
    data = resolve(cfg.data.train, "data.train")(**cfg.data.kwargs)
    part = partition(model, cfg.partition.stages, method=cfg.partition.method, example_input=data.inputs(0))
    p, m = len(part.stages), cfg.schedule.microbatches

    with TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        metrics = run_dir / METRICS_FILE
        cluster = start_local_cluster(p + 1)  # one spare
        kill: dict = {}
        try:
            with Client(cluster) as client:
                pids = client.run(os.getpid)

                def killer() -> None:
                    # After the first commit and `after` more micro-batches of stage 0's steps.
                    first_cut = args.every
                    target_step = (first_cut + args.after) // m
                    while True:
                        records = read_records(metrics)  # [] before the run writes one; a torn last line is left out
                        if records_of(records, CheckpointRecord) and any(
                                r.step == target_step for r in records_of(records, StepRecord)):
                            break
                        time.sleep(0.01)
                    address = stage_worker(client, args.stage)
                    kill.update(time=time.time(), worker=address, pid=pids[address])
                    os.kill(pids[address], signal.SIGKILL)

                thread = threading.Thread(target=killer, daemon=True)
                thread.start()
                started = time.time()
                result = fit(part, data, schedule=cfg.schedule.name, microbatches=m, steps=args.steps,
                             optimizer=cfg.optimizer, client=client, checkpoint_every=args.every,
                             keep_checkpoints=2, run_dir=str(run_dir), progress=False, placement_timeout=60)
                wall = time.time() - started
        finally:
            cluster.close()

    if not result.recoveries:
        raise SystemExit("the kill did not land before the run ended: use more --steps")
    r = result.recoveries[0]
    detection = r["detected_at"] - kill["time"]
    start = r["ready_at"] - r["placed_at"] - r["load_seconds"]
    rows = [
        ("detection", detection),
        ("stop", r["stop_seconds"]),
        ("re-placement", r["place_seconds"]),
        ("start (submit, build, rendezvous)", start),
        ("checkpoint load", r["load_seconds"]),
        ("warm-up / compile", r["warmup_seconds"]),
    ]
    recovery_s = r["first_microbatch_at"] - kill["time"]
    print(f"flagship GPT, {p}-stage {cfg.schedule.name}, {m} micro-batches/step, {args.steps} steps, "
          f"checkpoint every {args.every}; killed stage {args.stage} ({kill['worker']}, pid {kill['pid']})")
    print(f"rolled back to micro-batch {r['rollback_to']}, run wall time {wall:.1f} s\n")
    width = max(len(name) for name, _ in rows)
    for name, seconds in rows:
        print(f"  {name:<{width}}  {seconds:7.2f} s")
    print(f"  {'other (driver bookkeeping)':<{width}}  {recovery_s - sum(s for _, s in rows):7.2f} s")
    print(f"  {'kill -> first micro-batch done':<{width}}  {recovery_s:7.2f} s   (target <= 10 s)")
    print(json.dumps({"recovery_s": round(recovery_s, 3), "detection_s": round(detection, 3),
                      "stop_s": round(r["stop_seconds"], 3), "placement_s": round(r["place_seconds"], 3),
                      "start_s": round(start, 3), "load_s": round(r["load_seconds"], 3),
                      "warmup_s": round(r["warmup_seconds"], 3), "rollback_to": r["rollback_to"],
                      "stages": p, "schedule": cfg.schedule.name}))


if __name__ == "__main__":
    main()

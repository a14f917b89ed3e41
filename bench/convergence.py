"""Does asynchrony cost accuracy? The flagship GPT trained with each schedule.

gpipe, 1f1b, pipedream and 2bw each train the character-level GPT
(models/gpt.py, 4 stages) on the same micro-batches, in the same order, for
the same number of samples, with the reference executor (the schedules'
numerics do not depend on the executor). The table gives held-out loss
next to the weight staleness each schedule implies: how many updates old the
weights are that a micro-batch's gradient is computed with, per stage.

    .venv/bin/python bench/convergence.py [--steps 40]

Last line: {"heldout_loss": {...}, "unigram_loss": ...}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import gpt, text  # noqa: E402
from pipetrain.optim import Optimizer  # noqa: E402
from pipetrain.partitioning import partition  # noqa: E402
from pipetrain.runtime.reference import build_stages, evaluate, run_reference  # noqa: E402
from pipetrain.schedule.builders import build_schedule  # noqa: E402

SCHEDULES = ("gpipe", "1f1b", "pipedream", "2bw")
P, M = 4, 8


def staleness(schedule: str) -> list[int]:
    """Per stage: how many updates behind the latest weights a gradient is."""
    if schedule == "pipedream":
        return [P - s - 1 for s in range(P)]
    if schedule == "2bw":
        return [1] * P
    return [0] * P


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-microbatches", type=int, default=16)
    args = ap.parse_args()

    train = text.CharWindows(split="train", microbatch_size=16)
    heldout = text.CharWindows(split="heldout", microbatch_size=16)
    part = partition(gpt.build(), P, method="params", example_input=train.inputs(0))
    eval_ids = range(args.eval_microbatches)
    results = {}
    initial = evaluate(build_stages(part, Optimizer()), heldout, eval_ids)
    for name in SCHEDULES:
        started = time.time()
        stages = build_stages(part, Optimizer("adam", lr=args.lr))
        schedule = build_schedule(name, num_stages=P, microbatches=M, steps=args.steps)
        run = run_reference(schedule, stages=stages, source=train)
        results[name] = {"heldout": evaluate(stages, heldout, eval_ids),
                         "train_last": run.loss_history(M)[-1], "seconds": time.time() - started}
        print(f"  {name}: done in {results[name]['seconds']:.0f} s", file=sys.stderr)

    unigram = text.unigram_loss("heldout")
    samples = args.steps * M * train.microbatch_size
    print(f"GPT {P} stages, {args.steps} steps x {M} micro-batches x {train.microbatch_size} = {samples} samples, "
          f"adam lr {args.lr}; held-out loss at init {initial:.3f}, unigram baseline {unigram:.3f} nats/char")
    print(f"{'schedule':<10} {'held-out':>9} {'vs unigram':>10} {'train (last step)':>18} "
          f"{'staleness per stage':>20} {'max':>4}")
    for name in SCHEDULES:
        r, st = results[name], staleness(name)
        print(f"{name:<10} {r['heldout']:>9.3f} {r['heldout'] - unigram:>+10.3f} {r['train_last']:>18.3f} "
              f"{str(st):>20} {max(st):>4}")
    print(json.dumps({"heldout_loss": {k: round(v["heldout"], 4) for k, v in results.items()},
                      "unigram_loss": round(unigram, 4), "initial_loss": round(initial, 4), "samples": samples}))


if __name__ == "__main__":
    main()

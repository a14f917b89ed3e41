"""On one GPU: the flagship GPT scaled up, as 4 stages sharing the device, against one process.

Two comparisons a CPU machine cannot make, in one short run for a lent GPU:

1. Pipeline overhead: the same model and micro-batches trained in this
   process as one stage (the reference executor: compute only, no
   transport; each F, B and U timed, the median of each kind), and as a
   4-stage 1f1b pipeline on an embedded Dask cluster
   (one worker process per stage, all on the one GPU). Steady samples/s of
   each and the ratio.
2. Time to accuracy at p=4: 1f1b (Adam, lr 2e-3) against pipedream + weight
   prediction (lr 1e-3), each with the training recipe (warm-up over 10% of
   its updates, cosine to 0.1 x lr, clipping at 1.0) and the learning rate
   that was its best on the CPU flagship (README, Convergence), for the same
   samples. Their held-out curves come from the stages' own evaluations
   (``eval_every``), their steady samples/s from the same runs; time to the
   lowest held-out loss 1f1b reached by 75% of its samples, as in
   bench/time_to_accuracy.py.

    python bench/gpu_pipeline.py [--d-model 512] [--n-layers 8] [--steps 40]
    python bench/gpu_pipeline.py --quick   # a tiny model on CPU: the script's own smoke test

Prints a table, then one JSON line:
{"pipeline_vs_one_process": ..., "time_to_target_ratio_vs_1f1b": ..., "samples_per_s": {...}, ...}
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from convergence import MICROBATCH, parse_config, with_recipe  # noqa: E402
from convergence import train as train_reference  # noqa: E402
from time_to_accuracy import _Timings, lowest_by, samples_to  # noqa: E402

from models import gpt, text  # noqa: E402
from pipetrain.optim import Optimizer  # noqa: E402
from pipetrain.partitioning import partition  # noqa: E402
from pipetrain.schedule.builders import microbatches_per_update  # noqa: E402

M = 8  # micro-batches per step
RECIPE = {"schedule": "cosine", "warmup_frac": 0.1, "min_lr_frac": 0.1, "clip_norm": 1.0}
CONTESTANTS = {"1f1b": 2e-3, "pipedream+predict": 1e-3}  # each at its best lr on the CPU flagship


def steady_rate(history: list[dict], *, samples_per_step: int, skip: int) -> float:
    """Samples/s between stage 0's reports of step ``skip`` and the last step (compilation excluded)."""
    done = [h["stage0_done"] for h in sorted(history, key=lambda h: h["step"])]
    return (len(done) - skip) * samples_per_step / (done[-1] - done[skip - 1])


def train(part, data, config: str, lr: float, args, *, steps: int, heldout=None, **where):
    from pipetrain.api import fit

    schedule, accumulate, correction = parse_config(config)
    updates = steps * M // microbatches_per_update(schedule, M, accumulate)
    optimizer = with_recipe(Optimizer("adam", lr=lr), RECIPE, updates=updates)
    evals = {} if heldout is None else dict(heldout=heldout, eval_every=args.eval_every,
                                            eval_microbatches=args.eval_microbatches)
    started = time.perf_counter()
    result = fit(part, data, schedule=schedule, accumulate=accumulate, correction=correction, microbatches=M,
                 steps=steps, optimizer=optimizer, progress=False, **evals, **where)
    return result, time.perf_counter() - started


def one_process_rate(args) -> float:
    """Samples/s of the model as one stage in this process (the reference executor): a step's
    M forwards and backwards and its update, each the median of its kind, first calls (compiling) left out."""
    ms: dict = defaultdict(list)
    train_reference("1f1b", seed=0, steps=args.skip + 2, stages=1, optimizer=Optimizer("adam", lr=CONTESTANTS["1f1b"]),
                    eval_every=args.skip + 2, eval_microbatches=1, hooks=_Timings(ms), recipe=RECIPE,
                    model_kwargs=model_kwargs(args))
    step_ms = M * (statistics.median(ms[0, "F"]) + statistics.median(ms[0, "B"])) + statistics.median(ms[0, "U"])
    return M * MICROBATCH / step_ms * 1e3


def model_kwargs(args) -> dict:
    return {"d_model": args.d_model, "n_layers": args.n_layers, "n_heads": max(1, args.d_model // 64)}


def pipelined(part, data, heldout, config: str, args, client) -> dict:
    """Its steady samples/s (a run without evaluations between steps) and its held-out curve
    (a run evaluating every ``--eval-every`` steps, which would slow the timed one)."""
    lr, samples_per_step = CONTESTANTS[config], M * MICROBATCH
    timed, _ = train(part, data, config, lr, args, steps=args.steps, client=client)
    curved, _ = train(part, data, config, lr, args, steps=args.steps, heldout=heldout, client=client)
    return {"lr": lr, "heldout": curved.heldout_after,
            "curve": [(step * samples_per_step, loss) for step, loss in sorted(curved.evals.items()) if step > 0],
            "samples_per_s": steady_rate(timed.history, samples_per_step=samples_per_step, skip=args.skip)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--n-layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--eval-every", type=int, default=2)
    ap.add_argument("--eval-microbatches", type=int, default=16)
    ap.add_argument("--skip", type=int, default=3, help="steps before the steady rate is timed (compilation)")
    ap.add_argument("--target-at", type=float, default=0.75)
    ap.add_argument("--quick", action="store_true", help="a tiny model for a few steps (CPU smoke test)")
    args = ap.parse_args()
    if args.quick:
        args.d_model, args.n_layers, args.steps, args.eval_every, args.eval_microbatches = 32, 4, 6, 2, 2
        args.skip = 2

    import jax
    from distributed import Client

    from pipetrain.runtime.local import start_local_cluster

    device = str(jax.devices()[0])
    data = text.CharWindows(split="train", microbatch_size=MICROBATCH)
    heldout = text.CharWindows(split="heldout", microbatch_size=MICROBATCH)
    model = gpt.build(**model_kwargs(args))
    four = partition(model, 4, method="params", example_input=data.inputs(0))
    one = {"samples_per_s": one_process_rate(args), "lr": CONTESTANTS["1f1b"]}
    runs = {}
    cluster = start_local_cluster(4)
    try:
        with Client(cluster) as client:
            for config in CONTESTANTS:
                runs[config] = pipelined(four, data, heldout, config, args, client)
    finally:
        cluster.close()

    budget = args.steps * M * MICROBATCH
    target = lowest_by(runs["1f1b"]["curve"], args.target_at * budget)
    needed = {c: samples_to(r["curve"], target) for c, r in runs.items()}
    times = {c: None if n is None else n / runs[c]["samples_per_s"] for c, n in needed.items()}
    ratio = None if None in times.values() else times["1f1b"] / times["pipedream+predict"]
    overhead = runs["1f1b"]["samples_per_s"] / one["samples_per_s"]

    print(f"GPT d_model {args.d_model}, {args.n_layers} layers, {args.steps} steps x {M} x {MICROBATCH} "
          f"samples, on {device}; target held-out {target:.4f} (1f1b's lowest by {args.target_at:.0%})")
    print("| run | lr | samples/s (steady) | held-out at the end | samples to target | time to target (s) |")
    print("|---|---|---|---|---|---|")
    print(f"| one process, 1 stage (reference executor) | {one['lr']:g} | {one['samples_per_s']:.0f} | - | - | - |")
    for config, r in runs.items():
        t = times[config]
        print(f"| 4 stages, {config} (Dask) | {r['lr']:g} | {r['samples_per_s']:.0f} | {r['heldout']:.4f} "
              f"| {'not reached' if needed[config] is None else round(needed[config])} "
              f"| {'-' if t is None else f'{t:.1f}'} |")
    print(f"4-stage 1f1b / one process: {overhead:.3f}x the samples/s; pipedream + predict reaches the target "
          f"{'-' if ratio is None else f'{ratio:.2f}x'} sooner than 1f1b")
    print(json.dumps({"device": device, "pipeline_vs_one_process": round(overhead, 3),
                      "time_to_target_ratio_vs_1f1b": None if ratio is None else round(ratio, 3),
                      "samples_per_s": {"one_process": round(one["samples_per_s"], 1),
                                        **{c: round(r["samples_per_s"], 1) for c, r in runs.items()}},
                      "heldout": {c: r["heldout"] for c, r in runs.items()}, "target": round(target, 4),
                      "model": {"d_model": args.d_model, "n_layers": args.n_layers}}))


if __name__ == "__main__":
    main()

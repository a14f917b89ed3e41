"""Time to accuracy: held-out loss against samples, times samples per second.

For 1f1b, gpipe and each asynchronous schedule with its best correction
(the lowest mean held-out loss in bench/convergence.py's p=4 runs), this
combines

- the held-out-loss-versus-samples curve (mean over seeds) at each pipeline
  depth p: p=4 from ``--convergence`` (convergence.py ``--out``); p=2 (the
  flagship GPT in 2 stages) and p=8 (the GPT with 6 blocks, one layer per
  stage: the 4-block flagship has only 6 layers) trained here with the
  reference executor, since an asynchronous schedule's delays grow with p.
  gpipe and 1f1b compute the same numbers as the unpartitioned model at any
  p, so their p=2 curve is the p=4 one;
- the steady-state samples per second at that p: at p=2 measured on a Dask
  run (embedded local cluster, one worker process per stage, best of
  ``--repeats`` rotated rounds); at p=4 and p=8 simulated
  (pipetrain.schedule.simulator.simulate) with each stage's F, B and U
  measured in this process for that configuration (a correction's extra
  work included: the median of a round, the lowest over ``--cost-rounds``
  rotated rounds, since load on a shared machine only ever slows a round
  down) and the message latency measured on the p=2 Dask run;

into the time to reach a fixed held-out loss: by default the lowest loss
1f1b's mean curve (over seeds) has reached by ``--target-at`` (75%) of its
samples (one target for the flagship at p=2 and p=4, one for the 6-block
model at p=8), or ``--target``. The lowest so far, not the loss at that
point: with momentum at lr 0.1, 1f1b's curve spikes (3.0 -> 3.4 around 75%),
and a spike's value would be a target every configuration meets in its first
evaluations. 75%, not 100%: a configuration slightly worse per sample still
gets a time, and one that cannot reach 1f1b's quality inside the budget
shows as "not reached". Samples to target: the first crossing, interpolated
linearly between evaluations. Step times and runs are cached in ``--cache``.

Several ``--convergence`` files (the same runs at other learning rates,
e.g. ``convergence.py --lr 0.002 --configs 1f1b pipedream+predict``) put
each configuration at the learning rate of its lowest mean held-out loss
among them, for every p: a synchronous baseline tuned as well as the
asynchronous configuration it is compared with.

    nice -n 10 .venv/bin/python bench/time_to_accuracy.py --convergence bench/results/convergence_adam.json \\
        [more.json ...] [--seeds 0 1 2] [--cache FILE]

Last line: {"time_to_target_ratio_vs_1f1b": {"p2": ..., "p4": ..., "p8": ...}, "heldout_at_equal_samples": {...}}
(the ratios are the best asynchronous configuration's: 1f1b's time over its time).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipetrain.runtime.local import single_thread_env  # noqa: E402

os.environ.update(single_thread_env())  # as in the stage workers, set before JAX loads

import numpy as np  # noqa: E402

from convergence import M, MICROBATCH, parse_config, recipe_of, summarize, train, with_recipe  # noqa: E402
from models import gpt, text  # noqa: E402
from pipetrain.optim import Optimizer  # noqa: E402
from pipetrain.runtime.interpreter import Hooks  # noqa: E402
from pipetrain.schedule.builders import build_schedule, microbatches_per_update  # noqa: E402
from pipetrain.schedule.simulator import simulate  # noqa: E402

MODEL_AT = {2: {}, 4: {}, 8: {"n_layers": 6}}  # gpt.build kwargs per depth
ASYNC = ("pipedream", "pipedream/acc8", "2bw")


def best_configs(summary: dict) -> list[str]:
    """1f1b, gpipe, and each async schedule with the correction of lowest mean held-out loss."""
    best = []
    for family in ASYNC:
        members = [c for c in summary if c.split("+")[0] == family]
        if members:
            best.append(min(members, key=lambda c: summary[c]["mean"]))
    return ["1f1b", "gpipe", *best]


# What the --convergence files must share: they may differ in the learning rate only.
SAME_IN_EVERY_FILE = ("steps", "optimizer", "dc_lambda", "recipe", "warmup_frac", "min_lr_frac", "clip_norm",
                      "eval_every", "eval_microbatches", "seeds")


def best_learning_rates(convs: list[dict]) -> tuple[dict, dict, dict]:
    """Each configuration at the learning rate (of the files that ran it) with its lowest mean
    held-out loss: (lr per config, its p=4 runs, its summary). One file: its lr for all."""
    by_lr: dict[float, dict] = {}
    for conv in convs:
        by_lr.setdefault(conv["args"]["lr"], {}).update({c: [] for c in {r["config"] for r in conv["runs"]}})
        for r in conv["runs"]:
            by_lr[conv["args"]["lr"]][r["config"]].append(r)
    summaries = {lr: summarize([r for runs in per.values() for r in runs]) for lr, per in by_lr.items()}
    lr_of, runs, summary = {}, {}, {}
    for config in sorted({c for per in by_lr.values() for c in per}):
        lr = min((lr for lr in by_lr if config in by_lr[lr]), key=lambda lr: summaries[lr][config]["mean"])
        lr_of[config], runs[config], summary[config] = lr, by_lr[lr][config], summaries[lr][config]
    return lr_of, runs, summary


def mean_curve(runs: list[dict]) -> list[tuple[int, float]]:
    points = defaultdict(list)
    for r in runs:
        for samples, loss in r["curve"]:
            points[samples].append(loss)
    return [(s, float(np.mean(v))) for s, v in sorted(points.items()) if len(v) == len(runs)]


def samples_to(curve: list[tuple[int, float]], target: float) -> float | None:
    """First crossing of ``target``, linear between evaluations (None: not reached)."""
    previous = (0, float("inf"))
    for samples, loss in curve:
        if loss <= target:
            s0, l0 = previous
            if not np.isfinite(l0):
                return float(samples)
            return s0 + (samples - s0) * (l0 - target) / (l0 - loss)
        previous = (samples, loss)
    return None


# -------------------------------------------------------------- step times

class _Timings(Hooks):
    """Milliseconds of every F, B and U by (stage, kind), but each one's first (it compiles)."""

    def __init__(self, ms: dict):
        self.ms, self.seen = ms, set()

    def on_action(self, action, start, end):
        key = action.stage, action.kind.value
        if key[1] in ("F", "B", "U"):
            if key in self.seen:
                self.ms[key].append((end - start) * 1e3)
            self.seen.add(key)


def measured_costs(configs: list[str], p: int, *, steps: int, rounds: int, optimizer: Optimizer,
                   recipe: dict | None) -> dict:
    """Each stage's F, B and U (ms) of every config at depth ``p``, in this process: the
    median within a round, the lowest over ``rounds`` rotated rounds. The machine is shared
    and its load comes and goes: a median over every round let one loaded round make the
    same F/B cost 30-50% more in one configuration than in the next."""
    best: dict = {c: {} for c in configs}
    for _ in range(rounds):
        for config in configs:
            ms = defaultdict(list)
            train(config, seed=0, steps=steps, stages=p, optimizer=optimizer, eval_every=steps, eval_microbatches=1,
                  model_kwargs=MODEL_AT[p], hooks=_Timings(ms), recipe=recipe)
            for key, values in ms.items():
                best[config][key] = min(best[config].get(key, float("inf")), statistics.median(values))
    return {c: {kind: [b[s, kind] for s in range(p)] for kind in ("F", "B", "U")} for c, b in best.items()}


def simulated_rate(config: str, p: int, costs: dict, send_ms: float, *, clip: bool) -> float:
    """Steady-state samples/s of ``config`` at depth p with these costs (fill and drain cancel out).
    ``clip``: the recipe's norm actions are in the schedule, so gpipe / 1f1b / 2bw pay a
    chain of 2(p-1) scalar messages before each update (pipedream clips per stage)."""
    schedule, accumulate, _ = parse_config(config)

    def makespan(steps: int) -> float:
        built = build_schedule(schedule, num_stages=p, microbatches=M, steps=steps, accumulate=accumulate, clip=clip)
        return simulate(built, forward_cost=costs["F"], backward_cost=costs["B"], update_cost=costs["U"],
                        send_cost=send_ms).makespan

    return M * MICROBATCH / ((makespan(8) - makespan(4)) / 4) * 1e3


def dask_rates(configs: list[str], *, steps: int, warmup: int, repeats: int, optimizer: Optimizer,
               recipe: dict | None) -> tuple:
    """Samples/s of each config at p=2 on the embedded cluster (best round), and the
    median message latency (ms): a RECV's end after the matching SEND's start, over
    the messages whose receiver was already waiting."""
    from distributed import Client

    from pipetrain.api import fit
    from pipetrain.partitioning import partition
    from pipetrain.runtime.local import start_local_cluster

    data = text.CharWindows(split="train", microbatch_size=MICROBATCH)
    part = partition(gpt.build(), 2, method="params", example_input=data.inputs(0))
    rates, latencies = defaultdict(list), []
    cluster = start_local_cluster(2)
    try:
        with Client(cluster) as client:
            for _ in range(repeats):
                for config in configs:
                    schedule, accumulate, correction = parse_config(config)
                    updates = (warmup + steps) * M // microbatches_per_update(schedule, M, accumulate)
                    result = fit(part, data, client=client, schedule=schedule, microbatches=M,
                                 steps=warmup + steps, accumulate=accumulate, correction=correction,
                                 optimizer=with_recipe(optimizer, recipe, updates=updates), progress=False)
                    done = [h["stage0_done"] for h in sorted(result.history, key=lambda h: h["step"])]
                    rates[config].append(steps * M * MICROBATCH / (done[-1] - done[warmup - 1]))
                    latencies += _latencies(result.events)
    finally:
        cluster.close()
    return {c: max(v) for c, v in rates.items()}, {c: v for c, v in rates.items()}, statistics.median(latencies)


def _latencies(events: list[np.ndarray]) -> list[float]:
    out = []
    for sender, receiver, send, recv in ((0, 1, "SEND_F", "RECV_F"), (1, 0, "SEND_B", "RECV_B")):
        sent = {int(e["k"]): e for e in events[sender] if e["kind"] == send}
        for e in events[receiver]:
            if e["kind"] == recv and int(e["k"]) in sent and e["start"] < sent[int(e["k"])]["start"]:
                out.append((e["end"] - sent[int(e["k"])]["start"]) * 1e3)
    return out


def step_times(configs: list[str], args: argparse.Namespace, optimizer: Optimizer, recipe: dict | None) -> dict:
    """Samples/s per depth: measured on Dask at p=2, simulated at p=4 and 8 (and at 2, to compare)."""
    print("measuring step times: Dask at p=2 ...", file=sys.stderr, flush=True)
    rates2, rounds2, send_ms = dask_rates(configs, steps=args.dask_steps, warmup=args.dask_warmup,
                                          repeats=args.repeats, optimizer=optimizer, recipe=recipe)
    out = {"rates": {2: rates2}, "rounds2": rounds2, "send_ms": send_ms, "simulated2": {}, "costs": {}}
    for p in (2, 4, 8):
        out["costs"][p] = measured_costs(configs, p, steps=args.cost_steps, rounds=args.cost_rounds,
                                         optimizer=optimizer, recipe=recipe)
        for config in configs:
            rate = simulated_rate(config, p, out["costs"][p][config], send_ms, clip=bool(recipe))
            (out["simulated2"] if p == 2 else out["rates"].setdefault(p, {}))[config] = rate
    return json.loads(json.dumps(out))  # int keys as the cache will hold them


def lowest_by(curve: list[tuple[int, float]], samples: float) -> float:
    """The lowest loss ``curve`` has reached by ``samples`` (its running minimum, linear
    between evaluations): a loss the run did reach, never the top of a spike."""
    xs, ys = zip(*curve)
    return float(np.interp(samples, xs, np.minimum.accumulate(ys)))


# -------------------------------------------------------------- curves

def recipe_key(recipe: dict | None) -> str:
    """The cache keys' suffix: runs with and without the recipe (or with another one) never mix."""
    return "" if not recipe else "/recipe-" + "-".join(f"{k}{recipe[k]}" for k in sorted(recipe))


def curves_at(p: int, configs: list[str], *, seeds, steps, optimizer, cache: dict,
              recipe: dict | None, lr_of: dict) -> dict[str, list]:
    runs = defaultdict(list)
    for seed in seeds:
        for config in configs:
            # (the learning rate is in the key only where it is not the first file's: older caches stay valid)
            lr = "" if lr_of[config] == optimizer.lr else f"/lr{lr_of[config]}"
            key = f"p{p}/{config}/seed{seed}/steps{steps}{recipe_key(recipe)}{lr}"
            if key not in cache["runs"]:
                cache["runs"][key] = train(config, seed=seed, steps=steps, stages=p,
                                           optimizer=dataclasses.replace(optimizer, lr=lr_of[config]),
                                           eval_every=2, eval_microbatches=16, model_kwargs=MODEL_AT[p],
                                           recipe=recipe)
                print(f"  p={p} seed {seed} {config}: held-out {cache['runs'][key]['heldout']:.4f}", file=sys.stderr,
                      flush=True)
                cache["save"]()
            runs[config].append(cache["runs"][key])
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--convergence", required=True, nargs="+",
                    help="convergence.py --out JSON (p=4); several (the same runs at other learning rates): "
                         "each configuration at the learning rate of its lowest mean held-out loss")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--p8-seeds", type=int, nargs="+", default=None,
                    help="seeds of the p=8 curves (default: --seeds; fewer when time is short)")
    ap.add_argument("--target", type=float, default=None, help="the flagship's (p=2, 4) target loss")
    ap.add_argument("--target-at", type=float, default=0.75,
                    help="otherwise: the lowest held-out loss 1f1b reached by this share of its samples (per model)")
    ap.add_argument("--dask-steps", type=int, default=10)
    ap.add_argument("--dask-warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cost-steps", type=int, default=4)
    ap.add_argument("--cost-rounds", type=int, default=3)
    ap.add_argument("--cache", default=None, help="keep the p=2 / p=8 runs here and reuse them")
    args = ap.parse_args()

    convs = [json.loads(Path(f).read_text()) for f in args.convergence]
    conv_args = convs[0]["args"]
    for f, conv in zip(args.convergence[1:], convs[1:]):
        other = conv["args"]
        differ = [f"{key} {other.get(key)} vs {conv_args.get(key)}" for key in SAME_IN_EVERY_FILE
                  if other.get(key) != conv_args.get(key)]
        if differ:
            raise SystemExit(f"{f}: its runs differ from {args.convergence[0]}'s in more than the learning rate "
                             f"({', '.join(differ)})")
    optimizer = Optimizer(conv_args["optimizer"], lr=conv_args["lr"], dc_lambda=conv_args.get("dc_lambda"))
    recipe = recipe_of(argparse.Namespace(**conv_args))  # the p=4 curves' recipe, for every other run too
    steps = conv_args["steps"]
    lr_of, p4_runs, summary4 = best_learning_rates(convs)
    # gpipe computes 1f1b's numbers (the same updates, another order): one curve for both, at one lr
    lr_of["gpipe"], p4_runs["gpipe"], summary4["gpipe"] = lr_of["1f1b"], p4_runs["1f1b"], summary4["1f1b"]
    configs = best_configs(summary4)
    cache = {"runs": {}}
    if args.cache and Path(args.cache).exists():
        cache["runs"] = json.loads(Path(args.cache).read_text())
    cache["save"] = lambda: args.cache and Path(args.cache).write_text(json.dumps(cache["runs"]))

    async_configs = [c for c in configs if c not in ("1f1b", "gpipe")]
    lr_of = {c: lr_of[c] for c in configs}
    curves = {4: {c: mean_curve(p4_runs[c]) for c in configs}}
    p2 = curves_at(2, async_configs, seeds=args.seeds, steps=steps, optimizer=optimizer, cache=cache,
                   recipe=recipe, lr_of=lr_of)
    curves[2] = {"1f1b": curves[4]["1f1b"], "gpipe": curves[4]["gpipe"], **{c: mean_curve(v) for c, v in p2.items()}}
    p8_seeds = args.p8_seeds or args.seeds
    p8 = curves_at(8, ["1f1b", *async_configs], seeds=p8_seeds, steps=steps, optimizer=optimizer, cache=cache,
                   recipe=recipe, lr_of=lr_of)
    curves[8] = {"gpipe": mean_curve(p8["1f1b"]), **{c: mean_curve(v) for c, v in p8.items()}}
    # One target per model: the flagship's (p=2, p=4) and the 6-block GPT's (p=8).
    budget = steps * M * MICROBATCH
    flagship = args.target if args.target is not None else lowest_by(curves[4]["1f1b"], args.target_at * budget)
    targets = {2: flagship, 4: flagship, 8: lowest_by(curves[8]["1f1b"], args.target_at * budget)}

    key = f"timing-min/{optimizer.name}/{optimizer.lr}/{'|'.join(configs)}{recipe_key(recipe)}"
    if key not in cache["runs"]:
        cache["runs"][key] = step_times(configs, args, optimizer, recipe)
        cache["save"]()
    timing = cache["runs"][key]
    rates = {int(p): v for p, v in timing["rates"].items()}
    simulated2, rounds2, send_ms = timing["simulated2"], timing["rounds2"], timing["send_ms"]
    for p, per_config in timing["costs"].items():
        for config, costs in per_config.items():
            print(f"  p={p} {config}: F {np.round(costs['F'], 2)} B {np.round(costs['B'], 2)} "
                  f"U {np.round(costs['U'], 2)} ms", file=sys.stderr)

    lrs = ", ".join(f"{c} {lr_of[c]:g}" for c in configs)
    print(f"GPT, {steps} steps x {M} x {MICROBATCH} samples per run, {optimizer.name}, lr: {lrs}, "
          f"seeds {args.seeds} (p=8: {p8_seeds}); target held-out loss {targets[4]:.4f} at p=2 and 4, "
          f"{targets[8]:.4f} at p=8 "
          f"(1f1b's lowest by {args.target_at:.0%} of its samples); message latency {send_ms:.2f} ms (p=2 Dask run)")
    print("| configuration | p | held-out at equal samples | samples to target | samples/s | time to target (s) "
          "| vs 1f1b |")
    print("|---|---|---|---|---|---|---|")
    ratios: dict[int, dict[str, float | None]] = {}
    for p in (2, 4, 8):
        times = {}
        for config in configs:
            needed = samples_to(curves[p][config], targets[p])
            times[config] = None if needed is None else needed / rates[p][config]
        ratios[p] = {c: None if t is None or times["1f1b"] is None else times["1f1b"] / t for c, t in times.items()}
        for config in configs:
            needed = samples_to(curves[p][config], targets[p])
            how = "measured (Dask)" if p == 2 else "simulated"
            t, r = times[config], ratios[p][config]
            reached = "not reached" if needed is None else round(needed)
            print(f"| {config} | {p} | {curves[p][config][-1][1]:.4f} | {reached} "
                  f"| {rates[p][config]:.0f} ({how}) | {'-' if t is None else f'{t:.1f}'} "
                  f"| {'-' if r is None else f'{r:.2f}x'} |")
    print("p=2 simulated samples/s with the measured costs, against the Dask run: "
          + ", ".join(f"{c} {simulated2[c]:.0f} / {rates[2][c]:.0f}" for c in configs)
          + "; Dask rounds: " + ", ".join(f"{c} {[round(x) for x in v]}" for c, v in rounds2.items()))

    def best(p):
        candidates = {c: r for c, r in ratios[p].items() if c in async_configs and r is not None}
        return max(candidates.items(), key=lambda kv: kv[1]) if candidates else (None, None)

    print(json.dumps({
        "time_to_target_ratio_vs_1f1b": {f"p{p}": None if best(p)[1] is None else round(best(p)[1], 3)
                                         for p in (2, 4, 8)},
        "best_async": {f"p{p}": best(p)[0] for p in (2, 4, 8)},
        "heldout_at_equal_samples": {f"p{p}": {c: round(curves[p][c][-1][1], 4) for c in configs} for p in (2, 4, 8)},
        "ratios": {f"p{p}": {c: None if r is None else round(r, 3) for c, r in ratios[p].items()} for p in (2, 4, 8)},
        "samples_per_s": {f"p{p}": {c: round(v, 1) for c, v in rates[p].items()} for p in (2, 4, 8)},
        "target": {f"p{p}": round(t, 4) for p, t in targets.items()}, "message_latency_ms": round(send_ms, 3),
        "lr": lr_of}))


if __name__ == "__main__":
    main()

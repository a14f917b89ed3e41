"""Does asynchrony cost accuracy, and do delay corrections win it back?

The flagship GPT (models/gpt.py, 4 stages) trains with every schedule and
every delay correction (pipetrain.stages.corrections) for the same number of
samples, with the reference executor (the numerics do not depend on the
executor). A seed sets the initial weights and the order of the training
windows; every run is evaluated on the same held-out micro-batches, every
``--eval-every`` steps, which gives each configuration's held-out loss
against samples (``--out`` keeps those curves for bench/time_to_accuracy.py).

With ``--recipe`` every run uses the training recipe of the flagship
(pipetrain.optim): linear warm-up over the first ``--warmup-frac`` of its
updates, cosine decay to ``--min-lr-frac`` x lr at its last update, and
clipping by global norm at ``--clip-norm`` (per stage for pipedream, see
schedule/norms.py). The schedule is counted in each configuration's own
updates (pipedream updates once per micro-batch, the others once per step),
so every run sweeps the same LR curve over the same samples.

Configurations: gpipe, 1f1b; pipedream (an update per micro-batch),
pipedream/acc8 (accumulating the 8 micro-batches of a step, as many updates
as 1f1b, still without a flush) and 2bw, each with correction none,
predict, dcasgd, dcasgd-a.

    nice -n 10 .venv/bin/python bench/convergence.py [--steps 40] [--seeds 0 1 2] \\
        [--optimizer adam --lr 1e-3] [--recipe] [--configs 1f1b pipedream+predict ...] [--out FILE]

Last line: {"heldout_loss": {config: mean}, "spread": {config: std}, "vs_1f1b_pct": {...}, "recipe": {...}, ...}.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipetrain.runtime.local import single_thread_env  # noqa: E402

# One thread per kernel, as in the stage workers (set before JAX loads): the
# same numbers a Dask run computes, and a fair share of a shared machine.
os.environ.update(single_thread_env())

from models import gpt, text  # noqa: E402
from pipetrain.optim import Optimizer  # noqa: E402
from pipetrain.partitioning import partition  # noqa: E402
from pipetrain.runtime.interpreter import Hooks  # noqa: E402
from pipetrain.runtime.reference import build_stages, evaluate, run_reference  # noqa: E402
from pipetrain.schedule.builders import build_schedule, microbatches_per_update  # noqa: E402

M, MICROBATCH = 8, 16
CORRECTIONS = ("none", "predict", "dcasgd", "dcasgd-a")


def config_name(schedule: str, accumulate: int = 1, correction: str = "none") -> str:
    acc = f"/acc{accumulate}" if accumulate > 1 else ""
    return schedule + acc + ("" if correction == "none" else f"+{correction}")


def parse_config(name: str) -> tuple[str, int, str]:
    """"pipedream/acc8+predict" -> ("pipedream", 8, "predict")."""
    head, _, correction = name.partition("+")
    schedule, _, acc = head.partition("/acc")
    return schedule, int(acc or 1), correction or "none"


ALL_CONFIGS = (["gpipe", "1f1b"] + [config_name(s, a, c) for s, a in (("pipedream", 1), ("pipedream", M), ("2bw", 1))
                                    for c in CORRECTIONS])


class _LatestWeights(Hooks):
    """At every checkpoint cut, each stage's latest weights (all a held-out evaluation needs)."""

    def __init__(self):
        self.at: dict[int, dict[int, dict[str, np.ndarray]]] = {}

    def on_checkpoint(self, cut, stage):
        state = stage.state_dict()
        prefix = f"v{int(state['meta/latest'])}/"
        self.at.setdefault(cut, {})[stage.spec.index] = {n[len(prefix):]: a for n, a in state.items()
                                                          if n.startswith(prefix)}


def heldout_curve(part, weights_at: dict, heldout, eval_ids) -> list[tuple[int, float]]:
    """(samples, held-out loss) at every cut, through one set of evaluation stages."""
    stages = build_stages(part, Optimizer("sgd", lr=1.0))
    templates = [s.state_dict() for s in stages]
    curve = []
    for cut in sorted(weights_at):
        for s, stage in enumerate(stages):
            state = dict(templates[s])
            state.update({f"v0/{n}": a for n, a in weights_at[cut][s].items()})
            stage.load_state_dict(state)
        curve.append((cut * MICROBATCH, evaluate(stages, heldout, eval_ids)))
    return curve


def with_recipe(optimizer: Optimizer, recipe: dict | None, *, updates: int) -> Optimizer:
    """``optimizer`` with the recipe's warm-up, cosine decay and clipping, over ``updates`` updates."""
    if not recipe:
        return optimizer
    return dataclasses.replace(optimizer, schedule="cosine", warmup=max(1, round(recipe["warmup_frac"] * updates)),
                               decay_steps=updates, min_lr=recipe["min_lr_frac"] * optimizer.lr,
                               clip_norm=recipe["clip_norm"])


def train(config: str, *, seed: int, steps: int, stages: int = 4, optimizer: Optimizer, eval_every: int,
          eval_microbatches: int, model_kwargs: dict | None = None, hooks: Hooks | None = None,
          recipe: dict | None = None) -> dict:
    """One run: held-out curve, final held-out loss, last step's train loss, seconds."""
    schedule_name, accumulate, correction = parse_config(config)
    updates = steps * M // microbatches_per_update(schedule_name, M, accumulate)
    optimizer = with_recipe(optimizer, recipe, updates=updates)
    train_data = text.CharWindows(split="train", microbatch_size=MICROBATCH, seed=seed)
    heldout = text.CharWindows(split="heldout", microbatch_size=MICROBATCH)  # one evaluation set for every seed
    model = gpt.build(seed=seed, **(model_kwargs or {}))
    part = partition(model, stages, method="params", example_input=train_data.inputs(0))
    started = time.time()
    opt = dataclasses.replace(optimizer, correction=correction)
    schedule = build_schedule(schedule_name, num_stages=stages, microbatches=M, steps=steps, accumulate=accumulate,
                              checkpoint_every=eval_every * M, clip=bool(opt.clip_norm))
    latest = _LatestWeights()
    run = run_reference(schedule, stages=build_stages(part, opt), source=train_data, hooks=_Both(latest, hooks))
    trained = time.time() - started
    curve = heldout_curve(part, latest.at, heldout, range(eval_microbatches))
    delays = [max(schedule.delays(s).values()) for s in range(stages)]
    return {"config": config, "seed": seed, "curve": [(n, round(loss, 4)) for n, loss in curve],
            "heldout": round(curve[-1][1], 4), "train_last": round(run.loss_history(M)[-1], 4),
            "seconds": round(trained, 1), "max_delay": delays}


class _Both(Hooks):
    def __init__(self, *hooks):
        self.hooks = [h for h in hooks if h is not None]

    def on_checkpoint(self, cut, stage):
        for h in self.hooks:
            h.on_checkpoint(cut, stage)

    def on_action(self, action, start, end):
        for h in self.hooks:
            h.on_action(action, start, end)


def summarize(runs: list[dict], baseline: str = "1f1b") -> dict[str, dict]:
    """Per configuration: mean, std, min, max of the final held-out loss over seeds, and
    the mean of the per-seed relative difference to ``baseline`` (same init, same data)."""
    by = {}
    for r in runs:
        by.setdefault(r["config"], {})[r["seed"]] = r
    base = by.get(baseline, {})
    out = {}
    for config, seeds in by.items():
        losses = np.array([seeds[s]["heldout"] for s in sorted(seeds)])
        paired = [seeds[s]["heldout"] / base[s]["heldout"] - 1 for s in sorted(seeds) if s in base]
        out[config] = {"mean": float(losses.mean()), "std": float(losses.std(ddof=1)) if len(losses) > 1 else 0.0,
                       "min": float(losses.min()), "max": float(losses.max()), "seeds": len(losses),
                       "vs_baseline_pct": 100 * float(np.mean(paired)) if paired else None,
                       "vs_baseline_pct_range": [100 * min(paired), 100 * max(paired)] if paired else None,
                       "train_last": float(np.mean([seeds[s]["train_last"] for s in seeds])),
                       # above the loss of knowing nothing (ln 97): the run diverged
                       "diverged": int(sum(loss > text.uniform_loss() for loss in losses)),
                       "max_delay": next(iter(seeds.values()))["max_delay"]}
    return out


def print_table(summary: dict, order: list[str]) -> None:
    print("| configuration | held-out (mean) | std | min-max | vs 1f1b, per seed: mean [range] | train, last step "
          "| max delay per stage | diverged |")
    print("|---|---|---|---|---|---|---|---|")
    for config in order:
        r = summary[config]
        vs = ""
        if r["vs_baseline_pct"] is not None:
            lo, hi = r["vs_baseline_pct_range"]
            vs = f"{r['vs_baseline_pct']:+.2f}% [{lo:+.2f}, {hi:+.2f}]"
        print(f"| {config} | {r['mean']:.4f} | {r['std']:.4f} | {r['min']:.4f}-{r['max']:.4f} | {vs} "
              f"| {r['train_last']:.3f} | {' '.join(map(str, r['max_delay']))} | {r['diverged']} of {r['seeds']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--optimizer", default="adam", choices=["adam", "momentum", "sgd"])
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dc-lambda", type=float, default=None, help="DC-ASGD's lambda (default: the paper's)")
    ap.add_argument("--recipe", action="store_true", help="warm-up + cosine decay + clipping (module docstring)")
    ap.add_argument("--warmup-frac", type=float, default=0.1, help="--recipe: share of the updates warming up")
    ap.add_argument("--min-lr-frac", type=float, default=0.1, help="--recipe: the final LR, as a share of --lr")
    ap.add_argument("--clip-norm", type=float, default=1.0, help="--recipe: clip by global norm at this")
    ap.add_argument("--configs", nargs="+", default=list(ALL_CONFIGS))
    ap.add_argument("--eval-every", type=int, default=2, help="steps between held-out evaluations")
    ap.add_argument("--eval-microbatches", type=int, default=16)
    ap.add_argument("--out", default=None, help="write every run (curves included) here as JSON")
    ap.add_argument("--summarize", default=None, help="print the table of an earlier --out file, train nothing")
    args = ap.parse_args()
    if args.summarize:
        saved = json.loads(Path(args.summarize).read_text())
        return report(saved["runs"], argparse.Namespace(**saved["args"]))

    optimizer = Optimizer(args.optimizer, lr=args.lr, dc_lambda=args.dc_lambda)
    runs = []
    for seed in args.seeds:
        for config in args.configs:
            r = train(config, seed=seed, steps=args.steps, optimizer=optimizer, eval_every=args.eval_every,
                      eval_microbatches=args.eval_microbatches, recipe=recipe_of(args))
            runs.append(r)
            print(f"  seed {seed} {config}: held-out {r['heldout']:.4f} in {r['seconds']:.0f} s", file=sys.stderr,
                  flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps({"args": vars(args), "runs": runs}))
    report(runs, args)


def recipe_of(args: argparse.Namespace) -> dict | None:
    if not getattr(args, "recipe", False):
        return None
    return {"schedule": "cosine", "warmup_frac": args.warmup_frac, "min_lr_frac": args.min_lr_frac,
            "clip_norm": args.clip_norm}


def report(runs: list[dict], args: argparse.Namespace) -> None:
    unigram = text.unigram_loss("heldout")
    samples = args.steps * M * MICROBATCH
    summary = summarize(runs)
    recipe = recipe_of(args)
    print(f"GPT 4 stages, {args.steps} steps x {M} micro-batches x {MICROBATCH} = {samples} samples, "
          f"{args.optimizer} lr {args.lr}, seeds {args.seeds}; unigram baseline {unigram:.3f} nats/char")
    if recipe:
        print(f"recipe: warm-up {recipe['warmup_frac']:.0%} of the updates, cosine to {recipe['min_lr_frac']} x lr, "
              f"clip_norm {recipe['clip_norm']}")
    print_table(summary, [c for c in args.configs if c in summary])
    print(json.dumps({"heldout_loss": {c: round(r["mean"], 4) for c, r in summary.items()},
                      "spread": {c: round(r["std"], 4) for c, r in summary.items()},
                      "vs_1f1b_pct": {c: None if r["vs_baseline_pct"] is None else round(r["vs_baseline_pct"], 2)
                                      for c, r in summary.items()},
                      "unigram_loss": round(unigram, 4), "samples": samples, "optimizer": args.optimizer,
                      "lr": args.lr, "seeds": args.seeds, "recipe": recipe}))


if __name__ == "__main__":
    main()

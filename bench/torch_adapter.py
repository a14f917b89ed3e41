"""The torch adapter's own step against a plain torch loop, in one process.

No Dask, no network, one thread: the MLP of ``bench/ddp_baseline.py`` (4 MiB of
weights), ``--microbatches`` micro-batches of 32 per step, SGD. Three contestants,
interleaved round by round, each round starting with the next one, so the machine's drift
hits them alike:

- ``plain torch``: ``nn.Sequential``, ``loss.backward()`` per micro-batch (divided
  by m), ``torch.optim.SGD.step()`` — what a DDP rank runs, without the all-reduce;
- ``TorchStage``: pipetrain's stage, forward / backward per micro-batch and one
  update, binding the weight version with ``torch_swap.call_with``;
- ``TorchStage (functional_call)``: the same, binding with
  ``torch.func.functional_call`` as it did before ``torch_swap``.

Prints ms per step (best and median of the rounds) and the ratio to the plain
loop, then a JSON line. All three start from the same weights; the two stage
variants must end with the same bits (checked), the plain loop within float
tolerance (it averages before it adds).

    .venv/bin/python bench/torch_adapter.py [--rounds 7] [--steps 10]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import ddp_baseline  # noqa: E402

B = 32


def _stage():
    from pipetrain.optim import Optimizer
    from pipetrain.stages.base import StageSpec

    model = ddp_baseline.build_model()
    spec = StageSpec(index=0, start=0, end=len(model), num_stages=1)
    return model.build_stage(spec, optimizer=Optimizer("sgd", lr=ddp_baseline.LR))


def _functional_call(module, params, x, casts):
    """How the adapter bound a version before ``torch_swap``."""
    import torch

    return torch.func.functional_call(module, casts.module_values(module, params), (x,))


def _run_stage(stage, batches, *, binding: str, steps: int, start_step: int) -> float:
    from pipetrain.stages import torch_stage

    original = torch_stage._call_with
    if binding == "functional_call":
        torch_stage._call_with = _functional_call
    try:
        started = time.perf_counter()
        m = len(batches)
        for step in range(start_step, start_step + steps):
            for j, (x, y) in enumerate(batches):
                k = step * m + j
                stage.forward(k, x, version=step, targets=y)
                stage.backward(k)
            stage.update(new_version=step + 1)
            stage.release(step)
        return (time.perf_counter() - started) / steps
    finally:
        torch_stage._call_with = original


def _plain(batches):
    import torch
    from torch import nn

    model = ddp_baseline.build_model()
    net = nn.Sequential(*[model.make_layer(i) for i in range(len(model))])
    opt = torch.optim.SGD(net.parameters(), lr=ddp_baseline.LR)
    tensors = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in batches]

    def run(steps: int) -> float:
        started = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad()
            for x, y in tensors:
                (ddp_baseline.cross_entropy(net(x), y) / len(tensors)).backward()
            opt.step()
        return (time.perf_counter() - started) / steps

    return net, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="a smoke run (2 rounds of 2 steps)")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.steps = 2, 2
    import torch

    from pipetrain.runtime.worker import _keep_freed_memory

    torch.set_num_threads(1)
    _keep_freed_memory()  # what a pipetrain worker process runs with
    data = ddp_baseline.data_source(microbatch_size=B)
    batches = [(data.inputs(k), data.targets(k)) for k in range(args.microbatches)]
    stages = {"swap": _stage(), "functional_call": _stage()}
    net, plain_run = _plain(batches)
    times: dict[str, list[float]] = {"plain torch": [], "TorchStage": [], "TorchStage (functional_call)": []}
    _run_stage(stages["swap"], batches, binding="swap", steps=1, start_step=0)  # warm-up
    _run_stage(stages["functional_call"], batches, binding="functional_call", steps=1, start_step=0)
    plain_run(1)
    done = 1
    contestants = {
        "plain torch": lambda: plain_run(args.steps),
        "TorchStage": lambda: _run_stage(stages["swap"], batches, binding="swap", steps=args.steps,
                                         start_step=done),
        "TorchStage (functional_call)": lambda: _run_stage(stages["functional_call"], batches,
                                                           binding="functional_call", steps=args.steps,
                                                           start_step=done),
    }
    names = list(contestants)
    for r in range(args.rounds):
        for name in names[r % 3:] + names[:r % 3]:  # no contestant always goes first
            times[name].append(contestants[name]())
        done += args.steps
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {t[-1] * 1e3:.1f} ms" for n, t in times.items()),
              file=sys.stderr, flush=True)

    a, b = (stages[n].params(done) for n in ("swap", "functional_call"))
    same_bits = all(torch.equal(a[n], b[n]) for n in a)
    plain = dict(net.named_parameters())
    close = all(np.allclose(a[n].numpy(), plain[n].detach().numpy(), rtol=1e-4, atol=1e-6) for n in a)
    print(f"\ntorch adapter vs a plain torch loop: MLP {ddp_baseline.DEPTH} x Linear({ddp_baseline.WIDTH}) + Tanh, "
          f"{args.microbatches} micro-batches of {B} per step, SGD, 1 thread; {args.rounds} rounds of {args.steps} "
          f"steps, interleaved")
    print(f"{'contestant':30s} {'best ms/step':>12s} {'median':>8s} {'best / plain':>13s} {'median / plain':>15s}")
    best_plain, median_plain = min(times["plain torch"]), statistics.median(times["plain torch"])
    summary = {}
    for name, t in times.items():
        summary[name] = {"best_ms": round(min(t) * 1e3, 2), "median_ms": round(statistics.median(t) * 1e3, 2),
                         "best_ratio": round(min(t) / best_plain, 3),
                         "median_ratio": round(statistics.median(t) / median_plain, 3)}
        s = summary[name]
        print(f"{name:30s} {s['best_ms']:12.1f} {s['median_ms']:8.1f} {s['best_ratio']:12.3f}x "
              f"{s['median_ratio']:14.3f}x")
    paired = [f / s for f, s in zip(times["TorchStage (functional_call)"], times["TorchStage"])]
    print(f"functional_call / torch_swap, paired per round: median {statistics.median(paired):.3f}x "
          f"({' '.join(f'{p:.2f}' for p in paired)})")
    print(f"stage variants end with the same bits: {same_bits}; plain loop within float tolerance: {close}")
    print(f"load average {os.getloadavg()[0]:.2f}")
    print(json.dumps({"ms_per_step": summary, "swap_speedup_paired_median": round(statistics.median(paired), 3),
                      "same_bits": same_bits, "plain_close": close}))
    if not (same_bits and close):
        sys.exit("the contestants did not train the same model")


if __name__ == "__main__":
    main()

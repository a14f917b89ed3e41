"""pipetrain against torch.distributed.pipelining, the peer users would pick instead.

One torch model: an MLP of 8 hidden ``Linear(1024, 1024)`` + ``Tanh`` blocks and
a ``Linear(1024, 10)`` head with cross-entropy; batch 256 in 8 micro-batches of
32; SGD lr 0.01; the same fixed random inputs and labels every step; the same
initial weights everywhere (``TorchSequential.make_layer``). The pipelines cut it
into 2 stages of 4 hidden blocks each (the head joins stage 1). One thread per
process everywhere. Trained side by side, in this order, each round:

- ``torch_single``: one torch process, one thread, the same math as the flush
  schedules: 8 micro-batches of 32, gradients accumulated (mean), one SGD step.
  This is the fair baseline: same kernel shapes, same numbers as 1F1B. The
  whole batch of 256 in one forward/backward is shown too, for reference
  (bigger GEMMs are faster per sample on one core).
- ``torch_pipelining_1f1b``: ``PipelineStage`` + ``Schedule1F1B`` over gloo,
  2 processes started with subprocess, ``torch.set_num_threads(1)`` in each,
  ``torch.optim.SGD`` stepped after each ``schedule.step``.
- ``pipetrain_1f1b`` / ``pipetrain_pipedream``: ``pipetrain.fit`` with a
  ``TorchSequential`` cut at the same layer, on the embedded Dask cluster (2
  worker processes, one thread each), kept up across rounds. pipedream updates
  after every backward (``accumulate=1``), as the schedule is defined.

Throughput is steady state: samples per second over the steps after
``--warmup`` (stage 0's finish times for pipetrain, rank 0's clock for torch).
Each contestant takes its best of ``--repeats`` rounds (this is a shared
2-core machine). Ratios are to ``torch_single``. For the pipetrain runs a
second table splits each stage's steady-state wall time by action kind from
``result.events`` (RECV = waiting for input, SEND includes waiting for credit).

The stage workers undo what Dask's nanny does to glibc's allocator
(``MALLOC_TRIM_THRESHOLD_``, see ``pipetrain.runtime.worker._keep_freed_memory``);
torch.distributed.pipelining's processes start from the environment before
the Dask cluster, so neither side runs with it.

    .venv/bin/python bench/vs_torch_pipelining.py [--steps 10] [--warmup 2] [--repeats 3]

Prints tables, then one JSON line:
{"samples_per_s": {"torch_single": ..., "torch_pipelining_1f1b": ..., "pipetrain_1f1b": ...,
"pipetrain_pipedream": ...}, "ratio_to_single": {...}, ...}.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

WIDTH, DEPTH, CLASSES = 1024, 8, 10
BATCH, M, STAGES, LR, SEED = 256, 8, 2, 0.01, 0
ENV_BEFORE_DASK: dict[str, str] = {}
CONTESTANTS = ("torch_single", "torch_pipelining_1f1b", "pipetrain_1f1b", "pipetrain_pipedream")


# ---------------------------------------------------------------- the model and data

def cross_entropy(logits, labels):
    import torch.nn.functional as F

    return F.cross_entropy(logits, labels)


def build_model(*, width: int = WIDTH, depth: int = DEPTH, split_backward: bool | str = "auto"):
    """The TorchSequential every contestant takes its layers from (same initial weights)."""
    from torch import nn

    from pipetrain.stages.torch_stage import TorchSequential

    layers = []
    for _ in range(depth):
        layers += [lambda: nn.Linear(width, width), nn.Tanh]
    layers.append(lambda: nn.Linear(width, CLASSES))
    return TorchSequential(layers, loss=cross_entropy, seed=SEED, device="cpu", split_backward=split_backward)


def fixed_data(*, width: int = WIDTH, batch: int = BATCH) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((batch, width), dtype=np.float32)
    y = rng.integers(0, CLASSES, size=batch, dtype=np.int64)
    return x, y


def layers_of(model, start: int, end: int):
    from torch import nn

    return nn.Sequential(*[model.make_layer(i) for i in range(start, end)])


# ---------------------------------------------------------------- (d) one torch process

def run_single(*, steps: int, warmup: int, accumulate: bool, width: int, depth: int, batch: int) -> dict:
    import torch

    torch.set_num_threads(1)
    model = layers_of(build_model(width=width, depth=depth), 0, 2 * depth + 1)
    x, y = (torch.from_numpy(a) for a in fixed_data(width=width, batch=batch))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    xs, ys = (x.chunk(M), y.chunk(M)) if accumulate else ((x,), (y,))
    losses = []
    for step in range(warmup + steps):
        if step == warmup:
            started = time.perf_counter()
        opt.zero_grad()
        total = 0.0
        for xm, ym in zip(xs, ys):
            loss = cross_entropy(model(xm), ym) / len(xs)
            loss.backward()
            total += loss.item()
        opt.step()
        losses.append(total)
    return {"samples_per_s": steps * batch / (time.perf_counter() - started), "losses": losses}


# ---------------------------------------------------------------- (a) torch.distributed.pipelining

def torch_pipelining_rank(rank: int, port: int, *, steps: int, warmup: int, width: int, depth: int,
                          batch: int) -> None:
    """One rank of the torch.distributed.pipelining run; rank 0 prints a JSON result line."""
    import torch
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=STAGES)
    model = build_model(width=width, depth=depth)
    cut = depth  # layer index of the (depth / 2)-th Linear: half the hidden blocks per stage
    submod = layers_of(model, 0, cut) if rank == 0 else layers_of(model, cut, len(model))
    stage = PipelineStage(submod, stage_index=rank, num_stages=STAGES, device=torch.device("cpu"))
    schedule = Schedule1F1B(stage, n_microbatches=M, loss_fn=cross_entropy)
    opt = torch.optim.SGD(submod.parameters(), lr=LR)
    x, y = (torch.from_numpy(a) for a in fixed_data(width=width, batch=batch))
    losses = []
    for step in range(warmup + steps):
        if step == warmup:
            dist.barrier()
            started = time.perf_counter()
        opt.zero_grad()
        if rank == 0:
            schedule.step(x)
        else:
            mb_losses: list = []
            schedule.step(target=y, losses=mb_losses)
            losses.append(float(torch.stack(mb_losses).mean()))
        opt.step()
    elapsed = time.perf_counter() - started  # rank 0 runs the last backward of a 1F1B step
    gathered = [None] * STAGES
    dist.all_gather_object(gathered, {"elapsed": elapsed, "losses": losses})
    if rank == 0:
        print(json.dumps({"samples_per_s": steps * batch / gathered[0]["elapsed"], "losses": gathered[1]["losses"]}))
    dist.destroy_process_group()


def run_torch_pipelining(*, steps: int, warmup: int, width: int, depth: int, batch: int) -> dict:
    port = _free_port()
    # The environment from before the Dask cluster started: its nanny leaves
    # MALLOC_TRIM_THRESHOLD_ in os.environ, which would slow these processes too.
    env = {**ENV_BEFORE_DASK, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    args = [f"--steps={steps}", f"--warmup={warmup}", f"--width={width}", f"--depth={depth}", f"--batch={batch}"]
    procs = [subprocess.Popen([sys.executable, __file__, "--torch-rank", str(r), "--port", str(port), *args],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(STAGES)]
    outs = [p.communicate(timeout=600) for p in procs]
    for r, (p, (_, err)) in enumerate(zip(procs, outs)):
        if p.returncode:
            raise RuntimeError(f"torch.distributed.pipelining rank {r} exited {p.returncode}:\n{err[-3000:]}")
    return json.loads(outs[0][0].strip().splitlines()[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- (b, c) pipetrain

def run_pipetrain(part, data, client, *, schedule: str, steps: int, warmup: int, accumulate: int = 1) -> dict:
    from pipetrain.api import fit
    from pipetrain.optim import Optimizer

    result = fit(part, data, client=client, schedule=schedule, microbatches=M, steps=warmup + steps,
                 accumulate=accumulate, optimizer=Optimizer("sgd", lr=LR), progress=False)
    done = [h["stage0_done"] for h in sorted(result.history, key=lambda h: h["step"])]
    # Step `warmup - 1` ends where the measured steps begin.
    start, end = done[warmup - 1], done[-1]
    samples = steps * M * data.microbatch_size
    losses = [h["loss"] for h in sorted(result.history, key=lambda h: h["step"])]
    return {"samples_per_s": samples / (end - start), "losses": losses,
            "breakdown": [_breakdown(ev, start, end) for ev in result.events],
            "schedule": {"schedule": schedule, "accumulate": accumulate,
                         "split_backward": part.model.split_backward}}


def _breakdown(events: np.ndarray, start: float, end: float) -> dict[str, float]:
    """Share of [start, end] per action kind (clipped), the rest as "other", and the
    median milliseconds of F, B, W, U, a backward's whole work (B+W) and a split
    backward's input-gradient half (B in) inside it."""
    s = np.clip(events["start"], start, end)
    e = np.clip(events["end"], start, end)
    inside = (events["start"] >= start) & (events["end"] <= end)
    out: dict[str, float] = {}
    for kind in np.unique(events["kind"]):
        mine = events["kind"] == kind
        out[str(kind)] = float((e - s)[mine].sum()) / (end - start)
        if kind in ("F", "B", "W", "U") and (mine & inside).any():
            out[f"{kind} ms"] = float(np.median((events["end"] - events["start"])[mine & inside])) * 1e3
    # A backward's whole work: B, plus W where it ran split.
    work: dict[int, float] = {}
    for event in events[inside & np.isin(events["kind"], ("B", "W"))]:
        work[int(event["k"])] = work.get(int(event["k"]), 0.0) + float(event["end"] - event["start"])
    if work:
        out["B+W ms"] = float(np.median(list(work.values()))) * 1e3
    # The input-gradient half of a split backward: the B of a micro-batch that has a W.
    split_b = inside & (events["kind"] == "B") & np.isin(events["k"], events["k"][inside & (events["kind"] == "W")])
    if split_b.any():
        out["B in ms"] = float(np.median((events["end"] - events["start"])[split_b])) * 1e3
    out["other"] = 1 - sum(v for k, v in out.items() if not k.endswith(" ms"))
    return out


def ceiling(breakdown: list[dict[str, float]], *, schedule: str, accumulate: int, split_backward: str,
            batch: int) -> float:
    """Samples/s of ``schedule`` in steady state if every stage took exactly its
    measured median F, B (W included) and U and messages were free and instant: the most
    any runtime could get from these kernels on this machine."""
    from pipetrain.schedule.builders import build_schedule
    from pipetrain.schedule.simulator import simulate

    # A backward costs its whole median work (B, plus W where split); a split
    # one sends after its input-gradient share, W / (B in + W) as measured.
    weights = [row["B+W ms"] * row["W ms"] / (row["B in ms"] + row["W ms"]) if "W ms" in row else 0.0
               for row in breakdown]
    costs = {"forward_cost": [row["F ms"] for row in breakdown],
             "backward_cost": [row["B+W ms"] for row in breakdown],
             "update_cost": [row["U ms"] for row in breakdown],
             "weight_cost": weights, "split_backward": split_backward}

    def makespan(steps: int) -> float:
        built = build_schedule(schedule, num_stages=STAGES, microbatches=M, steps=steps, accumulate=accumulate)
        return simulate(built, **costs).makespan

    ms_per_step = (makespan(8) - makespan(4)) / 4  # steady state: fill and drain cancel out
    return batch / ms_per_step * 1e3


def worker_threads(client) -> list[int]:
    def threads() -> int:
        import torch

        return torch.get_num_threads()

    return sorted(client.run(threads).values())


# ---------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="measured steps (mini-batches) per contestant")
    ap.add_argument("--warmup", type=int, default=2, help="steps run before measuring (>= 1)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; each contestant keeps its best")
    ap.add_argument("--width", type=int, default=WIDTH, help=argparse.SUPPRESS)
    ap.add_argument("--depth", type=int, default=DEPTH, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=BATCH, help=argparse.SUPPRESS)
    ap.add_argument("--torch-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = {"width": args.width, "depth": args.depth, "batch": args.batch}
    if args.torch_rank is not None:
        torch_pipelining_rank(args.torch_rank, args.port, steps=args.steps, warmup=args.warmup, **sizes)
        return
    if args.warmup < 1 or args.depth % 2:
        ap.error("--warmup must be >= 1 and --depth even")

    from distributed import Client

    from pipetrain.data import ArraySource
    from pipetrain.partitioning import partition
    from pipetrain.runtime.local import start_local_cluster

    x, y = fixed_data(width=args.width, batch=args.batch)
    data = ArraySource(x, y, microbatch_size=args.batch // M, shuffle=False)
    part, part_fused, part_split = (
        partition(build_model(width=args.width, depth=args.depth, split_backward=split), STAGES,
                  method="explicit", boundaries=[args.depth], example_input=data.inputs(0))
        for split in ("auto", False, True))
    load_before = os.getloadavg()[0]
    ENV_BEFORE_DASK.update(os.environ)
    cluster = start_local_cluster(STAGES)
    with Client(cluster) as client:
        threads = worker_threads(client)
        common = {"steps": args.steps, "warmup": args.warmup}
        contestants = {
            "torch_single": lambda: run_single(accumulate=True, **common, **sizes),
            "torch_pipelining_1f1b": lambda: run_torch_pipelining(**common, **sizes),
            "pipetrain_1f1b": lambda: run_pipetrain(part, data, client, schedule="1f1b", **common),
            "pipetrain_pipedream": lambda: run_pipetrain(part, data, client, schedule="pipedream", **common),
            "torch_single_whole_batch": lambda: run_single(accumulate=False, **common, **sizes),
            "pipetrain_pipedream_acc8": lambda: run_pipetrain(part, data, client, schedule="pipedream",
                                                              accumulate=M, **common),
            # The default splits only the step's last backward in 1f1b (and
            # none in pipedream, which has no flush): what never splitting,
            # and splitting every backward, are worth against it.
            "pipetrain_1f1b_never_split": lambda: run_pipetrain(part_fused, data, client, schedule="1f1b", **common),
            "pipetrain_1f1b_split_every_backward": lambda: run_pipetrain(part_split, data, client, schedule="1f1b",
                                                                         **common),
            "pipetrain_pipedream_split_every_backward": lambda: run_pipetrain(part_split, data, client,
                                                                              schedule="pipedream", **common),
        }
        runs: dict[str, list[dict]] = {name: [] for name in contestants}
        names = list(contestants)
        for r in range(args.repeats):
            # Each round starts one contestant later, so none always runs first or last.
            for name in names[r % len(names):] + names[:r % len(names)]:
                runs[name].append(contestants[name]())
    cluster.close()
    load_after = os.getloadavg()[0]

    best = {name: max(r, key=lambda run: run["samples_per_s"]) for name, r in runs.items()}
    rate = {name: round(b["samples_per_s"], 1) for name, b in best.items()}
    base, peer = rate["torch_single"], rate["torch_pipelining_1f1b"]
    # The median of the rounds too: a contestant whose rounds spread more
    # (torch.distributed.pipelining starts fresh processes each round) gains
    # more from taking the best.
    median = {name: round(float(np.median([run["samples_per_s"] for run in r])), 1) for name, r in runs.items()}
    print(f"MLP {args.depth} x Linear({args.width}, {args.width}) + Tanh, head Linear({args.width}, {CLASSES}), "
          f"batch {args.batch} = {M} x {args.batch // M}, {STAGES} stages cut after layer {args.depth - 1}, "
          f"SGD lr {LR}, 1 thread per process (Dask workers' torch threads: {threads}); {args.steps} steps after "
          f"{args.warmup} warm-up, best of {args.repeats} rounds"
          f"; load average {load_before:.2f} before, "
          f"{load_after:.2f} after")
    print(f"{'contestant':<40} {'samples/s':>9} {'vs single':>9} {'vs torch pp':>11} {'median vs pp':>12} "
          f"{'each round':>26} {'loss first..last':>17}")
    for name in names:
        rounds = " ".join(f"{r['samples_per_s']:.0f}" for r in runs[name])
        losses = best[name]["losses"]
        print(f"{name:<40} {rate[name]:>9.1f} {rate[name] / base:>8.2f}x {rate[name] / peer:>10.2f}x "
              f"{median[name] / median['torch_pipelining_1f1b']:>11.2f}x {rounds:>26} "
              f"{losses[0]:>8.4f}..{losses[-1]:.4f}")

    print("\npipetrain, each stage in its best round: median ms of F, B, W (weight gradients after a split "
          "backward's send), B+W (a backward's whole work), U; share of the steady-state wall time")
    ms_kinds = ("F ms", "B ms", "W ms", "B+W ms", "U ms")
    kinds = ("F", "B", "W", "U", "RECV_F", "RECV_B", "SEND_F", "SEND_B", "other")
    print(f"{'run':<48}" + "".join(f"{k:>7}" for k in ms_kinds) + "".join(f"{k:>7}" for k in kinds))
    for name in (n for n in names if n.startswith("pipetrain")):
        for stage, row in enumerate(best[name]["breakdown"]):
            print(f"{name + f' stage {stage}':<48}" + "".join(f"{row.get(k, 0.0):>7.1f}" for k in ms_kinds)
                  + "".join(f"{row.get(k, 0.0):>7.1%}" for k in kinds))

    ceilings = {name: ceiling(best[name]["breakdown"], batch=args.batch, **best[name]["schedule"])
                for name in names if "breakdown" in best[name]}
    print("\nceiling: samples/s the schedule would reach on its own stages' measured F, B, W and U (medians above)\n"
          "with free, instant communication (pipetrain simulate); "
          "the ratio to torch.distributed.pipelining's measured rate")
    for name, limit in ceilings.items():
        print(f"{name:<40} {limit:>9.1f} {limit / peer:>8.2f}x   (measured {rate[name] / limit:.0%} of it)")
    # What removing the flush can buy at all: a perfect 1F1B idles (p-1)
    # slots of m+p-1 per step on its bottleneck stage, a schedule without
    # flush none, before any extra updates it runs.
    flush_bound = (M + STAGES - 1) / M
    print(f"\nno flush (pipedream) against a perfect 1F1B: at most (m+p-1)/m = {flush_bound:.3f}x at p={STAGES}, "
          f"m={M}, before pipedream's extra updates")

    print(json.dumps({
        "samples_per_s": {name: rate[name] for name in CONTESTANTS},
        "ratio_to_single": {name: round(rate[name] / base, 3) for name in CONTESTANTS},
        "ratio_to_torch_pipelining": {name: round(rate[name] / peer, 3) for name in CONTESTANTS},
        "median_samples_per_s": {name: median[name] for name in names},
        "extra_samples_per_s": {name: rate[name] for name in names if name not in CONTESTANTS},
        # Same initial weights, data and math: the sync runs agree; pipedream differs by design.
        "last_loss": {name: round(best[name]["losses"][-1], 6) for name in names},
        "ceiling_samples_per_s": {name: round(limit, 1) for name, limit in ceilings.items()},
        "no_flush_bound_vs_perfect_1f1b": round(flush_bound, 4),
        "targets_met": {"pipetrain_1f1b >= torch_pipelining_1f1b": rate["pipetrain_1f1b"] >= peer,
                        "pipetrain_pipedream >= 1.2 x torch_pipelining_1f1b":
                            rate["pipetrain_pipedream"] >= 1.2 * peer},
    }))

if __name__ == "__main__":
    main()

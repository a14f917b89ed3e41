"""The torch DDP side of bench/replicas.py: the MLP both contestants train, its data, and the
DistributedDataParallel run (gloo, one process per replica, one thread each).

The model: ``DEPTH`` hidden ``Linear(WIDTH, WIDTH)`` + ``Tanh`` blocks and a
``Linear(WIDTH, CLASSES)`` head with cross-entropy, 4 MiB of float32 weights at
the default sizes; its layers come from one ``TorchSequential`` (``make_layer``),
so pipetrain's stage and every DDP rank start from the same weights. The data: a
fixed ``ArraySource`` of random inputs and labels, shuffled per epoch from its seed.

Each DDP rank r runs, per step, the same micro-batches a pipetrain replica r runs
(``fit(replicas=d)`` gives replica r the job's micro-batch ids k * d + r for its
local k = step * m + j): m forward/backwards of ``microbatch_size`` samples, the
first m - 1 under ``no_sync`` (gradients accumulated locally), the last one with
DDP's all-reduce, then one ``torch.optim.SGD`` step. Each loss is divided by m, and
DDP averages over the d ranks: the update is the mean over d * m micro-batches,
pipetrain's. This, not one batch of m * b per rank, is the fair comparison: the
same kernel shapes (a bigger GEMM is faster per sample on one core) and the same
numbers, so the two runs' losses agree; and DDP's one all-reduce per step is what
pipetrain's one reduction per update does.

    python bench/ddp_baseline.py --rank R --world 2 --port P --steps S --warmup W ...

(started by ``run_ddp``; rank 0 prints one JSON line.)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

WIDTH, DEPTH, CLASSES = 512, 4, 10
SAMPLES, SEED, LR = 4096, 0, 0.01


def cross_entropy(logits, labels):
    import torch.nn.functional as F

    return F.cross_entropy(logits, labels)


def build_model(*, width: int = WIDTH, depth: int = DEPTH):
    """The TorchSequential both sides take their layers (and initial weights) from."""
    from torch import nn

    from pipetrain.stages.torch_stage import TorchSequential

    layers = []
    for _ in range(depth):
        layers += [lambda: nn.Linear(width, width), nn.Tanh]
    layers.append(lambda: nn.Linear(width, CLASSES))
    return TorchSequential(layers, loss=cross_entropy, seed=SEED, device="cpu")


def weight_bytes(*, width: int = WIDTH, depth: int = DEPTH) -> int:
    return 4 * (depth * (width * width + width) + width * CLASSES + CLASSES)


def data_source(*, width: int = WIDTH, microbatch_size: int):
    from pipetrain.data import ArraySource

    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((SAMPLES, width), dtype=np.float32)
    y = rng.integers(0, CLASSES, size=SAMPLES, dtype=np.int64)
    return ArraySource(x, y, microbatch_size=microbatch_size, seed=SEED)


def ddp_rank(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    rank, d, m = args.rank, args.world, args.microbatches
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=rank, world_size=d)
    model = build_model(width=args.width, depth=args.depth)
    net = DistributedDataParallel(nn.Sequential(*[model.make_layer(i) for i in range(len(model))]))
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    data = data_source(width=args.width, microbatch_size=args.microbatch_size)
    losses = []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            dist.barrier()
            started = time.perf_counter()
        opt.zero_grad()
        total = 0.0
        for j in range(m):
            k = (step * m + j) * d + rank  # the job's micro-batch id pipetrain's replica `rank` runs here
            x, y = torch.from_numpy(data.inputs(k)), torch.from_numpy(data.targets(k))
            # The last micro-batch's backward all-reduces the accumulated sums; the others stay local.
            with net.no_sync() if j < m - 1 else contextlib.nullcontext():
                loss = cross_entropy(net(x), y) / m
                loss.backward()
            total += float(loss)
        opt.step()
        losses.append(total)
    elapsed = time.perf_counter() - started  # every rank leaves the last all-reduce together
    gathered: list = [None] * d
    dist.all_gather_object(gathered, losses)
    if rank == 0:
        # A step's loss: the mean over the d ranks' m micro-batches (pipetrain's step record).
        step_losses = np.mean(np.array(gathered, dtype=np.float64), axis=0)
        samples = args.steps * d * m * args.microbatch_size
        print(json.dumps({"samples_per_s": samples / elapsed, "losses": step_losses.tolist()}), flush=True)
    dist.barrier()  # neither rank tears gloo down while the other still talks to it
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ddp(*, world: int, microbatches: int, microbatch_size: int, steps: int, warmup: int, width: int = WIDTH,
            depth: int = DEPTH, env: dict[str, str] | None = None, timeout: float = 600) -> dict:
    """``world`` DDP processes started fresh (subprocess); rank 0's {"samples_per_s", "losses"}."""
    port = _free_port()
    env = {**(env or {}), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    flags = [f"--world={world}", f"--port={port}", f"--microbatches={microbatches}",
             f"--microbatch-size={microbatch_size}", f"--steps={steps}", f"--warmup={warmup}",
             f"--width={width}", f"--depth={depth}"]
    procs = [subprocess.Popen([sys.executable, __file__, f"--rank={r}", *flags], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(world)]
    outs = [p.communicate(timeout=timeout) for p in procs]
    result = _result_line(outs[0][0])
    for r, (p, (_, err)) in enumerate(zip(procs, outs)):
        if p.returncode and result is None:
            raise RuntimeError(f"torch DDP rank {r} exited {p.returncode}:\n{err[-3000:]}")
        if p.returncode:
            # torch 2.13's gloo can abort in its exit path ("terminate called without an active
            # exception", SIGABRT) after every step and rank 0's figures are done: those stand.
            print(f"ddp_baseline: rank {r} exited {p.returncode} after the run's result was reported "
                  f"(its last stderr line: {err.strip().splitlines()[-1] if err.strip() else '-'})", file=sys.stderr)
    return result


def _result_line(stdout: str) -> dict | None:
    """Rank 0's JSON result line, or None if it never printed one."""
    lines = stdout.strip().splitlines()
    try:
        return json.loads(lines[-1]) if lines else None
    except ValueError:
        return None


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="one rank of bench/replicas.py's torch DDP baseline")
    for name in ("rank", "world", "port", "microbatches", "microbatch-size", "steps", "warmup"):
        ap.add_argument(f"--{name}", type=int, required=True)
    ap.add_argument("--width", type=int, default=WIDTH)
    ap.add_argument("--depth", type=int, default=DEPTH)
    ddp_rank(ap.parse_args())

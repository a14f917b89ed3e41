"""Replicated pipelines (pipeline x data parallelism): how pipetrain scales with d, and how it
compares with torch DDP.

Scaling: two sleep stages (F 10 ms, B 20 ms: the machine's two cores do not decide),
1f1b, 16 micro-batches per replica and step, each stage holding 1 MiB of float32
gradients (``SleepSequential(grad_bytes=1 << 20)``) that its d replicas sum before
every update, 64 KiB boundaries; d = 1, 2, 4 pipelines (up to 8 worker processes) on
one embedded Dask cluster of 8 single-threaded workers, interleaved each round (after
one untimed d = 4 run). Throughput: the job's micro-batches (d * m per step) per
second between stage 0's reports of the first and the last step (the first step's
start-up left out), from ``FitResult.history``'s ``stage0_done``. Scaling
efficiency: throughput(d) / (d x throughput(1)), from the best round of each d (and
from the medians, next to it). A fourth contestant each round is d = 4 with the other
exchange than the default one for the stages' size (runtime/replicas.py; 1 MiB stages: direct,
each replica sends its whole part to the three others; from 4 MiB, ``--grad-mib``: scatter,
each replica sums a quarter of every gradient and shares that sum, half the bytes): what
scattering wins, paired per round.

vs DDP: the torch MLP of ``bench/ddp_baseline.py`` (4 x Linear(512, 512) + Tanh, a
Linear(512, 10) head, 4 MiB of weights), d = 2 replicas of a 1-stage pipeline
(``fit(part, data, replicas=2)``, on its own embedded cluster of 2 workers) against
``DistributedDataParallel`` with gloo on 2 processes, one thread each everywhere,
the same initial weights, micro-batches, SGD and number of steps: per replica and
step m = 8 micro-batches of 32 (DDP: gradient accumulation under ``no_sync``, one
all-reduce per step; why that is the fair one: see ddp_baseline.py). Samples/s over
the ``--ddp-steps`` after ``--warmup`` (pipetrain: stage 0's reports; DDP: rank 0's clock
after a barrier), best of ``--ddp-repeats`` rounds, the order alternating each round
(and the median of the rounds' paired ratios, the figure least moved by other jobs' load).
The two train the same: their step losses are printed side by side. A third contestant in
the same rounds is pipetrain sending each replica's part as one message after the backward
(``reduce_bucket_mib`` large) instead of 1 MiB buckets during the update's last backward:
what the buckets win, paired per round. It also prints the share of a core this process
(the driver, and the embedded cluster's scheduler and nannies, on one event loop) used
during pipetrain's runs: the Dask apparatus DDP does not have.

    .venv/bin/python bench/replicas.py [--steps 8] [--repeats 3] [--ddp-steps 20] [--ddp-repeats 5]
                                       [--part scaling|ddp|both] [--quick] [--shape-loopback GBIT]
                                       [--grad-mib 1]

``--shape-loopback GBIT`` (root) limits the loopback device to GBIT Gbit/s while it runs
(``tc ... tbf``): the wire then costs time, as between hosts, instead of the CPU time a
2-core machine's loopback copy takes from the compute.

Prints tables, then one JSON line:
{"scaling_efficiency": {"1": ..., "2": ..., "4": ...}, "scatter_gain_d4_paired_median": ..., "vs_torch_ddp": ...,
 "bucket_gain_paired_median": ..., "client_cpu_share": ..., ...}.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package

import ddp_baseline  # noqa: E402
from models.synthetic import SleepData, SleepSequential  # noqa: E402

P, F_MS, B_MS, GRAD_BYTES, BOUNDARY_BYTES = 2, 10.0, 20.0, 1 << 20, 1 << 16
REPLICAS = (1, 2, 4)
OTHER = "4 other"  # the scaling part's fourth contestant: d = 4 with the exchange auto does not pick
WORKERS = P * max(REPLICAS)
DDP_WORLD, DDP_M, DDP_B = 2, 8, 32
LR = 0.01
ENV_BEFORE_DASK: dict[str, str] = {}


def steady_rate(history: list[dict], *, first: int, microbatches_per_step: int, samples_per_microbatch: int = 1
                ) -> float:
    """Samples (or micro-batches) per second between stage 0's reports of step ``first`` and the last step."""
    done = [h["stage0_done"] for h in sorted(history, key=lambda h: h["step"])]
    if len(done) < first + 2:
        raise ValueError(f"need at least {first + 2} steps to measure after step {first}, got {len(done)}")
    steps = len(done) - 1 - first
    return steps * microbatches_per_step * samples_per_microbatch / (done[-1] - done[first])


def per_step_ms(result, *, first: int) -> list[dict[str, float]]:
    """Each task's milliseconds per step in each action kind (F, B, U; SEND_R, RECV_R, R: the
    replicas' gradient sum) between stage 0's reports of step ``first`` and the last step."""
    import numpy as np

    done = sorted((h["step"], h["stage0_done"]) for h in result.history)
    start, end, steps = done[first][1], done[-1][1], len(done) - 1 - first
    rows = []
    for events in result.events:
        inside = (events["start"] >= start) & (events["end"] <= end)
        spent = (events["end"] - events["start"])[inside]
        kinds = events["kind"][inside]
        rows.append({str(kind): float(spent[kinds == kind].sum()) / steps * 1e3 for kind in np.unique(kinds)})
    return rows


def print_breakdown(title: str, rows: list[dict[str, float]]) -> None:
    kinds = ("F", "B", "U", "SEND_R", "RECV_R", "R", "RECV_F", "RECV_B")
    print(f"{title}: ms per step by action, each task (RECV_R: waiting for the other replicas' gradients)")
    print(f"{'task':>6}" + "".join(f"{k:>8}" for k in kinds))
    for task, row in enumerate(rows):
        print(f"{task:>6}" + "".join(f"{row.get(k, 0.0):>8.1f}" for k in kinds))


def ideal_rate(m: int) -> float:
    """One 1f1b pipeline's micro-batches/s with free messages and reductions: m / ((m + p - 1)(F + B))."""
    return m / ((m + P - 1) * (F_MS + B_MS) / 1000)


# ---------------------------------------------------------------- scaling with d

def scaling_rates(client, args: argparse.Namespace) -> dict[int, list[float]]:
    """Micro-batches/s of the job for each d, ``--repeats`` rounds, d interleaved (order turning each round)."""
    from pipetrain.api import fit
    from pipetrain.optim import Optimizer
    from pipetrain.partitioning import partition

    data = SleepData(nbytes=BOUNDARY_BYTES)
    model = SleepSequential(P, forward_ms=F_MS, backward_ms=B_MS, grad_bytes=grad_bytes(args))
    part = partition(model, P, method="uniform", example_input=data.inputs(0))
    def run(d: int, steps: int, exchange: str = "auto"):
        return fit(part, data, client=client, schedule=args.schedule, microbatches=args.microbatches,
                   steps=steps, replicas=d, optimizer=Optimizer("sgd", lr=LR), progress=False,
                   reduce_exchange=exchange)

    run(max(REPLICAS), 2)  # untimed: every worker's first job (imports, first connections) out of the rounds
    contestants = [*REPLICAS, OTHER]
    other = exchanges_at_d4(args)[1]
    rates: dict = {c: [] for c in contestants}
    breakdowns: dict = {}
    for r in range(args.repeats):
        for c in contestants[r % len(contestants):] + contestants[:r % len(contestants)]:
            d = 4 if c == OTHER else c
            result = run(d, args.steps, other if c == OTHER else "auto")
            rates[c].append(steady_rate(result.history, first=0, microbatches_per_step=d * args.microbatches))
            if rates[c][-1] == max(rates[c]):
                breakdowns[c] = per_step_ms(result, first=0)
    return {"rates": rates, "breakdown": breakdowns[max(REPLICAS)], "breakdown_other": breakdowns[OTHER]}


def grad_bytes(args: argparse.Namespace) -> int:
    return int(args.grad_mib * (1 << 20))


def exchanges_at_d4(args: argparse.Namespace) -> tuple[str, str]:
    """The exchange d = 4 replicas of these stages use by default (``reduce_exchange = "auto"``), and the other."""
    from pipetrain.runtime.replicas import exchange_for

    default = exchange_for(4, "auto", grad_bytes(args))
    return default, "direct" if default == "scatter" else "scatter"


def report_scaling(measured: dict, args: argparse.Namespace) -> dict:
    rates = measured["rates"]
    best = {d: max(r) for d, r in rates.items()}
    median = {d: statistics.median(r) for d, r in rates.items()}
    eff = {d: best[d] / (d * best[1]) for d in REPLICAS}
    eff_median = {d: median[d] / (d * median[1]) for d in REPLICAS}
    default, other = exchanges_at_d4(args)
    eff_other, eff_other_median = best[OTHER] / (4 * best[1]), median[OTHER] / (4 * median[1])
    scatter, direct = (rates[OTHER], rates[4]) if other == "scatter" else (rates[4], rates[OTHER])
    gain = statistics.median(a / b for a, b in zip(scatter, direct))  # paired per round
    ideal = ideal_rate(args.microbatches)
    print(f"scaling: {P} sleep stages (F {F_MS:.0f} ms, B {B_MS:.0f} ms), {args.schedule}, m = {args.microbatches} "
          f"per replica and step, {args.grad_mib:g} MiB of gradients per stage reduced across replicas every "
          f"update, {BOUNDARY_BYTES >> 10} KiB boundaries, {args.steps} steps (rate over steps 1..), "
          f"{args.repeats} rounds; one pipeline's ideal {ideal:.1f} mb/s")
    print(f"{'d':>2} {'workers':>7} {'best mb/s':>9} {'median':>8} {'efficiency':>10} {'(median)':>8} "
          f"{'vs ideal':>8}   each round")
    for d in REPLICAS:
        rounds = " ".join(f"{x:.1f}" for x in rates[d])
        print(f"{d:>2} {P * d:>7} {best[d]:>9.2f} {median[d]:>8.2f} {eff[d]:>10.3f} {eff_median[d]:>8.3f} "
              f"{best[d] / (d * ideal):>8.3f}   {rounds}")
    rounds = " ".join(f"{x:.1f}" for x in rates[OTHER])
    print(f"{f'4 ({other} exchange)':>20} {best[OTHER]:>7.2f} {median[OTHER]:>8.2f} {eff_other:>10.3f} "
          f"{eff_other_median:>8.3f} {best[OTHER] / (4 * ideal):>8.3f}   {rounds}")
    print(f"d = 4: the scatter exchange / the direct one ({default} is the default here), paired per round: "
          f"median {gain:.3f}x")
    print_breakdown(f"d = {max(REPLICAS)} ({default} exchange), its best round", measured["breakdown"])
    print_breakdown(f"d = 4 with the {other} exchange, its best round", measured["breakdown_other"])
    return {"scaling_efficiency": {str(d): round(eff[d], 3) for d in REPLICAS},
            "scaling_efficiency_median": {str(d): round(eff_median[d], 3) for d in REPLICAS},
            f"scaling_efficiency_{other}_d4": round(eff_other, 3),
            "scatter_gain_d4_paired_median": round(gain, 3),
            "microbatches_per_s": {str(d): round(best[d], 2) for d in REPLICAS},
            "targets_met": {"efficiency at d=4 >= 0.9": eff[4] >= 0.9, "goal 0.95": eff[4] >= 0.95}}


# ---------------------------------------------------------------- against torch DDP

def fit_ddp_twin(part, data, client, *, steps: int, bucket_mib: float = 1.0):
    """pipetrain's contestant: d = 2 replicas of the 1-stage pipeline, DDP's micro-batches and SGD;
    ``bucket_mib``: the gradient buckets sent during the update's last backward (a large value: one
    message per part, after the backward)."""
    from pipetrain.api import fit
    from pipetrain.optim import Optimizer

    return fit(part, data, client=client, schedule="1f1b", microbatches=DDP_M, steps=steps, replicas=DDP_WORLD,
               optimizer=Optimizer("sgd", lr=ddp_baseline.LR), progress=False, reduce_bucket_mib=bucket_mib)


OURS, ONE_MESSAGE, DDP = "pipetrain d=2 p=1", "  one message/part", "torch DDP (gloo)"


def run_pipetrain(part, data, client, args: argparse.Namespace, *, bucket_mib: float = 1.0) -> dict:
    # This process's CPU over the run: the embedded cluster's scheduler and nannies share its
    # event loop with the driver, so this is the Dask apparatus besides the two workers.
    cpu, wall = time.process_time(), time.perf_counter()
    result = fit_ddp_twin(part, data, client, steps=args.warmup + args.ddp_steps, bucket_mib=bucket_mib)
    client_cpu = (time.process_time() - cpu) / (time.perf_counter() - wall)
    history = sorted(result.history, key=lambda h: h["step"])
    rate = steady_rate(history, first=args.warmup - 1, microbatches_per_step=DDP_WORLD * DDP_M,
                       samples_per_microbatch=DDP_B)
    return {"samples_per_s": rate, "losses": [h["loss"] for h in history], "client_cpu": client_cpu,
            "breakdown": per_step_ms(result, first=args.warmup - 1), "skew_ms": replica_skew_ms(result)}


def replica_skew_ms(result) -> float:
    """Median over the updates of how far apart the two replicas started SEND_R: how long the
    earlier one waits for the later one's part in RECV_R, whatever the wire."""
    import numpy as np

    starts = [events["start"][events["kind"] == "SEND_R"] for events in result.events]
    n = min(len(s) for s in starts)
    return float(np.median(np.abs(starts[0][:n] - starts[1][:n]))) * 1e3


def ddp_rates(client, args: argparse.Namespace) -> dict[str, list[dict]]:
    from pipetrain.partitioning import partition

    sizes = {"width": args.width, "depth": args.depth}
    data = ddp_baseline.data_source(width=args.width, microbatch_size=DDP_B)
    part = partition(ddp_baseline.build_model(**sizes), 1, method="uniform", example_input=data.inputs(0))
    contestants = {
        OURS: lambda: run_pipetrain(part, data, client, args),
        ONE_MESSAGE: lambda: run_pipetrain(part, data, client, args, bucket_mib=1 << 20),
        DDP: lambda: ddp_baseline.run_ddp(world=DDP_WORLD, microbatches=DDP_M, microbatch_size=DDP_B,
                                                         steps=args.ddp_steps, warmup=args.warmup, env=ENV_BEFORE_DASK,
                                                         **sizes),
    }
    fit_ddp_twin(part, data, client, steps=2)  # untimed: the workers import torch and build the stage once
    runs: dict[str, list[dict]] = {name: [] for name in contestants}
    names = list(contestants)
    for r in range(args.ddp_repeats):
        for name in names[r % 3:] + names[:r % 3]:  # none always goes first
            runs[name].append(contestants[name]())
    return runs


def report_ddp(runs: dict[str, list[dict]], args: argparse.Namespace) -> dict:
    ours, peer, unbucketed = runs[OURS], runs[DDP], runs[ONE_MESSAGE]
    best = {name: max(r["samples_per_s"] for r in rs) for name, rs in runs.items()}
    median = {name: statistics.median(r["samples_per_s"] for r in rs) for name, rs in runs.items()}
    ratio, ratio_median = best[OURS] / best[DDP], median[OURS] / median[DDP]
    # Each round's two runs are next to each other in time, under the same load from other jobs:
    # the median of the rounds' ratios is the least load-sensitive figure on a shared machine.
    paired = [a["samples_per_s"] / b["samples_per_s"] for a, b in zip(ours, peer)]
    bucket_gain = [a["samples_per_s"] / b["samples_per_s"] for a, b in zip(ours, unbucketed)]
    mib = ddp_baseline.weight_bytes(width=args.width, depth=args.depth) / (1 << 20)
    print(f"\nvs torch DDP: MLP {args.depth} x Linear({args.width}, {args.width}) + Tanh, head "
          f"Linear({args.width}, {ddp_baseline.CLASSES}) ({mib:.1f} MiB of weights), d = {DDP_WORLD} replicas, "
          f"p = 1, {DDP_M} micro-batches of {DDP_B} per replica and step (global batch "
          f"{DDP_WORLD * DDP_M * DDP_B}), SGD lr {ddp_baseline.LR}, 1 thread per process; {args.ddp_steps} steps "
          f"after {args.warmup} warm-up, {args.ddp_repeats} rounds")
    print(f"{'contestant':<20} {'best samples/s':>14} {'median':>9}   each round")
    for name, rs in runs.items():
        rounds = " ".join(f"{r['samples_per_s']:.0f}" for r in rs)
        print(f"{name:<20} {best[name]:>14.1f} {median[name]:>9.1f}   {rounds}")
    # Same weights, data, micro-batches and maths: the step losses must agree (float32 sums in another order).
    last_ours, last_peer = ours[-1]["losses"], peer[-1]["losses"]
    print(f"pipetrain / DDP: {ratio:.3f}x best, {ratio_median:.3f}x median, each round "
          + " ".join(f"{x:.2f}" for x in paired) + f" (median {statistics.median(paired):.3f}x)")
    print(f"buckets / one message per part: {best[OURS] / best[ONE_MESSAGE]:.3f}x best, each round "
          + " ".join(f"{x:.2f}" for x in bucket_gain) + f" (median {statistics.median(bucket_gain):.3f}x)")
    print("step losses, pipetrain vs DDP: "
          + ", ".join(f"{a:.5f}/{b:.5f}" for a, b in list(zip(last_ours, last_peer))[-3:]))
    print("the replicas' SEND_R apart, median ms per update, each round: buckets "
          + " ".join(f"{r['skew_ms']:.1f}" for r in ours) + "; one message " +
          " ".join(f"{r['skew_ms']:.1f}" for r in unbucketed))
    client_cpu = statistics.median(r["client_cpu"] for r in ours + unbucketed)
    print(f"the client process (driver, scheduler, nannies) during pipetrain's runs: median {client_cpu:.1%} "
          f"of a core")
    print_breakdown("pipetrain d=2 p=1, its best round", max(ours, key=lambda r: r["samples_per_s"])["breakdown"])
    print_breakdown("one message per part, its best round",
                    max(unbucketed, key=lambda r: r["samples_per_s"])["breakdown"])
    return {"vs_torch_ddp": round(ratio, 3), "vs_torch_ddp_median": round(ratio_median, 3),
            "vs_torch_ddp_paired_median": round(statistics.median(paired), 3),
            "ddp_samples_per_s": {"pipetrain": round(best[OURS], 1),
                                  "pipetrain_one_message": round(best[ONE_MESSAGE], 1),
                                  "torch_ddp": round(best[DDP], 1)},
            "bucket_gain_paired_median": round(statistics.median(bucket_gain), 3),
            "client_cpu_share": round(client_cpu, 3),
            "ddp_last_loss": {"pipetrain": round(last_ours[-1], 6), "torch_ddp": round(last_peer[-1], 6)},
            "ddp_target_met": {"pipetrain >= 1.0 x DDP": ratio >= 1.0}}


@contextlib.contextmanager
def shaped_loopback(gbit: float):
    """The loopback device limited to ``gbit`` Gbit/s for the block (nothing for 0): one token
    bucket that every loopback packet of the machine passes, both directions of every connection
    (Dask's, the stage transport's, gloo's) sharing it. Needs root and ``tc`` (iproute2)."""
    if not gbit:
        yield
        return
    if os.geteuid() != 0 or shutil.which("tc") is None:
        raise SystemExit("--shape-loopback needs root and tc (iproute2)")
    add = ["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", f"{gbit}gbit", "burst", "512kb",
           "latency", "100ms"]
    done = subprocess.run(add, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"--shape-loopback: {' '.join(add)} failed: {done.stderr.strip()} (another qdisc on lo? "
                         f"'tc qdisc del dev lo root' removes it)")
    print(f"loopback shaped to {gbit:g} Gbit/s (tc tbf), both directions sharing it")
    try:
        yield
    finally:
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], check=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8, help="the scaling part's steps per run (measured over steps 1..)")
    ap.add_argument("--ddp-steps", type=int, default=20, help="vs DDP: steps measured per run, after --warmup")
    ap.add_argument("--warmup", type=int, default=2, help="vs DDP: steps run before measuring (>= 1)")
    ap.add_argument("--repeats", type=int, default=3, help="the scaling part's rounds, d interleaved")
    ap.add_argument("--ddp-repeats", type=int, default=5, help="vs DDP: rounds, the two interleaved")
    ap.add_argument("--schedule", default="1f1b", help="the scaling part's schedule")
    ap.add_argument("--microbatches", type=int, default=16, help="the scaling part's m per replica and step")
    ap.add_argument("--grad-mib", type=float, default=GRAD_BYTES / (1 << 20),
                    help="the scaling part's gradients per stage, MiB")
    ap.add_argument("--part", choices=("scaling", "ddp", "both"), default="both")
    ap.add_argument("--quick", action="store_true", help="toy sizes for the smoke test: 3 steps, 1 round, "
                                                         "4 micro-batches, a narrow MLP")
    ap.add_argument("--shape-loopback", type=float, default=0.0, metavar="GBIT",
                    help="shape the loopback device to GBIT Gbit/s (tc tbf; root) while the bench runs: a "
                         "wire that costs time rather than CPU, as between hosts")
    ap.add_argument("--width", type=int, default=ddp_baseline.WIDTH, help=argparse.SUPPRESS)
    ap.add_argument("--depth", type=int, default=ddp_baseline.DEPTH, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.ddp_steps, args.warmup, args.microbatches, args.width = 3, 3, 1, 4, 64
        args.repeats = args.ddp_repeats = 1
    if args.warmup < 1 or args.steps < 2 or args.ddp_steps < 1:
        ap.error("--warmup and --ddp-steps must be >= 1, --steps >= 2")

    from distributed import Client

    from pipetrain.runtime.local import start_local_cluster

    load_before = os.getloadavg()[0]
    # The DDP processes start from the environment before the Dask cluster's nannies changed it
    # (MALLOC_TRIM_THRESHOLD_, as in vs_torch_pipelining.py).
    ENV_BEFORE_DASK.update(os.environ)
    out: dict = {}
    # Each part on its own embedded cluster: 8 workers for d = 4 x p = 2; the DDP twin's 2 workers
    # import torch once and run every round (the other part's idle workers are gone).
    parts = {"scaling": (WORKERS, scaling_rates, report_scaling), "ddp": (DDP_WORLD, ddp_rates, report_ddp)}
    with shaped_loopback(args.shape_loopback):
        for name, (workers, measure, report) in parts.items():
            if args.part not in (name, "both"):
                continue
            cluster = start_local_cluster(workers)
            try:
                with Client(cluster) as client:
                    rates = measure(client, args)
            finally:
                cluster.close()
            out.update(report(rates, args))
    if args.shape_loopback:
        out["loopback_gbit"] = args.shape_loopback
    out["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print(f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    print(json.dumps(out))


if __name__ == "__main__":
    main()

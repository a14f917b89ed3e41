"""How close does the Dask runtime come to each schedule's ideal throughput?

Four stages whose compute is a fixed sleep (10 ms forward, 20 ms backward),
1 MiB activations and gradients, 16 micro-batches per mini-batch, on the
embedded local cluster (one worker process per stage). Sleeping stages make
the two cores of a small machine irrelevant: what is measured is the
schedule plus pipetrain's own overhead (transport, flow control, reports).

Ideal: the bottleneck stage's bound, one micro-batch per (F + B); times
m / (m + p - 1) for the flush schedules (gpipe, 1f1b), whose bubble is part
of the design. Measured: micro-batches per second over the steady state
(steps 1..S-1; step 0 includes start-up). Each schedule runs with the
timeline events on and off, interleaved, to show what recording costs.

    .venv/bin/python bench/pipeline_efficiency.py [--steps 8] [--repeats 2] [--transport-paths]

``--transport-paths``: the stream transport's receive path (direct reads in
the waiting thread, credits riding on data) against the loop thread reading
every frame and handing it over with an ACK frame per message (the path
before transport/direct.py and acks.py), interleaved per schedule, events on.

Prints a table, then one JSON line: {"efficiency": {...}, "event_overhead": ...}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distributed import Client  # noqa: E402

from models.synthetic import SleepData, SleepSequential  # noqa: E402
from pipetrain.api import fit  # noqa: E402
from pipetrain.optim import Optimizer  # noqa: E402
from pipetrain.partitioning import partition  # noqa: E402
from pipetrain.runtime.local import start_local_cluster  # noqa: E402

SCHEDULES = ("gpipe", "1f1b", "pipedream", "2bw")
P, M, F_MS, B_MS = 4, 16, 10.0, 20.0


def ideal_rate(schedule: str) -> float:
    per_microbatch = (F_MS + B_MS) / 1000
    if schedule in ("gpipe", "1f1b"):
        return M / ((M + P - 1) * per_microbatch)
    return 1 / per_microbatch


def measured_rate(history: list[dict]) -> float:
    done = [h["stage0_done"] for h in sorted(history, key=lambda h: h["step"])]
    return (len(done) - 1) * M / (done[-1] - done[0])


def _use_transport_path(direct_reads: bool, defer_acks: bool) -> None:
    """On a worker: which receive path the stage endpoints it starts next use (private switches)."""
    from pipetrain.runtime.transport import endpoint, stream

    stream.DIRECT_READS, endpoint.DEFER_ACKS = direct_reads, defer_acks


# name -> (stream.DIRECT_READS, endpoint.DEFER_ACKS)
TRANSPORT_PATHS = {"direct reads, acks ride": (True, True), "direct reads, ack frames": (True, False),
                   "loop reads, ack frames": (False, False)}


def interleaved_rates(args: argparse.Namespace, variants: dict) -> dict[tuple[str, Any], list[float]]:
    """Samples/s of every schedule under every variant, ``--repeats`` rounds interleaved on one
    embedded cluster. ``variants``: label -> (setup run on the workers first, or None; record_events)."""
    data = SleepData(nbytes=1 << 20)
    part = partition(SleepSequential(P, forward_ms=F_MS, backward_ms=B_MS), P, method="uniform",
                     example_input=data.inputs(0))
    rates: dict[tuple[str, Any], list[float]] = {}
    cluster = start_local_cluster(P)
    with Client(cluster) as client:
        for _ in range(args.repeats):
            for schedule in SCHEDULES:
                for label, (setup, events) in variants.items():
                    if setup is not None:
                        setup(client)
                    result = fit(part, data, client=client, schedule=schedule, microbatches=M, steps=args.steps,
                                 optimizer=Optimizer("sgd", lr=0.01), progress=False, record_events=events)
                    rates.setdefault((schedule, label), []).append(measured_rate(result.history))
    cluster.close()
    return rates


def _path_setup(switches: tuple[bool, bool]):
    return lambda client: client.run(_use_transport_path, *switches)


def compare_transport_paths(args: argparse.Namespace) -> None:
    rates = interleaved_rates(args, {path: (_path_setup(switches), True)
                                     for path, switches in TRANSPORT_PATHS.items()})
    print(f"efficiency per run (measured / ideal), {args.repeats} runs each, interleaved:")
    for schedule in SCHEDULES:
        for path in TRANSPORT_PATHS:
            runs = [rate / ideal_rate(schedule) for rate in rates[(schedule, path)]]
            print(f"{schedule:<10} {path:<24} " + " ".join(f"{r:.3f}" for r in runs)
                  + f"   min {min(runs):.3f} median {statistics.median(runs):.3f}")
    print(json.dumps({path: {schedule: round(max(rates[(schedule, path)]) / ideal_rate(schedule), 3)
                             for schedule in SCHEDULES} for path in TRANSPORT_PATHS}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--transport-paths", action="store_true",
                    help="instead of events on/off: the stream transport's receive paths side by side, events on")
    args = ap.parse_args()
    if args.transport_paths:
        compare_transport_paths(args)
        return

    rates = interleaved_rates(args, {True: (None, True), False: (None, False)})  # events on / off

    efficiency, overheads = {}, []
    print(f"{P} stages, F {F_MS:.0f} ms, B {B_MS:.0f} ms, 1 MiB boundaries, {M} micro-batches per mini-batch, "
          f"{args.steps} mini-batches, best of {args.repeats}")
    print(f"{'schedule':<10} {'ideal mb/s':>10} {'measured':>9} "
          f"{'efficiency':>10} {'events off':>10} {'events cost':>11}")
    for schedule in SCHEDULES:
        on, off = max(rates[(schedule, True)]), max(rates[(schedule, False)])
        efficiency[schedule] = round(on / ideal_rate(schedule), 3)
        overhead = 1 - on / off
        overheads.append(overhead)
        print(f"{schedule:<10} {ideal_rate(schedule):>10.2f} {on:>9.2f} {efficiency[schedule]:>10.3f} "
              f"{off:>10.2f} {overhead:>+10.1%}")
    print(json.dumps({"efficiency": efficiency, "event_overhead": round(statistics.median(overheads), 4)}))


if __name__ == "__main__":
    main()

"""Does the per-stage memory estimate (pipetrain.memory) match what stages really hold?

The flagship GPT (JAX, 4 stages) runs two steps of each schedule in the
reference executor, every stage on a CPU device of its own
(``--xla_force_host_platform_device_count``), so ``jax.live_arrays()``
filtered by device is exactly the buffers one stage holds: its weight
versions, optimizer state, accumulator, the VJP residuals of its
micro-batches in flight, and the activations it received. The bench samples
that after every action and compares the peak with the estimate
``pipetrain partition --schedule`` prints. It counts tensors, not the
process around them (interpreter, compiled code, allocator slack), which is
also what the estimate counts; the samples fall between actions, so a
transient inside one backward is not seen (nor estimated, outside remat).

    .venv/bin/python bench/memory.py [--schedules 1f1b gpipe pipedream 2bw] [--microbatches 8] [--d-model 128]

Last line: {"max_abs_error_pct": ..., "target_pct": 25, "per_stage": {schedule: [[estimate, measured], ...]}}
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

STAGES = 4
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={STAGES}")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402

from models import gpt, text  # noqa: E402
from pipetrain.memory import estimate_memory, format_bytes, partition_layer_bytes  # noqa: E402
from pipetrain.optim import Optimizer  # noqa: E402
from pipetrain.partitioning import partition  # noqa: E402
from pipetrain.runtime.interpreter import Hooks  # noqa: E402
from pipetrain.runtime.reference import run_reference  # noqa: E402
from pipetrain.schedule.builders import build_schedule  # noqa: E402

MICROBATCH = 16


class _PeakLive(Hooks):
    """After every action: the bytes of live JAX arrays on each stage's device."""

    def __init__(self, devices):
        self.devices = devices
        self.peak = [0] * len(devices)

    def on_action(self, action, start, end):
        s = action.stage
        dev = self.devices[s]
        held = sum(a.nbytes for a in jax.live_arrays() if not a.is_deleted() and a.devices() == {dev})
        self.peak[s] = max(self.peak[s], held)


def measure(schedule_name: str, part, data, optimizer, microbatches: int) -> tuple[list[int], list[int]]:
    schedule = build_schedule(schedule_name, num_stages=STAGES, microbatches=microbatches, steps=2)
    devices = jax.devices()[:STAGES]
    stages = []
    for spec, dev in zip(part.specs(), devices):
        with jax.default_device(dev):  # the stage's parameters, and so all it computes, live there
            stages.append(part.model.build_stage(spec, optimizer=optimizer))
    hooks = _PeakLive(devices)
    run_reference(schedule, stages=stages, source=data, hooks=hooks)
    estimate = [e.total for e in estimate_memory(partition_layer_bytes(part), schedule, optimizer=optimizer)]
    del stages
    return estimate, hooks.peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--schedules", nargs="+", default=["1f1b", "gpipe", "pipedream", "2bw"])
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=128)
    args = ap.parse_args()
    if len(jax.devices()) < STAGES:
        sys.exit(f"bench/memory.py: needs {STAGES} CPU devices, got {len(jax.devices())}; was JAX imported first?")

    data = text.CharWindows(split="train", microbatch_size=MICROBATCH)
    model = gpt.build(d_model=args.d_model)
    part = partition(model, STAGES, method="params", example_input=data.inputs(0))
    optimizer = Optimizer("adam", lr=1e-3)
    results, worst = {}, 0.0
    print(f"GPT d_model {args.d_model}, {STAGES} stages, {args.microbatches} micro-batches of {MICROBATCH}, adam; "
          "peak live JAX bytes per stage device, against pipetrain.memory's estimate")
    print("| schedule | stage | estimate | measured | error |")
    print("|---|---|---|---|---|")
    for name in args.schedules:
        estimate, measured = measure(name, part, data, optimizer, args.microbatches)
        results[name] = [[e, m] for e, m in zip(estimate, measured)]
        for s, (e, m) in enumerate(zip(estimate, measured)):
            error = (e - m) / m * 100
            worst = max(worst, abs(error))
            print(f"| {name} | {s} | {format_bytes(e)} | {format_bytes(m)} | {error:+.1f}% |")
    print(json.dumps({"max_abs_error_pct": round(worst, 1), "target_pct": 25, "per_stage": results}))


if __name__ == "__main__":
    main()

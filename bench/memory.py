"""Does the per-stage memory estimate (pipetrain.memory) match what stages really hold?

The flagship GPT (JAX, 4 stages) runs two steps of each schedule in the
reference executor, every stage on a CPU device of its own
(``--xla_force_host_platform_device_count``), so ``jax.live_arrays()``
filtered by device is every buffer on a stage's device. The bench samples
after every action

- the *stage's tensors*: the live buffers the stage object holds (weight
  versions, optimizer state, accumulator, the VJP residuals of its
  micro-batches in flight), against the estimate's ``stage_tensors``;
- the *device*: all live buffers there, the boundary tensors in the
  reference executor's mailboxes and the interpreter's hands included
  (unbounded here, where stages run as far as they can; on Dask the
  transport's credits bound them: the estimate's ``buffers``).

It counts tensors, not the process around them (interpreter, compiled code,
allocator slack). Samples fall between actions, so what a backward's
recomputation holds under remat (the estimate's ``recompute``) is not seen:
CPU devices report no allocator peak.

With ``--remat`` modes (default stage and layer, for ``--remat-schedules``
1f1b and pipedream), the same with the stages rematerializing, which is
where the estimate's remat arithmetic is checked.

    .venv/bin/python bench/memory.py [--schedules 1f1b gpipe pipedream 2bw] [--remat stage layer] \\
        [--microbatches 8] [--d-model 128]

Last line: {"max_abs_error_pct": ..., "target_pct": 25, "per_stage": {"schedule/remat": [[estimate, measured], ...]}}
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
from pipetrain.memory import apply_remat, estimate_memory, format_bytes, partition_layer_bytes  # noqa: E402
from pipetrain.optim import Optimizer  # noqa: E402
from pipetrain.partitioning import partition  # noqa: E402
from pipetrain.runtime.interpreter import Hooks  # noqa: E402
from pipetrain.runtime.reference import run_reference  # noqa: E402
from pipetrain.schedule.builders import build_schedule  # noqa: E402

MICROBATCH = 16


class _PeakLive(Hooks):
    """After every action: the live JAX bytes each stage holds, and all on its device."""

    def __init__(self, devices, stages):
        self.devices, self.stages = devices, stages
        self.peak = [0] * len(devices)
        self.device_peak = [0] * len(devices)

    def on_action(self, action, start, end):
        s = action.stage
        dev = self.devices[s]
        live = [a for a in jax.live_arrays() if not a.is_deleted() and a.devices() == {dev}]
        owned = {id(a) for a in jax.tree_util.tree_leaves(list(vars(self.stages[s]).values()))}
        self.peak[s] = max(self.peak[s], sum(a.nbytes for a in live if id(a) in owned))
        self.device_peak[s] = max(self.device_peak[s], sum(a.nbytes for a in live))


def measure(schedule_name: str, part, data, optimizer, microbatches: int, remat: str) -> tuple:
    schedule = build_schedule(schedule_name, num_stages=STAGES, microbatches=microbatches, steps=2)
    devices = jax.devices()[:STAGES]
    stages = []
    for spec, dev in zip(part.specs(), devices):
        with jax.default_device(dev):  # the stage's parameters, and so all it computes, live there
            stages.append(part.model.build_stage(spec, optimizer=optimizer))
    hooks = _PeakLive(devices, stages)
    run_reference(schedule, stages=stages, source=data, hooks=hooks)
    estimates = estimate_memory(partition_layer_bytes(part), schedule, optimizer=optimizer, remat=remat)
    del stages
    return [e.stage_tensors for e in estimates], hooks.peak, hooks.device_peak, [e.recompute for e in estimates]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--schedules", nargs="+", default=["1f1b", "gpipe", "pipedream", "2bw"])
    ap.add_argument("--remat", nargs="*", default=["stage", "layer"])
    ap.add_argument("--remat-schedules", nargs="*", default=["1f1b", "pipedream"])
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=128)
    args = ap.parse_args()
    if len(jax.devices()) < STAGES:
        sys.exit(f"bench/memory.py: needs {STAGES} CPU devices, got {len(jax.devices())}; was JAX imported first?")

    data = text.CharWindows(split="train", microbatch_size=MICROBATCH)
    model = gpt.build(d_model=args.d_model)
    part = partition(model, STAGES, method="params", example_input=data.inputs(0))
    runs = [(name, "none") for name in args.schedules] + [(n, r) for r in args.remat for n in args.remat_schedules]
    optimizer = Optimizer("adam", lr=1e-3)
    results, worst = {}, 0.0
    print(f"GPT d_model {args.d_model}, {STAGES} stages, {args.microbatches} micro-batches of {MICROBATCH}, adam; "
          "the peak of the live JAX buffers each stage holds, against pipetrain.memory's estimate")
    print("| schedule | remat | stage | estimate | stage's tensors | error | device, all buffers | recompute "
          "(estimated, not seen) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, remat in runs:
        apply_remat(model, remat)  # the stages build from the partition's model
        estimate, measured, device, recompute = measure(name, part, data, optimizer, args.microbatches, remat)
        results[f"{name}/{remat}"] = [[e, m] for e, m in zip(estimate, measured)]
        for s, (e, m) in enumerate(zip(estimate, measured)):
            error = (e - m) / m * 100
            worst = max(worst, abs(error))
            print(f"| {name} | {remat} | {s} | {format_bytes(e)} | {format_bytes(m)} | {error:+.1f}% "
                  f"| {format_bytes(device[s])} | {format_bytes(recompute[s])} |", flush=True)
    print(json.dumps({"max_abs_error_pct": round(worst, 1), "target_pct": 25, "per_stage": results}))


if __name__ == "__main__":
    main()

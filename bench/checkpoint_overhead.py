"""What do checkpoints cost? Throughput of the flagship job with and without them.

The flagship GPT of models/configs/demo.toml, 4-stage pipedream, on one
embedded local cluster (one worker process per stage). Runs alternate
between no checkpoints and checkpoints at the default interval
(pipetrain.jobspec.DEFAULT_CHECKPOINT_EVERY micro-batches, to a local
directory: safetensors shards, fsync, sha256, manifest, commit marker), so
drift of the machine hits both alike. Throughput is measured over the steady
state (from the end of step 1, after the JIT compiles, to the last step).

    .venv/bin/python bench/checkpoint_overhead.py [--steps 20] [--repeats 2]

Prints a table, then one JSON line with "overhead" (a fraction; target <= 0.03).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from tempfile import TemporaryDirectory

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distributed import Client  # noqa: E402

from pipetrain import config as cfgmod  # noqa: E402
from pipetrain.api import fit  # noqa: E402
from pipetrain.jobspec import default_checkpoint_every  # noqa: E402
from pipetrain.config import resolve  # noqa: E402
from pipetrain.partitioning import partition  # noqa: E402
from pipetrain.runtime.local import start_local_cluster  # noqa: E402

DEMO = Path(__file__).resolve().parent.parent / "models" / "configs" / "demo.toml"


def steady_rate(history: list[dict], m: int) -> float:
    """Micro-batches per second from the end of step 1 to the end of the last step."""
    done = [h["stage0_done"] for h in sorted(history, key=lambda h: h["step"])][1:]
    return (len(done) - 1) * m / (done[-1] - done[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    cfg = cfgmod.load(DEMO)
    model = resolve(cfg.model.entry, "model.entry")(**cfg.model.kwargs)
    data = resolve(cfg.data.train, "data.train")(**cfg.data.kwargs)
    part = partition(model, cfg.partition.stages, method=cfg.partition.method, example_input=data.inputs(0))
    p, m, name = len(part.stages), cfg.schedule.microbatches, cfg.schedule.name
    every = default_checkpoint_every(schedule=name, microbatches=m)
    rates: dict[str, list[float]] = {"none": [], "checkpoints": []}
    commits = 0
    cluster = start_local_cluster(p)
    try:
        with Client(cluster) as client, TemporaryDirectory() as tmp:
            for r in range(args.repeats):
                for mode in ("none", "checkpoints") if r % 2 == 0 else ("checkpoints", "none"):
                    kwargs = {}
                    if mode == "checkpoints":
                        kwargs = dict(checkpoint_dir=f"{tmp}/ckpt-{r}", checkpoint_every=every, keep_checkpoints=2)
                    result = fit(part, data, schedule=name, microbatches=m, steps=args.steps,
                                 optimizer=cfg.optimizer, client=client, progress=False, record_events=False,
                                 **kwargs)
                    rates[mode].append(steady_rate(result.history, m))
                    if mode == "checkpoints":
                        commits += len(list(Path(f"{tmp}/ckpt-{r}").glob("step-*/COMMITTED")))
                    print(f"  repeat {r}  {mode:<11}  {rates[mode][-1]:7.2f} micro-batches/s", flush=True)
    finally:
        cluster.close()

    base, with_ckpt = statistics.median(rates["none"]), statistics.median(rates["checkpoints"])
    overhead = 1 - with_ckpt / base
    print(f"\nflagship GPT, {p}-stage {name}, {m} micro-batches/step, {args.steps} steps, "
          f"{args.repeats} interleaved repeats; checkpoints every {every} micro-batches "
          f"({commits} committed in all)")
    print(f"  {'no checkpoints':<26} {base:7.2f} micro-batches/s (median)")
    print(f"  {f'checkpoint every {every}':<26} {with_ckpt:7.2f} micro-batches/s (median)")
    print(f"  {'overhead':<26} {overhead:7.1%}   (target <= 3%)")
    print(json.dumps({"overhead": round(overhead, 4), "checkpoint_every": every,
                      "rate_none": round(base, 3), "rate_checkpoints": round(with_ckpt, 3),
                      "rates": {k: [round(x, 3) for x in v] for k, v in rates.items()},
                      "steps": args.steps, "repeats": args.repeats}))


if __name__ == "__main__":
    main()

"""How long d processes take to sum one stage's gradients: pipetrain's replica exchanges
over the stage transport against torch.distributed's gloo all_reduce, side by side.

Why this matters: before every update, each stage's d replicas sum their gradients
(schedule/replicas.py). pipetrain does it over its own stage transport, in one of two
exchanges (runtime/replicas.py), both adding the d parts in replica order (the same bits on
every replica and every run, and no torch import in a JAX or Keras stage): "direct", every
replica sends its part to each other one and adds all d parts; "scatter", replica q sums the
q-th d-th of the elements and sends that sum to the others (2(d-1)/d of the bytes).
The alternative a torch user would pick is gloo's all_reduce (ring / halving-doubling
over TCP). All run here on the same payload, d processes at a time, interleaved rounds;
the table gives the median time of one reduction and the ratios to gloo.

    .venv/bin/python bench/reduce_engines.py [--sizes 262144,1048576,4194304] [--replicas 2,3,4]

Prints a table, then one JSON line: {"reduce_ms": {"direct d=2 1 MiB": ..., "scatter d=2 1 MiB": ...,
"gloo d=2 1 MiB": ...}, "ratio": {"d=2 1 MiB": direct / gloo, ...}, "scatter_ratio": {"d=2 1 MiB":
scatter / gloo, ...}}.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SECRET = b"bench-reduce-engines-secret-0123"


def _transport_worker(rank: int, d: int, nbytes: int, iterations: int, addresses: dict, out: mp.Queue,
                      exchange: str = "direct") -> None:
    from pipetrain.runtime.transport import Endpoint, MessageKind

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    peers = tuple(r for r in range(d) if r != rank)
    grads = {"w": np.full(nbytes // 4, rank + 1.0, np.float32)}
    with Endpoint.start(stage=rank, secret=SECRET, credits=4, replica_peers=peers, senders=peers,
                        max_payload=nbytes + (1 << 16)) as endpoint:
        addresses[rank] = endpoint.address
        while len(addresses) < d:
            time.sleep(0.01)
        channels = {r: endpoint.connect(addresses[r], peer_stage=r) for r in peers}
        times = []
        reduce = _direct if exchange == "direct" else _scatter
        for it in range(iterations):
            start = time.perf_counter()
            total = reduce(endpoint, channels, MessageKind.REPLICA_PART, it, rank, d, grads["w"])
            times.append(time.perf_counter() - start)
        assert np.all(total == sum(range(1, d + 1))), exchange
        for channel in channels.values():
            channel.wait_acked(timeout=60)
    out.put((rank, times))


def _direct(endpoint, channels, kind, it, rank, d, grads):
    for r in channels:
        channels[r].put(kind, it * d + rank, {"w": grads}, timeout=60)
    parts = {rank: grads}
    for r in channels:
        parts[r] = endpoint.get(kind, it * d + r, timeout=60).tree["w"]
    return _in_replica_order(parts)


def _in_replica_order(parts: dict) -> np.ndarray:
    """parts[0] + parts[1] + ... left to right: the same sum on every replica."""
    total = parts[0]
    for r in range(1, len(parts)):
        total = total + parts[r]
    return total


def _scatter(endpoint, channels, kind, it, rank, d, grads):
    from pipetrain.runtime.replicas import share

    for r in channels:  # replica r sums share r
        channels[r].put(kind, 2 * (it * d + rank), {"w": share(grads, r, d)}, timeout=60)
    parts = {rank: share(grads, rank, d)}
    for r in channels:
        parts[r] = endpoint.get(kind, 2 * (it * d + r), timeout=60).tree["w"]
    mine = _in_replica_order(parts)
    for r in channels:
        channels[r].put(kind, 2 * (it * d + rank) + 1, {"w": mine}, timeout=60)
    total = np.empty_like(grads)
    share(total, rank, d)[...] = mine
    for r in channels:
        share(total, r, d)[...] = endpoint.get(kind, 2 * (it * d + r) + 1, timeout=60).tree["w"]
    return total


def _gloo_worker(rank: int, d: int, nbytes: int, iterations: int, port: int, out: mp.Queue) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=d)
    grads = torch.full((nbytes // 4,), rank + 1.0, dtype=torch.float32)
    times = []
    for _ in range(iterations):
        buf = grads.clone()
        start = time.perf_counter()
        dist.all_reduce(buf)
        times.append(time.perf_counter() - start)
    assert float(buf[0]) == sum(range(1, d + 1))
    dist.destroy_process_group()
    out.put((rank, times))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_engine(engine: str, d: int, nbytes: int, iterations: int) -> float:
    """Median seconds of one reduction (the slowest rank's per iteration), warm-up dropped."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    if engine in ("direct", "scatter"):
        manager = ctx.Manager()
        addresses = manager.dict()
        procs = [ctx.Process(target=_transport_worker, args=(r, d, nbytes, iterations, addresses, out, engine))
                 for r in range(d)]
    else:
        port = _free_port()
        procs = [ctx.Process(target=_gloo_worker, args=(r, d, nbytes, iterations, port, out)) for r in range(d)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    if engine != "gloo":
        manager.shutdown()
    per_iteration = [max(results[r][i] for r in results) for i in range(iterations)]
    return statistics.median(per_iteration[max(1, iterations // 5):])


def _label(nbytes: int) -> str:
    return f"{nbytes >> 20} MiB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="262144,1048576,4194304", help="payload bytes, comma-separated")
    parser.add_argument("--replicas", default="2,3,4", help="process counts d, comma-separated")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the best median is kept")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    ds = [int(d) for d in args.replicas.split(",")]
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for d in ds:
            for nbytes in sizes:
                for engine in ("direct", "scatter", "gloo"):
                    key = f"{engine} d={d} {_label(nbytes)}"
                    best[key] = min(best.get(key, float("inf")), run_engine(engine, d, nbytes, args.iterations))
    print(f"{'replicas':>8} {'payload':>8} {'direct ms':>10} {'scatter ms':>11} {'gloo ms':>9} "
          f"{'direct/gloo':>12} {'scatter/gloo':>13}")
    ratios, scatter_ratios = {}, {}
    for d in ds:
        for nbytes in sizes:
            label = f"d={d} {_label(nbytes)}"
            t, sc, g = (best[f"{e} {label}"] for e in ("direct", "scatter", "gloo"))
            ratios[label], scatter_ratios[label] = round(t / g, 3), round(sc / g, 3)
            print(f"{d:>8} {_label(nbytes):>8} {t * 1e3:>10.2f} {sc * 1e3:>11.2f} {g * 1e3:>9.2f} "
                  f"{t / g:>12.2f} {sc / g:>13.2f}")
    print(json.dumps({"reduce_ms": {k: round(v * 1e3, 3) for k, v in best.items()}, "ratio": ratios,
                      "scatter_ratio": scatter_ratios}))


if __name__ == "__main__":
    main()

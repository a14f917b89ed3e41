"""GPU check of the JAX and torch paths: stages on the accelerator, DLPack
between frameworks on the device, ucx:// (with ucxx installed: its CUDA
transports, a raw device-to-device send, a 2-stage run over it), and the
4-stage flagship demo with every stage sharing one GPU. Not a test (CI has
no GPU): run it on a GPU host.

    python bench/gpu_check.py [--steps 30]

Prints what it checked as a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402


def check_jax_stage(rows: list, out: dict) -> None:
    import jax

    from models import mlp
    from pipetrain.optim import Optimizer
    from pipetrain.partitioning import partition

    source = mlp.source(512, microbatch_size=32)
    part = partition(mlp.build(sizes=(256, 256)), 2, example_input=source.inputs(0))
    stages = [part.model.build_stage(spec, optimizer=Optimizer("sgd", lr=0.1)) for spec in part.specs()]
    y = stages[0].forward(0, source.inputs(0), version=0)
    loss = stages[1].forward(0, y, version=0, targets=source.targets(0))
    g = stages[1].backward(0)
    stages[0].backward(0, g)
    platform = list(y.devices())[0].platform
    out["jax_stage_platform"] = platform
    out["jax_devices"] = [str(d) for d in jax.devices()]
    rows.append(("JAX stage forward/backward", f"on {platform}, loss {loss:.4f}"))


def check_torch_stage(rows: list, out: dict) -> None:
    import torch
    from torch import nn

    from pipetrain.optim import Optimizer
    from pipetrain.partitioning import partition
    from pipetrain.stages.torch_stage import TorchSequential

    x = np.random.default_rng(0).standard_normal((32, 64), dtype=np.float32)
    t = np.random.default_rng(1).integers(0, 10, 32).astype(np.int64)
    model = TorchSequential([lambda: nn.Linear(64, 128), nn.Tanh, lambda: nn.Linear(128, 10)],
                            loss=nn.functional.cross_entropy)
    part = partition(model, 2, example_input=x)
    stages = [part.model.build_stage(spec, optimizer=Optimizer("sgd", lr=0.1)) for spec in part.specs()]
    y = stages[0].forward(0, x, version=0)
    loss = stages[1].forward(0, y, version=0, targets=t)
    stages[0].backward(0, stages[1].backward(0))
    out["torch_stage_device"] = str(y.device)
    out["torch_cuda"] = torch.cuda.is_available()
    rows.append(("torch stage forward/backward", f"on {y.device}, loss {float(loss):.4f}"))

    # The split backward (input gradient, then weight gradients) on the device:
    # the same bits as one fused backward, as on the CPU.
    spec = part.specs()[1]
    fused, split = (part.model.build_stage(spec, optimizer=Optimizer("sgd", lr=0.1)) for _ in range(2))
    h = stages[0].forward(1, x, version=0)
    fused.forward(1, h, version=0, targets=t)
    split.forward(1, h, version=0, targets=t)
    same_input_grad = torch.equal(fused.backward(1), split.backward_input(1))
    split.backward_weights(1)
    for stage in (fused, split):
        stage.update(new_version=1)
    same_weights = all(np.array_equal(a, b) for a, b in zip(fused.state_dict().values(), split.state_dict().values()))
    out["torch_split_backward_same_bits"] = bool(same_input_grad and same_weights)
    rows.append(("torch split backward on device", f"same bits as fused: {out['torch_split_backward_same_bits']}"))


def check_dlpack_on_device(rows: list, out: dict) -> None:
    import jax.numpy as jnp
    import torch

    from pipetrain.stages.tensors import to_jax, to_torch

    results = {}
    for dtype in ("float32", "bfloat16"):
        a = jnp.arange(1 << 20, dtype=dtype).reshape(1024, 1024)
        t = to_torch(a, device="cuda")
        same = t.data_ptr() == a.unsafe_buffer_pointer()
        back = to_jax(t)
        same_back = back.unsafe_buffer_pointer() == t.data_ptr()
        equal = bool(jnp.array_equal(back, a))
        results[dtype] = {"jax_to_torch_zero_copy": same, "torch_to_jax_zero_copy": same_back, "equal": equal,
                          "torch_device": str(t.device)}
        rows.append((f"DLPack {dtype} JAX<->torch on device",
                     f"{t.device}; zero-copy {same}/{same_back}; values equal {equal}"))
    out["dlpack"] = results
    del torch


def check_demo(rows: list, out: dict, steps: int) -> None:
    from pipetrain.job import train_from_config

    started = time.time()
    # overwrite: a rerun on the same machine replaces the earlier check's run
    result = train_from_config("models/configs/demo.toml", overrides={"schedule.steps": steps,
                                                                      "run_dir": "runs/gpu-demo"}, progress=True,
                               overwrite=True)
    rates = [h["samples_per_s"] for h in result.history[len(result.history) // 3:] if h["samples_per_s"]]
    out["demo"] = {"steps": steps, "wall_s": round(time.time() - started, 1),
                   "steady_samples_per_s": round(float(np.median(rates)), 1) if rates else None,
                   "heldout_before": result.heldout_before, "heldout_after": result.heldout_after}
    rows.append(("4-stage GPT pipedream demo, one shared GPU",
                 f"{out['demo']['steady_samples_per_s']} samples/s steady; held-out "
                 f"{result.heldout_before:.3f} -> {result.heldout_after:.3f}"))


def check_ucx(rows: list, out: dict) -> None:
    """ucx:// on this host: the transports UCX sees (cuda_copy/cuda_ipc: it can move device memory),
    a raw ucxx device-to-device send of torch CUDA tensors (what the hardware allows), and a
    2-stage run over ucx against the same run over tcp. pipetrain's ucx backend itself still
    sends host arrays (the device path is not built: runtime/transport/ucx.py)."""
    import asyncio

    from pipetrain.runtime.transport.ucx import _Ucx, device_path_available, ucx_available

    missing = ucx_available()
    if missing is not None:
        out["ucx"] = {"skipped": missing}
        rows.append(("ucx", f"skipped: {missing}"))
        return
    info = out["ucx"] = device_path_available()
    rows.append(("ucx transports", f"UCX {info['ucx_version']}: {', '.join(info['transports'])}"))
    import torch

    if torch.cuda.is_available():
        ucx = _Ucx.get()

        async def device_to_device() -> dict:
            accepted = asyncio.get_running_loop().create_future()
            listener = ucx.ucxx.create_listener(accepted.set_result, port=0)
            client = await ucx.ucxx.create_endpoint("127.0.0.1", listener.port)
            server = await accepted
            sent = torch.arange(16 << 20, dtype=torch.float32, device="cuda")  # 64 MiB
            got = torch.empty_like(sent)
            await asyncio.gather(client.send(sent), server.recv(got))  # warm
            started = time.perf_counter()
            for _ in range(10):
                await asyncio.gather(client.send(sent), server.recv(got))
            torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            result = {"equal": bool(torch.equal(sent, got)), "device": str(got.device),
                      "gb_per_s_64MiB": round(10 * sent.nbytes / seconds / 1e9, 2)}
            client.abort()
            server.abort()
            listener.close()
            return result

        info["device_to_device"] = ucx.io.run(device_to_device(), 120)
        rows.append(("ucxx CUDA tensor -> CUDA tensor (raw)", str(info["device_to_device"])))

    from models import mlp
    from pipetrain.api import fit
    from pipetrain.optim import Optimizer
    from pipetrain.partitioning import partition

    source = mlp.source(1024, microbatch_size=32, seed=0)
    part = partition(mlp.build(sizes=(256, 256, 256)), 2, example_input=source.inputs(0))
    kwargs = dict(schedule="1f1b", microbatches=8, steps=6, optimizer=Optimizer("adam", lr=1e-3), progress=False)
    runs = {transport: fit(part, source, transport=transport, **kwargs) for transport in ("ucx", "stream")}
    same = runs["ucx"].losses == runs["stream"].losses
    info["two_stage_same_losses_as_tcp"] = same
    rows.append(("2-stage JAX 1f1b over ucx", f"losses equal the tcp run's: {same}"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    rows: list[tuple[str, str]] = []
    out: dict = {}
    for check in (check_jax_stage, check_torch_stage, check_dlpack_on_device, check_ucx):
        try:
            check(rows, out)
        except Exception as e:  # report every check, even after one fails
            rows.append((check.__name__, f"FAILED: {type(e).__name__}: {e}"))
    try:
        check_demo(rows, out, args.steps)
    except Exception as e:
        rows.append(("demo", f"FAILED: {type(e).__name__}: {e}"))
    width = max(len(r[0]) for r in rows)
    print("\n".join(f"{name:<{width}}  {result}" for name, result in rows))
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()

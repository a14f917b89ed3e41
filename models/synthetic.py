"""A synthetic pipeline for benchmarks and runtime tests: numpy, fixed sleeps.

Each layer multiplies its input by a scalar weight; a stage then sleeps a
fixed time per forward and per backward, so on a 2-core machine the
pipeline's timing is decided by the schedule and the runtime, not by who
gets a core. The maths is tiny but real (gradients, updates, weight
versions), so a distributed run can still be checked against the
reference executor, and the stage is a full ``Stage``: no framework needed.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from pipetrain.stages.base import StageSpec, TensorSpec


class SleepSequential:
    framework = "numpy"

    def __init__(self, num_layers: int = 4, *, forward_ms: float = 10.0, backward_ms: float = 20.0, seed: int = 0):
        self.num_layers = num_layers
        self.forward_s, self.backward_s = forward_ms / 1000, backward_ms / 1000
        self.seed = seed

    def layer_names(self) -> list[str]:
        return [f"scale{i}" for i in range(self.num_layers)]

    def layer_param_counts(self) -> list[int]:
        return [1] * self.num_layers

    def trace_specs(self, example_input: Any) -> list[Any]:
        spec = TensorSpec(tuple(np.shape(example_input)), str(np.asarray(example_input).dtype))
        return [spec] * self.num_layers

    def layer_costs(self, method: str, example_input: Any, *, repeats: int = 5) -> list[float]:
        return [self.forward_s + self.backward_s] * self.num_layers

    def initial_weight(self, layer: int) -> float:
        return float(1.0 + 0.01 * np.random.default_rng([self.seed, layer]).standard_normal())

    def build_stage(self, spec: StageSpec, *, optimizer: Any) -> "SleepStage":
        return SleepStage(self, spec, lr=getattr(optimizer, "lr", 0.01))


class SleepStage:
    """y = x * prod(w) over the stage's layers; the last stage's loss is mean(y * t)."""

    framework = "numpy"

    def __init__(self, model: SleepSequential, spec: StageSpec, *, lr: float):
        self.spec, self.model, self.lr = spec, model, lr
        weights = np.array([model.initial_weight(i) for i in range(spec.start, spec.end)], dtype=np.float64)
        self._versions = {0: weights}
        self._saved: dict[int, tuple[np.ndarray, int, Any]] = {}
        self._acc = np.zeros_like(weights)
        self._count = 0

    @staticmethod
    def _sleep_until(deadline: float) -> None:
        # The compute above counts towards the fixed duration, so a forward
        # takes forward_ms in all, whatever numpy costs on this machine.
        remaining = deadline - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)

    def forward(self, k: int, inputs: Any, *, version: int, targets: Any = None) -> Any:
        if version not in self._versions:
            raise KeyError(f"stage {self.spec.index}: forward of micro-batch {k} needs version {version}, "
                           f"held: {sorted(self._versions)}")
        deadline = time.perf_counter() + self.model.forward_s
        x = np.asarray(inputs, dtype=np.float32)
        y = x * np.float32(np.prod(self._versions[version]))
        self._saved[k] = (x, version, targets)
        out = float(np.mean(y * targets, dtype=np.float64)) if self.spec.is_last else y
        self._sleep_until(deadline)
        return out

    def backward(self, k: int, grad_outputs: Any = None) -> Any:
        if k not in self._saved:
            raise KeyError(f"stage {self.spec.index}: backward of micro-batch {k} without its forward")
        deadline = time.perf_counter() + self.model.backward_s
        x, version, targets = self._saved.pop(k)
        w = self._versions[version]
        if self.spec.is_last:
            g = np.asarray(targets, dtype=np.float32) / np.float32(x.size)
        else:
            g = np.asarray(grad_outputs, dtype=np.float32)
        dscale = float(np.dot(g.ravel(), x.ravel()))
        prod = float(np.prod(w))
        self._acc += np.array([prod / wi * dscale for wi in w])
        self._count += 1
        grad_in = None if self.spec.is_first else g * np.float32(prod)
        self._sleep_until(deadline)
        return grad_in

    def update(self, *, new_version: int) -> None:
        latest = self._versions[max(self._versions)]
        self._versions[new_version] = latest - self.lr * self._acc / max(1, self._count)
        self._acc[:] = 0
        self._count = 0

    def release(self, version: int) -> None:
        self._versions.pop(version, None)

    def versions(self) -> tuple[int, ...]:
        return tuple(sorted(self._versions))

    def evaluate(self, inputs: Any, *, targets: Any = None) -> Any:
        w = self._versions[max(self._versions)]
        y = np.asarray(inputs, dtype=np.float32) * np.float32(np.prod(w))
        return float(np.mean(y * targets, dtype=np.float64)) if self.spec.is_last else y

    def state_dict(self) -> dict[str, np.ndarray]:
        state = {f"v{v}/w": w.copy() for v, w in self._versions.items()}
        state["acc/w"] = self._acc.copy()
        state["meta/count"] = np.array(self._count)
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self._versions = {int(name[1:].split("/")[0]): np.array(a) for name, a in state.items()
                          if name.startswith("v")}
        self._acc = np.array(state["acc/w"])
        self._count = int(state["meta/count"])
        self._saved.clear()


class SleepData:
    """Micro-batch k: a float32 array of ``nbytes`` (1 MiB by default) from (seed, k)."""

    def __init__(self, *, nbytes: int = 1 << 20, microbatch_size: int = 1, seed: int = 0):
        self.shape = (microbatch_size, max(1, nbytes // 4 // microbatch_size))
        self.microbatch_size, self.seed = microbatch_size, seed

    # Constant arrays: drawing 1 MiB of random numbers would cost more than
    # the runtime overhead the benchmark is there to measure.
    def inputs(self, k: int) -> np.ndarray:
        return np.full(self.shape, np.random.default_rng([self.seed, k]).standard_normal(), dtype=np.float32)

    def targets(self, k: int) -> np.ndarray:
        return np.full(self.shape, np.random.default_rng([self.seed, k, 1]).standard_normal(), dtype=np.float32)

"""A synthetic pipeline for benchmarks and runtime tests: numpy, fixed sleeps.

Each layer multiplies its input by a scalar weight; a stage then sleeps a
fixed time per forward and per backward, so on a 2-core machine the
pipeline's timing is decided by the schedule and the runtime, not by who
gets a core. The maths is tiny but real (gradients, updates, weight
versions), so a distributed run can still be checked against the
reference executor, and the stage is a full ``Stage``: no framework needed.

``grad_bytes`` > 0 gives each stage a float32 parameter ``pad`` of
``grad_bytes // 4`` elements that scales the stage by ``1 + mean(pad)``: a real
parameter with a real gradient (the same value in every element, so a backward
costs one array add), there so that replicated pipelines have that many bytes of
gradients to sum per stage and update. It starts at zero, so the first forward
is the same as without it.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from pipetrain.stages.base import StageSpec, TensorSpec


class SleepSequential:
    framework = "numpy"

    def __init__(self, num_layers: int = 4, *, forward_ms: float = 10.0, backward_ms: float = 20.0, seed: int = 0,
                 grad_bytes: int = 0):
        if grad_bytes < 0:
            raise ValueError(f"SleepSequential: grad_bytes must be >= 0, got {grad_bytes}")
        self.num_layers = num_layers
        self.forward_s, self.backward_s = forward_ms / 1000, backward_ms / 1000
        self.seed = seed
        self.pad_size = grad_bytes // 4  # float32 elements of each stage's pad (0: none)

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
    """y = x * s with s = prod(w) over the stage's layers (times 1 + mean(pad) when the model has
    a pad); the last stage's loss is mean(y * t)."""

    framework = "numpy"

    def __init__(self, model: SleepSequential, spec: StageSpec, *, lr: float):
        self.spec, self.model, self.lr = spec, model, lr
        weights = np.array([model.initial_weight(i) for i in range(spec.start, spec.end)], dtype=np.float64)
        self._versions = {0: weights}
        self._saved: dict[int, tuple[np.ndarray, int, Any]] = {}
        self._acc = np.zeros_like(weights)
        self._count = 0
        # Each weight version has its pad (pipedream keeps several); None: the model has none.
        self._pads: dict[int, np.ndarray] | None = None
        self._acc_pad: np.ndarray | None = None
        if model.pad_size:
            self._pads = {0: np.zeros(model.pad_size, dtype=np.float32)}
            self._acc_pad = np.zeros(model.pad_size, dtype=np.float32)

    def _pad_factor(self, version: int) -> float:
        """1 + mean(pad) of ``version``; exactly 1.0 without a pad, so those runs keep their bits."""
        if self._pads is None:
            return 1.0
        return 1.0 + float(np.mean(self._pads[version], dtype=np.float64))

    def _scale(self, version: int) -> np.float32:
        return np.float32(np.prod(self._versions[version]) * self._pad_factor(version))

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
        y = x * self._scale(version)
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
        dscale = float(np.dot(g.ravel(), x.ravel()))  # d loss / d s
        prod, factor = float(np.prod(w)), self._pad_factor(version)
        self._acc += np.array([prod / wi * factor * dscale for wi in w])
        if self._acc_pad is not None:
            # d s / d pad_i = prod / n for every element i: one scalar, added to all of them.
            self._acc_pad += np.float32(prod * dscale / self._acc_pad.size)
        self._count += 1
        grad_in = None if self.spec.is_first else g * np.float32(prod * factor)
        self._sleep_until(deadline)
        return grad_in

    def update(self, *, new_version: int) -> None:
        newest = max(self._versions)
        self._versions[new_version] = self._versions[newest] - self.lr * self._acc / max(1, self._count)
        self._acc[:] = 0
        if self._pads is not None:
            self._pads[new_version] = self._pads[newest] - np.float32(self.lr) * self._acc_pad / np.float32(
                max(1, self._count))
            self._acc_pad[:] = 0
        self._count = 0

    def accumulated_gradients(self) -> tuple[dict[str, np.ndarray], int]:
        """The gradient sums accumulated since the last update, by parameter name, and how many
        backwards they hold (host arrays; the reduction sums them across replicas)."""
        grads = {"w": self._acc.copy()}
        if self._acc_pad is not None:
            grads["pad"] = self._acc_pad.copy()
        return grads, self._count

    def set_accumulated_gradients(self, grads: dict[str, np.ndarray], count: int) -> None:
        """Replace them (the replicas' sum) and the count (the replicas' total): the next
        update applies grads / count."""
        mine = {"w": self._acc} if self._acc_pad is None else {"w": self._acc, "pad": self._acc_pad}
        if set(grads) != set(mine):
            raise ValueError(f"stage {self.spec.index}: set_accumulated_gradients got {sorted(grads)}, "
                             f"the stage's parameters are {sorted(mine)}")
        for name, acc in mine.items():
            if np.shape(grads[name]) != acc.shape:
                raise ValueError(f"stage {self.spec.index}: gradient {name!r} has shape {np.shape(grads[name])}, "
                                 f"the parameter {acc.shape}")
        if count < 0:
            raise ValueError(f"stage {self.spec.index}: set_accumulated_gradients count must be >= 0, got {count}")
        self._acc = np.array(grads["w"], dtype=self._acc.dtype)
        if self._acc_pad is not None:
            self._acc_pad = np.array(grads["pad"], dtype=np.float32)
        self._count = int(count)

    def release(self, version: int) -> None:
        self._versions.pop(version, None)
        if self._pads is not None:
            self._pads.pop(version, None)

    def versions(self) -> tuple[int, ...]:
        return tuple(sorted(self._versions))

    def evaluate(self, inputs: Any, *, targets: Any = None) -> Any:
        y = np.asarray(inputs, dtype=np.float32) * self._scale(max(self._versions))
        return float(np.mean(y * targets, dtype=np.float64)) if self.spec.is_last else y

    def state_dict(self) -> dict[str, np.ndarray]:
        state = {f"v{v}/w": w.copy() for v, w in self._versions.items()}
        state["acc/w"] = self._acc.copy()
        if self._pads is not None:
            state.update({f"v{v}/pad": pad.copy() for v, pad in self._pads.items()})
            state["acc/pad"] = self._acc_pad.copy()
        state["meta/count"] = np.array(self._count)
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        def versions(param: str) -> dict[int, np.ndarray]:
            return {int(name[1:].split("/")[0]): np.array(a) for name, a in state.items()
                    if name.startswith("v") and name.endswith(f"/{param}")}

        has_pad = "acc/pad" in state
        if has_pad != (self._pads is not None):
            raise ValueError(f"stage {self.spec.index}: the state {'has' if has_pad else 'lacks'} a pad, the model "
                             f"has grad_bytes={4 * self.model.pad_size}")
        self._versions = versions("w")
        self._acc = np.array(state["acc/w"])
        if has_pad:
            self._pads = versions("pad")
            if set(self._pads) != set(self._versions) or any(p.shape != (self.model.pad_size,)
                                                             for p in self._pads.values()):
                raise ValueError(f"stage {self.spec.index}: the state's pads (versions {sorted(self._pads)}) do "
                                 f"not match its weight versions {sorted(self._versions)} and "
                                 f"{self.model.pad_size} elements")
            self._acc_pad = np.array(state["acc/pad"], dtype=np.float32)
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

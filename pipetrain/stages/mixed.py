"""One model made of parts written in different frameworks.

``MixedSequential([jax_part, torch_part, keras_part])`` is a SequentialModel
whose layers are the parts' layers end to end. A stage never straddles two
parts (``required_cuts`` tells the partitioner where it must cut), so each
stage is an ordinary JAX, torch or Keras stage, and tensors cross frameworks
only at stage boundaries, through ``pipetrain.stages.tensors`` (DLPack). The
loss is the last part's. Framework-free itself: a stage process imports only
the framework of its own part.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from pipetrain.stages.base import PartitionError, StageSpec, TensorSpec
from pipetrain.tree import Tree, tree_map


def _zeros_like_spec(spec_tree: Tree) -> Tree:
    def leaf(spec: TensorSpec) -> np.ndarray:
        if spec.dtype == "bfloat16":
            import ml_dtypes

            return np.zeros(spec.shape, dtype=ml_dtypes.bfloat16)
        return np.zeros(spec.shape, dtype=spec.dtype)

    return tree_map(leaf, spec_tree)


class MixedSequential:
    framework = "mixed"

    def __init__(self, parts: Sequence[Any]):
        if len(parts) < 1:
            raise ValueError("MixedSequential: no parts given")
        self._parts: list[Any] = list(parts)
        self._blobs: list[bytes | None] = [None] * len(parts)
        self.frameworks = [part.framework for part in parts]
        sizes = [len(part.layer_names()) for part in parts]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]

    # Each part travels as its own pickle and is unpickled only when a stage
    # of that part is built: a worker imports only its own stage's framework.
    def __getstate__(self) -> dict:
        import cloudpickle

        blobs = [blob if part is None else cloudpickle.dumps(part) for part, blob in zip(self._parts, self._blobs)]
        return {"_parts": [None] * len(blobs), "_blobs": blobs, "frameworks": self.frameworks,
                "offsets": self.offsets}

    def part(self, i: int) -> Any:
        if self._parts[i] is None:
            import pickle

            self._parts[i] = pickle.loads(self._blobs[i])
        return self._parts[i]

    @property
    def parts(self) -> list[Any]:
        return [self.part(i) for i in range(len(self._parts))]

    @property
    def required_cuts(self) -> tuple[int, ...]:
        """Layer indices where a stage must end: the boundaries between parts."""
        return tuple(self.offsets[1:-1])

    def layer_names(self) -> list[str]:
        return [f"{part.framework}:{name}" for part in self.parts for name in part.layer_names()]

    def layer_param_counts(self) -> list[int]:
        return [n for part in self.parts for n in part.layer_param_counts()]

    def _walk(self, example_input: Tree, fn) -> list:
        out, x = [], example_input
        for part in self.parts:
            specs = part.trace_specs(x)
            out += fn(part, x, specs)
            x = _zeros_like_spec(specs[-1])
        return out

    def trace_specs(self, example_input: Tree) -> list[Tree]:
        return self._walk(example_input, lambda part, x, specs: specs)

    def layer_costs(self, method: str, example_input: Tree, *, repeats: int = 5) -> list[float]:
        return self._walk(example_input, lambda part, x, specs: part.layer_costs(method, x, repeats=repeats))

    def part_of(self, spec: StageSpec) -> tuple[int, Any]:
        for i, framework in enumerate(self.frameworks):
            lo, hi = self.offsets[i], self.offsets[i + 1]
            if lo <= spec.start < hi:
                if spec.end > hi:
                    raise PartitionError(
                        f"stage {spec.index}: layers {spec.start}-{spec.end - 1} cross from the {framework} "
                        f"part into the {self.frameworks[i + 1]} part; a stage must end at layer {hi - 1} "
                        f"(cut at {hi})")
                return i, self.part(i)
        raise PartitionError(f"stage {spec.index}: layers {spec.start}-{spec.end - 1} are outside the model")

    def build_stage(self, spec: StageSpec, *, optimizer: Any) -> Any:
        i, part = self.part_of(spec)
        local = StageSpec(spec.index, spec.num_stages, spec.start - self.offsets[i], spec.end - self.offsets[i])
        return part.build_stage(local, optimizer=optimizer)

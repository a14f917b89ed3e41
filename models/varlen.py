"""Micro-batches whose sequence length changes with k: the flagship text,
with windows of 32 characters for odd k and 64 for even k.

torch.distributed.pipelining freezes shapes at the first micro-batch; here
the shape travels with each message and a JAX stage compiles once per
distinct shape.
"""
from __future__ import annotations

from models.text import CharWindows


class AlternatingLength:
    def __init__(self, *, split: str = "train", lengths: tuple[int, ...] = (64, 32), microbatch_size: int = 8,
                 seed: int = 0):
        self.sources = [CharWindows(split=split, context=n, microbatch_size=microbatch_size, seed=seed)
                        for n in lengths]
        self.microbatch_size = microbatch_size

    def _source(self, k: int) -> CharWindows:
        return self.sources[k % len(self.sources)]

    def inputs(self, k: int):
        return self._source(k).inputs(k)

    def targets(self, k: int):
        return self._source(k).targets(k)

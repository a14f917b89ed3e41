"""Weight-version bookkeeping the JAX, torch and Keras stages share.

A stage keeps ``self._versions`` ({version: {param name: tensor}}) and
``self._latest``; the schedule decides which versions live (see
``Schedule.last_use``), this only guards the rules: the latest is never
released, and asking for a version that is not held names the stage and
what it holds.
"""
from __future__ import annotations

from typing import Any


class VersionedParams:
    _versions: dict[int, dict[str, Any]]
    _latest: int
    _corr: Any  # pipetrain.stages.corrections.StageCorrection
    spec: Any

    def release(self, version: int) -> None:
        if version == self._latest:
            raise ValueError(f"stage {self.spec.index}: cannot release weight version {version}, the latest")
        self._versions.pop(version, None)
        self._corr.release(version)  # a correction's per-version state goes with it

    def versions(self) -> tuple[int, ...]:
        return tuple(sorted(self._versions))

    def params(self, version: int) -> dict[str, Any]:
        """The tensors of one weight version, by name (read-only by convention)."""
        return dict(self._params(version))

    def _params(self, version: int, k: int | None = None) -> dict[str, Any]:
        """Version ``version``; the error names micro-batch ``k`` when one asked for it."""
        try:
            return self._versions[version]
        except KeyError:
            where = f"stage {self.spec.index}" + (f", micro-batch {k}" if k is not None else "")
            raise KeyError(f"{where}: no weight version {version}; held: {self.versions()}") from None

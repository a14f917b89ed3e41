"""`pipetrain export`: a committed checkpoint's stage shards merged into one artifact.

``export(run_dir, out, fmt=...)`` reads the run's job.json, rebuilds its model
(``model.entry`` with its kwargs, as ``pipetrain train`` did) and the stage
ranges (the boundaries the checkpoint's manifest records, else the config's),
loads each stage's shard with ``CheckpointStore.load_shard`` (checksums
verified), keeps the newest weight version of each (``meta/latest``'s
``v{N}/...``) and writes one ``{parameter name: array}`` artifact:

- parameter names are the unpartitioned model's: a JAX stage's names are its
  layer paths (``dense0/w``), a torch stage's the ``nn.Module`` state_dict
  names of ``nn.Sequential(*layers)`` (``2.weight``), a Keras stage's
  ``{layer index}.{variable name}``; every stage already uses those global
  names. A ``MixedSequential``'s parameters are ``part{i}/{the part's name}``;
- ``--with-optimizer`` adds each stage's optimizer state as
  ``optimizer/stage{s}/{its name}`` (safetensors only).

Framework-free at import: the per-format writers (``pipetrain.export_formats``)
import their framework when they run.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipetrain.errors import PipetrainError

FORMATS = ("safetensors", "torch", "flax", "keras")
_FRAMEWORK_OF_FORMAT = {"torch": "torch", "flax": "jax", "keras": "tf"}
_FORMATS_OF_FRAMEWORK = {"jax": "safetensors or flax", "torch": "safetensors or torch", "tf": "safetensors or keras"}
_VERSION = re.compile(r"^v(\d+)/(.+)$")


class ExportError(PipetrainError, ValueError):
    """An export that cannot be made; the message says what was found and what to do."""


@dataclass
class Exported:
    """What ``export`` wrote: the artifact, its sidecar (safetensors) and where it came from."""

    path: str
    format: str
    framework: str
    cut: int
    step: int
    checkpoint: str
    tensors: int
    sidecar: str | None = None
    names: list[str] = field(default_factory=list)


@dataclass
class Merged:
    """The checkpoint's weights under the unpartitioned model's names (and optimizer state if asked)."""

    model: Any
    framework: str
    weights: dict[str, np.ndarray]
    optimizer: dict[str, np.ndarray]
    cut: int
    step: int
    checkpoint: str
    cfg: Any


def export(run_dir: str, out: str, *, fmt: str, step: int | None = None, with_optimizer: bool = False,
           overwrite: bool = False) -> Exported:
    """Write the checkpoint of ``run_dir`` (the newest that verifies, or the one at
    ``step``) to ``out`` in format ``fmt``; see the module docstring."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if with_optimizer and fmt != "safetensors":
        raise ExportError(f"--with-optimizer is for --format safetensors only (its optimizer/... tensors have no "
                          f"place in a {fmt} artifact); export the weights alone, or use safetensors")
    from pipetrain.export_formats import sidecar_path

    targets = [Path(out)] + ([Path(sidecar_path(out))] if fmt == "safetensors" else [])
    existing = [str(t) for t in targets if t.exists() or t.is_symlink()]
    if existing and not overwrite:
        raise ExportError(f"{' and '.join(existing)} exists already; pass --overwrite to replace it")
    if any(t.is_dir() for t in targets):
        raise ExportError(f"{out} is a directory; give the path of the file to write")
    merged = merge(run_dir, step=step, with_optimizer=with_optimizer, need_framework=_FRAMEWORK_OF_FORMAT.get(fmt),
                   fmt=fmt)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    from pipetrain import export_formats

    writer = getattr(export_formats, f"write_{fmt}")
    sidecar = writer(merged, out)
    return Exported(path=str(out), format=fmt, framework=merged.framework, cut=merged.cut, step=merged.step,
                    checkpoint=merged.checkpoint, tensors=len(merged.weights) + len(merged.optimizer),
                    sidecar=sidecar, names=sorted(merged.weights) + sorted(merged.optimizer))


def merge(run_dir: str, *, step: int | None = None, with_optimizer: bool = False, need_framework: str | None = None,
          fmt: str = "safetensors") -> Merged:
    """The checkpoint's stage shards as one map under the unpartitioned model's names."""
    from pipetrain.checkpoint.store import CheckpointStore
    from pipetrain.config import resolve
    from pipetrain.job import recorded_config

    cfg = recorded_config(run_dir)
    store = CheckpointStore(cfg.checkpoint_url())
    cut, path, manifest = _pick(store, cfg, step)
    model = resolve(cfg.model.entry, "model.entry")(**cfg.model.kwargs)
    framework = getattr(model, "framework", "?")
    if need_framework is not None and framework != need_framework:
        if framework == "mixed":
            raise ExportError(f"--format {fmt} is for a {need_framework} model, but {cfg.model.entry} is a "
                              f"mixed-framework model ({', '.join(model.frameworks)}): a mixed model exports "
                              f"only as --format safetensors")
        fits = _FORMATS_OF_FRAMEWORK.get(framework, "safetensors")
        raise ExportError(f"--format {fmt} is for a {need_framework} model, but {cfg.model.entry} is a {framework} "
                          f"model ({type(model).__name__}): use --format {fits}")
    ranges = _stage_ranges(model, cfg, manifest, path)
    weights: dict[str, np.ndarray] = {}
    optimizer: dict[str, np.ndarray] = {}
    owner: dict[str, int] = {}
    named: dict[str, str] = {}  # a parameter's name in its stage's state -> its name in the artifact
    for s, (start, _end) in enumerate(ranges):
        state = store.load_shard(cut, s)
        prefix = _mixed_prefix(model, start)
        for name, array in _latest_weights(state, s, path).items():
            named[name], name = prefix + name, prefix + name
            if name in owner:
                if np.array_equal(weights[name], array):  # one tied parameter, kept by both stages
                    continue
                raise ExportError(f"{path}: stages {owner[name]} and {s} both hold a parameter {name!r}, with "
                                  f"different values; cannot merge them into one artifact")
            owner[name] = s
            weights[name] = array
        if with_optimizer:
            optimizer.update({f"optimizer/stage{s}/{k[4:]}": v for k, v in state.items() if k.startswith("opt/")})
    _untie(weights, named, owner, cfg.model.ties if cfg.model.ties is not None else getattr(model, "ties", ()))
    return Merged(model=model, framework=framework, weights=weights, optimizer=optimizer, cut=cut,
                  step=cut // cfg.schedule.microbatches, checkpoint=path, cfg=cfg)


def _untie(weights: dict, named: dict, owner: dict, ties: Any) -> None:
    """Every copy of a tied parameter gets its owner's value (the copy on the lowest stage):
    the copies the sync schedules keep are equal anyway, but under pipedream only the owner's
    is trained (runtime/tie_carry.py), and the unpartitioned model reads each copy."""
    for tie in ties or ():
        held = [named[n] for n in tie if n in named]
        if len(held) > 1:
            first = min(held, key=lambda n: owner[n])
            for name in held:
                weights[name] = weights[first]


def _pick(store: Any, cfg: Any, step: int | None) -> tuple[int, str, dict]:
    """(cut, path, manifest) of the checkpoint to export, or an error saying what there is."""
    m = cfg.schedule.microbatches
    infos = store.list()
    if step is None:
        latest = store.latest()
        if latest is None:
            found = "; ".join(f"{i.path}: {i.status} ({i.reason})" for i in infos) or "no checkpoint at all"
            raise ExportError(f"{store.url} holds no committed checkpoint that verifies: {found}")
        return latest.cut, latest.path, latest.manifest
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ExportError(f"--step must be an integer >= 0, got {step!r}")
    cut = step * m
    info = next((i for i in infos if i.cut == cut), None)
    if info is None:
        there = ", ".join(f"step {i.cut // m} (cut {i.cut}, {i.status})" if i.cut % m == 0 else
                          f"cut {i.cut} ({i.status}, mid-step)" for i in infos) or "none"
        raise ExportError(f"--step {step}: {store.url} has no checkpoint at cut {cut} (step {step} x {m} "
                          f"micro-batches); the checkpoints there are: {there}")
    if info.status != "committed":
        raise ExportError(f"--step {step}: the checkpoint {info.path} is {info.status}: {info.reason}")
    checkpoint, problem = store.verify(cut)
    if checkpoint is None:  # it changed since list()
        raise ExportError(f"--step {step}: the checkpoint {info.path} does not verify: {problem}")
    return cut, checkpoint.path, checkpoint.manifest


def _stage_ranges(model: Any, cfg: Any, manifest: dict, path: str) -> list[tuple[int, int]]:
    """Layer ranges of the checkpoint's stages: the manifest's boundaries, else the config's,
    else the partition recomputed as ``pipetrain train`` made it."""
    from pipetrain.stages.base import stage_ranges

    num_stages = int(manifest["num_stages"])
    n = len(model.layer_names())
    boundaries = (manifest.get("partition") or {}).get("boundaries")
    if boundaries is None and cfg.partition.boundaries:
        boundaries = list(cfg.partition.boundaries)
    if boundaries is None:
        from pipetrain.job import build_source
        from pipetrain.partitioning import partition

        example = build_source(cfg.data.train, "data.train", cfg.data.kwargs).inputs(0)
        boundaries = list(partition(model, num_stages, method=cfg.partition.method, example_input=example).boundaries)
    if len(boundaries) != num_stages - 1 or (boundaries and not 0 < boundaries[0] <= boundaries[-1] < n):
        raise ExportError(f"{path}: its {num_stages} stages with boundaries {list(boundaries)} do not fit "
                          f"{cfg.model.entry}, a model of {n} layers; was the model changed since the run?")
    return stage_ranges([int(b) for b in boundaries], n)


def _mixed_prefix(model: Any, start: int) -> str:
    if getattr(model, "framework", None) != "mixed":
        return ""
    part = max(i for i, offset in enumerate(model.offsets[:-1]) if offset <= start)
    return f"part{part}/"


def _latest_weights(state: dict[str, np.ndarray], stage: int, path: str) -> dict[str, np.ndarray]:
    """The ``v{N}/...`` tensors of the stage's newest version (``meta/latest``), names without ``v{N}/``."""
    versions: dict[int, dict[str, np.ndarray]] = {}
    for key, array in state.items():
        m = _VERSION.match(key)
        if m:
            versions.setdefault(int(m.group(1)), {})[m.group(2)] = array
    if not versions:
        raise ExportError(f"{path}: stage {stage}'s shard holds no weights (no v{{N}}/... tensors)")
    latest = int(state["meta/latest"]) if "meta/latest" in state else max(versions)
    if latest not in versions:
        latest = max(versions)
    return versions[latest]


def sidecar_record(merged: Merged, fmt: str) -> dict:
    return {"format": fmt, "framework": merged.framework, "model": merged.cfg.model.entry,
            "model_kwargs": merged.cfg.model.kwargs, "checkpoint": merged.checkpoint, "cut": merged.cut,
            "step": merged.step, "microbatches_per_step": merged.cfg.schedule.microbatches,
            "optimizer": bool(merged.optimizer)}


def describe(result: Exported) -> str:
    also = f" (and {result.sidecar})" if result.sidecar else ""
    return (f"pipetrain export: wrote {result.path}{also}: {result.tensors} tensors of the {result.framework} model, "
            f"{result.format} format, from {result.checkpoint} (step {result.step}, micro-batch {result.cut})")


def dumps(record: dict) -> str:
    return json.dumps(record, indent=2, default=str)

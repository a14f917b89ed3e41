"""The JSON records of a checkpoint: shard record, manifest, commit marker.

Pure functions over dicts (no I/O), so what counts as "committed and intact"
is decided in one place and tested without a file system.

A step directory ``step-{cut:010d}/`` holds, per stage s,
``stage-{s}.safetensors`` and its record ``stage-{s}.json``; then the
driver's ``manifest.json``; then ``COMMITTED`` (written last). The marker
carries the manifest's sha256, and the manifest carries every shard's sha256
and size, so a checkpoint verifies from the marker down. The store root holds
those step directories and the ``GENERATION`` record; every file is written
through a temporary ``.{name}.tmp-{pid}-{token}`` first. Those names are all
the store ever writes, so they are all it may ever delete (``is_own_file``).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from pipetrain.errors import PipetrainError

FORMAT = "pipetrain-checkpoint/1"
MANIFEST = "manifest.json"
MARKER = "COMMITTED"
GENERATION = "GENERATION"
STEP_DIR = re.compile(r"^step-(\d{10})$")
_STAGE_FILE = re.compile(r"^stage-\d+\.(safetensors|json)$")
_TEMP_FILE = re.compile(r"^\.(?P<name>.+)\.tmp-\d+-[0-9a-f]{8}$")
# Keys the store writes into manifest.json; the driver's extra fields may not reuse them.
RESERVED_KEYS = frozenset(
    ["format", "cut", "microbatch_cursor", "generation", "num_stages", "created_at", "shards"]
)


class CheckpointError(PipetrainError, RuntimeError):
    """A checkpoint operation that cannot proceed; the message names the file."""


class StaleGenerationError(CheckpointError):
    """A writer from an older generation tried to write into a newer run."""

    retryable = True  # a stage of an old generation: the new one writes there instead


class CheckpointCorruptError(CheckpointError):
    """A checkpoint file that does not match its manifest (or is unreadable)."""


class ForeignFilesError(CheckpointError):
    """The store root holds files the store did not write: it deletes nothing there."""


def temp_file_name(name: str, pid: int, token: str) -> str:
    """Where a file is written before its atomic rename to ``name`` (``token``: 8 hex digits)."""
    return f".{name}.tmp-{pid}-{token}"


def is_own_file(name: str, *, in_step_dir: bool) -> bool:
    """Whether the store writes files of this name: in a step directory its shards,
    records, manifest and marker; in the root its GENERATION record; either's temporaries."""
    temp = _TEMP_FILE.match(name)
    if temp:
        name = temp.group("name")
    if in_step_dir:
        return name in (MANIFEST, MARKER) or bool(_STAGE_FILE.match(name))
    return name == GENERATION


def foreign_entries(root: list[tuple[str, bool]], step: Callable[[str], list[tuple[str, bool]]]) -> list[str]:
    """Of a store root's entries ``root`` ((name, is a directory) pairs; ``step(name)``
    lists a step directory's), the paths of those the store did not write, sorted
    (directories with a trailing /): the store may delete only when this is empty."""
    foreign = []
    for name, is_dir in root:
        if is_dir and STEP_DIR.match(name):
            foreign += [f"{name}/{inner}" + "/" * inner_is_dir for inner, inner_is_dir in step(name)
                        if inner_is_dir or not is_own_file(inner, in_step_dir=True)]
        elif is_dir or not is_own_file(name, in_step_dir=False):
            foreign.append(name + "/" * is_dir)
    return sorted(foreign)


def name_a_few(names: list[str], shown: int = 5) -> str:
    """``a, b, c and 4 more``: enough of a list for a one-line error."""
    rest = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + rest


def step_dir_name(cut: int) -> str:
    return f"step-{cut:010d}"


def shard_file_name(stage: int) -> str:
    return f"stage-{stage}.safetensors"


def record_file_name(stage: int) -> str:
    return f"stage-{stage}.json"


@dataclass(frozen=True)
class ShardRecord:
    """What a worker reports to the driver once its shard is durable."""

    cut: int
    stage: int
    generation: int
    file: str
    bytes: int
    sha256: str
    tensors: dict[str, dict] = field(default_factory=dict)  # name -> {dtype, shape}
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "cut": self.cut, "stage": self.stage, "generation": self.generation,
            "file": self.file, "bytes": self.bytes, "sha256": self.sha256,
            "tensors": self.tensors, "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardRecord:
        return cls(
            cut=int(d["cut"]), stage=int(d["stage"]), generation=int(d["generation"]),
            file=str(d["file"]), bytes=int(d["bytes"]), sha256=str(d["sha256"]),
            tensors=dict(d.get("tensors", {})), meta=dict(d.get("meta", {})),
        )


@dataclass(frozen=True)
class CheckpointInfo:
    """One step directory as ``CheckpointStore.list()`` sees it (for the CLI)."""

    cut: int
    path: str
    status: str  # "committed" | "uncommitted" | "corrupt"
    reason: str | None = None  # why it is not usable


@dataclass(frozen=True)
class CommittedCheckpoint:
    """A committed checkpoint that verified: marker, manifest and every shard."""

    cut: int  # the micro-batch cursor: training resumes at micro-batch ``cut``
    generation: int
    num_stages: int
    path: str  # the step directory (inside the store's file system)
    manifest: dict[str, Any]
    # Newer step directories ``latest()`` passed over, and why: (cut, reason).
    skipped: tuple[tuple[int, str], ...] = ()

    def shard(self, stage: int) -> dict[str, Any]:
        return self.manifest["shards"][str(stage)]


def build_manifest(
    cut: int, *, records: list[ShardRecord], generation: int, num_stages: int,
    extra: dict[str, Any], created_at: float,
) -> dict[str, Any]:
    """Check the records cover every stage of this cut and generation; the manifest dict."""
    clash = RESERVED_KEYS.intersection(extra)
    if clash:
        raise CheckpointError(f"manifest field(s) {sorted(clash)} are reserved by the checkpoint store")
    by_stage: dict[int, ShardRecord] = {}
    for r in records:
        if r.cut != cut:
            raise CheckpointError(f"shard record of stage {r.stage} is for cut {r.cut}, not {cut}")
        if r.generation != generation:
            raise StaleGenerationError(
                f"shard record of stage {r.stage} at cut {cut} is from generation {r.generation}, "
                f"the commit is for generation {generation}"
            )
        if r.stage in by_stage:
            raise CheckpointError(f"two shard records for stage {r.stage} at cut {cut}")
        if not 0 <= r.stage < num_stages:
            raise CheckpointError(f"shard record for stage {r.stage}, but the job has {num_stages} stages")
        if r.file != shard_file_name(r.stage):
            raise CheckpointError(f"shard record of stage {r.stage} names file {r.file!r}")
        by_stage[r.stage] = r
    missing = [s for s in range(num_stages) if s not in by_stage]
    if missing:
        raise CheckpointError(f"cannot commit cut {cut}: no shard record from stage(s) {missing}")
    manifest = {
        "format": FORMAT,
        "cut": cut,
        "microbatch_cursor": cut,
        "generation": generation,
        "num_stages": num_stages,
        "created_at": created_at,
        "shards": {str(s): by_stage[s].to_dict() for s in range(num_stages)},
    }
    manifest.update(extra)
    return manifest


def shard_problem(stage: int, entry: dict[str, Any], *, size: int | None, digest: Callable[[], str]) -> str | None:
    """Why a shard of ``size`` bytes (None: missing) is not the one manifest ``entry``
    describes (None: it is); ``digest()`` hashes it, asked only when the size matches."""
    if size is None:
        return f"shard {entry['file']} of stage {stage} is missing"
    if size != entry["bytes"]:
        return (f"shard {entry['file']} of stage {stage} has {size} bytes, the manifest says {entry['bytes']} "
                f"(truncated or replaced)")
    sha = digest()
    if sha != entry["sha256"]:
        return (f"shard {entry['file']} of stage {stage} has sha256 {sha[:12]}..., the manifest says "
                f"{entry['sha256'][:12]}... (corrupted or replaced)")
    return None


def dumps(obj: dict[str, Any], *, what: str) -> bytes:
    try:
        return json.dumps(obj, sort_keys=True, indent=1, allow_nan=False).encode()
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{what} is not plain JSON (no arrays, objects or NaN): {err}") from err


def loads(data: bytes, *, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointCorruptError(f"{what} is not valid JSON: {err}") from err
    if not isinstance(obj, dict):
        raise CheckpointCorruptError(f"{what} is not a JSON object")
    return obj


def manifest_problem(manifest: dict[str, Any], *, cut: int) -> str | None:
    """Why this manifest cannot describe step ``cut`` (None: it can)."""
    if manifest.get("format") != FORMAT:
        return f"manifest format is {manifest.get('format')!r}, expected {FORMAT!r}"
    if manifest.get("cut") != cut:
        return f"manifest is for cut {manifest.get('cut')!r}, its directory for cut {cut}"
    n = manifest.get("num_stages")
    shards = manifest.get("shards")
    if not isinstance(n, int) or n < 1 or not isinstance(shards, dict):
        return "manifest lacks num_stages or shards"
    for s in range(n):
        entry = shards.get(str(s))
        if not isinstance(entry, dict):
            return f"manifest lacks stage {s} of {n}"
        if entry.get("file") != shard_file_name(s):
            return f"manifest names file {entry.get('file')!r} for stage {s}"
        if not isinstance(entry.get("bytes"), int) or not isinstance(entry.get("sha256"), str):
            return f"manifest entry of stage {s} lacks bytes or sha256"
    if len(shards) != n:
        return f"manifest lists {len(shards)} shards for {n} stages"
    return None

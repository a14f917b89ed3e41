"""The checkpoint store: per-stage safetensors shards, a manifest, a commit marker.

Who calls what (DESIGN.md section 2, "Nothing torn"):

- each stage, on its worker, at a CHECKPOINT cut K: ``write_shard(K, s, state,
  generation=g)``; the shard is durable (fsync + atomic rename on a local
  disk) when it returns, and the returned ``ShardRecord`` goes to the driver;
- the driver, once it holds every stage's record: ``commit(K, records=...,
  generation=g, num_stages=p, manifest={...})`` writes ``manifest.json``, then
  the ``COMMITTED`` marker last, then prunes;
- on (re)start: ``latest()`` is the newest committed checkpoint that verifies
  end to end; anything torn or corrupt is skipped with a warning saying why;
- on a rollback to that cut: ``discard_after(cut, generation=g)`` removes the
  newer, unusable step directories so their cuts can be written again;
- for a new run in the same root: ``clear()``, which deletes only what the
  store writes, and nothing in a root that holds anything else.

Fencing: the driver records each new run's generation with
``begin_generation(g)``; a writer or committer of an older generation is
refused, so a stage process from before a recovery cannot write into the new
run. The last line of defence is the checksums: a shard swapped after commit
fails verification and is never loaded.

Only safetensors and JSON are ever parsed, so loading a checkpoint cannot run
code. Storage is any fsspec file system (local paths, ``memory://``, ...).
"""
from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import replace
from typing import Any

import numpy as np

from pipetrain.checkpoint.codec import ShardFormatError, decode_state, encode_state, tensor_index
from pipetrain.checkpoint.manifest import (
    GENERATION,
    MANIFEST,
    MARKER,
    STEP_DIR,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointInfo,
    CommittedCheckpoint,
    ForeignFilesError,
    ShardRecord,
    StaleGenerationError,
    build_manifest,
    dumps,
    foreign_entries,
    loads,
    manifest_problem,
    name_a_few,
    record_file_name,
    shard_file_name,
    shard_problem,
    step_dir_name,
    temp_file_name,
)

log = logging.getLogger("pipetrain.checkpoint")
_CHUNK = 8 * 1024 * 1024


class CheckpointStore:
    def __init__(self, url: str, *, keep: int = 3, fs: Any = None, clock: Callable[[], float] = time.time) -> None:
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"checkpoint keep must be an int >= 1, got {keep!r}")
        if fs is None:
            import fsspec

            fs, root = fsspec.core.url_to_fs(url)
        else:
            root = fs._strip_protocol(url)
        self.url = url
        self.keep = keep
        self.fs = fs
        self.root = root.rstrip("/") or "/"
        self._clock = clock

    def __repr__(self) -> str:
        return f"CheckpointStore({self.url!r}, keep={self.keep})"

    # -- generations --------------------------------------------------------

    def current_generation(self) -> int | None:
        """The newest generation the driver recorded, None if it never did."""
        path = self._path(GENERATION)
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        g = loads(data, what=f"{path} (the generation record)").get("generation")
        if not isinstance(g, int) or isinstance(g, bool):
            raise CheckpointCorruptError(f"{path} (the generation record) holds no integer generation: {g!r}")
        return g

    def begin_generation(self, generation: int) -> None:
        """Record that run ``generation`` owns this root from now on (driver only)."""
        current = self.current_generation()
        if current is not None and generation < current:
            raise StaleGenerationError(
                f"cannot begin generation {generation}: {self._path(GENERATION)} already records "
                f"generation {current}"
            )
        self._makedirs(self.root)
        self._write_atomic(self._path(GENERATION), dumps({"generation": generation}, what="GENERATION"))

    def _check_generation(self, generation: int, doing: str) -> None:
        current = self.current_generation()
        if current is not None and generation < current:
            raise StaleGenerationError(
                f"{doing} refused: it belongs to generation {generation}, but "
                f"{self._path(GENERATION)} records generation {current} (a stage or driver from "
                f"an earlier run may not write into this one)"
            )

    # -- writing ------------------------------------------------------------

    def write_shard(
        self, cut: int, stage: int, state: Mapping[str, np.ndarray], *,
        generation: int, meta: dict[str, Any] | None = None,
    ) -> ShardRecord:
        """Write stage ``stage``'s state for cut ``cut``; durable when this returns."""
        doing = f"stage {stage} writing its shard for cut {cut}"
        step = self._writable_step(cut, generation, doing)
        try:
            data = encode_state(state)
        except ShardFormatError as err:
            raise CheckpointError(f"stage {stage}, cut {cut}: {err}") from err
        record = ShardRecord(
            cut=cut, stage=stage, generation=generation, file=shard_file_name(stage),
            bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
            tensors=tensor_index(state), meta=dict(meta or {}),
        )
        record_bytes = dumps(record.to_dict(), what=f"meta of stage {stage}")
        self._makedirs(step)
        # Checked again just before the rename: a writer paused across a recovery
        # is refused at the last moment it can be, not only when it started.
        def fence() -> None:
            self._check_generation(generation, doing)

        self._write_atomic(posixpath.join(step, record.file), data, before_publish=fence)
        self._write_atomic(posixpath.join(step, record_file_name(stage)), record_bytes, before_publish=fence)
        return record

    def _writable_step(self, cut: int, generation: int, doing: str) -> str:
        """The step directory of ``cut``, if ``generation`` may write there: it is
        not stale, and the cut is not committed yet (``discard_after`` first)."""
        self._check_generation(generation, doing)
        step = self._step_path(cut)
        if self.fs.exists(posixpath.join(step, MARKER)):
            raise CheckpointError(f"{doing} refused: {step} is already committed")
        return step

    def commit(
        self, cut: int, *, records: list[ShardRecord], generation: int, num_stages: int,
        manifest: dict[str, Any] | None = None,
    ) -> CommittedCheckpoint:
        """Write the manifest, then the commit marker (last, atomically), then prune."""
        doing = f"commit of cut {cut}"
        step = self._writable_step(cut, generation, doing)
        body = build_manifest(
            cut, records=list(records), generation=generation, num_stages=num_stages,
            extra=dict(manifest or {}), created_at=self._clock(),
        )
        for s in range(num_stages):  # cheap presence check; full hashes are verified on load
            entry = body["shards"][str(s)]
            path = posixpath.join(step, entry["file"])
            size = self._size(path)
            if size != entry["bytes"]:
                found = "missing" if size is None else f"{size} bytes"
                raise CheckpointError(f"{doing}: {path} is {found}, stage {s} reported {entry['bytes']} bytes")
        manifest_bytes = dumps(body, what=f"manifest of cut {cut}")
        self._write_atomic(posixpath.join(step, MANIFEST), manifest_bytes)
        marker = {
            "cut": cut, "generation": generation,
            "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
        }
        self._write_atomic(
            posixpath.join(step, MARKER), dumps(marker, what="marker"),
            before_publish=lambda: self._check_generation(generation, doing),
        )
        log.info("checkpoint committed: %s (generation %d)", step, generation)
        self.prune()
        return CommittedCheckpoint(cut=cut, generation=generation, num_stages=num_stages, path=step, manifest=body)

    def prune(self) -> None:
        """Keep the newest ``keep`` committed checkpoints; drop uncommitted leftovers
        older than the newest committed one (newer ones may be being written now)."""
        cuts = self._cuts()
        committed = [c for c in cuts if self.fs.exists(posixpath.join(self._step_path(c), MARKER))]
        if not committed:
            return
        kept = set(committed[-self.keep :])
        newest = committed[-1]
        for c in cuts:
            if c in kept or c > newest:
                continue
            self._remove_step(c)

    def discard_after(self, cut: int, *, generation: int) -> list[int]:
        """Remove every step directory newer than ``cut``; returns the cuts removed.

        For a rollback to ``cut`` (the newest checkpoint that verified, or -1 for
        none): whatever is newer is torn or corrupt, and the new generation writes
        those cuts again, which ``write_shard`` and ``commit`` refuse while a
        directory still holds a commit marker. Each marker goes first, so a crash
        half-way leaves an uncommitted leftover that ``latest()`` passes over and
        the next discard or prune removes. Refused, like any write, for a
        generation older than the one the store records.
        """
        removed = []
        for c in self._cuts():
            if c <= cut:
                continue
            # Checked per directory: a newer driver that begins its generation
            # half-way stops this one from deleting what that driver now writes.
            self._check_generation(generation, f"discarding {self._step_path(c)} (newer than cut {cut})")
            self._remove_step(c)
            removed.append(c)
        return removed

    def _remove_step(self, cut: int) -> None:
        step = self._step_path(cut)
        # Marker first: a crash mid-removal leaves an uncommitted leftover, never
        # a marker over a half-deleted directory.
        with suppress(FileNotFoundError):
            self.fs.rm_file(posixpath.join(step, MARKER))
        with suppress(FileNotFoundError):
            self.fs.rm(step, recursive=True)
        log.info("checkpoint removed: %s", step)

    # -- reading ------------------------------------------------------------

    def latest(self) -> CommittedCheckpoint | None:
        """The newest committed checkpoint that verifies, None if there is none."""
        skipped: list[tuple[int, str]] = []
        for cut in reversed(self._cuts()):
            checkpoint, problem = self.verify(cut)
            if checkpoint is not None:
                if skipped:
                    log.warning("falling back to checkpoint %s", checkpoint.path)
                return replace(checkpoint, skipped=tuple(skipped))
            log.warning("checkpoint %s skipped: %s", self._step_path(cut), problem)
            skipped.append((cut, problem))
        return None

    def load_shard(self, cut: int, stage: int) -> dict[str, np.ndarray]:
        """Stage ``stage``'s state at committed cut ``cut``, checksum verified before parsing."""
        manifest, problem = self._read_manifest(cut)
        if manifest is None:
            raise CheckpointCorruptError(f"cannot load stage {stage} of {self._step_path(cut)}: {problem}")
        entry = manifest["shards"].get(str(stage))
        if entry is None:
            raise CheckpointError(
                f"{self._step_path(cut)} has no stage {stage} (it has {manifest['num_stages']} stages)"
            )
        path = posixpath.join(self._step_path(cut), entry["file"])
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            raise CheckpointCorruptError(f"{path} is missing") from None
        problem = shard_problem(stage, entry, size=len(data), digest=lambda: hashlib.sha256(data).hexdigest())
        if problem:
            raise CheckpointCorruptError(f"{path} does not match its manifest: {problem}")
        try:
            return decode_state(data, source=path)
        except ShardFormatError as err:
            raise CheckpointCorruptError(str(err)) from err

    def list(self) -> list[CheckpointInfo]:
        """Every step directory, oldest first, with whether it is usable and why not."""
        out = []
        for cut in self._cuts():
            checkpoint, problem = self.verify(cut)
            status = "committed" if checkpoint else (
                "uncommitted" if problem.startswith("not committed") else "corrupt")
            out.append(CheckpointInfo(cut=cut, path=self._step_path(cut), status=status, reason=problem))
        return out

    def _read_manifest(self, cut: int) -> tuple[dict[str, Any] | None, str | None]:
        """The manifest of a committed step (marker checked), or why there is none."""
        step = self._step_path(cut)
        try:
            marker_bytes = self.fs.cat_file(posixpath.join(step, MARKER))
        except (FileNotFoundError, NotADirectoryError):  # (a file where the step directory should be)
            return None, "not committed: no COMMITTED marker (the save was interrupted or is in progress)"
        try:
            marker = loads(marker_bytes, what=MARKER)
            manifest_bytes = self.fs.cat_file(posixpath.join(step, MANIFEST))
        except CheckpointCorruptError as err:
            return None, str(err)
        except FileNotFoundError:
            return None, f"committed but {MANIFEST} is missing"
        if hashlib.sha256(manifest_bytes).hexdigest() != marker.get("manifest_sha256"):
            return None, f"{MANIFEST} does not match the sha256 in its COMMITTED marker"
        try:
            manifest = loads(manifest_bytes, what=MANIFEST)
        except CheckpointCorruptError as err:
            return None, str(err)
        problem = manifest_problem(manifest, cut=cut)
        return (None, problem) if problem else (manifest, None)

    def verify(self, cut: int) -> tuple[CommittedCheckpoint | None, str | None]:
        manifest, problem = self._read_manifest(cut)
        if manifest is None:
            return None, problem
        step = self._step_path(cut)
        for s in range(manifest["num_stages"]):
            entry = manifest["shards"][str(s)]
            path = posixpath.join(step, entry["file"])
            problem = shard_problem(s, entry, size=self._size(path), digest=lambda: self._sha256(path))
            if problem:
                return None, problem
        return CommittedCheckpoint(
            cut=cut, generation=int(manifest.get("generation", -1)),
            num_stages=manifest["num_stages"], path=step, manifest=manifest,
        ), None

    # -- file system --------------------------------------------------------

    def _path(self, name: str) -> str:
        return posixpath.join(self.root, name)

    def _step_path(self, cut: int) -> str:
        return self._path(step_dir_name(cut))

    def cuts(self) -> list[int]:
        """The cuts that have a step directory, committed or not (nothing is read or verified)."""
        return self._cuts()

    def clear(self) -> None:
        """Remove every checkpoint and the generation record: a new run starts over here.

        Only what the store writes is removed, and nothing at all when the root
        holds anything else (``ForeignFilesError`` names it): the root may be a
        directory a user pointed ``checkpoint.dir`` at. The root itself stays.
        """
        foreign = self.foreign_entries()
        if foreign:
            raise ForeignFilesError(f"{self.root} holds files pipetrain did not write ({name_a_few(foreign)}); "
                                    f"it deletes only its own checkpoints, so it deleted nothing: move those "
                                    f"files, or use another checkpoint directory")
        for cut in self._cuts():
            self._remove_step(cut)
        for name, _ in self._entries(self.root):  # GENERATION and temporaries left by a crash
            self.fs.rm_file(self._path(name))

    def foreign_entries(self) -> list[str]:
        """What the root holds that the store did not write, as paths relative to
        the root (a directory with a trailing /); empty for an empty or missing root."""
        return foreign_entries(self._entries(self.root), lambda step: self._entries(self._path(step)))

    def _entries(self, path: str) -> list[tuple[str, bool]]:
        """(name, is a directory) of each entry of ``path``; none if it does not exist."""
        try:
            listing = self.fs.ls(path, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [(posixpath.basename(e["name"].rstrip("/")), e["type"] == "directory") for e in listing
                if e["name"].rstrip("/") != path.rstrip("/")]

    def _cuts(self) -> list[int]:
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        cuts = []
        for entry in entries:
            m = STEP_DIR.match(posixpath.basename(entry.rstrip("/")))
            if m:
                cuts.append(int(m.group(1)))
        return sorted(set(cuts))

    def _size(self, path: str) -> int | None:
        try:
            return int(self.fs.size(path))
        except FileNotFoundError:
            return None

    def _sha256(self, path: str) -> str:
        digest = hashlib.sha256()
        with self.fs.open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def _is_local(self) -> bool:
        from fsspec.implementations.local import LocalFileSystem

        return isinstance(self.fs, LocalFileSystem)

    def _makedirs(self, path: str) -> None:
        if self._is_local():
            created = not os.path.isdir(path)
            os.makedirs(path, exist_ok=True)
            if created:
                _fsync_dir(os.path.dirname(path))
        else:
            self.fs.makedirs(path, exist_ok=True)

    def _write_atomic(self, path: str, data: bytes, *, before_publish: Callable[[], None] | None = None) -> None:
        """Readers see the old file or the whole new one, never part of it."""
        if not self._is_local():
            # Object stores put a whole object atomically, and the memory file
            # system is in-process; a rename there is copy + delete, no safer.
            if before_publish:
                before_publish()
            self.fs.pipe_file(path, data)
            return
        directory, name = os.path.split(path)
        tmp = os.path.join(directory, temp_file_name(name, os.getpid(), uuid.uuid4().hex[:8]))
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if before_publish:
                before_publish()
            os.replace(tmp, path)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(directory)


def _fsync_dir(path: str) -> None:
    """Make a rename or a new entry in ``path`` durable (POSIX; a no-op elsewhere)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

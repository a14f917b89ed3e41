"""The checkpoint store on real local files and on fsspec's memory file system.

Torn and corrupt checkpoints are made by doing to the files what a crash or
bad storage would: stopping before the marker, truncating, flipping a bit,
swapping a shard, editing the manifest. Each must be skipped with a warning
that says why, and the previous committed checkpoint used instead.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import pathlib
import pickle
import posixpath
import uuid

import fsspec
import ml_dtypes
import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from pipetrain.checkpoint import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointStore,
    StaleGenerationError,
)
from pipetrain.checkpoint.manifest import ForeignFilesError

STAGES = 3
LOGGER = "pipetrain.checkpoint"


@pytest.fixture(params=["local", "memory"])
def url(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "ckpt")
        return
    root = f"memory://pipetrain-test-{uuid.uuid4().hex}/ckpt"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def stage_state(stage: int, cut: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 * cut + stage)
    return {
        "v0/w": rng.standard_normal((4, 3)).astype(np.float32),
        "v0/b": rng.standard_normal(3).astype(ml_dtypes.bfloat16),
        "opt/count": np.array(cut, dtype=np.int32),
        "meta/step": np.array(cut * 0.5, dtype=np.float64),
    }


def save(store: CheckpointStore, cut: int, *, generation: int = 1, stages: int = STAGES, **extra):
    records = [
        store.write_shard(cut, s, stage_state(s, cut), generation=generation, meta={"stage": s})
        for s in range(stages)
    ]
    return store.commit(cut, records=records, generation=generation, num_stages=stages, manifest=extra)


def step_file(store: CheckpointStore, cut: int, name: str) -> str:
    return posixpath.join(store.root, f"step-{cut:010d}", name)


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert value.dtype == b[name].dtype, name
        assert value.shape == b[name].shape, name
        assert value.tobytes() == b[name].tobytes(), name


def latest_with_warning(store, caplog, *, expect_cut, reason):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        checkpoint = store.latest()
    assert checkpoint is not None and checkpoint.cut == expect_cut
    warnings = " | ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert reason in warnings, warnings
    assert any(reason in why for _, why in checkpoint.skipped)
    return checkpoint


# -- round trip ---------------------------------------------------------------


def test_round_trip_dtypes_and_0d(url):
    store = CheckpointStore(url)
    state = {
        "f32": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
        "bf16": np.array([1.5, -2.0, np.inf, np.nan, 3.1415], dtype=ml_dtypes.bfloat16),
        "bf16_0d": np.array(0.25, dtype=ml_dtypes.bfloat16),
        "i32": np.arange(-5, 5, dtype=np.int32),
        "i32_0d": np.array(7, dtype=np.int32),
        "f32_0d": np.array(2.5, dtype=np.float32),
        "f8": np.array([0.5, -1.0], dtype=ml_dtypes.float8_e4m3fn),
        "bool": np.array([True, False]),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "strided": np.arange(20, dtype=np.float32).reshape(4, 5)[:, ::2],
    }
    record = store.write_shard(5, 0, state, generation=0, meta={"rng": [1, 2, 3]})
    store.commit(5, records=[record], generation=0, num_stages=1)
    loaded = store.load_shard(5, 0)
    assert_same(loaded, {k: np.ascontiguousarray(v) if v.ndim else v for k, v in state.items()})
    assert loaded["bf16_0d"].shape == () and loaded["bf16"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert record.tensors["bf16"] == {"dtype": "bfloat16", "shape": [5]}


def test_shard_record_matches_the_file(url):
    store = CheckpointStore(url)
    record = store.write_shard(3, 1, stage_state(1, 3), generation=2, meta={"versions": [0, 1]})
    data = store.fs.cat_file(step_file(store, 3, "stage-1.safetensors"))
    assert record.bytes == len(data)
    assert record.sha256 == hashlib.sha256(data).hexdigest()
    assert (record.cut, record.stage, record.generation) == (3, 1, 2)
    on_disk = json.loads(store.fs.cat_file(step_file(store, 3, "stage-1.json")))
    assert on_disk == record.to_dict()
    assert type(record).from_dict(on_disk) == record


def test_manifest_holds_cursor_generation_and_driver_fields(url):
    store = CheckpointStore(url, clock=lambda: 1234.5)
    save(store, 8, generation=3, schedule="1f1b", partition=[0, 2, 4], rng={"seed": 7, "key": [1, 2]})
    checkpoint = store.latest()
    m = checkpoint.manifest
    assert (checkpoint.cut, checkpoint.generation, checkpoint.num_stages) == (8, 3, STAGES)
    assert m["microbatch_cursor"] == 8 and m["created_at"] == 1234.5
    assert m["schedule"] == "1f1b" and m["partition"] == [0, 2, 4] and m["rng"]["seed"] == 7
    for s in range(STAGES):
        data = store.fs.cat_file(step_file(store, 8, f"stage-{s}.safetensors"))
        assert checkpoint.shard(s)["sha256"] == hashlib.sha256(data).hexdigest()
        assert_same(store.load_shard(8, s), stage_state(s, 8))


# -- commit marker, torn and corrupt checkpoints -------------------------------


class RecordingMemoryFS(MemoryFileSystem):
    """Memory file system that logs writes and can crash at a chosen file."""

    def __init__(self, *args, crash_at: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.writes: list[str] = []
        self.crash_at = crash_at

    def pipe_file(self, path, value, *args, **kwargs):
        if self.crash_at and posixpath.basename(path) == self.crash_at:
            raise OSError(f"injected crash before writing {path}")
        self.writes.append(posixpath.basename(path))
        return super().pipe_file(path, value, *args, **kwargs)


def test_commit_marker_is_written_last():
    fs = RecordingMemoryFS(skip_instance_cache=True)
    store = CheckpointStore(f"memory://marker-{uuid.uuid4().hex}", fs=fs)
    save(store, 4)
    assert fs.writes[-1] == "COMMITTED"
    assert fs.writes.index("manifest.json") == len(fs.writes) - 2
    assert {f"stage-{s}.safetensors" for s in range(STAGES)} <= set(fs.writes[:-2])
    fs.rm(store.root, recursive=True)


def test_crash_before_marker_keeps_previous(caplog):
    fs = RecordingMemoryFS(skip_instance_cache=True)
    store = CheckpointStore(f"memory://crash-{uuid.uuid4().hex}", fs=fs)
    save(store, 4)
    fs.crash_at = "COMMITTED"
    with pytest.raises(OSError, match="injected crash"):
        save(store, 8)
    assert fs.exists(step_file(store, 8, "manifest.json"))  # everything but the marker
    latest_with_warning(store, caplog, expect_cut=4, reason="no COMMITTED marker")
    fs.rm(store.root, recursive=True)


def test_crash_between_shard_writes_keeps_previous(url, caplog):
    store = CheckpointStore(url)
    save(store, 4)
    store.write_shard(8, 0, stage_state(0, 8), generation=1, meta={})  # stage 1, 2 and the marker never come
    latest_with_warning(store, caplog, expect_cut=4, reason="no COMMITTED marker")
    assert_same(store.load_shard(4, 0), stage_state(0, 4))


def test_commit_refuses_missing_stage_record(url):
    store = CheckpointStore(url)
    records = [store.write_shard(8, s, stage_state(s, 8), generation=1) for s in (0, 2)]
    with pytest.raises(CheckpointError, match=r"no shard record from stage\(s\) \[1\]"):
        store.commit(8, records=records, generation=1, num_stages=STAGES)
    assert store.latest() is None


def test_commit_refuses_shard_truncated_before_commit(url):
    store = CheckpointStore(url)
    records = [store.write_shard(8, s, stage_state(s, 8), generation=1) for s in range(STAGES)]
    path = step_file(store, 8, "stage-2.safetensors")
    store.fs.pipe_file(path, store.fs.cat_file(path)[:-4])
    with pytest.raises(CheckpointError, match="stage-2.safetensors"):
        store.commit(8, records=records, generation=1, num_stages=STAGES)
    assert not store.fs.exists(step_file(store, 8, "COMMITTED"))


def test_truncated_shard_is_never_loaded(url, caplog):
    store = CheckpointStore(url)
    save(store, 4)
    save(store, 8)
    path = step_file(store, 8, "stage-1.safetensors")
    store.fs.pipe_file(path, store.fs.cat_file(path)[:-10])
    latest_with_warning(store, caplog, expect_cut=4, reason="stage-1.safetensors of stage 1 has")
    assert "truncated" in caplog.text
    with pytest.raises(CheckpointCorruptError, match="stage-1.safetensors"):
        store.load_shard(8, 1)


def test_flipped_bit_is_never_loaded(url, caplog):
    store = CheckpointStore(url)
    save(store, 4)
    save(store, 8)
    path = step_file(store, 8, "stage-2.safetensors")
    data = bytearray(store.fs.cat_file(path))
    data[-3] ^= 0x10  # inside the tensor bytes: still parses, wrong numbers
    store.fs.pipe_file(path, bytes(data))
    latest_with_warning(store, caplog, expect_cut=4, reason="stage-2.safetensors of stage 2 has sha256")
    with pytest.raises(CheckpointCorruptError, match="does not match its manifest"):
        store.load_shard(8, 2)


def test_missing_marker_is_never_loaded(url, caplog):
    store = CheckpointStore(url)
    save(store, 4)
    save(store, 8)
    store.fs.rm_file(step_file(store, 8, "COMMITTED"))
    latest_with_warning(store, caplog, expect_cut=4, reason="no COMMITTED marker")
    with pytest.raises(CheckpointCorruptError, match="no COMMITTED marker"):
        store.load_shard(8, 0)


def test_shard_swapped_for_another_is_never_loaded(url, caplog):
    store = CheckpointStore(url)
    save(store, 4)
    save(store, 8)
    # Same size, valid safetensors, different content: a shard of the wrong cut.
    other = store.fs.cat_file(step_file(store, 4, "stage-0.safetensors"))
    store.fs.pipe_file(step_file(store, 8, "stage-0.safetensors"), other)
    latest_with_warning(store, caplog, expect_cut=4, reason="stage-0.safetensors of stage 0 has sha256")


def rewrite_manifest(store, cut, edit):
    """Edit the manifest and re-seal the marker, as a buggy or hostile writer could."""
    path = step_file(store, cut, "manifest.json")
    manifest = json.loads(store.fs.cat_file(path))
    edit(manifest)
    data = json.dumps(manifest).encode()
    store.fs.pipe_file(path, data)
    marker = json.loads(store.fs.cat_file(step_file(store, cut, "COMMITTED")))
    marker["manifest_sha256"] = hashlib.sha256(data).hexdigest()
    store.fs.pipe_file(step_file(store, cut, "COMMITTED"), json.dumps(marker).encode())


def test_manifest_missing_a_stage_is_never_loaded(url, caplog):
    store = CheckpointStore(url)
    save(store, 4)
    save(store, 8)
    rewrite_manifest(store, 8, lambda m: m["shards"].pop("2"))
    latest_with_warning(store, caplog, expect_cut=4, reason="manifest lacks stage 2 of 3")


def test_manifest_with_wrong_sha_is_never_loaded(url, caplog):
    store = CheckpointStore(url)
    save(store, 4)
    save(store, 8)
    rewrite_manifest(store, 8, lambda m: m["shards"]["1"].update(sha256="0" * 64))
    latest_with_warning(store, caplog, expect_cut=4, reason="stage-1.safetensors of stage 1 has sha256")


def test_manifest_edited_after_commit_is_never_loaded(url, caplog):
    store = CheckpointStore(url)
    save(store, 4)
    save(store, 8)
    path = step_file(store, 8, "manifest.json")
    store.fs.pipe_file(path, store.fs.cat_file(path).replace(b'"cut": 8', b'"cut": 9'))
    latest_with_warning(store, caplog, expect_cut=4, reason="does not match the sha256 in its COMMITTED marker")


def test_garbage_manifest_and_marker_are_never_loaded(url, caplog):
    store = CheckpointStore(url)
    save(store, 4)
    save(store, 8)
    save(store, 12)
    store.fs.pipe_file(step_file(store, 12, "COMMITTED"), b"\x00garbage")
    store.fs.rm_file(step_file(store, 8, "manifest.json"))
    checkpoint = latest_with_warning(store, caplog, expect_cut=4, reason="COMMITTED is not valid JSON")
    assert "manifest.json is missing" in caplog.text
    assert [c for c, _ in checkpoint.skipped] == [12, 8]


def test_no_usable_checkpoint_gives_none(url, caplog):
    store = CheckpointStore(url)
    assert store.latest() is None
    save(store, 4)
    store.fs.rm_file(step_file(store, 4, "stage-0.safetensors"))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.latest() is None
    assert "stage-0.safetensors of stage 0 is missing" in caplog.text


def test_list_reports_status_and_reason(url):
    store = CheckpointStore(url, keep=5)
    save(store, 4)
    save(store, 8)
    store.write_shard(12, 0, stage_state(0, 12), generation=1)
    path = step_file(store, 8, "stage-1.safetensors")
    store.fs.pipe_file(path, store.fs.cat_file(path)[:-1])
    info = {i.cut: i for i in store.list()}
    assert info[4].status == "committed" and info[4].reason is None
    assert info[8].status == "corrupt" and "stage-1.safetensors" in info[8].reason
    assert info[12].status == "uncommitted"


# -- pruning ------------------------------------------------------------------


def test_keeps_last_n_committed(url):
    store = CheckpointStore(url, keep=2)
    for cut in (2, 4, 6, 8, 10):
        save(store, cut)
    assert [i.cut for i in store.list()] == [8, 10]
    assert not store.fs.exists(posixpath.join(store.root, "step-0000000006"))
    assert_same(store.load_shard(8, 2), stage_state(2, 8))


def test_removes_older_uncommitted_but_not_newer(url):
    store = CheckpointStore(url, keep=3)
    save(store, 4)
    store.write_shard(6, 0, stage_state(0, 6), generation=1)  # torn save, older than the next commit
    store.write_shard(12, 1, stage_state(1, 12), generation=1)  # a save being written right now
    save(store, 8)
    cuts = {i.cut: i.status for i in store.list()}
    assert cuts == {4: "committed", 8: "committed", 12: "uncommitted"}
    assert store.fs.exists(step_file(store, 12, "stage-1.safetensors"))


def test_keep_must_be_positive():
    with pytest.raises(ValueError, match="keep"):
        CheckpointStore("memory://x", keep=0)


# -- generations --------------------------------------------------------------


def test_stale_generation_is_refused(url):
    store = CheckpointStore(url)
    store.begin_generation(1)
    old_records = [store.write_shard(8, s, stage_state(s, 8), generation=1) for s in range(STAGES)]
    store.begin_generation(2)  # recovery: the driver starts generation 2
    with pytest.raises(StaleGenerationError,
                       match="stage 1 writing its shard for cut 12 refused.*generation 1.*generation 2"):
        store.write_shard(12, 1, stage_state(1, 12), generation=1)
    with pytest.raises(StaleGenerationError, match="commit of cut 8 refused"):
        store.commit(8, records=old_records, generation=1, num_stages=STAGES)
    with pytest.raises(StaleGenerationError, match="stage 0 at cut 8 is from generation 1"):
        store.commit(8, records=old_records, generation=2, num_stages=STAGES)
    with pytest.raises(StaleGenerationError, match="cannot begin generation 1"):
        store.begin_generation(1)
    assert store.current_generation() == 2
    assert not store.fs.exists(step_file(store, 12, "stage-1.safetensors"))
    save(store, 8, generation=2)  # the new generation rewrites the cut and commits it
    assert store.latest().generation == 2


class BumpsGenerationWhenRead(dict):
    """A state whose serialisation takes long enough for a recovery to happen."""

    def __init__(self, state, store):
        super().__init__(state)
        self.store = store

    def items(self):
        self.store.begin_generation(2)
        return super().items()


def test_generation_bumped_during_write_is_refused_before_publish(url):
    store = CheckpointStore(url)
    store.begin_generation(1)
    state = BumpsGenerationWhenRead(stage_state(0, 8), store)
    with pytest.raises(StaleGenerationError, match="stage 0 writing its shard for cut 8"):
        store.write_shard(8, 0, state, generation=1)
    assert not store.fs.exists(step_file(store, 8, "stage-0.safetensors"))
    if store._is_local():  # no temp file left behind either
        assert os.listdir(os.path.dirname(step_file(store, 8, "x"))) == []


def test_committed_cut_is_not_overwritten(url):
    store = CheckpointStore(url)
    save(store, 4)
    with pytest.raises(CheckpointError, match="already committed"):
        store.write_shard(4, 0, stage_state(0, 99), generation=1)
    records = [store.write_shard(8, s, stage_state(s, 8), generation=1) for s in range(STAGES)]
    store.commit(8, records=records, generation=1, num_stages=STAGES)
    with pytest.raises(CheckpointError, match="already committed"):
        store.commit(8, records=records, generation=1, num_stages=STAGES)


# -- discarding what follows a rollback cut ------------------------------------


def flip_a_bit(store: CheckpointStore, cut: int, stage: int) -> None:
    path = step_file(store, cut, f"stage-{stage}.safetensors")
    data = bytearray(store.fs.cat_file(path))
    data[-3] ^= 0x10
    store.fs.pipe_file(path, bytes(data))


def test_discard_after_lets_a_corrupt_committed_cut_be_written_again(url):
    store = CheckpointStore(url)
    store.begin_generation(1)
    save(store, 4)
    save(store, 8)
    flip_a_bit(store, 8, 1)
    assert store.latest().cut == 4  # the rollback cut
    store.begin_generation(2)
    with pytest.raises(CheckpointError, match="already committed"):  # why the discard is needed
        store.write_shard(8, 0, stage_state(0, 8), generation=2)
    assert store.discard_after(4, generation=2) == [8]
    assert not store.fs.exists(posixpath.join(store.root, "step-0000000008"))
    save(store, 8, generation=2)  # the new generation writes and commits cut 8 again
    checkpoint = store.latest()
    assert (checkpoint.cut, checkpoint.generation, checkpoint.skipped) == (8, 2, ())
    for s in range(STAGES):
        assert_same(store.load_shard(8, s), stage_state(s, 8))


def test_discard_after_keeps_the_cut_and_older_ones(url):
    store = CheckpointStore(url, keep=5)
    for cut in (4, 8, 12):
        save(store, cut)
    store.write_shard(16, 0, stage_state(0, 16), generation=1)  # torn, newer still
    assert store.discard_after(8, generation=1) == [12, 16]
    assert [(i.cut, i.status) for i in store.list()] == [(4, "committed"), (8, "committed")]
    assert store.latest().cut == 8
    assert_same(store.load_shard(4, 2), stage_state(2, 4))
    assert store.discard_after(8, generation=1) == []  # nothing newer: a no-op
    assert store.discard_after(-1, generation=1) == [4, 8]  # no usable checkpoint: all go
    assert store.list() == [] and store.latest() is None


def test_clear_leaves_an_empty_store_a_new_run_can_start_in(url):
    store = CheckpointStore(url)
    store.begin_generation(2)
    save(store, 4, generation=2)
    store.write_shard(8, 0, stage_state(0, 8), generation=2)  # torn
    assert store.cuts() == [4, 8] and store.current_generation() == 2
    store.clear()
    assert store.cuts() == [] and store.current_generation() is None and store.latest() is None
    store.begin_generation(0)  # generation 0 again: no record of 2 is left
    save(store, 4, generation=0)
    assert store.latest().cut == 4
    store.clear()
    store.clear()  # clearing an empty store is a no-op


def test_clear_refuses_a_root_holding_anything_else_and_deletes_nothing(url):
    # A user's directory given as checkpoint.dir: clear() used to rm -r the root.
    store = CheckpointStore(url)
    store.begin_generation(1)
    save(store, 4)
    fs = store.fs
    extras = {"precious.txt": b"years of work", f"step-{4:010d}/notes.md": b"mine", "step-12/x": b"not a cut"}
    for name, data in extras.items():
        fs.makedirs(posixpath.dirname(posixpath.join(store.root, name)), exist_ok=True)
        fs.pipe_file(posixpath.join(store.root, name), data)
    with pytest.raises(ForeignFilesError) as refused:
        store.clear()
    message = str(refused.value)
    assert store.root in message and "precious.txt" in message and "step-0000000004/notes.md" in message
    assert "step-12/" in message and "deleted nothing" in message
    for name, data in extras.items():
        assert fs.cat_file(posixpath.join(store.root, name)) == data
    assert store.latest().cut == 4 and store.current_generation() == 1
    assert store.foreign_entries() == ["precious.txt", "step-0000000004/notes.md", "step-12/"]


def test_clear_removes_what_the_store_wrote_including_temporaries(url):
    store = CheckpointStore(url)
    store.begin_generation(1)
    save(store, 4)
    store.write_shard(8, 0, stage_state(0, 8), generation=1)  # torn
    # What a writer killed between its write and its rename leaves behind.
    store.fs.pipe_file(step_file(store, 8, ".stage-1.safetensors.tmp-4242-0123abcd"), b"partial")
    store.fs.pipe_file(posixpath.join(store.root, ".GENERATION.tmp-4242-89abcdef"), b"{")
    assert store.foreign_entries() == []
    store.clear()
    assert store.fs.ls(store.root, detail=False) == [] and store.current_generation() is None


def test_a_garbage_generation_record_names_the_file(url):
    store = CheckpointStore(url)
    store.begin_generation(1)
    path = posixpath.join(store.root, "GENERATION")
    for garbage in (b"\x00\xffgarbage", b'{"generation": true}', b"[1]"):
        store.fs.pipe_file(path, garbage)
        with pytest.raises(CheckpointCorruptError, match=f"{path} \\(the generation record\\)"):
            store.current_generation()


def test_discard_after_is_refused_from_a_stale_generation(url):
    store = CheckpointStore(url)
    store.begin_generation(1)
    save(store, 4)
    save(store, 8)
    store.begin_generation(3)
    with pytest.raises(StaleGenerationError,
                       match="discarding .*step-0000000008.* refused.*generation 2.*generation 3"):
        store.discard_after(4, generation=2)
    assert [i.cut for i in store.list()] == [4, 8]


class CrashesInRmtree:
    """A file system that dies after deleting a file and before a recursive delete."""

    def rm(self, path, recursive=False, **kwargs):
        if recursive:
            raise OSError(f"injected crash before removing {path}")
        return super().rm(path, recursive=recursive, **kwargs)


class CrashingLocalFS(CrashesInRmtree, LocalFileSystem):
    pass


class CrashingMemoryFS(CrashesInRmtree, MemoryFileSystem):
    pass


def test_crash_inside_discard_after_leaves_an_uncommitted_leftover(url, caplog):
    crashing = (CrashingMemoryFS if url.startswith("memory://") else CrashingLocalFS)(skip_instance_cache=True)
    store = CheckpointStore(url)
    save(store, 4)
    save(store, 8)
    flip_a_bit(store, 8, 0)
    with pytest.raises(OSError, match="injected crash"):
        CheckpointStore(url, fs=crashing).discard_after(4, generation=1)
    # The marker went first: cut 8 is now a plain uncommitted leftover.
    assert store.fs.exists(step_file(store, 8, "manifest.json"))
    assert not store.fs.exists(step_file(store, 8, "COMMITTED"))
    assert [(i.cut, i.status) for i in store.list()] == [(4, "committed"), (8, "uncommitted")]
    latest_with_warning(store, caplog, expect_cut=4, reason="no COMMITTED marker")
    # The rerun (or the next generation's writes) can go on from here.
    save(store, 8)
    assert store.latest().cut == 8


def test_bad_inputs_have_clear_errors(url):
    store = CheckpointStore(url)
    with pytest.raises(CheckpointError, match="'z'.*complex64"):
        store.write_shard(1, 0, {"z": np.zeros(2, np.complex64)}, generation=0)
    record = store.write_shard(1, 0, {"w": np.zeros(2, np.float32)}, generation=0)
    with pytest.raises(CheckpointError, match="reserved"):
        store.commit(1, records=[record], generation=0, num_stages=1, manifest={"cut": 3})
    with pytest.raises(CheckpointError, match="manifest of cut 1 is not plain JSON"):
        store.commit(1, records=[record], generation=0, num_stages=1, manifest={"rng": np.zeros(2)})


# -- several processes, one root ----------------------------------------------


def write_stage_shards(root: str, stage: int, cuts: list[int], out) -> None:
    store = CheckpointStore(root)
    for cut in cuts:
        out.put(store.write_shard(cut, stage, stage_state(stage, cut), generation=1).to_dict())


def test_concurrent_writers_from_processes(tmp_path):
    from pipetrain.checkpoint import ShardRecord

    root = str(tmp_path / "ckpt")
    store = CheckpointStore(root, keep=2)
    store.begin_generation(1)
    cuts = [4, 8, 12, 16, 20]
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=write_stage_shards, args=(root, s, cuts, out)) for s in range(STAGES)]
    for p in procs:
        p.start()
    # The driver commits each cut as soon as every stage reported it, while the
    # stages are already writing later cuts (which pruning must leave alone).
    pending: dict[int, list] = {c: [] for c in cuts}
    for _ in range(STAGES * len(cuts)):
        record = ShardRecord.from_dict(out.get(timeout=60))
        pending[record.cut].append(record)
        if len(pending[record.cut]) == STAGES:
            store.commit(record.cut, records=pending[record.cut], generation=1, num_stages=STAGES)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert [(i.cut, i.status) for i in store.list()] == [(16, "committed"), (20, "committed")]
    assert store.latest().cut == 20
    for s in range(STAGES):
        assert_same(store.load_shard(20, s), stage_state(s, 20))
    leftovers = [p for p in pathlib.Path(root).rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


# -- no code runs on load -----------------------------------------------------


class RunsCodeWhenUnpickled:
    def __init__(self, sentinel: str):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.mkdir, (self.sentinel,))


def test_pickle_payload_is_never_unpickled(url, tmp_path):
    sentinel = tmp_path / "pwned"
    payload = pickle.dumps({"w": RunsCodeWhenUnpickled(str(sentinel))})
    store = CheckpointStore(url)
    save(store, 4, stages=1)
    # A hostile shard that checks out: the manifest and marker are re-sealed for it.
    store.fs.pipe_file(step_file(store, 4, "stage-0.safetensors"), payload)
    rewrite_manifest(store, 4, lambda m: m["shards"]["0"].update(
        bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest()))
    assert store.latest().cut == 4  # checksums match: only parsing stands in the way
    with pytest.raises(CheckpointCorruptError, match="stage-0.safetensors"):
        store.load_shard(4, 0)
    # Pickles in the JSON files are just invalid JSON.
    store.fs.pipe_file(step_file(store, 4, "COMMITTED"), payload)
    assert store.latest() is None
    assert not sentinel.exists()


def test_checkpoint_code_has_no_pickle_path():
    """No module of the package can deserialize objects: no such import, no such call."""
    import ast

    package = pathlib.Path(__file__).resolve().parents[1] / "pipetrain" / "checkpoint"
    unsafe_modules = {"pickle", "_pickle", "cloudpickle", "dill", "marshal", "shelve", "joblib", "yaml", "torch"}
    unsafe_calls = {"eval", "exec", "load", "loads"}  # np.load, pickle.load(s), torch.load
    for path in sorted(package.glob("*.py")):
        tree = ast.parse(path.read_text())
        # Bare loaders allowed: safetensors' (parses bytes, no code) and our JSON wrapper.
        safe_bare = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not {n.split(".")[0] for n in names} & unsafe_modules, (path.name, names)
                if isinstance(node, ast.ImportFrom) and node.module in (
                    "safetensors.numpy", "pipetrain.checkpoint.manifest"):
                    safe_bare |= {a.name for a in node.names}
            if isinstance(node, ast.Call):
                f = node.func
                if isinstance(f, ast.Attribute):
                    ok = f.attr not in unsafe_calls or getattr(f.value, "id", "") == "json"
                else:
                    ok = getattr(f, "id", "") not in unsafe_calls or f.id in safe_bare
                assert ok, (path.name, ast.unparse(node))
                assert not any(k.arg == "allow_pickle" for k in node.keywords), path.name

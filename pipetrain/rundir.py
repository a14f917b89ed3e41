"""The run directory: its layout, and whether a new run may start in it.

    RUN_DIR/
      job.json        the resolved config, the job id and the config file it came from
      metrics.jsonl   one JSON record per line: start, step, checkpoint, recovery, resume, end
      summary.json    written once the job has trained all its steps
      driver.log      a detached job's driver (`pipetrain submit`): its progress lines and notes
      events/         stage-N.npy: each stage's timeline
      tensorboard/    events.out.tfevents.*: TensorBoard event files, with [observe] tensorboard = true
      checkpoints/    the checkpoint store, unless checkpoint.dir points elsewhere
      trace.json gantt.png loss.png throughput.png    written by `pipetrain trace` and `report`

pipetrain deletes only what it can show it wrote: the checkpoint store's own
files (``CheckpointStore.clear``) and, in a directory whose job.json is a
pipetrain job record, the files named above. A directory holding anything
else is refused before any work, with the entries it holds.

job.json is the ownership marker: pipetrain writes it (atomically) before
anything else in a directory it has just found empty or its own, and it is
in every run directory pipetrain has made. A separate marker file would prove
no more (that pipetrain once created the directory, not that each entry in
it is pipetrain's, which is checked entry by entry anyway) and would be
missing from the run directories made before it.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from pipetrain.checkpoint.manifest import name_a_few
from pipetrain.config import ConfigError, JobConfig
from pipetrain.observe.records import EndRecord, StartRecord, read_records

JOB_FILE = "job.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
DRIVER_LOG = "driver.log"
EVENTS_DIR = "events"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINTS_DIR = "checkpoints"
TRACE_FILE, GANTT_PLOT = "trace.json", "gantt.png"  # written by `pipetrain trace`
LOSS_PLOT, THROUGHPUT_PLOT = "loss.png", "throughput.png"  # written by `pipetrain report`
OUTPUT_FILES = (TRACE_FILE, GANTT_PLOT, LOSS_PLOT, THROUGHPUT_PLOT)
RUN_FILES = (JOB_FILE, METRICS_FILE, SUMMARY_FILE, DRIVER_LOG, *OUTPUT_FILES)
_EVENT_FILE = re.compile(r"^stage-\d+\.npy$")
_TENSORBOARD_FILE = re.compile(r"^events\.out\.tfevents\.\d+\.[^/]+$")  # tensorboardX's: TIME.HOST[SUFFIX]
_RUN_DIRS = {EVENTS_DIR: _EVENT_FILE, TENSORBOARD_DIR: _TENSORBOARD_FILE}  # what each may hold
_JOB_TEMP = re.compile(r"^\.job\.json\.tmp-\d+$")  # write_job's, left by a crash mid-write


def event_file_name(stage: int) -> str:
    return f"stage-{stage}.npy"


# -- before any work ----------------------------------------------------------

def check_locations(cfg: JobConfig) -> None:
    """The run directory and the checkpoint location exist as writable directories or
    can be created: checked right after the config is read, naming the field and the path."""
    run_dir = Path(cfg.run_dir)
    _check_creatable(run_dir, "run_dir")
    if not cfg.checkpoint.dir:
        _check_creatable(run_dir / CHECKPOINTS_DIR, "run_dir")
        return
    root = _local_root(cfg.checkpoint.dir)
    if root is None:  # an object store or other fsspec URL: nothing to create ahead
        return
    if root.resolve() == run_dir.resolve():
        raise ConfigError(f"checkpoint.dir: {cfg.checkpoint.dir} is the run directory itself; use a directory "
                          f"of its own (the default is RUN_DIR/{CHECKPOINTS_DIR})")
    _check_creatable(root, "checkpoint.dir")


def _check_creatable(path: Path, field: str) -> None:
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"cannot be created: {existing} is a file"
        raise ConfigError(f"{field}: {path} {where}, not a directory")
    try:  # what creating the directory or writing into it needs, undone at once
        os.rmdir(tempfile.mkdtemp(prefix=".pipetrain-probe-", dir=existing))
    except OSError as e:
        verb = "write into" if existing == path else "create"
        raise ConfigError(f"{field}: cannot {verb} {path}: {e.strerror} (in {existing})") from None


def _local_root(url: str) -> Path | None:
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ValueError, ImportError) as e:
        raise ConfigError(f"checkpoint.dir: {url}: {e}") from None
    return Path(root) if isinstance(fs, LocalFileSystem) else None


def prepare_new_run(cfg: JobConfig, *, config_path: str, overwrite: bool) -> None:
    """Make ``cfg.run_dir`` ready for a new job, or refuse (ConfigError) before touching anything.

    Refused: a directory holding anything pipetrain cannot show it wrote, and,
    unless ``overwrite``, one holding an earlier run's checkpoints (resume it
    instead). Replaced without asking: an earlier run that left no checkpoint.
    """
    run_dir = Path(cfg.run_dir)
    stores = _stores(cfg)
    job, problem = read_job(run_dir)
    _refuse_foreign(run_dir, stores, job_problem=problem)
    for store in stores:
        cuts = store.cuts()
        if cuts and not overwrite:  # claim_checkpoints' rule, told in terms of the run directory
            raise ConfigError(_earlier_run(cfg, store, cuts, job, problem, config_path))
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for leftover in run_dir.glob(".job.json.tmp-*"):
        leftover.unlink()
    for name in _RUN_DIRS:
        directory = run_dir / name
        if directory.is_dir():
            for f in directory.iterdir():  # each a file of its kind: _refuse_foreign checked
                f.unlink()
            directory.rmdir()
    for store in stores:
        store.clear()


def claim_checkpoints(store: Any) -> None:
    """Let a new run start in checkpoint store ``store`` (``pipetrain.fit``'s driver asks
    here), or refuse: the one rule for whether a checkpoint directory is in use. One
    holding another run's step directories is, whatever they hold: the new run's
    first checkpoint would collide with them after the work up to it was done. One
    holding at most the generation record of a run that never checkpointed is not,
    and is emptied (``clear`` deletes only what the store wrote)."""
    from pipetrain.errors import CheckpointDirInUse

    cuts = store.cuts()
    if cuts:
        raise CheckpointDirInUse(
            f"{store.root} already belongs to a run (generation {store.current_generation()}, checkpoints up to "
            f"micro-batch {cuts[-1]}): continue it with resume=True (`pipetrain resume RUN_DIR`), or start this "
            f"one in an empty directory (`pipetrain train CONFIG --overwrite` empties the run directory first)")
    store.clear()


def _stores(cfg: JobConfig) -> list[Any]:
    """The configured checkpoint store, and RUN_DIR/checkpoints if an earlier run used that one."""
    from pipetrain.checkpoint.store import CheckpointStore

    stores = [CheckpointStore(cfg.checkpoint_url())]
    default = Path(cfg.run_dir) / CHECKPOINTS_DIR
    if cfg.checkpoint.dir and default.is_dir() and _root_path(stores[0]) != default.resolve():
        stores.append(CheckpointStore(str(default)))
    return stores


def _root_path(store: Any) -> Path | None:
    from fsspec.implementations.local import LocalFileSystem

    return Path(store.root).resolve() if isinstance(store.fs, LocalFileSystem) else None


def _refuse_foreign(run_dir: Path, stores: list[Any], *, job_problem: str | None) -> None:
    roots = {root: s for s in stores if (root := _root_path(s)) is not None}
    unknown, unproven = [], []

    def walk(directory: Path, prefix: str) -> None:
        for entry in sorted(directory.iterdir()):
            name, resolved = prefix + entry.name, entry.resolve()
            if resolved in roots:
                unknown.extend(f"{name}/{inner}" for inner in roots[resolved].foreign_entries())
            elif entry.is_dir() and not entry.is_symlink() and any(resolved in r.parents for r in roots):
                walk(entry, name + "/")  # on the way to a checkpoint.dir deeper inside the run directory
            elif prefix or not _is_run_entry(entry):
                unknown.append(name + "/" * entry.is_dir())
            elif job_problem:
                unproven.append(name + "/" * entry.is_dir())
            elif entry.name in _RUN_DIRS:
                unknown.extend(f"{name}/{e.name}" for e in sorted(entry.iterdir())
                               if e.is_symlink() or not e.is_file() or not _RUN_DIRS[entry.name].match(e.name))

    if run_dir.is_dir():
        walk(run_dir, "")
    if unknown:
        raise ConfigError(f"run_dir: {run_dir} holds files pipetrain did not write ({name_a_few(unknown)}); it "
                          f"deletes only its own files and starts no run among others: move them, or set run_dir "
                          f"to a new or empty directory")
    if unproven:
        raise ConfigError(f"run_dir: {run_dir} holds {name_a_few(unproven)} but {job_problem}, so pipetrain cannot "
                          f"tell they are its own and deletes nothing: move them, or set run_dir to a new or empty "
                          f"directory")
    for store in stores:
        if _root_path(store) is None or run_dir.resolve() not in _root_path(store).parents:
            foreign = store.foreign_entries()
            if foreign:
                raise ConfigError(f"checkpoint.dir: {store.url} holds files pipetrain did not write "
                                  f"({name_a_few(foreign)}); it deletes only its own checkpoints and starts no "
                                  f"run among other files: move them, or set checkpoint.dir to a new or empty "
                                  f"directory")


def _is_run_entry(entry: Path) -> bool:
    if entry.is_symlink():
        return False
    if entry.name in _RUN_DIRS:
        return entry.is_dir()
    return (entry.name in RUN_FILES or bool(_JOB_TEMP.match(entry.name))) and entry.is_file()


def _earlier_run(cfg: JobConfig, store: Any, cuts: list[int], job: dict | None, problem: str | None,
                 config_path: str) -> str:
    run_dir = Path(cfg.run_dir)
    inside = _root_path(store) is not None and run_dir.resolve() in _root_path(store).parents
    where = str(run_dir) if inside else f"checkpoint.dir {store.url}"
    if job:
        about = f"job {job['job_id']}, from {job.get('source') or 'a config whose file is not recorded'}"
        done = completed_steps(run_dir)
        resume = (f"it trained all its {done} steps: `pipetrain resume {run_dir} --steps N` trains it further"
                  if done else f"`pipetrain resume {run_dir}` continues it")
    else:
        about, resume = f"its job is unknown: {run_dir / JOB_FILE} {problem.removeprefix(JOB_FILE + ' ')}", None
    options = [resume, f"`pipetrain train {config_path} --overwrite` deletes it and starts over",
               f"or set {'run_dir' if inside else 'checkpoint.dir'} to another directory"]
    return (f"{where} holds the checkpoints of an earlier run ({about}; checkpoints up to micro-batch {cuts[-1]}): "
            + "; ".join(o for o in options if o))


# -- the job record and the run's state ----------------------------------------

def read_job(run_dir: str | Path) -> tuple[dict | None, str | None]:
    """RUN_DIR/job.json as pipetrain wrote it, or (None, why it is not that: missing, unreadable, ...)."""
    path = Path(run_dir) / JOB_FILE
    if not path.exists():
        return None, f"{JOB_FILE} is missing"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return None, f"{JOB_FILE} is unreadable ({e})"
    if not isinstance(record, dict) or not isinstance(record.get("job_id"), str) \
            or not isinstance(record.get("config"), dict):
        return None, f"{JOB_FILE} is not a pipetrain job record (no job_id and config)"
    return record, None


def load_job(run_dir: str | Path) -> dict:
    """The job record of an existing run directory (for resume); ConfigError saying what is wrong."""
    path = Path(run_dir)
    if not path.exists():
        raise ConfigError(f"{run_dir}: no such run directory")
    if not path.is_dir():
        raise ConfigError(f"{run_dir}: is a file, not a run directory")
    job, problem = read_job(path)
    if job is None:
        raise ConfigError(f"{path / JOB_FILE}: {problem.removeprefix(JOB_FILE + ' ')}; is {run_dir} the run "
                          f"directory of a pipetrain job?")
    return job


def write_job(run_dir: str | Path, record: dict) -> None:
    """Write RUN_DIR/job.json atomically: a crash leaves the old record or the new one, never a torn file
    (which would no longer prove the directory is pipetrain's)."""
    path = Path(run_dir) / JOB_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{JOB_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


def write_summary(run_dir: str | Path, summary: dict) -> None:
    (Path(run_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))


def forget_summary(run_dir: str | Path) -> None:
    """A run trained further is not complete until it writes its summary again."""
    (Path(run_dir) / SUMMARY_FILE).unlink(missing_ok=True)


def completed_steps(run_dir: str | Path) -> int | None:
    """How many steps a run that reached its end trained (None: it never did): summary.json's
    steps, else those of the metrics log's last "end" record (a killed run has neither)."""
    run = Path(run_dir)
    try:
        steps = json.loads((run / SUMMARY_FILE).read_text()).get("steps")
        if isinstance(steps, int):
            return steps
    except (OSError, ValueError, AttributeError):
        pass
    try:
        records = read_records(run / METRICS_FILE, skip_malformed=True)  # a torn line leaves the rest telling
    except (OSError, ValueError):  # unreadable, or not text
        return None
    started = done = None
    for record in records:
        if isinstance(record, StartRecord):
            started = record.steps
        elif isinstance(record, EndRecord):
            done = started if record.steps is None else record.steps
    return done if isinstance(done, int) else None

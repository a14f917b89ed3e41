"""Detached jobs: `pipetrain submit` hands the driver itself to the cluster.

`pipetrain train` runs the driver in the user's process: when that goes, so
does the job. `pipetrain submit CONFIG --scheduler ADDR` prepares the run
directory exactly as `train` does (``job.prepare_run``: the same refusals, the
same job.json), submits the driver as a Dask task (``detached_driver.drive``)
and returns. `pipetrain status`, `logs` and `cancel` find the job again by its
id (scheduler metadata ["pipetrain", "jobs", JOB_ID] holds its run directory
and task) or by its run directory.

**Surviving the client.** The task is ``fire_and_forget``: the scheduler
itself wants it done, so closing the submitting client (and its process)
releases nothing, and once the task ends the scheduler forgets it; what it did
is in the run directory. A published dataset or a named Variable would keep
the task alive too, but would also keep its result, and a kept result whose
worker later dies is recomputed: a finished job's driver would run again.

**Surviving the driver's worker.** A task whose worker dies is started again
elsewhere by the scheduler (up to ``distributed.scheduler.allowed-failures``
times, 3 by default), and a retryable failure is retried (``retries=``).
Every attempt is the same code, which resumes from the last committed
checkpoint when an earlier attempt ran (``detached_driver``); so a detached job
must write checkpoints, and submit refuses one that writes none.

**Where the driver runs.** A worker started with ``--resources
pipetrain-driver=1`` is a driver worker (N instead of 1 for N drivers at once:
the task secedes, so its thread is free, but it holds the resource while it
runs). When the cluster has one, the task asks for the resource, so it runs
only there, and after a driver worker dies it waits for one (a nanny brings
it back). No stage is placed on a driver worker, nor on whichever worker a
driver runs on: the detached driver's placement excludes both. Without a
driver worker the task runs where Dask puts it and placement leaves that worker
out, which costs the job a worker; and if that worker dies, the new attempt
may land on a worker whose only thread an orphaned stage of the dead driver
still holds for a moment (Dask forgot that stage's task, not its thread; the
stage notices within a second and stops, ``StageControl._task_released``).
A driver worker avoids both: it is the set-up docs/cluster.md recommends.

**Cancel** sets ["pipetrain", "jobs", JOB_ID, "cancel"]. The driver polls it
and ends as Ctrl-C ends `pipetrain train`: every stage stopped through its
generation's stop flag, the run resumable. cancel waits for the driver task to
end, cancels it (so no restart of it begins), raises the stop flag of the
store's current generation itself (for a driver that was not there to do it),
and waits until no worker runs a task of the job.
"""
from __future__ import annotations

import os
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipetrain import config as cfgmod
from pipetrain import job, rundir
from pipetrain.config import ConfigError
from pipetrain.detached_driver import DRIVER_RESOURCE, cancel_key, job_key
from pipetrain.driver_log import FINAL_STATES, SUBMITTED, DriverLog, attempts, last_state
from pipetrain.errors import PipetrainError, short_error

DRIVER_RETRIES = 3  # retryable failures; a dead worker is the scheduler's allowed-failures
ACTIVE = ("released", "waiting", "queued", "no-worker", "processing")  # the scheduler's states of a live task


class DetachedJobError(PipetrainError):
    """A detached job cannot be submitted, found or cancelled; the message says why."""


@dataclass(frozen=True)
class Submitted:
    job_id: str
    run_dir: str
    scheduler: str
    on_driver_worker: bool  # the cluster has a worker declaring pipetrain-driver
    task_state: str | None
    worker: str | None
    workers: int  # the cluster's, at submission
    stages: int
    started: bool  # the driver said so within a few seconds


def describe(s: Submitted, at: str) -> str:
    """What `pipetrain submit` prints: the job, where its driver went, how to follow it."""
    if s.started:
        where = f"started on worker {s.worker}"
    elif s.worker:  # assigned, but not yet running: a busy thread, or another driver holds the resource
        where = f"assigned to worker {s.worker}, not started yet"
    else:
        where = f"its task is {s.task_state}, waiting for a worker"
    if s.on_driver_worker:
        where += f" (a driver worker: it declares {DRIVER_RESOURCE})"
    else:
        where += (f"; no worker declares {DRIVER_RESOURCE}, so the stages are placed on the others "
                  f"(docs/cluster.md: a driver worker)")
        if s.workers <= s.stages:
            where += (f"; the cluster has {s.workers} workers for {s.stages} stages and this driver, so the "
                      f"placement waits for more")
    rows = [("run directory", s.run_dir), ("driver", where), ("status", f"pipetrain status {s.job_id} {at}"),
            ("follow", f"pipetrain logs {s.run_dir} -f"), ("cancel", f"pipetrain cancel {s.job_id} {at}")]
    width = max(len(k) for k, _ in rows)
    return f"job {s.job_id} submitted to {s.scheduler}; it runs on without this process\n" + "\n".join(
        f"  {k:<{width}}  {v}" for k, v in rows)


def connect(scheduler: str | None, scheduler_file: str | None, *, timeout: float = 10.0) -> Any:
    from distributed import Client

    try:
        return Client(scheduler, scheduler_file=scheduler_file, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError) as e:
        raise DetachedJobError(f"cannot reach {scheduler or f'the scheduler of {scheduler_file}'}: {e}") from None


# -- submit ---------------------------------------------------------------------

def submit(config_path: str, *, scheduler: str | None = None, scheduler_file: str | None = None,
           overrides: dict | None = None, overwrite: bool = False) -> Submitted:
    cfg = cfgmod.load(config_path, overrides)
    if not cfg.checkpoint.enabled:
        raise ConfigError(f"{config_path}: checkpoint.every and checkpoint.seconds are 0, but a detached job's "
                          f"driver resumes from checkpoints when it restarts: set one (--set checkpoint.every=64)")
    # The driver runs elsewhere, in another working directory: job.json records absolute paths.
    overrides = {**(overrides or {}), **_absolute_locations(cfg)}
    client = connect(scheduler, scheduler_file)
    try:
        _refuse_if_running(client, cfg.run_dir)
        cfg, job_id = job.prepare_run(config_path, overrides=overrides, overwrite=overwrite)
        _check_workers_share(client, cfg.run_dir, job_id)
        DriverLog(cfg.run_dir).state(SUBMITTED, f"job {job_id} to {client.scheduler.address} from "
                                                f"{socket.gethostname()}")
        return _submit_driver(client, job_id, cfg.run_dir, stages=cfg.partition.stages)
    finally:
        client.close()


def resubmit(run_dir: str, *, scheduler: str | None = None, scheduler_file: str | None = None) -> Submitted:
    """`pipetrain submit --resume RUN_DIR`: a new driver task for a stopped run, which resumes it."""
    record = rundir.load_job(run_dir)
    run_dir, job_id = str(Path(run_dir).resolve()), record["job_id"]
    done, steps = rundir.completed_steps(run_dir), job.recorded_config(run_dir).schedule.steps
    if done is not None and done >= steps:
        raise DetachedJobError(f"{run_dir} is complete: it trained all {done} steps")
    client = connect(scheduler, scheduler_file)
    try:
        _refuse_if_running(client, run_dir)
        _check_workers_share(client, run_dir, job_id)
        DriverLog(run_dir).state(SUBMITTED, f"job {job_id} again, to resume, to {client.scheduler.address}")
        return _submit_driver(client, job_id, run_dir, stages=job.recorded_config(run_dir).partition.stages)
    finally:
        client.close()


def _absolute_locations(cfg: Any) -> dict:
    where = {"run_dir": str(Path(cfg.run_dir).resolve())}
    if cfg.checkpoint.dir and "://" not in cfg.checkpoint.dir:
        where["checkpoint.dir"] = str(Path(cfg.checkpoint.dir).resolve())
    return where


def _submit_driver(client: Any, job_id: str, run_dir: str, *, stages: int) -> Submitted:
    from distributed import fire_and_forget

    from pipetrain.detached_driver import drive

    workers = client.sync(client.scheduler.identity, n_workers=-1)["workers"]  # not the client's cache
    on_driver_worker = any((w.get("resources") or {}).get(DRIVER_RESOURCE, 0) > 0 for w in workers.values())
    key = f"pipetrain-{job_id}-driver-{uuid.uuid4().hex[:6]}"  # a fresh key each submission
    # A new record: it also withdraws the cancel request of an earlier submission.
    client.set_metadata(job_key(job_id), {"run_dir": run_dir, "task": key, "submitted": time.time()})
    before = attempts(run_dir)
    future = client.submit(drive, run_dir, job_id, key=key, pure=False, retries=DRIVER_RETRIES,
                           resources={DRIVER_RESOURCE: 1} if on_driver_worker else None)
    fire_and_forget(future)
    # A while for the driver to say it started (and, at least, for the scheduler to have the
    # task: a client closed straight after submitting may not have sent it yet).
    started = _wait(lambda: attempts(run_dir) > before, timeout=10.0)
    state, worker = task_state(client, key)
    return Submitted(job_id, run_dir, client.scheduler.address, on_driver_worker, state, worker,
                     workers=len(workers), stages=stages, started=started)


def _refuse_if_running(client: Any, run_dir: str) -> None:
    record, _ = rundir.read_job(run_dir)
    if record is None:
        return
    state = task_state(client, job_record(client, record["job_id"]).get("task"))[0]
    if state in ACTIVE:
        raise DetachedJobError(f"job {record['job_id']} is still running in {run_dir} (its driver task is "
                               f"{state}): `pipetrain cancel {record['job_id']}` it first")


def _check_workers_share(client: Any, run_dir: str, job_id: str) -> None:
    answers = client.run(_sees_job, run_dir, job_id, on_error="return")
    problems = [f"worker {w}: {a if isinstance(a, str) else short_error(a)}" for w, a in answers.items() if a]
    if problems:
        raise DetachedJobError(f"{run_dir}: the driver and the stages run on the workers, which must all read and "
                               f"write the run directory at this path (a shared file system): " + "; ".join(problems))


def _sees_job(run_dir: str, job_id: str) -> str | None:
    """On a worker: None if it reads this job's job.json and can write beside it."""
    record, problem = rundir.read_job(run_dir)
    if record is None:
        return f"{run_dir}: {problem} there"
    if record["job_id"] != job_id:
        return f"{run_dir}: its job.json there is job {record['job_id']}'s, not {job_id}'s"
    try:
        fd, probe = tempfile.mkstemp(prefix=".pipetrain-probe-", dir=run_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"cannot write into {run_dir}: {e.strerror}"
    return None


# -- finding a job, and its task ------------------------------------------------------

def job_record(client: Any, job_id: str) -> dict:
    """What submit recorded on the scheduler: run_dir, task; {} if it holds nothing."""
    entry = client.get_metadata(job_key(job_id), default=None)
    return entry if isinstance(entry, dict) else {}


def find_job(target: str, client: Any | None) -> tuple[str, str]:
    """(run directory, job id) of ``target``: a run directory, or a job id the scheduler knows."""
    if Path(target).is_dir():
        return str(target), rundir.load_job(target)["job_id"]
    if client is None:
        raise DetachedJobError(f"{target}: no such run directory (a job id needs --scheduler or --scheduler-file)")
    run_dir = job_record(client, target).get("run_dir")
    if not run_dir:
        raise DetachedJobError(f"job {target} is not known to the scheduler at {client.scheduler.address} (a "
                               f"scheduler forgets its jobs when it restarts): name its run directory instead")
    return run_dir, target


def task_state(client: Any, key: str | None) -> tuple[str | None, str | None]:
    """The scheduler's state of task ``key`` (None: it has none) and, while processing, its worker."""
    if key is None:
        return None, None
    state = client.sync(client.scheduler.get_task_status, keys=[key]).get(key)
    worker = None
    if state == "processing":
        worker = next((w for w, keys in client.processing().items() if key in keys), None)
    return state, worker


def running_tasks(client: Any, job_id: str) -> dict[str, list[str]]:
    """Per worker, the tasks of the job whose threads still run there, those Dask forgot included."""
    answers = client.run(_running_here, f"pipetrain-{job_id}-", on_error="return")
    return {w: keys for w, keys in answers.items() if isinstance(keys, list) and keys}


def _running_here(prefix: str, dask_worker: Any = None) -> list[str]:
    # "cancelled" is a task Dask released whose thread has not returned yet
    return sorted(str(key) for key, ts in dask_worker.state.tasks.items()
                  if str(key).startswith(prefix) and ts.state in ("executing", "long-running", "cancelled"))


# -- cancel ---------------------------------------------------------------------

def cancel(client: Any, run_dir: str, job_id: str, *, say: Callable[[str], None] = print,
           timeout: float = 60.0) -> bool:
    """Stop the job's driver and stages; True when nothing of it runs any more."""
    from distributed import Future

    key = job_record(client, job_id).get("task")
    state = last_state(run_dir)
    if task_state(client, key)[0] not in ACTIVE and state and state[0] in FINAL_STATES:
        say(f"job {job_id} is not running: its driver {state[0]}")
        return True
    client.set_metadata(cancel_key(job_id), True)
    say(f"asked the driver of job {job_id} to stop its stages")
    if not _wait(lambda: task_state(client, key)[0] != "processing", timeout=timeout):
        say(f"its driver did not end within {timeout:.0f} s")
    if key:
        client.cancel([Future(key, client=client)], force=True)
    generation = _current_generation(run_dir)
    if generation is not None:
        from pipetrain.runtime.control import ControlNames, DriverControl

        DriverControl(ControlNames(job_id, generation), client=client).stop()
    if not _wait(lambda: not running_tasks(client, job_id), timeout=timeout):
        say(f"still running: {running_tasks(client, job_id)}")
        return False
    latest = _store(run_dir).latest()
    say(f"job {job_id} cancelled: its driver and its stages have stopped; "
        + (f"its last committed checkpoint is at micro-batch {latest.cut} ({latest.path})" if latest
           else "it committed no checkpoint, so a resume starts it from the beginning"))
    return True


def _store(run_dir: str) -> Any:
    from pipetrain.checkpoint.store import CheckpointStore

    return CheckpointStore(job.recorded_config(run_dir).checkpoint_url())


def _current_generation(run_dir: str) -> int | None:
    return _store(run_dir).current_generation()


def _wait(condition: Callable[[], bool], *, timeout: float, poll: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll)
    return True

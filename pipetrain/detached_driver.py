"""A detached job's driver, as the Dask task `pipetrain submit` starts (``drive``).

Every attempt of the task is the same code: the first finds a run directory
``prepare_run`` made and trains it from the beginning (``job.start_prepared``);
a later one (Dask started the task again because its worker died, or after a
retryable failure) finds what the earlier attempt left and continues it from the
last committed checkpoint (``job.resume_run``). The resume raises the stop flag
of the generation the dead driver ran (the core's ``StopOldRun``) and fences the
checkpoint store, so the orphaned stages stop and cannot write.

The task secedes from its worker's thread pool at once: it runs for the whole
job, talks to the scheduler through the worker's client (``get_client``), and
must not hold a thread that another task is waiting for.

The driver loop hears two things from this task (its ``Supervisor``):
placement leaves out the workers reserved for drivers (this task's own and
any that declares the ``pipetrain-driver`` resource), and a cancel request
(`pipetrain cancel`) reaches the core as the ``Interrupted`` event a Ctrl-C
would give, so the job ends as an interrupted one does: stages stopped, the
run resumable.
"""
from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

from pipetrain import job, rundir
from pipetrain.driver_log import CANCELLED, FAILED, FINISHED, RETRYING, STARTED, DriverLog, attempts
from pipetrain.runtime.placement import DRIVER_RESOURCE  # noqa: F401 - where detached.py and tests find it
from pipetrain.errors import JobInterrupted, PipetrainError, is_retryable, short_error



def job_key(job_id: str) -> list[str]:
    """The scheduler metadata key of a detached job's record: its run directory and task."""
    return ["pipetrain", "jobs", job_id]


def cancel_key(job_id: str) -> list[str]:
    return [*job_key(job_id), "cancel"]


def cancel_requested(client: Any, job_id: str) -> bool:
    try:
        return bool(client.get_metadata(cancel_key(job_id), default=False))
    except (OSError, TimeoutError):  # the scheduler is away: the driver's own checks deal with that
        return False


def drive(run_dir: str, job_id: str) -> dict:
    """Run the job of ``run_dir`` as its driver, on the worker this task landed on."""
    from distributed import get_client, get_worker, secede

    secede()
    client, worker = get_client(), get_worker().address
    log = DriverLog(run_dir)
    if cancel_requested(client, job_id):
        log.state(CANCELLED, "cancelled before this driver attempt started")
        return {"state": CANCELLED}
    resuming = has_run_before(run_dir)
    how = "resuming from the last committed checkpoint" if resuming else "training from the beginning"
    log.state(STARTED, f"attempt {attempts(run_dir) + 1} on worker {worker}, {how}")
    try:
        supervisor = _DriverTaskSupervisor(client, job_id)
        with log.capture():
            if resuming:
                job.resume_run(run_dir, client=client, supervisor=supervisor)
            else:
                job.start_prepared(run_dir, client=client, supervisor=supervisor)
    except JobInterrupted as e:  # the cancel request, carried out
        log.state(CANCELLED, str(e))
        return {"state": CANCELLED}
    except Exception as e:
        if not isinstance(e, PipetrainError):
            log.write(traceback.format_exc())
        if is_retryable(e):  # Dask runs the task again (retries=), which resumes
            log.state(RETRYING, short_error(e))
            raise
        log.state(FAILED, str(e))
        return {"state": FAILED, "error": short_error(e)}
    log.state(FINISHED, f"{Path(run_dir) / rundir.SUMMARY_FILE}")
    return {"state": FINISHED}


def has_run_before(run_dir: str) -> bool:
    """Whether an earlier driver started training here. ``fit`` writes the metrics log's
    start record before its driver begins a generation, and ``prepare_run`` deletes both,
    so no metrics log means no stage of this job ever ran."""
    return (Path(run_dir) / rundir.METRICS_FILE).exists()


def reserved_workers(client: Any) -> frozenset[str]:
    """Workers no stage may use: this driver's own, and every one declaring ``pipetrain-driver``."""
    from distributed import get_worker

    info = client.sync(client.scheduler.identity, n_workers=-1)
    declared = {address for address, w in info["workers"].items()
                if (w.get("resources") or {}).get(DRIVER_RESOURCE, 0) > 0}
    return frozenset(declared | {get_worker().address})


class _DriverTaskSupervisor:
    """What this driver task tells the driver loop (``runtime.plan.Supervisor``): spare the
    drivers' workers, and stop when `pipetrain cancel` asks."""

    def __init__(self, client: Any, job_id: str):
        self.client, self.job_id = client, job_id

    def reserved_workers(self) -> frozenset[str]:
        return reserved_workers(self.client)

    def stop_requested(self) -> bool:
        return cancel_requested(self.client, self.job_id)

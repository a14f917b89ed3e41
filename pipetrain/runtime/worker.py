"""One stage of a job, running as one long-running task on its Dask worker.

The task thread is the stage's compute thread: it interprets the stage's
action list (``StageProgram``) while the transport's event loop moves bytes.
Reports and checkpoint writes leave through the courier thread, so compute
never waits on the scheduler or the disk. The task returns the stage's final
state, its timeline events and its ledger; or, when a recovery's stop ended
it, a small ``{"ended": "stopped"}`` result instead of an error (an expected
ending, which Dask would otherwise log as a failed task with a traceback).
A stage whose schedule ends with a checkpoint returns no state: the run's
result reads it from that checkpoint (``plan.StoredStates``), so the driver
never receives the whole model. With an ``EvalSpec`` the stage's schedule gets
its eval blocks (``schedule/evaluation.py``) and it reads ``heldout``.

What the stage does around each action (reports, events, the ledger, the
checkpoints) is ``stage_hooks.StageHooks``; this module starts the stage,
runs it, and decides how its task ends.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any


from pipetrain.errors import PipetrainError, short_error
from pipetrain.runtime import messages as msg
from pipetrain.runtime.control import ControlNames, StageControl
from pipetrain.runtime.interpreter import StageProgram
from pipetrain.runtime.stage_hooks import StageHooks, StopRequested
from pipetrain.stages.base import StageSpec

log = logging.getLogger("pipetrain.runtime")


@dataclass(frozen=True)
class StageJob:
    """Everything a worker needs to run one stage (shipped with the task)."""

    job_id: str
    generation: int
    spec: StageSpec
    model: Any
    optimizer: Any
    schedule: Any  # ScheduleSpec, resumed at the generation's starting cut
    source: Any
    checkpoint_url: str | None = None
    resume_cut: int | None = None
    credits: int = 0
    transport: str = "stream"  # the transport backend (cluster.transport): "stream" or "ucx"
    connect_timeout: float = 60.0
    input_specs: Any = None  # expected boundary specs from the partition, if known
    output_specs: Any = None  # what it sends (so the gradients it receives): bounds that edge
    max_events: int = 200_000
    resume_ledger: dict | None = None  # the ledger at resume_cut, from the checkpoint manifest
    # How long a stage whose neighbour vanished waits for the driver's stop
    # before it fails loudly after all (see ``_ended_by_recovery``).
    peer_lost_wait: float = 10.0
    # The job's transport key (JobPlan.secret): a stage port accepts only
    # connections that prove they hold it, for this job, edge and generation.
    secret: bytes = field(default=b"", repr=False)
    heldout: Any = None  # the held-out source the eval blocks read (JobPlan.heldout)
    evaluation: Any = None  # EvalSpec, or None: no eval blocks
    ties: Any = None  # pipetrain.ties.TiePlan of the partition, or None: no tied weights
    # Replicated pipelines (schedule/replicas.py): this task runs stage spec.index of replica
    # ``replica`` of ``replicas``; only replica 0 writes checkpoint shards and runs eval blocks.
    replica: int = 0
    replicas: int = 1
    cut_replicas: int = 1  # the replicas that wrote the checkpoint at resume_cut (runtime/replicas.renumbered)
    bucket_bytes: int | None = None  # gradient bytes per replica message (cluster.reduce_bucket_mib)
    exchange: str = "auto"  # how the replicas sum their gradients (cluster.reduce_exchange)

    @property
    def task(self) -> int:
        """The task's id in its job, and its endpoint's: replica r's stage s is r * p + s."""
        return self.replica * self.spec.num_stages + self.spec.index

    @property
    def replica_peers(self) -> tuple[int, ...]:
        """The task ids of this stage's other replicas."""
        p, s = self.spec.num_stages, self.spec.index
        return tuple(r * p + s for r in range(self.replicas) if r != self.replica)


def _ended_by_recovery(job: StageJob, control: StageControl, error: BaseException) -> dict | None:
    """The small result a stage returns when a recovery, not its own work, ended
    it; None when ``error`` must fail the task (and be logged by Dask) as usual.

    - Stopped by the driver (between actions, or while waiting): the driver
      is already recovering, so this is expected, not a failure.
    - A neighbour vanished (``PeerLost``): the effect of a failure elsewhere,
      which the driver detects on its own (that worker left the cluster).
      The stage tells the driver (a "peer-lost" report, which the driver
      weighs exactly as it weighed this task failing with PeerLost), then
      waits for the stop. If none comes within ``job.peer_lost_wait`` the
      error is raised after all: something is wrong beyond a recovery.
    - Any transport error once the stop was seen: the generation is being
      torn down around this stage.

    Anything else, above all an error of the stage's own computation, is
    raised: the driver must see it fail and must not retry it.
    """
    from pipetrain.runtime.links import Stopped
    from pipetrain.runtime.transport import PeerLost, TransportError

    stage = job.task
    text = short_error(error)
    if isinstance(error, (Stopped, StopRequested)):
        pass
    elif isinstance(error, PeerLost) and not control.stopped():
        control.report(msg.PeerLostReport(job.generation, stage, reason=text, time=time.time()))
        if not control.wait_stopped(job.peer_lost_wait):
            return None
    elif not (isinstance(error, TransportError) and control.stopped()):
        return None
    # Stopped by its driver, or by losing it (the scheduler gone, or its task released).
    why = control.lost_reason or "the driver's stop"
    log.info("stage %d of generation %d ended by %s (%s)", stage, job.generation, why, text)
    return {"ended": "stopped", "stage": stage, "generation": job.generation, "reason": text}


class CheckpointUnwritable(PipetrainError, RuntimeError):
    """A stage's worker cannot write the checkpoint location (not retryable:
    a restart on the same worker, or one set up the same way, fails alike)."""


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return "this process"


def _check_writable(job: StageJob, store: Any) -> None:
    """Write and remove a probe file where the shards will go, before any work:
    a worker that cannot (a container without the shared directory mounted, a
    read-only path) fails the job at once, naming itself and the path."""
    import uuid

    probe = f"{store.root.rstrip('/')}/.pipetrain-probe-stage{job.spec.index}-{uuid.uuid4().hex[:8]}"
    try:
        store.fs.makedirs(store.root, exist_ok=True)
        store.fs.pipe_file(probe, b"")
        store.fs.rm_file(probe)
    except OSError as error:
        raise CheckpointUnwritable(
            f"stage {job.spec.index} on worker {_worker_address()} cannot write the checkpoint location "
            f"{job.checkpoint_url}: {short_error(error)} (every worker needs that path: mount the shared "
            f"directory on the workers too, or use a URL they all reach)") from error


def _install_gauges(job: StageJob) -> Any:
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return None
    from pipetrain.observe.dashboard import StageGauges

    return StageGauges(stage=job.task, job_id=job.job_id).install(worker)


def _keep_freed_memory() -> None:
    """Undo what Dask's nanny does to glibc's allocator for this process.

    The nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which also
    pins glibc's mmap threshold at 128 KiB: every activation, gradient and
    weight tensor then becomes mmap + page faults + munmap. Measured on the
    torch benchmark: 266k page faults against 29k, backward 15 -> 7.5 ms,
    update 30 -> 3 ms. The variable is read at process start, so only
    mallopt at run time helps. Cost: up to 256 MiB of freed heap is kept
    for reuse instead of returned (Dask shows it as unmanaged memory).
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl)
        return
    libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: glibc's maximum on 64-bit


def _replica_part_bytes(job: StageJob, stage: Any) -> int:
    """The most payload one of this stage's replicas' parts of a gradient sum takes
    (runtime/replicas.py): its gradients, an id per micro-batch of an update, the count."""
    if job.replicas == 1:
        return 0
    from pipetrain.runtime.transport import wire
    from pipetrain.stages import replica_grads

    grads, _ = replica_grads.read(stage, copy=False)  # only their sizes
    ids = 8 * job.schedule.microbatches_per_update
    return sum(g.nbytes + wire.ALIGN for g in grads.values()) + ids + 8 + 2 * wire.ALIGN


def run_stage(job: StageJob) -> dict:
    """The body of a stage task. Returns {"state", "events", "ledger"}, or
    {"ended": "stopped", ...} when the driver's stop for a recovery ended it."""
    _keep_freed_memory()
    started = time.time()
    control = StageControl(ControlNames(job.job_id, job.generation))
    gauges = _install_gauges(job)
    store = None
    if job.checkpoint_url:
        from pipetrain.checkpoint.store import CheckpointStore

        store = CheckpointStore(job.checkpoint_url)
    try:
        if store is not None:
            _check_writable(job, store)
        return _run(job, control, store, gauges, started)
    except Exception as error:
        ended = _ended_by_recovery(job, control, error)
        if ended is None:
            raise
        return ended
    finally:
        if gauges is not None:
            gauges.uninstall()
        control.close()


def _run(job: StageJob, control: StageControl, store: Any, gauges: Any, started: float) -> dict:
    from pipetrain.runtime.links import open_links
    from pipetrain.runtime.replicas import stage_exchange
    from pipetrain.stages import replica_grads

    schedule = job.schedule.build()
    evaluation = job.evaluation if job.replica == 0 else None  # the replicas hold the same weights
    if evaluation is not None:
        schedule = evaluation.apply(schedule)
    stage = job.model.build_stage(job.spec, optimizer=job.optimizer)
    if job.ties:
        from pipetrain.ties import prepare_stage

        prepare_stage(stage, job.ties, job.model)  # (a resumed stage's copies come from its shard next)
    built = time.time()
    if job.resume_cut:
        state = store.load_shard(job.resume_cut, job.spec.index)
        if job.cut_replicas != job.replicas:  # another layout counted other updates to the same weights
            from pipetrain.runtime.replicas import renumbered

            state = renumbered(state, latest=max(schedule.initial_versions[job.spec.index]))
        stage.load_state_dict(state)
    loaded = time.time()
    hooks = StageHooks(job, control, store, stage_object=stage, cut_points=schedule.cut_points(job.spec.index),
                       worker=_worker_address(), gauges=gauges)
    messages = 1 if job.replicas == 1 else len(replica_grads.buckets(stage, bucket_bytes=job.bucket_bytes))
    if job.replicas > 1 and stage_exchange(stage, job.replicas, job.exchange) == "scatter":
        messages *= 2  # (each update's parts, then the shares' sums)
    with open_links(job, control, replica_bytes=_replica_part_bytes(job, stage), replica_messages=messages) as links:
        hooks.meter.endpoint = links.endpoint
        control.report(msg.StageReady(job.generation, job.task, time=time.time(), seconds=time.time() - started,
                                      build_seconds=built - started, load_seconds=loaded - built,
                                      connect_seconds=time.time() - loaded))
        StageProgram(stage, schedule, source=job.source, links=links, hooks=hooks, clock=time.time,
                     heldout=job.heldout, evaluation=evaluation, replica=job.replica,
                     replicas=job.replicas, bucket_bytes=job.bucket_bytes, exchange=job.exchange).run_all()
        hooks.meter.flush_losses()
    control.report(msg.StageDone(job.generation, job.task, seconds=time.time() - started))
    # The last action of a schedule with checkpoints is the one at its end (or an eval block after it).
    final_in_store = store is not None and job.schedule.checkpoint_every is not None
    return {"state": None if final_in_store else stage.state_dict(), "events": hooks.timeline.array(),
            "ledger": hooks.ledger.to_dict()}

"""One stage of a job, running as one long-running task on its Dask worker.

The task thread is the stage's compute thread: it interprets the stage's
action list (``StageProgram``) while the transport's event loop moves bytes.
Reports and checkpoint writes leave through the courier thread, so compute
never waits on the scheduler or the disk. The task returns the stage's final
state, its timeline events and its ledger; or, when a recovery's stop ended
it, a small ``{"ended": "stopped"}`` result instead of an error (an expected
ending, which Dask would otherwise log as a failed task with a traceback).

The ledger is the exactly-once evidence (DESIGN.md section 2): in the order
they were applied, the micro-batch ids whose gradients each UPDATE folded
into the weights, plus those accumulated since the last one. It travels with
the state: a checkpoint's shard record carries the ledger at its cut, and a
stage resumed from that cut starts from it, so after any number of
recoveries the final ledger says how often each id reached the weights.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipetrain.errors import PipetrainError, RetryableError, short_error
from pipetrain.observe.timeline import EVENT_DTYPE
from pipetrain.runtime import messages as msg
from pipetrain.runtime.control import ControlNames, StageControl
from pipetrain.runtime.interpreter import Hooks, StageProgram
from pipetrain.schedule.actions import Action, Kind
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
    connect_timeout: float = 60.0
    input_specs: Any = None  # expected boundary specs from the partition, if known
    output_specs: Any = None  # what it sends (so the gradients it receives): bounds that edge
    security: Any = None
    max_events: int = 200_000
    resume_ledger: dict | None = None  # the ledger at resume_cut, from the checkpoint manifest
    # How long a stage whose neighbour vanished waits for the driver's stop
    # before it fails loudly after all (see ``_ended_by_recovery``).
    peer_lost_wait: float = 10.0
    # The job's transport key (JobPlan.secret): a stage port accepts only
    # connections that prove they hold it, for this job, edge and generation.
    secret: bytes = field(default=b"", repr=False)


class Ledger:
    """Which micro-batch ids reached the weights, as runs ``[first, last + 1]`` in order."""

    def __init__(self, saved: dict | None = None):
        saved = saved or {}
        self.applied: list[list[int]] = [list(run) for run in saved.get("applied", [])]
        self.pending: list[int] = list(saved.get("pending", []))

    def backward(self, k: int) -> None:
        self.pending.append(k)

    def update(self) -> None:
        for k in self.pending:
            if self.applied and self.applied[-1][1] == k:
                self.applied[-1][1] = k + 1
            else:
                self.applied.append([k, k + 1])
        self.pending = []

    def to_dict(self) -> dict:
        return {"applied": [list(run) for run in self.applied], "pending": list(self.pending)}


class StopRequested(RetryableError, RuntimeError):
    """The driver stopped this generation; raised between actions."""


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

    stage = job.spec.index
    text = short_error(error)
    if isinstance(error, (Stopped, StopRequested)):
        pass
    elif isinstance(error, PeerLost) and not control.stopped():
        control.report(msg.PeerLostReport(job.generation, stage, reason=text, time=time.time()))
        if not control.wait_stopped(job.peer_lost_wait):
            return None
    elif not (isinstance(error, TransportError) and control.stopped()):
        return None
    log.info("stage %d of generation %d ended by the driver's stop (%s)", stage, job.generation, text)
    return {"ended": "stopped", "stage": stage, "generation": job.generation, "reason": text}


class _Reporter(Hooks):
    """Turns the program's callbacks into reports, events, gauges and checkpoints."""

    def __init__(self, job: StageJob, control: StageControl, store: Any, gauges: Any = None):
        self.job, self.control, self.store, self.gauges = job, control, store, gauges
        self.m = job.schedule.microbatches
        self.stage, self.generation = job.spec.index, job.generation
        self.worker = _worker_address()  # read here: the courier thread, which writes shards, has no worker
        self.is_last = job.spec.is_last
        self.losses: dict[int, float] = {}
        self.busy = 0.0
        self.window_start = time.time()
        self.events: list[tuple] = []
        self.ledger = Ledger(job.resume_ledger)
        self.endpoint: Any = None  # set once the links are open (queued-message gauge)
        self.received = 0
        self.latest_version = 0
        self.staleness = 0
        self.first_backward_reported = False
        self.stage_object: Any = None  # set by run_stage: what time-based checkpoints snapshot
        self.position = -1
        self.cut_points: dict[int, int] = {}
        self.handled_cuts: set[int] = set()

    def follow(self, actions: Any) -> None:
        """Where in this stage's action list each cut K is consistent: after
        the B of K - 1 and the U that follows it, if one does (the same point
        a scheduled CHECKPOINT K occupies). Scheduled cuts are left to those."""
        scheduled = {a.k for a in actions if a.kind is Kind.CHECKPOINT}
        for i, a in enumerate(actions):
            if a.kind is not Kind.BACKWARD or a.k + 1 in scheduled:
                continue
            point = i
            for j in range(i + 1, len(actions)):
                if actions[j].kind is Kind.UPDATE:
                    point = j
                if actions[j].kind not in (Kind.SEND_GRAD, Kind.UPDATE):
                    break
            self.cut_points[a.k + 1] = point

    def on_loss(self, k: int, loss: float) -> None:
        self.losses[k] = loss

    def on_weights(self, k: int, version: int, start: float, end: float) -> None:
        # Work, not an action of the schedule: an event and busy time, but no
        # move of the action cursor (checkpoint cuts are positions in the list).
        self.busy += end - start
        self._record("W", k, version, start, end)

    def _record(self, kind: str, k: int | None, version: int | None, start: float, end: float) -> None:
        if len(self.events) < self.job.max_events:
            self.events.append((kind, -1 if k is None else k, -1 if version is None else version, start, end))

    def on_action(self, action: Action, start: float, end: float) -> None:
        kind = action.kind
        if kind in (Kind.FORWARD, Kind.BACKWARD, Kind.UPDATE):
            self.busy += end - start
        self._record(kind.value, action.k, action.version, start, end)
        if kind is Kind.FORWARD:
            self.staleness = max(0, self.latest_version - action.version)
        elif kind is Kind.BACKWARD:
            self.ledger.backward(action.k)
            if not self.first_backward_reported:
                self.first_backward_reported = True
                self.control.report(msg.FirstBackward(self.generation, self.stage, k=action.k, time=time.time()))
            if action.k % self.m == self.m - 1:
                self._report_step(action.k // self.m, end)
        elif kind is Kind.UPDATE:
            self.ledger.update()
            self.latest_version = action.version
        elif kind in (Kind.RECV_ACT, Kind.RECV_GRAD):
            self.received += 1
        self.position += 1
        self._maybe_checkpoint_on_request()
        # A local flag (see control.py): a stage computing without waiting on
        # data still stops within one action.
        if self.control.stopped():
            raise StopRequested(f"stage {self.stage}: stopped by the driver after {action!r}")

    def _maybe_checkpoint_on_request(self) -> None:
        cut = self.control.requested_cut
        if cut is None or cut in self.handled_cuts or cut not in self.cut_points or self.store is None:
            return
        if self.position == self.cut_points[cut]:
            self.handled_cuts.add(cut)
            self.on_checkpoint(cut, self.stage_object)
        elif self.position > self.cut_points[cut]:
            # Heard of it too late: the driver drops this cut and asks again later.
            self.handled_cuts.add(cut)
            self.control.report(msg.CutMissed(self.generation, self.stage, cut=cut))

    def _report_step(self, step: int, now: float) -> None:
        wall = now - self.window_start
        self.control.report(msg.StepReport(self.generation, self.stage, step=step, busy=self.busy, wall=wall,
                                           time=time.time(), losses=self.losses))
        self.losses = {}
        if self.gauges is not None:
            self.gauges.update(microbatches_per_s=self.m / wall if wall > 0 else 0.0,
                               busy=self.busy / wall if wall > 0 else 0.0,
                               queued=self._queued(), staleness=self.staleness)
        self.busy, self.window_start = 0.0, now

    def _queued(self) -> int:
        if self.endpoint is None:
            return 0
        stats = self.endpoint.stats
        return max(0, stats["received"] - stats["dropped_stale"] - self.received)

    def flush_losses(self) -> None:
        if self.losses:
            self.control.report(msg.StepReport(self.generation, self.stage, step=-1, busy=0.0, wall=0.0,
                                               time=time.time(), losses=self.losses))
            self.losses = {}

    def on_checkpoint(self, cut: int, stage: Any) -> None:
        if self.store is None:
            return
        # Losses before the cut reach the driver before this shard does, so the
        # manifest it commits can carry the loss history up to the cut.
        if self.is_last:
            self.flush_losses()
        # The snapshot is taken here, between micro-batches; the write happens
        # on the courier thread while compute goes on.
        snapshot = {name: np.array(value, copy=True) for name, value in stage.state_dict().items()}
        self.control.call_in_courier(self._write, cut, snapshot, self.ledger.to_dict())

    def _write(self, cut: int, snapshot: dict, ledger: dict) -> msg.Report:
        started = time.perf_counter()
        try:
            record = self.store.write_shard(cut, self.stage, snapshot, generation=self.job.generation,
                                            meta={"stage": self.stage, "ledger": ledger})
        except OSError as error:
            # The driver stops the job on this report: a restart would write here again.
            return msg.CourierError(self.generation, self.stage, worker=self.worker, cut=cut,
                                    error=f"stage {self.stage} could not write its checkpoint shard for cut {cut} "
                                          f"under {self.store.url}: {short_error(error)}")
        return msg.ShardWritten(self.generation, self.stage, cut=cut, record=record.to_dict(),
                                seconds=time.perf_counter() - started)


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

    return StageGauges(stage=job.spec.index, job_id=job.job_id).install(worker)


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

    schedule = job.schedule.build()
    stage = job.model.build_stage(job.spec, optimizer=job.optimizer)
    built = time.time()
    if job.resume_cut:
        stage.load_state_dict(store.load_shard(job.resume_cut, job.spec.index))
    loaded = time.time()
    reporter = _Reporter(job, control, store, gauges)
    reporter.stage_object = stage
    reporter.follow(schedule.stage_actions(job.spec.index))
    with open_links(job, control) as links:
        reporter.endpoint = links.endpoint
        control.report(msg.StageReady(job.generation, job.spec.index, time=time.time(), seconds=time.time() - started,
                                      build_seconds=built - started, load_seconds=loaded - built,
                                      connect_seconds=time.time() - loaded))
        StageProgram(stage, schedule, source=job.source, links=links, hooks=reporter, clock=time.time).run_all()
        reporter.flush_losses()
    control.report(msg.StageDone(job.generation, job.spec.index, seconds=time.time() - started))
    return {"state": stage.state_dict(), "events": np.array(reporter.events, dtype=EVENT_DTYPE),
            "ledger": reporter.ledger.to_dict()}

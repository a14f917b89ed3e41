"""The driver: places the stages, submits them, watches them, recovers.

Each stage is one long-running Dask task pinned to its worker (DESIGN.md
section 3). The driver never touches activations: it reads the stages'
reports from the control plane, commits checkpoints once every shard of a
cut is durable, and, when a stage's task fails or its worker leaves the
cluster, stops the generation, re-places the stages and resumes every stage
from the last committed checkpoint under a new generation.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipetrain.observe.progress import MetricsLog, Progress
from pipetrain.runtime.control import ControlNames, DriverControl
from pipetrain.runtime.worker import StageJob, run_stage


class StageLost(RuntimeError):
    def __init__(self, stage: int, worker: str, reason: str):
        super().__init__(f"stage {stage} on worker {worker}: {reason}")
        self.stage, self.worker, self.reason = stage, worker, reason


class JobFailed(RuntimeError):
    pass


@dataclass
class JobPlan:
    """A job as the driver sees it; built by ``pipetrain.fit``."""

    partition: Any
    source: Any
    optimizer: Any
    schedule_args: dict
    checkpoint_url: str | None = None
    keep_checkpoints: int = 3
    resource: str = "GPU"
    placement_timeout: float = 60.0
    max_restarts: int = 3
    credits: int = 0
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    resume: bool = False
    security: Any = None
    record_events: bool = True

    @property
    def num_stages(self) -> int:
        return len(self.partition.stages)

    @property
    def microbatches(self) -> int:
        return self.schedule_args["microbatches"]

    @property
    def steps(self) -> int:
        return self.schedule_args["steps"]


@dataclass
class RunOutcome:
    losses: dict[int, float]
    states: list[dict[str, np.ndarray]]
    events: list[np.ndarray]
    history: list[dict]
    recoveries: list[dict]
    generation: int
    wall_seconds: float


class _StepBook:
    """Collects per-stage step reports into one record per step."""

    def __init__(self, num_stages: int, microbatches: int, microbatch_size: int):
        self.p, self.m, self.b = num_stages, microbatches, microbatch_size
        self.reports: dict[int, dict[int, dict]] = {}
        self.losses: dict[int, float] = {}
        self.emitted: set[int] = set()
        self.last_stage0_time: float | None = None

    def add(self, message: dict) -> list[dict]:
        self.losses.update({int(k): float(v) for k, v in message.get("losses", {}).items()})
        step = message["step"]
        if step < 0:
            return []
        self.reports.setdefault(step, {})[message["stage"]] = message
        ready = []
        for t in sorted(self.reports):
            if t in self.emitted or len(self.reports[t]) < self.p:
                continue
            ready.append(self._record(t))
            self.emitted.add(t)
        return ready

    def _record(self, t: int) -> dict:
        per_stage = self.reports.pop(t)
        ks = range(t * self.m, (t + 1) * self.m)
        losses = [self.losses[k] for k in ks if k in self.losses]
        first = per_stage[0]
        rate = None
        if self.last_stage0_time is not None and first["time"] > self.last_stage0_time:
            rate = self.m * self.b / (first["time"] - self.last_stage0_time)
        self.last_stage0_time = first["time"]
        busy = [per_stage[s]["busy"] / per_stage[s]["wall"] if per_stage[s]["wall"] > 0 else 0.0
                for s in range(self.p)]
        return {"type": "step", "step": t, "loss": float(np.mean(losses)) if losses else None,
                "samples_per_s": rate, "busy": busy, "stage0_done": first["time"]}

    def forget_from(self, cut: int) -> None:
        """After a rollback to ``cut``, those micro-batches run again."""
        self.losses = {k: v for k, v in self.losses.items() if k < cut}
        first_step = cut // self.m
        self.emitted = {t for t in self.emitted if t < first_step}
        self.reports = {t: r for t, r in self.reports.items() if t < first_step}
        self.last_stage0_time = None


class Driver:
    def __init__(self, client: Any, plan: JobPlan, *, progress: Progress, metrics: MetricsLog,
                 spare_workers_for_recovery: bool = True):
        self.client, self.plan = client, plan
        self.progress, self.metrics = progress, metrics
        self.recoveries: list[dict] = []
        self.history: list[dict] = []
        self.dead_workers: set[str] = set()
        self.store = None
        if plan.checkpoint_url:
            from pipetrain.checkpoint.store import CheckpointStore

            self.store = CheckpointStore(plan.checkpoint_url, keep=plan.keep_checkpoints)

    # -- the job ---------------------------------------------------------
    def run(self) -> RunOutcome:
        started = time.time()
        generation, cut = self._starting_point()
        book = _StepBook(self.plan.num_stages, self.plan.microbatches, self.plan.source.microbatch_size)
        restarts = 0
        while True:
            if self.store is not None:
                self.store.begin_generation(generation)
            futures, placement = [], {}
            try:
                placement = self._place()
                futures = self._submit(generation, cut, placement)
                results = self._watch(generation, futures, placement, book)
                return RunOutcome(losses=dict(sorted(book.losses.items())),
                                  states=[r["state"] for r in results], events=[r["events"] for r in results],
                                  history=self.history, recoveries=self.recoveries, generation=generation,
                                  wall_seconds=time.time() - started)
            except StageLost as lost:
                lost_at = time.time()
                self._stop(generation, futures)
                restarts += 1
                latest = self.store.latest() if self.store is not None else None
                if restarts > self.plan.max_restarts:
                    where = f"the last committed checkpoint is {latest.path}" if latest else "no checkpoint was committed"
                    raise JobFailed(f"{lost}; gave up after {self.plan.max_restarts} restarts ({where})") from lost
                if lost.worker:
                    self.dead_workers.add(lost.worker)
                cut = latest.cut if latest else 0
                generation += 1
                book.forget_from(cut)
                self.history = [h for h in self.history if h["step"] < cut // self.plan.microbatches]
                event = {"type": "recovery", "generation": generation, "stage": lost.stage, "worker": lost.worker,
                         "reason": lost.reason, "rollback_to": cut, "stop_seconds": time.time() - lost_at}
                self.recoveries.append(event)
                self.metrics.write(event)
                self.progress.note(f"recovery: {lost}; rolling back to micro-batch {cut} as generation {generation}")

    def _starting_point(self) -> tuple[int, int]:
        if not self.plan.resume:
            return 0, 0
        if self.store is None:
            raise JobFailed("resume needs a checkpoint directory")
        latest = self.store.latest()
        if latest is None:
            self.progress.note("resume: no committed checkpoint found; starting from the beginning")
            return (self.store.current_generation() or 0) + 1, 0
        self.progress.note(f"resume: from the checkpoint at micro-batch {latest.cut} ({latest.path})")
        return (self.store.current_generation() or 0) + 1, latest.cut

    # -- placement and submission ---------------------------------------
    def _place(self) -> dict[int, str]:
        from pipetrain.runtime.placement import StageNeed, wait_for_placement

        needs = [StageNeed(stage=s.index, memory_bytes=getattr(s, "memory_bytes", 0) or 0)
                 for s in self.plan.partition.stages]
        placement = wait_for_placement(self.client, needs, resource=self.plan.resource,
                                       timeout=self.plan.placement_timeout, exclude=tuple(self.dead_workers))
        return dict(placement.stage_workers)

    def _submit(self, generation: int, cut: int, placement: dict[int, str]) -> list[Any]:
        plan = self.plan
        futures = []
        for spec in plan.partition.specs():
            job = StageJob(job_id=plan.job_id, generation=generation, spec=spec, model=plan.partition.model,
                           optimizer=plan.optimizer, schedule_args={**plan.schedule_args, "first_microbatch": cut},
                           source=plan.source, checkpoint_url=plan.checkpoint_url,
                           resume_cut=cut or None, credits=plan.credits, security=plan.security,
                           max_events=StageJob.max_events if plan.record_events else 0)
            futures.append(self.client.submit(run_stage, job, workers=[placement[spec.index]],
                                              allow_other_workers=False, pure=False, retries=0,
                                              key=f"pipetrain-{plan.job_id}-g{generation}-stage{spec.index}"))
        return futures

    # -- watching ---------------------------------------------------------
    def _watch(self, generation: int, futures: list[Any], placement: dict[int, str], book: _StepBook) -> list[dict]:
        control = DriverControl(ControlNames(self.plan.job_id, generation), client=self.client)
        shards: dict[int, dict[int, dict]] = {}
        last_membership_check = 0.0
        while True:
            for message in control.drain(timeout=0.2):
                self._handle(message, book, shards, generation)
            for s, f in enumerate(futures):
                if f.status == "error":
                    raise StageLost(s, placement[s], _short(f.exception()))
                if f.status in ("cancelled", "lost"):
                    raise StageLost(s, placement[s], f"task {f.status}")
            if time.time() - last_membership_check > 0.5:
                last_membership_check = time.time()
                alive = set(self.client.scheduler_info(n_workers=-1)["workers"])
                for s, address in placement.items():
                    if address not in alive:
                        raise StageLost(s, address, "worker left the cluster")
            if all(f.status == "finished" for f in futures):
                results = self.client.gather(futures)
                for message in control.drain(timeout=0.05):
                    self._handle(message, book, shards, generation)
                return results

    def _handle(self, message: dict, book: _StepBook, shards: dict, generation: int) -> None:
        kind = message.get("type")
        if kind == "step":
            for record in book.add(message):
                self.history.append(record)
                self.metrics.write(record)
                self.progress.step(record["step"], loss=record["loss"], samples_per_s=record["samples_per_s"],
                                   busy=record["busy"])
        elif kind == "shard":
            cut = message["cut"]
            shards.setdefault(cut, {})[message["stage"]] = message["record"]
            if len(shards[cut]) == self.plan.num_stages:
                from pipetrain.checkpoint.store import ShardRecord

                records = shards.pop(cut)
                self.store.commit(cut, records=[ShardRecord.from_dict(records[s]) for s in range(self.plan.num_stages)],
                                  generation=generation, num_stages=self.plan.num_stages,
                                  manifest=self._manifest(cut))
                self.metrics.write({"type": "checkpoint", "cut": cut, "generation": generation})
        elif kind == "error":
            self.metrics.write(message)

    def _manifest(self, cut: int) -> dict:
        return {"schedule": dict(self.plan.schedule_args),
                "partition": {"boundaries": list(self.plan.partition.boundaries),
                              "method": self.plan.partition.method},
                "job_id": self.plan.job_id}

    def _stop(self, generation: int, futures: list[Any]) -> None:
        DriverControl(ControlNames(self.plan.job_id, generation), client=self.client).stop()
        deadline = time.time() + 10
        while time.time() < deadline and any(f.status == "pending" for f in futures):
            time.sleep(0.05)
        self.client.cancel(futures, force=True)


def _short(error: BaseException | None) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) < 400 else text[:400] + "..."

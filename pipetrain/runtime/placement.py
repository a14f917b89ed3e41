"""Which worker runs which stage: a pure function of the scheduler's worker list.

`place` decides; `workers_from_scheduler_info` turns what Dask reports into
`WorkerInfo` records; `wait_for_placement` (and its async twin) polls the
scheduler until `place` succeeds, so a job can be submitted before all of its
workers have joined.

The rules, in order of strength:

1. A worker listed in `exclude` (known dead, or a driver's own), one not
   `running`, or one declaring the `pipetrain-driver` resource (kept for the
   drivers of detached jobs, `pipetrain submit`) is never used.
2. If any worker declares the resource (`dask worker --resources GPU=1`), only
   such workers are candidates; a cluster where none declares it (a laptop, a
   CPU cluster) uses all of its workers. `require_resource=True` turns the
   fallback off, for a driver that knows the job needs the resource even when
   the last worker that had it is gone.
3. One stage per worker, and a worker whose `memory_limit` is below a stage's
   estimated need is not used for that stage (`None` means unlimited, as in Dask).
4. Stages are spread over hosts before a host gets a second one, so one host
   failing costs as few stages as possible.
5. The same worker list gives the same placement: every choice is a sort.

Feasibility does not depend on the host preference: stages are placed in
decreasing order of memory need, and any worker that fits a larger need fits
every smaller one, so greedy never strands a stage that some assignment could
have placed.

A job may run d replicas of its p-stage pipeline (pipeline x data parallelism):
p * d tasks, `StageNeed(stage=t, replica=r)` with task id `t = r * p + s` for
stage s of replica r. With d > 1, rule 4 gives way to these, in order:

6. A stage's replicas go to distinct hosts while another host has room (one
   host failing then costs each stage at most one replica), even if that
   stretches a replica over more hosts.
7. A replica's tasks go to as few hosts as they can, in runs of consecutive
   stages (consecutive stages exchange activations every micro-batch): one
   host when it has room for the whole replica, else host by host in stage
   order.
8. Replicas keep to different hosts where they can; past that, hosts already
   holding the fewest tasks first.

Replicas are planned in turn, each by a small search over runs of stages
(bounded by a node count, so still a pure function of the worker list). If
that leaves a task with no fitting worker, the job is placed by rules 1-5
instead, which never strand a need that some assignment could place.
"""
from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipetrain.errors import PipetrainError

__all__ = [
    "Placement",
    "PlacementError",
    "StageNeed",
    "WorkerInfo",
    "merge_placement",
    "place",
    "wait_for_placement",
    "wait_for_placement_async",
    "workers_from_scheduler_info",
]


# A worker declaring this resource runs the drivers of detached jobs, never a stage.
DRIVER_RESOURCE = "pipetrain-driver"


class PlacementError(PipetrainError, RuntimeError):
    """Not enough suitable workers; the message lists what was found and needed."""


@dataclass(frozen=True)
class WorkerInfo:
    address: str
    host: str
    resources: Mapping[str, float] = field(default_factory=dict)
    memory_limit: int | None = None  # bytes; None = unlimited (Dask reports 0 or None)
    nthreads: int = 1
    name: str = ""
    status: str = "running"

    def fits(self, memory_bytes: int) -> bool:
        return self.memory_limit is None or self.memory_limit >= memory_bytes

    def describe(self) -> str:
        resources = ", ".join(f"{k}={v:g}" for k, v in sorted(self.resources.items())) or "none"
        return (f"{self.address} (name {self.name}, host {self.host}, resources {resources}, "
                f"memory {_format_bytes(self.memory_limit)}, {self.status})")


@dataclass(frozen=True)
class StageNeed:
    """One task of a job. `stage` is the task's key in `Placement.stage_workers`: the stage
    itself for a single pipeline, the task id `replica * num_stages + stage` with replicas."""

    stage: int
    memory_bytes: int = 0  # estimated peak host memory of the stage on its worker
    replica: int = 0  # which copy of the pipeline, 0..d-1 (data parallelism)


@dataclass(frozen=True)
class Placement:
    stage_workers: Mapping[int, str]  # stage -> worker address
    spares: tuple[str, ...]  # unused candidates, best replacement first
    resource: str | None  # the resource the stages were placed by; None on a plain cluster

    def worker_of(self, stage: int) -> str:
        return self.stage_workers[stage]

    @property
    def task_resources(self) -> dict[str, float]:
        """What each stage task should request so Dask accounts for the resource."""
        return {self.resource: 1} if self.resource else {}


def workers_from_scheduler_info(info: Mapping[str, Any]) -> list[WorkerInfo]:
    """`client.scheduler_info(n_workers=-1)` (or `scheduler.identity`) -> records.

    An async client's `scheduler_info()` is a cache with no workers in it; use
    `await client.scheduler.identity(n_workers=-1)` there (as the async waiter does).
    """
    if "workers" not in info:
        raise ValueError("scheduler info has no 'workers' entry: pass client.scheduler_info(n_workers=-1)")
    workers = []
    for address, entry in info["workers"].items():
        workers.append(WorkerInfo(
            address=address,
            host=str(entry.get("host") or _host_of(address)),
            resources=dict(entry.get("resources") or {}),
            memory_limit=int(entry["memory_limit"]) if entry.get("memory_limit") else None,
            nthreads=int(entry.get("nthreads", 1)),
            name=str(entry.get("name", address)),
            status=str(entry.get("status", "running")),
        ))
    return sorted(workers, key=_worker_order)


def place(
    workers: Sequence[WorkerInfo],
    needs: Sequence[StageNeed],
    *,
    resource: str | None = "GPU",
    exclude: Iterable[str] = (),
    require_resource: bool = False,
) -> Placement:
    """Assign each task its own worker, or raise `PlacementError` saying why not."""
    num_stages, num_replicas = _pipeline_shape(needs)
    excluded = set(exclude) | {w.address for w in workers if w.resources.get(DRIVER_RESOURCE, 0) > 0}
    declares = [w for w in workers if resource and w.resources.get(resource, 0) > 0]
    by_resource = bool(resource) and (bool(declares) or require_resource)
    candidates = sorted(
        (w for w in (declares if by_resource else workers)
         if w.address not in excluded and w.status == "running"),
        key=_worker_order,
    )

    assigned = _place_replicas(candidates, needs, num_stages) if num_replicas > 1 else None
    if assigned is None:
        assigned, stuck = _place_spread(candidates, needs)
        if stuck is not None:
            raise PlacementError(_explain(workers, needs, resource=resource, by_resource=by_resource,
                                          excluded=excluded, placed=assigned, stuck=stuck))

    # A spare on an untouched host survives the failures that cost a stage, and the
    # biggest spare fits whichever stage it has to replace.
    host_load = Counter(w.host for w in assigned.values())
    taken = {w.address for w in assigned.values()}
    free = [w for w in candidates if w.address not in taken]
    spares = sorted(free, key=lambda w: (host_load[w.host], -_best_fit(w), _worker_order(w)))
    return Placement(
        stage_workers={need.stage: assigned[need.stage].address for need in needs},
        spares=tuple(w.address for w in spares),
        resource=resource if by_resource else None,
    )


def _pipeline_shape(needs: Sequence[StageNeed]) -> tuple[int, int]:
    """(stages per replica, replicas), after checking the needs describe p stages x d replicas."""
    stages = [need.stage for need in needs]
    if len(set(stages)) != len(stages):
        raise ValueError(f"stage ids repeat in the needs: {stages}")
    per_replica = Counter(need.replica for need in needs)
    replicas = sorted(per_replica)
    if replicas != list(range(len(replicas))):
        raise ValueError(f"StageNeed.replica must number the replicas 0..{len(replicas) - 1}; "
                         f"the needs name replicas {replicas}")
    if len(set(per_replica.values())) > 1:
        counts = ", ".join(f"replica {r} has {per_replica[r]}" for r in replicas)
        raise ValueError(f"every replica must have the same number of tasks (StageNeed.replica): {counts}")
    num_stages, num_replicas = (per_replica[0] if needs else 0), len(replicas)
    for need in needs if num_replicas > 1 else ():
        first = need.replica * num_stages
        if not first <= need.stage < first + num_stages:
            raise ValueError(f"StageNeed.stage {need.stage} of replica {need.replica} must be the task id "
                             f"replica * {num_stages} + stage, in {first}..{first + num_stages - 1}")
    return num_stages, num_replicas


def _place_spread(candidates: Sequence[WorkerInfo], needs: Sequence[StageNeed]):
    """Rules 3-5: biggest need first, each on the least loaded host's best-fitting worker.
    Returns (assigned, None), or (what was assigned, the need that found no worker)."""
    assigned: dict[int, WorkerInfo] = {}
    host_load: Counter[str] = Counter()
    free = list(candidates)
    for need in sorted(needs, key=lambda n: -n.memory_bytes):  # stable: ties keep stage order
        fitting = [w for w in free if w.fits(need.memory_bytes)]
        if not fitting:
            return assigned, need
        best = min(fitting, key=lambda w: (host_load[w.host], _best_fit(w), _worker_order(w)))
        assigned[need.stage] = best
        host_load[best.host] += 1
        free.remove(best)
    return assigned, None


def _place_replicas(candidates: Sequence[WorkerInfo], needs: Sequence[StageNeed],
                    num_stages: int) -> dict[int, WorkerInfo] | None:
    """Rules 6-8, replica after replica; None when a replica finds no plan (memory)."""
    free: dict[str, list[WorkerInfo]] = {}
    for w in candidates:
        free.setdefault(w.host, []).append(w)
    at_stage: dict[str, Counter[int]] = {host: Counter() for host in free}  # host -> stages already there
    assigned: dict[int, WorkerInfo] = {}
    for replica in range(len(needs) // num_stages):
        tasks = sorted((n for n in needs if n.replica == replica), key=lambda n: n.stage)
        runs = _plan_replica([n.memory_bytes for n in tasks], free, at_stage)
        if runs is None:
            return None
        for host, first, length in runs:
            # Within the host, biggest need first onto the smallest worker that fits it.
            for s in sorted(range(first, first + length), key=lambda s: -tasks[s].memory_bytes):
                worker = min((w for w in free[host] if w.fits(tasks[s].memory_bytes)),
                             key=lambda w: (_best_fit(w), _worker_order(w)))
                free[host].remove(worker)
                assigned[tasks[s].stage] = worker
                at_stage[host][s] += 1
    return assigned


# Search nodes per replica; past it the best plan found so far stands. A count, not
# a time, so the placement stays a pure function of its input.
_PLAN_BUDGET = 2000


def _plan_replica(memory: list[int], free: Mapping[str, list[WorkerInfo]],
                  at_stage: Mapping[str, Counter[int]]) -> list[tuple[str, int, int]] | None:
    """The replica's stages (their memory needs, in stage order) as runs (host, first stage,
    length) over distinct hosts, minimising (stages shared with another replica on the same
    host, hosts used, other tasks on those hosts); None when no plan fits."""
    num_stages = len(memory)
    load = {host: sum(at_stage[host].values()) for host in free}
    # Hosts alike in free memory, stages held and load are interchangeable: search one of each.
    kinds: dict[tuple, list[str]] = {}
    for host in sorted(free, key=_natural):
        if free[host]:
            limits = tuple(sorted((_best_fit(w) for w in free[host]), reverse=True))
            kinds.setdefault((limits, tuple(sorted(at_stage[host].items())), load[host]), []).append(host)
    if not kinds:
        return None
    most_room = max(len(key[0]) for key in kinds)
    run_lengths: dict[tuple, int] = {}

    def longest_run(limits: tuple[float, ...], first: int) -> int:
        """How many stages from `first` on fit together on workers of these memory limits."""
        if (limits, first) in run_lengths:
            return run_lengths[limits, first]
        length = 0
        while first + length < num_stages and length < len(limits):
            run = sorted(memory[first:first + length + 1], reverse=True)
            if any(need > limit for need, limit in zip(run, limits)):
                break
            length += 1
        run_lengths[limits, first] = length
        return length

    best: list = [None, None]  # score, runs
    nodes = 0

    def visit(first: int, used: frozenset[str], shared: int, other_tasks: int, runs: tuple) -> None:
        nonlocal nodes
        if first == num_stages:
            score = (shared, len(used), other_tasks)
            if best[0] is None or score < best[0]:
                best[:] = [score, list(runs)]
            return
        nodes += 1
        bound = (shared, len(used) + -(-(num_stages - first) // most_room), other_tasks)
        if nodes > _PLAN_BUDGET or (best[0] is not None and bound >= best[0]):
            return
        options = []
        for (limits, _, host_load), hosts in kinds.items():
            host = next((h for h in hosts if h not in used), None)
            if host is None:
                continue
            longest = longest_run(limits, first)
            clashes = [at_stage[host][s] for s in range(first, first + longest)]
            # Also the run that stops short of the first stage another replica holds here.
            unshared = next((i for i, c in enumerate(clashes) if c), longest)
            for length in {longest, unshared} - {0}:
                options.append((sum(clashes[:length]), -length, host_load, len(limits), _natural(host), host))
        for clash, minus_length, host_load, _, _, host in sorted(options):
            visit(first - minus_length, used | {host}, shared + clash, other_tasks + host_load,
                  runs + ((host, first, -minus_length),))

    visit(0, frozenset(), 0, 0, ())
    return best[1]


def wait_for_placement(client, needs: Sequence[StageNeed], *, resource: str | None = "GPU",
                       exclude: Iterable[str] = (), require_resource: bool = False,
                       timeout: float = 60.0, poll: float = 0.5) -> Placement:
    """Poll a synchronous `distributed.Client` until the stages can be placed."""
    def attempt() -> Placement:
        # Asked of the scheduler, not the client's periodically refreshed cache,
        # which can briefly read as "no workers".
        info = client.sync(client.scheduler.identity, n_workers=-1)
        return place(workers_from_scheduler_info(info), needs, resource=resource,
                     exclude=exclude, require_resource=require_resource)

    start = time.monotonic()
    while True:
        try:
            return attempt()
        except PlacementError as error:
            waited = time.monotonic() - start
            if waited >= timeout:
                raise _timed_out(error, waited, timeout) from None
            time.sleep(min(poll, max(timeout - waited, 0.0)))


async def wait_for_placement_async(client, needs: Sequence[StageNeed], *, resource: str | None = "GPU",
                                   exclude: Iterable[str] = (), require_resource: bool = False,
                                   timeout: float = 60.0, poll: float = 0.5) -> Placement:
    """The same for an asynchronous client (asks the scheduler, not the client's cache)."""
    start = time.monotonic()
    while True:
        info = await client.scheduler.identity(n_workers=-1)
        try:
            return place(workers_from_scheduler_info(info), needs, resource=resource,
                         exclude=exclude, require_resource=require_resource)
        except PlacementError as error:
            waited = time.monotonic() - start
            if waited >= timeout:
                raise _timed_out(error, waited, timeout) from None
            await asyncio.sleep(min(poll, max(timeout - waited, 0.0)))


def _timed_out(error: PlacementError, waited: float, timeout: float) -> PlacementError:
    return PlacementError(f"{error}\nWaited {waited:.1f} s for suitable workers (timeout {timeout:g} s).")


def _explain(workers, needs, *, resource, by_resource, excluded, placed, stuck) -> str:
    num_stages, num_replicas = _pipeline_shape(needs)
    names = {n.stage: _task_name(n, num_stages, num_replicas) for n in needs}
    need_text = "\n".join(
        f"  {names[n.stage]}: memory {_format_bytes(n.memory_bytes or None, unlimited='no estimate')}"
        + (f", on worker {placed[n.stage].address}" if n.stage in placed else "")
        for n in needs)
    rule = (f"workers declaring resource {resource!r}" if by_resource
            else f"any worker (none declares resource {resource!r})" if resource else "any worker")
    found = "\n".join(f"  {w.describe()}{_why_unused(w, resource, by_resource, excluded, placed, names)}"
                      for w in sorted(workers, key=_worker_order)) or "  (no workers)"
    shape = (f"{num_stages} stages x {num_replicas} replicas = {len(needs)} tasks" if num_replicas > 1
             else f"{len(needs)} stages")
    return (f"cannot place {names[stuck.stage]} (needs memory "
            f"{_format_bytes(stuck.memory_bytes or None, unlimited='no estimate')}): "
            f"{shape} need {len(needs)} distinct workers from {rule}.\n"
            f"Needed, one worker per {'task' if num_replicas > 1 else 'stage'}:\n{need_text}\n"
            f"Found {len(workers)} worker(s):\n{found}")


def _task_name(need: StageNeed, num_stages: int, num_replicas: int) -> str:
    if num_replicas > 1:
        return f"stage {need.stage - need.replica * num_stages} of replica {need.replica}"
    return f"stage {need.stage}"


def _why_unused(worker, resource, by_resource, excluded, placed, names) -> str:
    if worker.resources.get(DRIVER_RESOURCE, 0) > 0:
        return f" -- reserved for drivers ({DRIVER_RESOURCE})"
    if worker.address in excluded:
        return " -- excluded (known dead, or a driver's own)"
    if worker.status != "running":
        return f" -- not running ({worker.status})"
    if by_resource and worker.resources.get(resource, 0) <= 0:
        return f" -- lacks resource {resource!r}"
    for stage, w in placed.items():
        if w.address == worker.address:
            return f" -- taken by {names[stage]}"
    return " -- too little memory for the stages left"


def _worker_order(worker: WorkerInfo) -> tuple:
    return (_natural(worker.host), _natural(worker.address))


def _natural(text: str) -> tuple:
    """'tcp://10.0.0.9:1' before 'tcp://10.0.0.10:1', so orders read as people expect."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


def _best_fit(worker: WorkerInfo) -> float:
    return float("inf") if worker.memory_limit is None else float(worker.memory_limit)


def _host_of(address: str) -> str:
    return address.split("://")[-1].rsplit(":", 1)[0]


def _format_bytes(n: int | None, *, unlimited: str = "unlimited") -> str:
    if not n:
        return unlimited
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def merge_placement(previous: dict[int, str], fresh: dict[int, str], spares: tuple[str, ...]) -> dict[int, str]:
    """Surviving stages stay where they are; lost ones take spares first, then what the fresh placement freed."""
    if not previous:
        return dict(fresh)
    usable = set(fresh.values()) | set(spares)
    kept = {s: w for s, w in previous.items() if w in usable and s in fresh}
    free = list(dict.fromkeys(w for w in list(spares) + sorted(fresh.values()) if w not in kept.values()))
    for s in sorted(fresh):
        if s not in kept:
            kept[s] = free.pop(0)
    return dict(sorted(kept.items()))

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
    stage: int
    memory_bytes: int = 0  # estimated peak host memory of the stage on its worker
    replica: int = 0


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
    """Assign each stage its own worker, or raise `PlacementError` saying why not."""
    stages = [need.stage for need in needs]
    if len(set(stages)) != len(stages):
        raise ValueError(f"stage ids repeat in the needs: {stages}")
    excluded = set(exclude) | {w.address for w in workers if w.resources.get(DRIVER_RESOURCE, 0) > 0}
    declares = [w for w in workers if resource and w.resources.get(resource, 0) > 0]
    by_resource = bool(resource) and (bool(declares) or require_resource)
    candidates = sorted(
        (w for w in (declares if by_resource else workers)
         if w.address not in excluded and w.status == "running"),
        key=_worker_order,
    )

    assigned: dict[int, WorkerInfo] = {}
    host_load: Counter[str] = Counter()
    free = list(candidates)
    for need in sorted(needs, key=lambda n: -n.memory_bytes):  # stable: ties keep stage order
        fitting = [w for w in free if w.fits(need.memory_bytes)]
        if not fitting:
            raise PlacementError(_explain(workers, needs, resource=resource, by_resource=by_resource,
                                          excluded=excluded, placed=assigned, stuck=need))
        best = min(fitting, key=lambda w: (host_load[w.host], _best_fit(w), _worker_order(w)))
        assigned[need.stage] = best
        host_load[best.host] += 1
        free.remove(best)

    # A spare on an untouched host survives the failures that cost a stage, and the
    # biggest spare fits whichever stage it has to replace.
    spares = sorted(free, key=lambda w: (host_load[w.host], -_best_fit(w), _worker_order(w)))
    return Placement(
        stage_workers={need.stage: assigned[need.stage].address for need in needs},
        spares=tuple(w.address for w in spares),
        resource=resource if by_resource else None,
    )


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
    need_text = "\n".join(
        f"  stage {n.stage}: memory {_format_bytes(n.memory_bytes or None, unlimited='no estimate')}"
        + (f", on worker {placed[n.stage].address}" if n.stage in placed else "")
        for n in needs)
    rule = (f"workers declaring resource {resource!r}" if by_resource
            else f"any worker (none declares resource {resource!r})" if resource else "any worker")
    found = "\n".join(f"  {w.describe()}{_why_unused(w, resource, by_resource, excluded, placed)}"
                      for w in sorted(workers, key=_worker_order)) or "  (no workers)"
    return (f"cannot place stage {stuck.stage} (needs memory "
            f"{_format_bytes(stuck.memory_bytes or None, unlimited='no estimate')}): "
            f"{len(needs)} stages need {len(needs)} distinct workers from {rule}.\n"
            f"Needed, one worker per stage:\n{need_text}\n"
            f"Found {len(workers)} worker(s):\n{found}")


def _why_unused(worker, resource, by_resource, excluded, placed) -> str:
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
            return f" -- taken by stage {stage}"
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

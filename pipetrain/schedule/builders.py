"""Pure functions that build a ``Schedule`` (semantics: ``schedule.py``'s docstring).

``build_schedule`` validates the request, asks the schedule's builder for each
stage's compute list (F, B, U), then runs two passes over it: one inserts the
CHECKPOINT actions at the cuts, one lowers the SEND/RECV actions in. Every
builder covers the micro-batches ``[first, N)``; a resumed schedule is the same
structure restarted at the cut, with the versions of the full run.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace

from pipetrain.schedule.actions import Action, B, C, F, Kind, U
from pipetrain.schedule.norms import with_norms
from pipetrain.schedule.replicas import with_replicas
from pipetrain.schedule.ties import check_tie_schedule, with_ties
from pipetrain.schedule.schedule import (  # noqa: F401 - ScheduleError, bubble_fraction_formula re-exported
    FLUSH_SCHEDULES, SCHEDULES, Schedule, ScheduleError, bubble_fraction_formula)


@dataclass(frozen=True)
class Shape:
    """What a builder needs to know: p stages, m micro-batches per step, the range [first, total)."""

    num_stages: int
    microbatches: int
    total: int
    first: int
    accumulate: int


# --- the four schedules: compute actions (F, B, U) of one stage -------------------------------

def gpipe_actions(stage: int, shape: Shape) -> list[Action]:
    m, out = shape.microbatches, []
    for t in range(shape.first // m, shape.total // m):
        step = range(t * m, (t + 1) * m)
        out += [F(stage, k, t) for k in step]  # fill
        out += [B(stage, k, t) for k in step]  # drain
        out.append(U(stage, t + 1))            # flush: one update per step
    return out


def one_f_one_b_actions(stage: int, shape: Shape) -> list[Action]:
    p, m, out = shape.num_stages, shape.microbatches, []
    for t in range(shape.first // m, shape.total // m):
        forwards = iter(range(t * m, (t + 1) * m))
        backwards = iter(range(t * m, (t + 1) * m))
        warmup = min(p - stage - 1, m)
        out += [F(stage, next(forwards), t) for _ in range(warmup)]
        for k in forwards:  # steady state: one forward, then the backward of the oldest
            out += [F(stage, k, t), B(stage, next(backwards), t)]
        out += [B(stage, k, t) for k in backwards]  # cool-down
        out.append(U(stage, t + 1))
    return out


def async_order(stage: int, shape: Shape) -> Iterator[tuple[Kind, int]]:
    """The no-flush 1F1B order shared by pipedream and 2bw: all steps stream through."""
    forwards = iter(range(shape.first, shape.total))
    backwards = iter(range(shape.first, shape.total))
    warmup = min(shape.num_stages - stage, shape.total - shape.first)
    for _ in range(warmup):
        yield Kind.FORWARD, next(forwards)
    for k in forwards:  # steady state: backward of the oldest, forward of the next
        yield Kind.BACKWARD, next(backwards)
        yield Kind.FORWARD, k
    for k in backwards:  # cool-down
        yield Kind.BACKWARD, k


def pipedream_actions(stage: int, shape: Shape) -> list[Action]:
    in_flight, a = shape.num_stages - stage, shape.accumulate

    def version(k: int) -> int:  # updates done when F k runs: one per `a` backwards before it
        return max(0, k - in_flight + 1) // a

    out = []
    for kind, k in async_order(stage, shape):
        if kind is Kind.FORWARD:
            out.append(F(stage, k, version(k)))
        else:
            out.append(B(stage, k, version(k)))  # weight stashing: F k's version
            if (k + 1) % a == 0:
                out.append(U(stage, (k + 1) // a))
    return out


def two_bw_actions(stage: int, shape: Shape) -> list[Action]:
    m, out = shape.microbatches, []
    for kind, k in async_order(stage, shape):
        t = k // m
        version = max(0, t - 1)  # delay 1: mini-batch t reads W(t-1)
        out.append((F if kind is Kind.FORWARD else B)(stage, k, version))
        if kind is Kind.BACKWARD and (k + 1) % m == 0:
            out.append(U(stage, t + 1))
    return out


BUILDERS: dict[str, Callable[[int, Shape], list[Action]]] = {
    "gpipe": gpipe_actions,
    "1f1b": one_f_one_b_actions,
    "pipedream": pipedream_actions,
    "2bw": two_bw_actions,
}


# --- passes ------------------------------------------------------------------------------------

def insert_checkpoints(actions: list[Action], cuts: tuple[int, ...]) -> list[Action]:
    """``C K`` right after the B of K - 1 and the U that follows it."""
    wanted, out, pending = set(cuts), [], None
    for a in actions:
        if pending is not None and a.kind is not Kind.UPDATE:
            out.append(pending)
            pending = None
        out.append(a)
        if a.kind is Kind.BACKWARD and a.k + 1 in wanted:
            pending = C(a.stage, a.k + 1)
    if pending is not None:
        out.append(pending)
    return out


def lower_communication(actions: list[Action], *, num_stages: int) -> list[Action]:
    """RECV just before the F/B that consumes it, SEND just after the F/B that produced it.

    Communication actions carry the version of the F/B they belong to on their own stage.
    """
    out: list[Action] = []
    for a in actions:
        s, first, last = a.stage, a.stage == 0, a.stage == num_stages - 1
        if a.kind is Kind.FORWARD:
            out += [] if first else [Action(s, Kind.RECV_ACT, a.k, a.version)]
            out.append(a)
            out += [] if last else [Action(s, Kind.SEND_ACT, a.k, a.version)]
        elif a.kind is Kind.BACKWARD:
            out += [] if last else [Action(s, Kind.RECV_GRAD, a.k, a.version)]
            out.append(a)
            out += [] if first else [Action(s, Kind.SEND_GRAD, a.k, a.version)]
        else:
            out.append(a)
    return out


# --- the entry point ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ScheduleSpec:
    """What a schedule is asked to be: the one description a job carries (to its
    workers, into its checkpoints' manifests), and whose ``build`` is the one
    way to get a ``Schedule``. ``first_microbatch=K > 0`` is the run resumed
    from the checkpoint at cut K.

    ``restart_at=R > 0``: the pipeline starts again, empty, at micro-batch R,
    from the single weight version R / microbatches_per_update: the schedule
    of [R, total) is the one a run of (total - R) micro-batches builds from
    scratch, its micro-batch ids and versions moved up by R and that version.
    ``pipetrain resume --steps`` sets it when it trains on a finished run,
    whose last checkpoint holds only its newest version: an asynchronous
    schedule's stages would need older ones to continue mid-flight, as the
    longer run would have. For gpipe and 1f1b (a flush at every step) the
    numbers are those of the longer run; for pipedream and 2bw the pipeline
    drains at R and fills again.
    """

    name: str
    num_stages: int
    microbatches: int  # per step
    steps: int
    accumulate: int = 1
    checkpoint_every: int | None = None
    first_microbatch: int = 0
    clip: bool = False  # gradient-norm actions before every UPDATE (schedule/norms.py): clip_norm is set
    restart_at: int = 0  # the pipeline starts again, empty, at this micro-batch (see the docstring)
    # Tied weights (schedule/ties.py): per tie, its (lowest, highest) holding stage.
    ties: tuple[tuple[int, int], ...] = ()
    # Replicated pipelines (schedule/replicas.py): this many copies run this schedule, each over
    # its own micro-batch ids, and sum their gradients before every UPDATE. Ids here are local.
    replicas: int = 1

    def __post_init__(self) -> None:
        _validate(self.name, self.num_stages, self.microbatches, self.steps, self.accumulate,
                  self.checkpoint_every, self.first_microbatch)
        r = self.restart_at
        if not _is_int(r) or r < 0 or r % self.microbatches or r >= self.total_microbatches:
            raise ScheduleError(f"restart_at: must be a step boundary in [0, {self.total_microbatches}), got {r!r}")
        object.__setattr__(self, "ties", tuple((int(lo), int(hi)) for lo, hi in self.ties))  # (JSON gives lists)
        if not _is_int(self.replicas) or self.replicas < 1:
            raise ScheduleError(f"replicas: must be an integer >= 1, got {self.replicas!r}")
        check_tie_schedule(self.name, self.ties)

    @property
    def microbatches_per_update(self) -> int:
        """Micro-batches each update folds in (pipedream: its accumulation; the others: a step):
        also the unit of every checkpoint cut."""
        return microbatches_per_update(self.name, self.microbatches, self.accumulate)

    @property
    def total_microbatches(self) -> int:
        return self.steps * self.microbatches

    def resumed_at(self, cut: int) -> "ScheduleSpec":
        return replace(self, first_microbatch=cut)

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.clip:  # (the manifests written before clipping existed stay what they were)
            del d["clip"]
        if not self.restart_at:
            del d["restart_at"]
        if self.replicas == 1:
            del d["replicas"]
        if not self.ties:
            del d["ties"]
        else:
            d["ties"] = [list(t) for t in self.ties]
        return d

    def _passes(self, schedule: Schedule) -> Schedule:
        """The passes over the built actions: the replicas' sum, tie sums, then the norms right before each U."""
        schedule = with_replicas(schedule) if self.replicas > 1 else schedule
        schedule = with_ties(schedule, self.ties) if self.ties else schedule
        return with_norms(schedule) if self.clip else schedule

    def build(self) -> Schedule:
        if self.restart_at:
            r, first = self.restart_at, self.first_microbatch
            fresh = replace(self, steps=self.steps - r // self.microbatches, first_microbatch=max(first - r, 0),
                            restart_at=0, clip=False, ties=(), replicas=1).build()
            moved = shifted(fresh, microbatches=r, versions=r // self.microbatches_per_update)
            if first < r:  # the run before the restart drains at r, then the pipeline fills again
                before = replace(self, steps=r // self.microbatches, restart_at=0, clip=False, ties=(),
                                 replicas=1).build()
                moved = replace(moved, first_microbatch=first, initial_versions=before.initial_versions,
                                actions=tuple(a + b for a, b in zip(before.actions, moved.actions)))
            return self._passes(moved)
        total, first = self.total_microbatches, self.first_microbatch
        shape = Shape(self.num_stages, self.microbatches, total, first, self.accumulate)
        cuts = checkpoint_cuts(first=first, total=total, every=self.checkpoint_every)
        actions = []
        for s in range(self.num_stages):
            compute = BUILDERS[self.name](s, shape)
            actions.append(tuple(lower_communication(insert_checkpoints(compute, cuts), num_stages=self.num_stages)))
        latest = first // self.microbatches_per_update
        schedule = Schedule(
            name=self.name, num_stages=self.num_stages, microbatches_per_step=self.microbatches, steps=self.steps,
            accumulate=self.accumulate, checkpoint_every=self.checkpoint_every, first_microbatch=first,
            actions=tuple(actions),
            initial_versions=tuple(initial_versions(acts, latest=latest) for acts in actions),
        )
        return self._passes(schedule)


def shifted(schedule: Schedule, *, microbatches: int, versions: int) -> Schedule:
    """``schedule`` with its micro-batch ids (and cuts) moved up by ``microbatches`` and
    its weight versions by ``versions`` (a ``ScheduleSpec.restart_at``)."""
    def move(a: Action) -> Action:
        k = None if a.k is None else a.k + microbatches
        return Action(a.stage, a.kind, k, None if a.version is None else a.version + versions)

    return replace(schedule, steps=schedule.steps + microbatches // schedule.microbatches_per_step,
                   first_microbatch=schedule.first_microbatch + microbatches,
                   actions=tuple(tuple(move(a) for a in acts) for acts in schedule.actions),
                   initial_versions=tuple(tuple(v + versions for v in vs) for vs in schedule.initial_versions))


def build_schedule(name: str, *, num_stages: int, microbatches: int, steps: int, accumulate: int = 1,
                   checkpoint_every: int | None = None, first_microbatch: int = 0, clip: bool = False) -> Schedule:
    """``ScheduleSpec(...).build()``, for callers with the fields at hand."""
    return ScheduleSpec(name, num_stages=num_stages, microbatches=microbatches, steps=steps, accumulate=accumulate,
                        checkpoint_every=checkpoint_every, first_microbatch=first_microbatch, clip=clip).build()


def microbatches_per_update(name: str, microbatches: int, accumulate: int = 1) -> int:
    """The one place that says how many micro-batches an update of schedule ``name`` folds in."""
    return accumulate if name == "pipedream" else microbatches


def checkpoint_cuts(*, first: int, total: int, every: int | None) -> tuple[int, ...]:
    """Every multiple of ``every`` in (first, total], plus total itself."""
    if every is None:
        return ()
    cuts = set(range((first // every + 1) * every, total + 1, every))
    if total > first:
        cuts.add(total)
    return tuple(sorted(cuts))


def initial_versions(actions: tuple[Action, ...], *, latest: int) -> tuple[int, ...]:
    """Versions F/B read that no U of this schedule produces, plus the latest one at the start.

    The latest is needed even when no F/B reads it: the next UPDATE starts from it.
    """
    read = {a.version for a in actions if a.kind in (Kind.FORWARD, Kind.BACKWARD)}
    produced = {a.version for a in actions if a.kind is Kind.UPDATE}
    return tuple(sorted((read - produced) | {latest}))


def _validate(name, num_stages, microbatches, steps, accumulate, checkpoint_every, first_microbatch) -> None:
    if name not in SCHEDULES:
        raise ScheduleError(f"name: unknown schedule {name!r}; known: {', '.join(SCHEDULES)}")
    for field, value in (("num_stages", num_stages), ("microbatches", microbatches), ("steps", steps),
                         ("accumulate", accumulate)):
        if not _is_int(value) or value < 1:
            raise ScheduleError(f"{field}: must be an integer >= 1, got {value!r}")
    m, total = microbatches, steps * microbatches
    if name != "pipedream" and accumulate != 1:
        raise ScheduleError(f"accumulate: only pipedream accumulates; {name} already updates once per step "
                            f"of {m} micro-batches (got accumulate={accumulate})")
    if name == "pipedream" and m % accumulate:
        raise ScheduleError(f"accumulate: must divide microbatches so every step ends with an update "
                            f"(got accumulate={accumulate}, microbatches={m})")
    if name == "2bw" and m < num_stages:
        raise ScheduleError(f"microbatches: 2bw needs microbatches >= num_stages so that at most two weight "
                            f"versions are live (got {m} < {num_stages})")
    # Cuts sit where a stage's state is complete: after an update, with nothing accumulated.
    unit = microbatches_per_update(name, m, accumulate)
    unit_name = "accumulate" if name == "pipedream" else "microbatches"
    if checkpoint_every is not None and (not _is_int(checkpoint_every) or checkpoint_every < 1
                                         or checkpoint_every % unit):
        raise ScheduleError(f"checkpoint_every: must be a positive multiple of {unit_name}={unit} "
                            f"for {name}, got {checkpoint_every!r}")
    if not _is_int(first_microbatch) or not 0 <= first_microbatch <= total:
        raise ScheduleError(f"first_microbatch: must be in [0, {total}], got {first_microbatch!r}")
    if first_microbatch % unit:
        raise ScheduleError(f"first_microbatch: {first_microbatch} is not a checkpoint cut of {name}: "
                            f"it must be a multiple of {unit_name}={unit}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

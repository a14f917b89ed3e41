"""Evaluation during training as a schedule pass: eval blocks in each stage's action list.

``EvalSpec.apply`` takes a built ``Schedule`` and inserts, on every stage, an
eval block at each evaluation point: a forward-only pass of the held-out
micro-batches ``0 .. microbatches - 1`` (``RECV_E``, ``E``, ``SEND_E`` per
micro-batch), whose mean loss the last stage reports. Nothing else changes:
the training actions, their versions and the checkpoint cuts are those of the
schedule without evaluation, so training numbers are the same with it or without.

Evaluation points are step boundaries: before the first step (step 0), after
the last (step ``steps``), and after every ``every``-th step. The block of
step t sits on each stage right after the B of micro-batch ``t * m - 1`` and
what follows it there (its SEND_B, the U of that step), before a CHECKPOINT
at that cut (so the last stage reports the eval before its shard, and the
checkpoint's manifest holds it), and evaluates with the stage's latest
version at that point of its program:

- gpipe and 1f1b: version t on every stage, the weights after t steps, so the
  eval loss is the unpartitioned model's held-out loss after t steps.
- pipedream: version ``t * m / accumulate``, the weights every micro-batch
  ``< t * m`` has updated and no later one, on every stage. The stage has by
  then run the forwards of its in-flight later micro-batches, which do not
  change its weights.
- 2bw: version t on every stage (the update after mini-batch t - 1).

All of it is a function of the schedule, so the eval losses are deterministic
and the same in the reference executor and on Dask.

A schedule resumed at cut K (a recovery, a resume) holds the eval points ``>= K``;
the one at K, if K is one, runs first, from the checkpoint's state, which is
the state the full run evaluated there: it is re-run after every rollback to K.
The job core logs each step's eval once (a re-run reports the same bits); a
job resumed in a new driver knows the evals its checkpoint's manifest holds
(those of a scheduled checkpoint's own cut included), and logs an eval it
did not know, such as a time-based cut's, again, with the same value.

Eval messages are numbered ``step * microbatches + j`` (``tag``): unique within
a run, so the transport's once-per-(kind, id) rule holds across blocks.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from pipetrain.schedule.actions import BEFORE_UPDATE, Action, Kind
from pipetrain.schedule.schedule import Schedule, ScheduleError


@dataclass(frozen=True)
class EvalSpec:
    """When the stages evaluate, and on how many held-out micro-batches (ids ``0 .. microbatches - 1``)."""

    microbatches: int
    every: int = 0  # steps between evaluations; 0: only before the first and after the last step

    def __post_init__(self) -> None:
        for name, value, low in (("eval_microbatches", self.microbatches, 1), ("eval_every", self.every, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ScheduleError(f"{name}: must be an integer >= {low}, got {value!r}")

    def steps(self, total_steps: int) -> tuple[int, ...]:
        """The steps after which the stages evaluate (0: before training)."""
        points = {0, total_steps}
        if self.every:
            points |= set(range(0, total_steps + 1, self.every))
        return tuple(sorted(points))

    def tag(self, step: int, j: int) -> int:
        return step * self.microbatches + j

    def decode(self, tag: int) -> tuple[int, int]:
        """(step, held-out micro-batch id) of eval message ``tag``."""
        return divmod(tag, self.microbatches)

    def apply(self, schedule: Schedule) -> Schedule:
        m, first = schedule.microbatches_per_step, schedule.first_microbatch
        due = [t for t in self.steps(schedule.steps) if t * m >= first]
        actions = tuple(tuple(self._stage(schedule, s, due)) for s in range(schedule.num_stages))
        return replace(schedule, actions=actions)

    def _stage(self, schedule: Schedule, s: int, due: list[int]) -> list[Action]:
        m, first = schedule.microbatches_per_step, schedule.first_microbatch
        actions = list(schedule.actions[s])
        latest = max(schedule.initial_versions[s])
        out: list[Action] = []
        i = 0
        for t in due:
            boundary = t * m
            stop = 0 if boundary == first else _after_backward(actions, boundary - 1, s, start=i)
            for a in actions[i:stop]:
                out.append(a)
                if a.kind is Kind.UPDATE:
                    latest = a.version
            i = max(i, stop)
            out += self._block(s, schedule.num_stages, t, latest)
        for a in actions[i:]:
            out.append(a)
        return out

    def _block(self, s: int, p: int, step: int, version: int) -> list[Action]:
        block = []
        for j in range(self.microbatches):
            tag = self.tag(step, j)
            block += [] if s == 0 else [Action(s, Kind.RECV_EVAL, tag, version)]
            block.append(Action(s, Kind.EVAL_F, tag, version))
            block += [] if s == p - 1 else [Action(s, Kind.SEND_EVAL, tag, version)]
        return block


def _after_backward(actions: list[Action], k: int, s: int, *, start: int) -> int:
    """The position right after stage ``s``'s B of micro-batch ``k`` and what belongs to it
    (its SEND_B, the U that follows and the passes' actions before that U: clipping's norms,
    the tie relay, the replicas' sum; not a CHECKPOINT), looking from ``start`` on."""
    for i in range(start, len(actions)):
        a = actions[i]
        if a.kind is Kind.BACKWARD and a.k == k:
            i += 1
            while i < len(actions) and actions[i].kind in (Kind.SEND_GRAD, Kind.UPDATE, *BEFORE_UPDATE):
                i += 1
            return i
    raise ScheduleError(f"stage {s}: no B of micro-batch {k} to place an evaluation after")


def check_eval_action(where: str, a: Action, s: int, p: int, seen: set[tuple[Kind, int]]) -> None:
    """The simulator's static check of one eval action of stage ``s`` (``seen``: the (kind, k) run before it)."""
    if a.k is None or a.k < 0:
        raise ScheduleError(f"{where}: an eval message needs a number >= 0, got {a.k}")
    if (a.kind, a.k) in seen:
        raise ScheduleError(f"{where}: runs {a.kind.value} {a.k} a second time")
    seen.add((a.kind, a.k))
    if a.kind is Kind.RECV_EVAL and s == 0:
        raise ScheduleError(f"{where}: stage 0 reads held-out inputs itself; it has no previous stage")
    if a.kind is Kind.SEND_EVAL and s == p - 1:
        raise ScheduleError(f"{where}: the last stage has no next stage to send to")
    if a.kind is Kind.EVAL_F and s > 0 and (Kind.RECV_EVAL, a.k) not in seen:
        raise ScheduleError(f"{where} has no input: no {s}RECV_E{a.k} before it")
    if a.kind is Kind.SEND_EVAL and (Kind.EVAL_F, a.k) not in seen:
        raise ScheduleError(f"{where} sends an eval activation before {s}E{a.k} produced it")

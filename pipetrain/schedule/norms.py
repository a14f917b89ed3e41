"""Gradient clipping by global norm as schedule actions (a pass over a built schedule).

With ``clip_norm`` set, an update must see the norm of the gradient it applies
across the *whole model*, which no stage holds. ``with_norms`` puts, before
every ``UPDATE v`` of the flush schedules (gpipe, 1f1b) and of 2bw, a scalar
reduction over the stages in a fixed order, keyed by v:

    stage p-1:        N v, SEND_N v,                     RECV_T v,           U v
    stage 0 < s < p-1: RECV_N v, N v, SEND_N v,         RECV_T v, SEND_T v, U v
    stage 0:          RECV_N v, N v,           SEND_T v,                     U v

``N v`` adds the stage's squared norm of its mean gradients (``grad_sq_norm``,
float64) to the partial sum of stages s+1..p-1, so the sum runs in the order
p-1, p-2, ..., 0 on every run; stage 0 then has the total and it travels back
up. Every stage of an update uses the same total, and each a function of the
gradients alone: the reference executor and a Dask run give the same bits.

pipedream has no such point: its stages update at different times, and a
reduction would make each update wait for the stages before it finish theirs
(the flush pipedream exists to remove). There each stage clips by the norm of
its *own* gradient (``N v, U v``, no messages): a per-stage rule, like
clipping each stage's parameter group on its own. It is documented, tested
against a numpy oracle, and deterministic.

A split backward's weight half runs right after its SEND_B (the interpreter),
before any N, so a stage's norm covers every gradient the update applies.
"""
from __future__ import annotations

from dataclasses import replace

from pipetrain.schedule.actions import NORMS, Action, Kind
from pipetrain.schedule.schedule import Schedule, ScheduleError

__all__ = ["NORM_RECVS", "NORM_SENDS", "check_norm_actions", "is_global", "with_norms"]

NORM_SENDS = (Kind.SEND_NORM, Kind.SEND_TOTAL)
NORM_RECVS = (Kind.RECV_NORM, Kind.RECV_TOTAL)
LOCAL_SCHEDULES = ("pipedream",)  # stages update at different times: each clips by its own norm


def is_global(schedule_name: str) -> bool:
    """Whether ``schedule_name``'s updates clip by the whole model's norm (else each stage's own)."""
    return schedule_name not in LOCAL_SCHEDULES


def norm_actions(stage: int, num_stages: int, version: int, *, cross: bool) -> list[Action]:
    """The actions that come right before ``stage``'s ``UPDATE version``."""
    first, last = stage == 0, stage == num_stages - 1
    if not cross or num_stages == 1:
        return [Action(stage, Kind.NORM, version)]
    out = [] if last else [Action(stage, Kind.RECV_NORM, version)]
    out.append(Action(stage, Kind.NORM, version))
    if not first:
        out += [Action(stage, Kind.SEND_NORM, version), Action(stage, Kind.RECV_TOTAL, version)]
    if not last:
        out.append(Action(stage, Kind.SEND_TOTAL, version))
    return out


def with_norms(schedule: Schedule) -> Schedule:
    """``schedule`` with the norm actions before each of its UPDATEs (see the module)."""
    cross = is_global(schedule.name)
    actions = []
    for s, acts in enumerate(schedule.actions):
        out: list[Action] = []
        for a in acts:
            if a.kind is Kind.UPDATE:
                out += norm_actions(s, schedule.num_stages, a.version, cross=cross)
            out.append(a)
        actions.append(tuple(out))
    return replace(schedule, actions=tuple(actions))


def check_norm_actions(schedule: Schedule, s: int) -> None:
    """Stage ``s``'s norm actions: each once, on a stage that has the neighbour it
    talks to, and all of version v between the last B before ``U v`` and ``U v``
    itself (the norm is of what that update applies), N after its RECV_N and
    before its SEND_N / SEND_T, and RECV_T before SEND_T."""
    p, acts = schedule.num_stages, schedule.actions[s]
    seen: dict[tuple[Kind, int], int] = {}
    for i, a in enumerate(acts):
        if a.kind not in NORMS:
            continue
        where = f"stage {s}: {a!r} (position {i})"
        if (a.kind, a.k) in seen:
            raise ScheduleError(f"{where}: runs {a.kind.value} {a.k} a second time")
        seen[a.kind, a.k] = i
        if (a.kind in (Kind.SEND_NORM, Kind.RECV_TOTAL) and s == 0) or (
                a.kind in (Kind.RECV_NORM, Kind.SEND_TOTAL) and s == p - 1):
            raise ScheduleError(f"{where}: stage {s} has no {'previous' if s == 0 else 'next'} stage to talk to")
        j = i + 1
        while j < len(acts) and acts[j].kind in NORMS:
            j += 1
        if j == len(acts) or acts[j].kind is not Kind.UPDATE or acts[j].version != a.k:
            raise ScheduleError(f"{where}: the norm of update {a.k} must come right before {s}U{a.k} "
                                f"(only norm actions between), not before {acts[j] if j < len(acts) else 'the end'!r}")
    for (kind, v), i in seen.items():
        needs = {Kind.SEND_NORM: [(Kind.NORM, True)], Kind.SEND_TOTAL: [(Kind.NORM, True)],
                 Kind.NORM: [(Kind.RECV_NORM, s < p - 1 and is_global(schedule.name))],
                 Kind.RECV_TOTAL: [(Kind.SEND_NORM, True)]}.get(kind, [])
        if kind is Kind.SEND_TOTAL and s > 0:
            needs.append((Kind.RECV_TOTAL, True))
        for before, required in needs:
            if required and seen.get((before, v), len(acts)) > i:
                raise ScheduleError(f"stage {s}: {s}{kind.value}{v} (position {i}) needs {s}{before.value}{v} "
                                    f"before it")

"""Tied weights as schedule actions (a pass over a built schedule, like ``norms.py``).

A model may tie parameters (the GPT's token embedding on stage 0 and its LM
head on stage p-1: ``pipetrain.ties``). Each stage holding one keeps its own
*copy*; the copies start identical (initialised once, copied) and stay so
because every update applies the same gradient to each: the sum of the
copies' gradients, which is the gradient of the model with one shared
parameter. ``with_ties`` puts, before every ``UPDATE v`` of the stages in a
tie's span ``[lo, hi]`` (its lowest and highest holding stage), a tensor
reduction shaped like clipping's scalar one, keyed by v:

    stage hi:          TIE v, SEND_G v,                     RECV_S v,           U v
    stage lo < s < hi: RECV_G v, TIE v, SEND_G v,           RECV_S v, SEND_S v, U v
    stage lo:          RECV_G v, TIE v,                               SEND_S v, U v

``TIE v`` adds the stage's copies' accumulated gradients (if it holds any) to
the partial sums received from stage + 1, so each sum runs in the fixed order
hi, ..., lo, computed once, at stage lo; the total travels back up and every
copy gets exactly those bits: the copies stay bit-identical, on every run and
in both executors. A tie inside one stage (p = 1, or both copies on one
stage) is just ``TIE v``. With several ties the reduction spans the union of
their spans; each message holds the sums of the ties whose span crosses its
edge (``{"g0": array, ...}``), checked on receipt against the tied
parameter's shape and dtype.

Why a relay: stages talk only to their neighbours (links s <-> s+1), and the
transport is being reworked, so the gradient goes hop by hop over the
existing links instead of a new lo <-> hi edge. Its cost: the tied gradient
crosses the p-1 edges twice per update (partial sums down, the total back
up), 2(p-1) hops of one gradient-sized message, in sequence, after the
step's last backward; a direct edge between the holders (future work) would
need one exchange. The norm actions of clipping come after these (``norms.py``
inserts right before U), and a stage counts a tied parameter in its norm only
where it holds the tie's *first* copy, so the global norm counts it once.

pipedream updates each stage at its own time, so there is no point where
both copies' gradients of an update exist together. Its ties follow
PipeDream's own rule for weights instead ("vertical sync": every stage's
forward of micro-batch k uses the weights that produced k's input), and need
no actions of their own: the lowest holder owns the tie (only it updates it),
the value its forward of k used rides up with k's activation, the highest
holder's forward and backward of k use exactly that value, and its gradient
rides down with k's input gradient to the owner, which adds it before its
update (``runtime/tie_carry.py``). So ``with_ties`` leaves a pipedream
schedule as it is. Only two copies on two different stages per tie are built
(``check_tie_schedule`` refuses a tie inside one stage under pipedream).
(A first design, "the same updates, applied late", sent the summed update's
new value up d = hi - lo updates later; it left values in flight at a
checkpoint cut that a replay does not recompute, so it is not built.)
"""
from __future__ import annotations

from dataclasses import replace

from pipetrain.schedule.actions import NORMS, TIES, Action, Kind
from pipetrain.schedule.schedule import Schedule, ScheduleError

__all__ = ["CARRIED", "TIE_RECVS", "TIE_SENDS", "check_tie_actions", "check_tie_schedule", "span", "with_ties"]

TIE_SENDS = (Kind.SEND_TIE, Kind.SEND_TIED)
TIE_RECVS = (Kind.RECV_TIE, Kind.RECV_TIED)
CARRIED = ("pipedream",)  # its stages update at different times: the ties ride on the F/B messages

Spans = tuple[tuple[int, int], ...]


def check_tie_schedule(schedule_name: str, spans: Spans) -> None:
    """Refuse what is not built: under pipedream, a tie whose copies are all on one stage."""
    if schedule_name in CARRIED:
        for lo, hi in spans:
            if lo == hi:
                raise NotImplementedError(
                    f"tied weights with the {schedule_name} schedule: a tie inside one stage (stage {lo}) is not "
                    f"implemented (its copies would need a sum before each update); cut the model so the copies "
                    f"are on different stages, use gpipe, 1f1b or 2bw, or untie the model")


def span(spans: Spans) -> tuple[int, int] | None:
    """The stages the reduction runs on: the union of the ties' spans (None: no ties)."""
    if not spans:
        return None
    return min(lo for lo, _ in spans), max(hi for _, hi in spans)


def tie_actions(stage: int, lo: int, hi: int, version: int) -> list[Action]:
    """The actions that come right before ``stage``'s ``UPDATE version`` (stage in [lo, hi])."""
    out = [] if stage == hi else [Action(stage, Kind.RECV_TIE, version)]
    out.append(Action(stage, Kind.TIE, version))
    if stage > lo:
        out += [Action(stage, Kind.SEND_TIE, version), Action(stage, Kind.RECV_TIED, version)]
    if stage < hi:
        out.append(Action(stage, Kind.SEND_TIED, version))
    return out


def with_ties(schedule: Schedule, spans: Spans) -> Schedule:
    """``schedule`` with the tie reduction before each UPDATE of the stages in the ties' span."""
    check_tie_schedule(schedule.name, spans)
    bounds = span(spans)
    if bounds is None or schedule.name in CARRIED:  # (pipedream: runtime/tie_carry.py)
        return schedule
    lo, hi = bounds
    if not 0 <= lo <= hi < schedule.num_stages:
        raise ScheduleError(f"ties: span [{lo}, {hi}] is outside the schedule's {schedule.num_stages} stages")
    actions = []
    for s, acts in enumerate(schedule.actions):
        out: list[Action] = []
        for a in acts:
            if a.kind is Kind.UPDATE and lo <= s <= hi:
                out += tie_actions(s, lo, hi, a.version)
            out.append(a)
        actions.append(tuple(out))
    return replace(schedule, actions=tuple(actions))


def check_tie_actions(schedule: Schedule, s: int) -> None:
    """Stage ``s``'s tie actions: each once, talking only to a neighbour it has, all of
    version v before ``U v`` with only tie and norm actions between, in the order
    RECV_G, TIE, SEND_G, RECV_S, SEND_S."""
    p, acts = schedule.num_stages, schedule.actions[s]
    order = {Kind.RECV_TIE: 0, Kind.TIE: 1, Kind.SEND_TIE: 2, Kind.RECV_TIED: 3, Kind.SEND_TIED: 4}
    last: dict[int, int] = {}
    seen: set[tuple[Kind, int]] = set()
    for i, a in enumerate(acts):
        if a.kind not in TIES:
            continue
        where = f"stage {s}: {a!r} (position {i})"
        if (a.kind, a.k) in seen:
            raise ScheduleError(f"{where}: runs {a.kind.value} {a.k} a second time")
        seen.add((a.kind, a.k))
        if (a.kind in (Kind.SEND_TIE, Kind.RECV_TIED) and s == 0) or (
                a.kind in (Kind.RECV_TIE, Kind.SEND_TIED) and s == p - 1):
            raise ScheduleError(f"{where}: stage {s} has no {'previous' if s == 0 else 'next'} stage to talk to")
        if order[a.kind] < last.get(a.k, -1):
            raise ScheduleError(f"{where}: out of order (RECV_G, TIE, SEND_G, RECV_S, SEND_S)")
        last[a.k] = order[a.kind]
        j = i + 1
        while j < len(acts) and (acts[j].kind in TIES or acts[j].kind in NORMS):
            j += 1
        if j == len(acts) or acts[j].kind is not Kind.UPDATE or acts[j].version != a.k:
            raise ScheduleError(f"{where}: the tie sums of update {a.k} must come right before {s}U{a.k}")

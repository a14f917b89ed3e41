"""Checks a ``Schedule`` and times it, without running any model.

``simulate`` first checks each stage's list on its own (every micro-batch gets
one F and one B, F before B, the weight version each reads is held, live
activations stay within the schedule's bound, sends and receives pair up),
then runs all stages together: each stage runs its actions in order (F, B
and U take their stage's cost; an update costs nothing unless
``update_cost`` says so; a split B sends after its input-gradient half and
does its ``weight_cost`` after the send), a RECV waits for the matching SEND
plus ``send_cost``, and a SEND waits for a credit when ``credits`` bounds the
unacknowledged micro-batches of its edge. The run
either finishes (deadlock-free, with a timeline) or stops with a
``ScheduleError`` that prints the stage x time grid so far and what each stage
is blocked on.

Eval blocks (``schedule/evaluation.py``) are checked too: every ``E`` has
its ``RECV_E`` before it (s > 0) and its ``SEND_E`` after it (s < p - 1),
reads the stage's latest version, and runs once; an ``E`` costs what the
stage's forward costs, and eval messages share the activations' edge and
its credits (one connection carries both).
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from pipetrain.schedule.actions import COMPUTE, EVALUATION, NORMS, REPLICAS, TIES, Action, Kind
from pipetrain.schedule.evaluation import check_eval_action
from pipetrain.schedule.norms import NORM_RECVS, NORM_SENDS, check_norm_actions
from pipetrain.schedule.replicas import check_replica_actions
from pipetrain.schedule.ties import TIE_RECVS, TIE_SENDS, check_tie_actions
from pipetrain.schedule.schedule import Schedule, ScheduleError, bubble_fraction_formula

__all__ = ["ScheduleError", "SimulationReport", "TimedAction", "activation_bound", "check_schedule",
           "render_grid", "simulate"]

_FREE = defaultdict(float)  # sends, receives and checkpoints take no time of their own
MAX_GRID_SLOTS = 256  # about 64 micro-batches at F=1, B=2 on a handful of stages


class TimedAction(NamedTuple):
    action: Action
    start: float
    end: float


@dataclass(frozen=True)
class StageMemory:
    peak_live_activations: int
    peak_stashed_versions: int
    versions_at_checkpoints: dict[int, tuple[int, ...]]  # cut -> versions held at its CHECKPOINT


@dataclass(frozen=True)
class SimulationReport:
    schedule: Schedule
    forward_cost: tuple[float, ...]
    backward_cost: tuple[float, ...]
    update_cost: tuple[float, ...]
    send_cost: float
    credits: int | None
    weight_cost: tuple[float, ...]
    split_backward: str
    makespan: float
    busy: tuple[float, ...]  # F, B (with a split one's W) and U time per stage
    peak_live_activations: tuple[int, ...]
    activation_bounds: tuple[int, ...]
    peak_stashed_versions: tuple[int, ...]
    versions_at_checkpoints: tuple[dict[int, tuple[int, ...]], ...]
    timeline: tuple[tuple[TimedAction, ...], ...]  # per stage: (action, start, end), in order
    # per stage: the weight-gradient halves of split backwards, as (their B, start, end)
    weights: tuple[tuple[TimedAction, ...], ...] = ()

    @property
    def bubble_fraction(self) -> float:
        capacity = self.schedule.num_stages * self.makespan
        return 0.0 if capacity == 0 else 1.0 - sum(self.busy) / capacity

    @property
    def formula_bubble(self) -> float | None:
        """(p-1)/(m+p-1) for the flush schedules (exact when costs are uniform across stages)."""
        s = self.schedule
        return bubble_fraction_formula(s.name, s.num_stages, s.microbatches_per_step) if s.is_flush else None

    @property
    def slot(self) -> float:
        """The grid's time unit: the smallest positive cost (a split B's two halves included)."""
        halves = () if self.split_backward == "never" else (
            *self.weight_cost, *(b - w for b, w in zip(self.backward_cost, self.weight_cost)))
        return _slot(self.forward_cost, (*self.backward_cost, *halves), self.send_cost)

    def render(self, *, width: int = 120) -> str:
        return "\n".join([_title(self), "", render_grid(self.schedule, self, width=width), "", _figures(self)])


# --- the entry points --------------------------------------------------------------------------

def simulate(schedule: Schedule, *, forward_cost: float | Sequence[float] = 1.0,
             backward_cost: float | Sequence[float] = 2.0, update_cost: float | Sequence[float] = 0.0,
             send_cost: float = 0.0, credits: int | None = None, weight_cost: float | Sequence[float] = 0.0,
             split_backward: str = "never", reduce_cost: float = 0.0) -> SimulationReport:
    """Check ``schedule``'s invariants and time it; raise ``ScheduleError`` naming the fault.

    ``reduce_cost``: with replicas (``schedule/replicas.py``), how long the exchange of a
    stage's gradients with its other replicas takes; every replica runs the same schedule
    at the same pace, so a ``RECV_R v`` waits until ``reduce_cost`` after its own ``SEND_R v``
    (the grid is one replica's).

    ``weight_cost``: the part of each stage's ``backward_cost`` that computes
    weight gradients; a B that runs split under ``split_backward`` ("never",
    "always", "auto": ``Schedule.split_positions``) takes the rest, its SEND_B
    goes out, then the stage spends ``weight_cost`` before its next action."""
    p = schedule.num_stages
    fwd = _per_stage(forward_cost, p, "forward_cost")
    bwd = _per_stage(backward_cost, p, "backward_cost")
    upd = _per_stage(update_cost, p, "update_cost", zero_ok=True)
    wgt = _per_stage(weight_cost, p, "weight_cost", zero_ok=True)
    for stage, (w, b) in enumerate(zip(wgt, bwd)):
        if w >= b:
            raise ScheduleError(f"weight_cost: stage {stage}'s {_fmt(w)} is not below its backward_cost {_fmt(b)} "
                                f"(the weight gradients are part of the backward)")
    try:
        split = tuple(schedule.split_positions(stage, split_backward) for stage in range(p))
    except ValueError as error:
        raise ScheduleError(f"split_backward: {error}") from None
    if not isinstance(send_cost, (int, float)) or send_cost < 0:
        raise ScheduleError(f"send_cost: must be a number >= 0, got {send_cost!r}")
    if credits is not None and (not isinstance(credits, int) or credits < 1):
        raise ScheduleError(f"credits: must be None (unbounded) or an integer >= 1, got {credits!r}")
    if not isinstance(reduce_cost, (int, float)) or reduce_cost < 0:
        raise ScheduleError(f"reduce_cost: must be a number >= 0, got {reduce_cost!r}")
    memory = check_schedule(schedule)
    timeline, weights = _run(schedule, fwd, bwd, upd, float(send_cost), credits, wgt, split, float(reduce_cost))
    makespan = max((e.end for t in (*timeline, *weights) for e in t), default=0.0)
    busy = tuple(sum(e.end - e.start for e in t if e.action.kind in (*COMPUTE, Kind.UPDATE, Kind.EVAL_F))
                 + sum(e.end - e.start for e in w) for t, w in zip(timeline, weights))
    return SimulationReport(
        schedule=schedule, forward_cost=fwd, backward_cost=bwd, update_cost=upd, send_cost=float(send_cost),
        credits=credits, weight_cost=wgt, split_backward=split_backward,
        makespan=makespan, busy=busy,
        peak_live_activations=tuple(m.peak_live_activations for m in memory),
        activation_bounds=tuple(activation_bound(schedule, s) for s in range(p)),
        peak_stashed_versions=tuple(m.peak_stashed_versions for m in memory),
        versions_at_checkpoints=tuple(m.versions_at_checkpoints for m in memory),
        timeline=timeline, weights=weights,
    )


def activation_bound(schedule: Schedule, stage: int) -> int:
    """Most micro-batches a stage may hold activations for (F done, B not yet)."""
    p, m = schedule.num_stages, schedule.microbatches_per_step
    if schedule.name == "gpipe":
        return m  # fill holds the whole step
    if schedule.name == "1f1b":
        return min(p - stage, m)
    return p - stage


def check_schedule(schedule: Schedule) -> tuple[StageMemory, ...]:
    """The static invariants, stage by stage and across neighbours; returns each stage's memory figures."""
    if len(schedule.actions) != schedule.num_stages or len(schedule.initial_versions) != schedule.num_stages:
        raise ScheduleError(f"schedule {schedule.name!r}: {schedule.num_stages} stages but "
                            f"{len(schedule.actions)} action lists and {len(schedule.initial_versions)} "
                            f"initial_versions entries")
    for s in range(schedule.num_stages):
        _check_order(schedule, s)
        check_norm_actions(schedule, s)
        check_tie_actions(schedule, s)
        check_replica_actions(schedule, s)
    _check_pairs(schedule)
    return tuple(_stage_memory(schedule, s) for s in range(schedule.num_stages))


# --- static checks -----------------------------------------------------------------------------

def _check_order(schedule: Schedule, s: int) -> None:
    p, first, total = schedule.num_stages, schedule.first_microbatch, schedule.total_microbatches
    forward_version: dict[int, int] = {}
    backwards: set[int] = set()
    seen: set[tuple[Kind, int]] = set()
    for i, a in enumerate(schedule.actions[s]):
        where = f"stage {s}: {a!r} (position {i})"
        if a.stage != s:
            raise ScheduleError(f"{where} belongs to stage {a.stage}, not {s}")
        if a.kind in (Kind.UPDATE, Kind.CHECKPOINT):
            if a.kind is Kind.CHECKPOINT:
                _check_cut(where, a.k, backwards, first, total)
            continue
        if a.kind in EVALUATION:
            check_eval_action(where, a, s, p, seen)
            continue
        if a.kind in NORMS or a.kind in TIES or a.kind in REPLICAS:  # checked by check_norm/tie/replica_actions
            continue
        if a.k is None or not first <= a.k < total:
            raise ScheduleError(f"{where}: micro-batch {a.k} is outside this schedule's range [{first}, {total})")
        if (a.kind, a.k) in seen:
            raise ScheduleError(f"{where}: runs {a.kind.value} {a.k} a second time")
        seen.add((a.kind, a.k))
        if a.kind in (Kind.RECV_ACT, Kind.SEND_GRAD) and s == 0:
            raise ScheduleError(f"{where}: stage 0 has no previous stage to talk to")
        if a.kind in (Kind.SEND_ACT, Kind.RECV_GRAD) and s == p - 1:
            raise ScheduleError(f"{where}: the last stage has no next stage to talk to")
        if a.kind is Kind.FORWARD:
            if s > 0 and (Kind.RECV_ACT, a.k) not in seen:
                raise ScheduleError(f"{where} has no input: no {s}RECV_F{a.k} before it")
            forward_version[a.k] = a.version
        elif a.kind is Kind.BACKWARD:
            if a.k not in forward_version:
                raise ScheduleError(f"{where} runs before its forward {s}F{a.k}")
            if a.version != forward_version[a.k]:
                raise ScheduleError(f"{where} uses version {a.version} but {s}F{a.k} used version "
                                    f"{forward_version[a.k]}: B must use its forward's version (weight stashing)")
            if s < p - 1 and (Kind.RECV_GRAD, a.k) not in seen:
                raise ScheduleError(f"{where} has no output gradient: no {s}RECV_B{a.k} before it")
            backwards.add(a.k)
        elif a.kind is Kind.SEND_ACT and a.k not in forward_version:
            raise ScheduleError(f"{where} sends an activation before {s}F{a.k} produced it")
        elif a.kind is Kind.SEND_GRAD and a.k not in backwards:
            raise ScheduleError(f"{where} sends a gradient before {s}B{a.k} produced it")
    for kind, done in ((Kind.FORWARD, set(forward_version)), (Kind.BACKWARD, backwards)):
        missing = sorted(set(range(first, total)) - done)
        if missing:
            raise ScheduleError(f"stage {s}: micro-batches {_few(missing)} have no {kind.value}: every micro-batch "
                                f"in [{first}, {total}) needs exactly one F and one B per stage")


def _check_cut(where: str, cut: int | None, backwards: set[int], first: int, total: int) -> None:
    if cut is None or not first < cut <= total:
        raise ScheduleError(f"{where}: cut {cut} is outside ({first}, {total}]")
    missing = sorted(set(range(first, cut)) - backwards)
    early = sorted(k for k in backwards if k >= cut)
    if missing or early:
        raise ScheduleError(f"{where}: the state at cut {cut} must include every B < {cut} and none after; "
                            + (f"missing B of {_few(missing)}" if missing else f"already ran B of {_few(early)}"))


def _check_pairs(schedule: Schedule) -> None:
    """Every SEND has its RECV on the neighbour and back; checkpoints cut all stages at the same places."""
    def ks(s: int, kind: Kind) -> set[int]:
        return {a.k for a in schedule.actions[s] if a.kind is kind}

    for s in range(schedule.num_stages - 1):
        for send, recv, src, dst in ((Kind.SEND_ACT, Kind.RECV_ACT, s, s + 1),
                                     (Kind.SEND_GRAD, Kind.RECV_GRAD, s + 1, s),
                                     (Kind.SEND_EVAL, Kind.RECV_EVAL, s, s + 1),
                                     (Kind.SEND_NORM, Kind.RECV_NORM, s + 1, s),
                                     (Kind.SEND_TOTAL, Kind.RECV_TOTAL, s, s + 1),
                                     (Kind.SEND_TIE, Kind.RECV_TIE, s + 1, s),
                                     (Kind.SEND_TIED, Kind.RECV_TIED, s, s + 1)):
            sent, received = ks(src, send), ks(dst, recv)
            for k in sorted(received - sent)[:1]:
                raise ScheduleError(f"stage {dst}: {dst}{recv.value}{k} has no matching {src}{send.value}{k} "
                                    f"on stage {src}")
            for k in sorted(sent - received)[:1]:
                raise ScheduleError(f"stage {src}: {src}{send.value}{k} is never received: no "
                                    f"{dst}{recv.value}{k} on stage {dst}")
    cuts = [tuple(a.k for a in acts if a.kind is Kind.CHECKPOINT) for acts in schedule.actions]
    for s, c in enumerate(cuts):
        if c != cuts[0]:
            raise ScheduleError(f"stage {s}: checkpoint cuts {list(c)} differ from stage 0's {list(cuts[0])}")


def _stage_memory(schedule: Schedule, s: int) -> StageMemory:
    """Versions held (dropped right after their last read unless latest) and live activations."""
    actions, last_use = schedule.actions[s], schedule.last_use(s)
    held = set(schedule.initial_versions[s])
    latest = max(held, default=None)
    held = {v for v in held if v == latest or v in last_use}
    bound = activation_bound(schedule, s)
    live: set[int] = set()
    peak_live, peak_versions, at_cuts = 0, len(held), {}
    for i, a in enumerate(actions):
        if a.kind in COMPUTE:
            if a.version not in held:
                raise ScheduleError(
                    f"stage {s}: {a!r} (position {i}) reads version {a.version}, which stage {s} does not hold "
                    f"(held: {sorted(held)}): a version is one of initial_versions {list(schedule.initial_versions[s])}"
                    f" or produced by an earlier U, and is dropped after its last read")
            if a.kind is Kind.FORWARD:
                live.add(a.k)
                peak_live = max(peak_live, len(live))
                if len(live) > bound:
                    raise ScheduleError(f"stage {s}: {a!r} (position {i}) makes {len(live)} live activations "
                                        f"(F done, B not yet), above {schedule.name}'s bound of {bound}")
            else:
                live.discard(a.k)
            if last_use[a.version] == i and a.version != latest:
                held.discard(a.version)
        elif a.kind is Kind.UPDATE:
            if latest is not None and a.version != latest + 1:
                raise ScheduleError(f"stage {s}: {a!r} (position {i}) produces version {a.version}, but the "
                                    f"latest is {latest}: an update produces {latest + 1}")
            held.add(a.version)
            if latest is not None and last_use.get(latest, -1) < i:
                held.discard(latest)
            latest = a.version
        elif a.kind is Kind.CHECKPOINT:
            at_cuts[a.k] = tuple(sorted(held))
        elif a.kind is Kind.EVAL_F and a.version != latest:
            raise ScheduleError(f"stage {s}: {a!r} (position {i}) evaluates with version {a.version}, but an "
                                f"evaluation uses the stage's latest version, {latest}")
        peak_versions = max(peak_versions, len(held))
    return StageMemory(peak_live, peak_versions, at_cuts)


# --- timing ------------------------------------------------------------------------------------

def _message(a: Action) -> tuple[str, int, int]:
    """(direction, sending stage, micro-batch) of the message a SEND or RECV moves
    ("E": an eval activation, on the forward edge)."""
    if a.kind in (Kind.SEND_ACT, Kind.SEND_GRAD, Kind.SEND_EVAL, *NORM_SENDS, *TIE_SENDS):
        return _DIRECTION[a.kind], a.stage, a.k
    if a.kind in (Kind.RECV_ACT, Kind.RECV_EVAL, Kind.RECV_TOTAL, Kind.RECV_TIED):
        return _DIRECTION[a.kind], a.stage - 1, a.k
    return _DIRECTION[a.kind], a.stage + 1, a.k


# "N": a partial squared norm (backward edge), "T": the total (forward edge); schedule/norms.py
_DIRECTION = {Kind.SEND_ACT: "F", Kind.RECV_ACT: "F", Kind.SEND_GRAD: "B", Kind.RECV_GRAD: "B",
              Kind.SEND_EVAL: "E", Kind.RECV_EVAL: "E", Kind.SEND_NORM: "N", Kind.RECV_NORM: "N",
              Kind.SEND_TOTAL: "T", Kind.RECV_TOTAL: "T",
              Kind.SEND_TIE: "G", Kind.RECV_TIE: "G", Kind.SEND_TIED: "S", Kind.RECV_TIED: "S"}  # ties.py
_EDGE = {"E": "F", "N": "B", "T": "F", "G": "B", "S": "F"}  # the connection a direction's messages share


def _edge(a: Action) -> tuple[str, int]:
    """The connection a message travels on, whose credits it takes: eval activations share the forward one."""
    direction, sender, _ = _message(a)
    return _EDGE.get(direction, direction), sender


def _run(schedule: Schedule, fwd: tuple[float, ...], bwd: tuple[float, ...], upd: tuple[float, ...],
         send_cost: float, credits: int | None, wgt: tuple[float, ...],
         split: tuple[frozenset[int], ...],
         reduce_cost: float = 0.0) -> tuple[tuple[tuple[TimedAction, ...], ...], ...]:
    """Per stage, the timeline of its actions and that of its split backwards' weight halves."""
    p, actions = schedule.num_stages, schedule.actions
    position, clock = [0] * p, [0.0] * p
    owed: list[Action | None] = [None] * p  # a split B whose weight gradients follow its SEND_B
    weights: list[list[TimedAction]] = [[] for _ in range(p)]
    timeline: list[list[TimedAction]] = [[] for _ in range(p)]
    arrival: dict[tuple[str, int, int], float] = {}
    sent: dict[tuple[str, int], int] = defaultdict(int)           # per edge (direction, sender)
    received: dict[tuple[str, int], list[float]] = defaultdict(list)  # receipt times, in order
    posted: dict[tuple[int, int], float] = {}  # (stage, version) -> when its replicas' exchange began

    def start_time(a: Action) -> float | None:
        """When ``a`` can start on its stage, or None while it waits on another stage."""
        now = clock[a.stage]
        if a.kind is Kind.RECV_REDUCE:  # (the other replicas posted theirs at the same time)
            return max(now, posted[a.stage, a.k] + reduce_cost)
        if a.kind in (Kind.RECV_ACT, Kind.RECV_GRAD, Kind.RECV_EVAL, *NORM_RECVS, *TIE_RECVS):
            message = _message(a)
            return None if message not in arrival else max(now, arrival[message])
        if a.kind in (Kind.SEND_ACT, Kind.SEND_GRAD, Kind.SEND_EVAL, *NORM_SENDS, *TIE_SENDS) and credits is not None:
            edge = _edge(a)
            n = sent[edge]
            if n >= credits:  # the (n - credits)-th receipt frees the credit this send needs
                acks = received[edge]
                return None if len(acks) <= n - credits else max(now, acks[n - credits])
        return now

    while not all(position[s] == len(actions[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            while position[s] < len(actions[s]):
                a = actions[s][position[s]]
                start = start_time(a)
                if start is None:
                    break
                cost = {Kind.FORWARD: fwd, Kind.BACKWARD: bwd, Kind.UPDATE: upd, Kind.EVAL_F: fwd}.get(a.kind, _FREE)[s]
                if a.kind is Kind.BACKWARD and position[s] in split[s]:
                    cost -= wgt[s]  # the input gradient only; the rest after the send
                    owed[s] = a
                if a.kind in (Kind.SEND_ACT, Kind.SEND_GRAD, Kind.SEND_EVAL, *NORM_SENDS, *TIE_SENDS):
                    arrival[_message(a)] = start + send_cost
                    sent[_edge(a)] += 1
                elif a.kind in (Kind.RECV_ACT, Kind.RECV_GRAD, Kind.RECV_EVAL, *NORM_RECVS, *TIE_RECVS):
                    received[_edge(a)].append(start)
                elif a.kind is Kind.SEND_REDUCE:
                    posted[s, a.k] = start
                timeline[s].append(TimedAction(a, start, start + cost))
                clock[s] = start + cost
                if a.kind is Kind.SEND_GRAD and owed[s] is not None:
                    weights[s].append(TimedAction(owed[s], clock[s], clock[s] + wgt[s]))
                    clock[s] += wgt[s]
                    owed[s] = None
                position[s] += 1
                progressed = True
        if not progressed:
            unit = _slot(fwd, bwd, send_cost)
            raise ScheduleError(_deadlock(schedule, timeline, position, credits, unit))
    return tuple(tuple(t) for t in timeline), tuple(tuple(w) for w in weights)


def _deadlock(schedule: Schedule, timeline: list[list[TimedAction]], position: list[int],
              credits: int | None, unit: float) -> str:
    lines = [f"schedule {schedule.name!r} deadlocks: no stage can run its next action"]
    for s, acts in enumerate(schedule.actions):
        if position[s] == len(acts):
            lines.append(f"  stage {s}: done")
            continue
        a = acts[position[s]]
        direction, sender, k = _message(a)
        if a.kind in (Kind.RECV_ACT, Kind.RECV_GRAD, Kind.RECV_EVAL, *NORM_RECVS, *TIE_RECVS):
            send = {"F": Kind.SEND_ACT, "B": Kind.SEND_GRAD, "E": Kind.SEND_EVAL, "N": Kind.SEND_NORM,
                    "T": Kind.SEND_TOTAL, "G": Kind.SEND_TIE, "S": Kind.SEND_TIED}[direction]
            why = f"waits for {sender}{send.value}{k}, which stage {sender} has not run"
        else:
            receiver = sender + 1 if direction in ("F", "E", "T", "S") else sender - 1
            why = f"waits for a credit: {credits} sent on edge {sender}->{receiver} not yet received"
        lines.append(f"  stage {s}: blocked at {a!r} (position {position[s]}), {why}")
    end = max((t[-1].end for t in timeline if t), default=0.0)
    lines += [f"grid so far (one column = {_fmt(unit)}):", _grid(timeline, unit, end, 120, MAX_GRID_SLOTS)]
    return "\n".join(lines)


# --- rendering ---------------------------------------------------------------------------------

def render_grid(schedule: Schedule, report: SimulationReport | None = None, *, width: int = 120,
                max_slots: int = MAX_GRID_SLOTS) -> str:
    """Stage x time grid: one column per time slot (the smallest cost), ``F3``/``B0`` cells, blank = idle."""
    report = report or simulate(schedule)
    return _grid(report.timeline, report.slot, report.makespan, width, max_slots, weights=report.weights)


def _grid(timeline: Sequence[Sequence[TimedAction]], unit: float, end: float, width: int, max_slots: int,
          *, weights: Sequence[Sequence[TimedAction]] = ()) -> str:
    """``weights``: per stage, split backwards' weight halves, shown as ``W3``."""
    slots = math.ceil(end / unit - 1e-9) if end > 0 else 0
    shown = min(slots, max_slots)
    rows = []
    for s, events in enumerate(timeline):
        row = [""] * shown
        cells = [(e, e.action.kind.value) for e in events if e.action.kind in COMPUTE]
        cells += [(e, "W") for e in (weights[s] if weights else ())]
        for e, letter in cells:
            # a slot shows the action running at its midpoint
            for j in range(max(0, math.ceil(e.start / unit - 0.5 - 1e-9)),
                           min(shown, math.ceil(e.end / unit - 0.5 - 1e-9))):
                row[j] = f"{letter}{e.action.k}"
        rows.append(row)
    cell = max([len(c) for r in rows for c in r] + [2]) + 1
    label = max(len(f"stage {len(timeline) - 1}"), len("time")) + 1
    per_block = max(1, (width - label) // cell)
    blocks = []
    for lo in range(0, shown, per_block):
        hi = min(shown, lo + per_block)
        lines = ["time".ljust(label) + _time_header(lo, hi, unit, cell)]
        lines += [f"stage {s}".ljust(label) + "".join(c.ljust(cell) for c in r[lo:hi]).rstrip()
                  for s, r in enumerate(rows)]
        blocks.append("\n".join(lines))
    text = "\n\n".join(blocks) if blocks else "(no compute actions)"
    if shown < slots:
        text += (f"\n... grid truncated: showing time slots 0-{shown - 1} of {slots} "
                 f"(up to t={_fmt(shown * unit)} of {_fmt(end)})")
    return text


def _time_header(lo: int, hi: int, unit: float, cell: int) -> str:
    """Time at the block's first column and every 5th, each where it does not overlap the previous one."""
    header = ""
    for j in range(lo, hi):
        at = (j - lo) * cell
        if (j == lo or j % 5 == 0) and at >= len(header) + (1 if header else 0):
            header = header.ljust(at) + _fmt(j * unit)
    return header


def _title(r: SimulationReport) -> str:
    s = r.schedule
    run = f"micro-batches {s.first_microbatch}..{s.total_microbatches - 1}"
    extra = f", accumulate {s.accumulate}" if s.accumulate != 1 else ""
    extra += f", checkpoint every {s.checkpoint_every}" if s.checkpoint_every else ""
    return (f"schedule {s.name}: {s.num_stages} stages, {s.microbatches_per_step} micro-batches/step, "
            f"{s.steps} step{'s' if s.steps != 1 else ''} ({run}){extra}\n"
            f"costs: forward {_costs(r.forward_cost)}, backward {_costs(r.backward_cost)}, "
            f"update {_costs(r.update_cost)}, send {_fmt(r.send_cost)}; "
            + (f"split backward {r.split_backward} (weight part {_costs(r.weight_cost)}); "
               if r.split_backward != "never" else "") +
            f"credits {'unbounded' if r.credits is None else r.credits}; one grid column = {_fmt(r.slot)}")


def _figures(r: SimulationReport) -> str:
    head = ("stage", "busy", "idle", "bubble", "live act peak/bound", "weight versions peak")
    rows = [head]
    for s in range(r.schedule.num_stages):
        idle = r.makespan - r.busy[s]
        share = idle / r.makespan if r.makespan else 0.0
        rows.append((str(s), _fmt(r.busy[s]), _fmt(idle), f"{share:.1%}",
                     f"{r.peak_live_activations[s]}/{r.activation_bounds[s]}", str(r.peak_stashed_versions[s])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    table = ["  ".join(c.rjust(w) if i < 4 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in rows]
    total = f"makespan {_fmt(r.makespan)}   bubble {r.bubble_fraction:.1%} simulated"
    if r.formula_bubble is not None:
        p, m = r.schedule.num_stages, r.schedule.microbatches_per_step
        total += f", {r.formula_bubble:.1%} by formula (p-1)/(m+p-1) = {p - 1}/{m + p - 1}"
    return "\n".join(table + ["", total])


def _slot(fwd: Sequence[float], bwd: Sequence[float], send_cost: float) -> float:
    return min(c for c in (*fwd, *bwd, send_cost) if c > 0)


def _per_stage(cost: float | Sequence[float], p: int, field: str, *, zero_ok: bool = False) -> tuple[float, ...]:
    values = [cost] * p if isinstance(cost, (int, float)) else list(cost)
    if len(values) != p:
        raise ScheduleError(f"{field}: expected one cost per stage ({p}), got {len(values)}")
    for s, c in enumerate(values):
        ok = isinstance(c, (int, float)) and not isinstance(c, bool) and (c >= 0 if zero_ok else c > 0)
        if not ok or math.isinf(c):
            raise ScheduleError(f"{field}: stage {s}'s cost must be a finite number {'>=' if zero_ok else '>'} 0, "
                                f"got {c!r}")
    return tuple(float(c) for c in values)


def _costs(values: tuple[float, ...]) -> str:
    return _fmt(values[0]) if len(set(values)) == 1 else "[" + ", ".join(_fmt(v) for v in values) + "]"


def _fmt(x: float) -> str:
    return f"{x:g}"


def _few(ks: list[int]) -> str:
    return ", ".join(map(str, ks[:5])) + (f", ... ({len(ks)} in all)" if len(ks) > 5 else "")

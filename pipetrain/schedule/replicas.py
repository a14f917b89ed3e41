"""Replicated pipelines (pipeline x data parallelism) as schedule actions.

A job with ``replicas = d`` runs d copies of one p-stage pipeline. Every copy
runs the *same* schedule, over its own micro-batch ids: replica r's local
micro-batch j is the job's micro-batch ``j * d + r`` (``global_id``), so one
step of d replicas with m micro-batches each covers the job's micro-batches
``t*m*d .. (t+1)*m*d - 1``, every one of them exactly once. Cuts and losses
are named by the job's (global) ids; a replica's schedule counts local ones.

Before every ``UPDATE v`` the d replicas of a stage sum their accumulated
gradients. ``with_replicas`` adds, on every stage:

    ... B k, SEND_B k, SEND_R v, [whatever else comes before U v], RECV_R v, R v, U v

``SEND_R v`` goes out as soon as the update's last backward (and its input
gradient's send, which the previous stage waits on) is done; the exchange
runs on the channel threads while the stage goes on, and it waits only in
``RECV_R v``. ``R v`` adds the d replicas' sums in replica order 0, 1, ...,
d - 1, whatever order they arrived in, and sets the accumulator's count to
the replicas' total, so the update applies the mean over d*m micro-batches:
every replica computes the same float sum from the same inputs, and the
replicas stay bit-identical, run after run and across recoveries.

The tie relay and the norm reduction (``ties.py``, ``norms.py``) come after
``R v``, so they see gradients already summed over the replicas. Each
replica's exchange is direct (every replica sends its gradients to each of
the others: d - 1 messages of the stage's gradient size each way), which at
the d this targets (2-8) costs one hop instead of a ring's 2(d-1) and keeps
the sum order trivially fixed; a ring would move 2(d-1)/d of the bytes.
"""
from __future__ import annotations

from dataclasses import replace

from pipetrain.schedule.actions import REPLICAS, Action, Kind
from pipetrain.schedule.schedule import Schedule, ScheduleError

__all__ = ["check_replica_actions", "global_id", "local_id", "with_replicas"]


def global_id(local: int, *, replica: int, replicas: int) -> int:
    """The job's micro-batch id of replica ``replica``'s local micro-batch ``local``."""
    return local * replicas + replica


def local_id(global_k: int, *, replicas: int) -> tuple[int, int]:
    """(replica, local id) of the job's micro-batch ``global_k``."""
    local, replica = divmod(global_k, replicas)
    return replica, local


def with_replicas(schedule: Schedule) -> Schedule:
    """``schedule`` with the replica exchange before each UPDATE (see the module)."""
    actions = []
    for s, acts in enumerate(schedule.actions):
        out: list[Action] = []
        posted_at = 0  # where in ``out`` the next update's SEND_R goes: after the last B (and its SEND_B)
        for a in acts:
            if a.kind is Kind.UPDATE:
                v = a.version
                out.insert(posted_at, Action(s, Kind.SEND_REDUCE, v))
                out += [Action(s, Kind.RECV_REDUCE, v), Action(s, Kind.REDUCE, v)]
            out.append(a)
            after_backward = (a.kind is Kind.SEND_GRAD and len(out) > 1 and out[-2].kind is Kind.BACKWARD
                              and out[-2].k == a.k)
            if a.kind in (Kind.BACKWARD, Kind.UPDATE) or after_backward:
                posted_at = len(out)
        actions.append(tuple(out))
    return replace(schedule, actions=tuple(actions))


def check_replica_actions(schedule: Schedule, s: int) -> None:
    """Stage ``s``'s replica actions: for each update v, SEND_R v after the update's last B,
    then RECV_R v and R v right before U v (only tie and norm actions between), each once."""
    acts = schedule.actions[s]
    seen: dict[tuple[Kind, int], int] = {}
    for i, a in enumerate(acts):
        if a.kind not in REPLICAS:
            continue
        where = f"stage {s}: {a!r} (position {i})"
        if (a.kind, a.k) in seen:
            raise ScheduleError(f"{where}: runs {a.kind.value} {a.k} a second time")
        seen[a.kind, a.k] = i
        update = next((j for j in range(i + 1, len(acts)) if acts[j].kind is Kind.UPDATE), None)
        if update is None or acts[update].version != a.k:
            raise ScheduleError(f"{where}: the replica sum of update {a.k} must come before {s}U{a.k}, "
                                f"not {acts[update] if update is not None else 'the end'!r}")
        if a.kind is Kind.SEND_REDUCE and any(acts[j].kind is Kind.BACKWARD for j in range(i + 1, update)):
            raise ScheduleError(f"{where}: sent before a backward that update {a.k} applies")
        if a.kind is Kind.RECV_REDUCE and seen.get((Kind.SEND_REDUCE, a.k), i) >= i:
            raise ScheduleError(f"{where}: receives before {s}SEND_R{a.k} sent this replica's part")
        if a.kind is Kind.REDUCE and seen.get((Kind.RECV_REDUCE, a.k), i) >= i:
            raise ScheduleError(f"{where}: sums before {s}RECV_R{a.k} received the other replicas' parts")
    updates = {a.version for a in acts if a.kind is Kind.UPDATE}
    for kind in REPLICAS:
        missing = sorted(updates - {k for (kd, k) in seen if kd is kind})
        if seen and missing:
            raise ScheduleError(f"stage {s}: updates {missing[:3]} have no {s}{kind.value}: with replicas every "
                                f"update sums the replicas' gradients first")

"""The reference executor: every stage in one process, the numerics oracle.

It interprets the same schedule with the same ``StageProgram`` as the Dask
runtime, stepping the stages round-robin and passing boundary values through
in-memory mailboxes. Async schedules have no closed form to compare with, so
this executor (checked against an independent implementation of the
published update rules in the tests) is what the distributed runs must match.
Given a held-out source and an ``EvalSpec`` it runs the schedule's eval blocks
(``schedule/evaluation.py``) as the Dask stages do; ``evaluate`` is the
unpipelined held-out loss of a set of stages (one process, by design).
With ``replicas = d`` it runs d copies of the pipeline (``schedule/replicas.py``):
``stages`` holds p * d stages, replica r's stage s at ``r * p + s``, as the Dask
runtime numbers its tasks; only replica 0 runs the eval blocks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from pipetrain.runtime.interpreter import Hooks, StageProgram
from pipetrain.schedule.actions import Kind
from pipetrain.schedule.schedule import Schedule

Tree = Any


class _Mailboxes:
    """Per-stage inboxes keyed by (kind of the receiving RECV, k)."""

    def __init__(self, num_stages: int):
        self.boxes: list[dict[tuple[Kind, int], Tree]] = [{} for _ in range(num_stages)]

    def links(self, task: int, *, num_stages: int = 1, replicas: int = 1) -> "_Links":
        return _Links(self, task, num_stages, replicas)


@dataclass
class _Links:
    """``stage``: the task (replica r's stage s is r * num_stages + s): its pipeline neighbours
    are tasks stage - 1 and stage + 1, its replicas every num_stages tasks."""

    mail: _Mailboxes
    stage: int
    num_stages: int = 1
    replicas: int = 1

    def ready(self, kind: Kind, k: int) -> bool:
        return (kind, k) in self.mail.boxes[self.stage]

    def recv(self, kind: Kind, k: int) -> Tree:
        return self.mail.boxes[self.stage].pop((kind, k))

    def send(self, kind: Kind, k: int, version: int | None, tree: Tree, *, wait_follows: bool = False,
             to: int | None = None) -> None:
        if kind is Kind.SEND_ACT:
            self.mail.boxes[self.stage + 1][(Kind.RECV_ACT, k)] = tree
        elif kind is Kind.SEND_EVAL:
            self.mail.boxes[self.stage + 1][(Kind.RECV_EVAL, k)] = tree
        elif kind is Kind.SEND_NORM:  # clipping (schedule/norms.py): partial sums go down, the total up
            self.mail.boxes[self.stage - 1][(Kind.RECV_NORM, k)] = tree
        elif kind is Kind.SEND_TOTAL:
            self.mail.boxes[self.stage + 1][(Kind.RECV_TOTAL, k)] = tree
        elif kind is Kind.SEND_TIE:  # tied weights (schedule/ties.py): partial sums go down, the totals up
            self.mail.boxes[self.stage - 1][(Kind.RECV_TIE, k)] = tree
        elif kind is Kind.SEND_TIED:
            self.mail.boxes[self.stage + 1][(Kind.RECV_TIED, k)] = tree
        elif kind is Kind.SEND_REDUCE:  # replicas (schedule/replicas.py): to every other replica of the stage
            s = self.stage % self.num_stages
            for r in range(self.replicas) if to is None else (to,):  # (to: only replica ``to``)
                if r * self.num_stages + s != self.stage:
                    self.mail.boxes[r * self.num_stages + s][(Kind.RECV_REDUCE, k)] = tree
        else:
            self.mail.boxes[self.stage - 1][(Kind.RECV_GRAD, k)] = tree


@dataclass
class _Recorder(Hooks):
    losses: dict[int, float] = field(default_factory=dict)
    checkpoints: dict[int, dict[int, dict[str, np.ndarray]]] = field(default_factory=dict)
    keep_checkpoints: bool = False
    also: Hooks = field(default_factory=Hooks)  # the caller's own hooks
    evals: dict[int, float] = field(default_factory=dict)
    grad_norms: dict[int, dict[int, float]] = field(default_factory=dict)  # stage -> version -> norm

    def on_loss(self, k: int, loss: float) -> None:
        self.losses[k] = loss
        self.also.on_loss(k, loss)

    def on_eval(self, step: int, loss: float) -> None:
        self.evals[step] = loss
        self.also.on_eval(step, loss)

    def on_grad_norm(self, version: int, norm: float, *, stage: int) -> None:
        self.grad_norms.setdefault(stage, {})[version] = norm
        self.also.on_grad_norm(version, norm, stage=stage)

    def on_checkpoint(self, cut: int, stage: Any) -> None:
        if self.keep_checkpoints:
            # (with replicas, each replica's state at a cut is the same: replica 0's is kept)
            self.checkpoints.setdefault(cut, {}).setdefault(stage.spec.index, stage.state_dict())
        self.also.on_checkpoint(cut, stage)

    def on_action(self, action: Any, start: float, end: float) -> None:
        self.also.on_action(action, start, end)

    def on_weights(self, k: int, version: int, start: float, end: float) -> None:
        self.also.on_weights(k, version, start, end)


@dataclass
class ReferenceResult:
    losses: dict[int, float]  # micro-batch id -> loss of its forward
    stages: list[Any]
    checkpoints: dict[int, dict[int, dict[str, np.ndarray]]]
    evals: dict[int, float] = field(default_factory=dict)  # step -> mean held-out loss after it
    grad_norms: dict[int, dict[int, float]] = field(default_factory=dict)  # clipping: stage -> version -> norm
    replica_stages: list[Any] = field(default_factory=list)  # every replica's stages (``stages``: replica 0's)

    def loss_history(self, microbatches_per_step: int) -> list[float]:
        """Mean loss per step, in step order."""
        ks = sorted(self.losses)
        steps: dict[int, list[float]] = {}
        for k in ks:
            steps.setdefault(k // microbatches_per_step, []).append(self.losses[k])
        return [float(np.mean(v)) for _, v in sorted(steps.items())]

    def state_dicts(self) -> list[dict[str, np.ndarray]]:
        return [s.state_dict() for s in self.stages]


def build_stages(partition: Any, optimizer: Any) -> list[Any]:
    """Every stage of ``partition``; with tied weights (``pipetrain.ties``), each holding
    stage gets its part of the plan and its copies start as the first copy does."""
    from pipetrain.ties import plan_ties, prepare_stage

    ties = plan_ties(partition)
    stages = [partition.model.build_stage(spec, optimizer=optimizer) for spec in partition.specs()]
    return [prepare_stage(st, ties, partition.model) for st in stages] if ties else stages


def run_reference(schedule: Schedule, *, stages: Sequence[Any], source: Any,
                  keep_checkpoints: bool = False, hooks: Hooks | None = None, heldout: Any = None,
                  evaluation: Any = None, replicas: int = 1, bucket_bytes: int | None = None,
                  exchange: str = "auto") -> ReferenceResult:
    """Run ``schedule`` on ``stages`` (built, e.g., by ``build_stages``, d times over with
    ``replicas = d``: see the module); ``hooks``
    hear every stage's losses, checkpoints and action times as well. With
    ``evaluation`` (an ``EvalSpec``) and ``heldout``, the schedule gets its eval
    blocks (``EvalSpec.apply``) and the result's ``evals`` their losses."""
    p = schedule.num_stages
    if len(stages) != p * replicas:
        raise ValueError(f"schedule has {p} stages and {replicas} replica(s), so {p * replicas} stages are "
                         f"needed, but {len(stages)} were given")
    evaluated = evaluation.apply(schedule) if evaluation is not None else schedule
    mail = _Mailboxes(len(stages))
    recorder = _Recorder(keep_checkpoints=keep_checkpoints, also=hooks or Hooks())
    programs = [StageProgram(st, evaluated if i < p else schedule, source=source,
                             links=mail.links(i, num_stages=p, replicas=replicas), hooks=recorder,
                             heldout=heldout, evaluation=evaluation, replica=i // p, replicas=replicas,
                             bucket_bytes=bucket_bytes, exchange=exchange)
                for i, st in enumerate(stages)]
    while not all(program.done for program in programs):
        progressed = False
        for program in programs:
            while program.can_run():
                program.run_next()
                progressed = True
        if not progressed:
            blocked = ", ".join(f"stage {q.index} at {q.next_action()!r}" for q in programs if not q.done)
            raise RuntimeError(f"reference executor: schedule {schedule.name!r} deadlocked ({blocked})")
    return ReferenceResult(recorder.losses, list(stages[:p]), recorder.checkpoints, recorder.evals,
                           recorder.grad_norms, replica_stages=list(stages))


def evaluate(stages: Sequence[Any], source: Any, microbatch_ids: Sequence[int]) -> float:
    """Mean loss of the given micro-batches through the stages' latest weights."""
    losses = []
    for k in microbatch_ids:
        x = source.inputs(k)
        for st in stages[:-1]:
            x = st.evaluate(x)
        losses.append(float(stages[-1].evaluate(x, targets=source.targets(k))))
    return float(np.mean(losses))

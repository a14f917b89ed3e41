"""Schedule actions: the small records a schedule is made of.

A schedule is data. Builders (``builders.py``) produce, per stage, a tuple of
``Action``s; the simulator checks them; the runtime only interprets them.
Actions print compactly, like torch.distributed.pipelining's: ``1F3`` is stage 1
running the forward of micro-batch 3, ``2B0`` stage 2 the backward of 0,
``0U4`` stage 0 producing weight version 4, ``3C16`` stage 3 checkpointing at the
cut before micro-batch 16, ``1RECV_F3`` stage 1 receiving the activation of 3,
``2E9`` stage 2 running the forward-only evaluation of held-out message 9
(``schedule/evaluation.py``: an eval block's messages are numbered by the pass),
``1N4`` stage 1 adding its squared gradient norm for the update to version 4
(``schedule/norms.py``), ``3TIE4`` stage 3 adding its tied copies' gradients
for the update to version 4 (``schedule/ties.py``), ``2R4`` stage 2 summing its
replicas' gradients for the update to version 4 (``schedule/replicas.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Kind(str, Enum):
    FORWARD = "F"
    BACKWARD = "B"
    UPDATE = "U"
    CHECKPOINT = "C"
    SEND_ACT = "SEND_F"   # send the activation of k to stage + 1
    RECV_ACT = "RECV_F"   # receive the activation of k from stage - 1
    SEND_GRAD = "SEND_B"  # send the input gradient of k to stage - 1
    RECV_GRAD = "RECV_B"  # receive the output gradient of k from stage + 1
    # Evaluation (schedule/evaluation.py): k is the eval message's number, not a training micro-batch.
    EVAL_F = "E"           # forward-only pass of a held-out micro-batch with the latest weights
    SEND_EVAL = "SEND_E"   # send its activation to stage + 1
    RECV_EVAL = "RECV_E"   # receive it from stage - 1
    # Global-norm clipping (schedule/norms.py): k is the version the next UPDATE produces.
    NORM = "N"               # the stage's squared gradient norm, added to the partial sum from stage + 1
    SEND_NORM = "SEND_N"     # send that partial sum to stage - 1
    RECV_NORM = "RECV_N"     # receive the partial sum of stages > s from stage + 1
    SEND_TOTAL = "SEND_T"    # send the whole model's squared norm to stage + 1
    RECV_TOTAL = "RECV_T"    # receive it from stage - 1
    # Tied weights (schedule/ties.py): k is the version the next UPDATE produces.
    TIE = "TIE"                # add the stage's tied-copy gradients to the partial sums from stage + 1
    SEND_TIE = "SEND_G"        # send the partial sums (of tied gradients) to stage - 1
    RECV_TIE = "RECV_G"        # receive the partial sums of the copies on stages > s from stage + 1
    SEND_TIED = "SEND_S"       # send the tied parameters' summed gradients to stage + 1
    RECV_TIED = "RECV_S"       # receive them from stage - 1
    # Replicated pipelines (schedule/replicas.py): k is the version the next UPDATE produces.
    SEND_REDUCE = "SEND_R"     # send the stage's accumulated gradients to its other replicas
    RECV_REDUCE = "RECV_R"     # receive theirs (from every other replica of this stage)
    REDUCE = "R"               # sum them in replica order: every replica then holds the same gradients


COMPUTE = (Kind.FORWARD, Kind.BACKWARD)
COMMUNICATION = (Kind.SEND_ACT, Kind.RECV_ACT, Kind.SEND_GRAD, Kind.RECV_GRAD)
EVALUATION = (Kind.EVAL_F, Kind.SEND_EVAL, Kind.RECV_EVAL)
NORMS = (Kind.NORM, Kind.SEND_NORM, Kind.RECV_NORM, Kind.SEND_TOTAL, Kind.RECV_TOTAL)
TIES = (Kind.TIE, Kind.SEND_TIE, Kind.RECV_TIE, Kind.SEND_TIED, Kind.RECV_TIED)
REPLICAS = (Kind.SEND_REDUCE, Kind.RECV_REDUCE, Kind.REDUCE)
# What the passes put between an update's last B (and its SEND_B) and the U: part of that update.
BEFORE_UPDATE = (*NORMS, *TIES, *REPLICAS)


@dataclass(frozen=True, slots=True)
class Action:
    """One step of one stage.

    ``k``: the micro-batch id for F, B and the communication kinds; for
    CHECKPOINT the cut: the state after every B of micro-batches ``< k``.
    ``version``: for F and B the weight version they use (B always uses F's:
    weight stashing); for UPDATE the version it produces.
    """

    stage: int
    kind: Kind
    k: int | None = None
    version: int | None = None

    def __str__(self) -> str:
        k = "" if self.k is None else str(self.k)
        if self.kind is Kind.UPDATE:
            k = str(self.version)
        return f"{self.stage}{self.kind.value}{k}"

    def __repr__(self) -> str:
        v = "" if self.version is None or self.kind is Kind.UPDATE else f"@v{self.version}"
        return f"{self}{v}"


def F(stage: int, k: int, version: int) -> Action:
    return Action(stage, Kind.FORWARD, k, version)


def B(stage: int, k: int, version: int) -> Action:
    return Action(stage, Kind.BACKWARD, k, version)


def U(stage: int, version: int) -> Action:
    return Action(stage, Kind.UPDATE, None, version)


def C(stage: int, cut: int) -> Action:
    return Action(stage, Kind.CHECKPOINT, cut, None)

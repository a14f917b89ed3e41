"""Tied parameters: what a model declares, and where the copies live once it is cut.

A model declares ties as an attribute, ``model.ties``: a sequence of ties,
each a sequence of two or more parameter names, as the stage holding the
parameter names it in its state (``state_dict``'s ``v{N}/<name>``, what
``pipetrain export`` writes): the flagship GPT built with
``tie_embeddings=True`` declares ``(("embed/tokens", "head/tokens"),)``. A job
config may declare them instead (``[model] ties = [["embed/tokens",
"head/tokens"]]``), which replaces the model's own declaration (``[]`` unties it).

``plan_ties(partition)`` resolves the names to stages before anything
trains: a name no layer of the model holds, or copies whose shapes or dtypes
differ, raise ``TieError`` (a ``ConfigError``) naming both parameters and
their stages. The result, a ``TiePlan``, is what the schedule pass
(``schedule/ties.py``: each tie's span of stages) and the stages (their
copies, ``prepare_stage``) are built from.

Semantics (sync schedules): each holding stage keeps a copy, and every update
applies to each copy the sum of all the copies' gradients, i.e. the gradient
of the model with one shared parameter. The copies start identical: the
first copy's initial value (its stage's, a function of the model seed and
layer) is computed on every other holder from the model and copied in,
never sent. Clipping counts the tied parameter once, at its first copy.

Semantics (pipedream, ``runtime/tie_carry.py``): the first copy's stage owns
the tie and alone updates it; the value its forward of micro-batch k used
rides up with k's activation to the other copy's stage, which computes with
it, and that stage's gradient rides down with k's input gradient to be added
at the owner (two copies per tie, on JAX stages).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from pipetrain.config import ConfigError
from pipetrain.stages.base import StageSpec, TensorSpec

__all__ = ["StageTies", "Tie", "TieError", "TiePlan", "TiedCopy", "declared_ties", "plan_ties", "prepare_stage"]


class TieError(ConfigError):
    """A tie the model or config declares that cannot hold: a missing parameter, shapes that differ."""


@dataclass(frozen=True)
class TiedCopy:
    name: str   # the parameter's name in its stage's state
    stage: int
    layer: int  # global layer index


@dataclass(frozen=True)
class Tie:
    index: int
    copies: tuple[TiedCopy, ...]  # in stage order (then declaration order): copies[0] is the first copy
    spec: TensorSpec

    @property
    def key(self) -> str:
        """The tie's key in a reduction message's dict."""
        return f"g{self.index}"

    @property
    def span(self) -> tuple[int, int]:
        return self.copies[0].stage, self.copies[-1].stage

    def crosses(self, s: int) -> bool:
        """Whether the tie's reduction crosses the edge between stages s and s + 1."""
        lo, hi = self.span
        return lo <= s < hi

    def on(self, s: int) -> tuple[str, ...]:
        """The names of the copies stage ``s`` holds."""
        return tuple(c.name for c in self.copies if c.stage == s)


@dataclass(frozen=True)
class StageTies:
    """What one stage needs to know about the ties: all of them (to relay), and its index."""

    stage: int
    ties: tuple[Tie, ...]

    def held(self) -> tuple[Tie, ...]:
        return tuple(t for t in self.ties if t.on(self.stage))

    def not_counted(self) -> tuple[str, ...]:
        """Copies this stage holds that the global norm must not count again (all but each tie's first)."""
        first = {t.copies[0].name for t in self.ties if t.copies[0].stage == self.stage}
        return tuple(n for t in self.held() for n in t.on(self.stage) if n not in first)

    def specs_across(self, s: int) -> dict[str, TensorSpec]:
        """The tensors a reduction message on the edge (s, s + 1) holds, by key."""
        return {t.key: t.spec for t in self.ties if t.crosses(s)}


@dataclass(frozen=True)
class TiePlan:
    ties: tuple[Tie, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.ties)

    @property
    def spans(self) -> tuple[tuple[int, int], ...]:
        """Per tie, its (lowest, highest) holding stage: ``ScheduleSpec.ties``."""
        return tuple(t.span for t in self.ties)

    def on_stage(self, s: int) -> StageTies | None:
        lo_hi = [t.span for t in self.ties]
        if not any(lo <= s <= hi for lo, hi in lo_hi):
            return None
        return StageTies(s, self.ties)


def declared_ties(model: Any) -> tuple[tuple[str, ...], ...]:
    """``model.ties`` checked for form: a sequence of ties, each of >= 2 distinct names."""
    raw = getattr(model, "ties", None) or ()
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise TieError(f"model.ties: must be a list of ties (each a list of parameter names), got {raw!r}")
    ties = []
    for i, tie in enumerate(raw):
        if isinstance(tie, (str, bytes)) or not isinstance(tie, Sequence) or len(tie) < 2 or \
                not all(isinstance(n, str) and n for n in tie):
            raise TieError(f"model.ties[{i}]: a tie is a list of two or more parameter names, got {tie!r}")
        if len(set(tie)) != len(tie):
            raise TieError(f"model.ties[{i}]: names a parameter twice: {list(tie)}")
        ties.append(tuple(tie))
    names = [n for t in ties for n in t]
    again = sorted({n for n in names if names.count(n) > 1})
    if again:
        raise TieError(f"model.ties: {again[0]!r} is in two ties; merge them into one")
    return tuple(ties)


def plan_ties(partition: Any) -> TiePlan:
    """Where each declared tie's copies live in ``partition``; ``TieError`` for one that cannot hold."""
    from pipetrain.stages import ties as framework

    model = partition.model
    declared = declared_ties(model)
    if not declared:
        return TiePlan()
    ranges = [(s.start, s.end) for s in partition.stages]
    stage_of = {layer: s for s, (a, b) in enumerate(ranges) for layer in range(a, b)}
    where: dict[str, tuple[int, TensorSpec]] = {}
    names_of_layer: dict[int, list[str]] = {}
    wanted = {n for t in declared for n in t}
    for layer in range(ranges[-1][1]):
        specs = framework.layer_param_specs(model, layer)
        names_of_layer[layer] = list(specs)
        for n in wanted & set(specs):
            if n in where:  # (a mixed model's parts name their layers from 0 each)
                raise TieError(f"model.ties: {n!r} names a parameter of layer {where[n][0]} and one of layer "
                               f"{layer}; a tie must name each copy unambiguously")
            where[n] = (layer, specs[n])
    ties = []
    for i, names in enumerate(declared):
        missing = [n for n in names if n not in where]
        if missing:
            some = [n for layer in sorted(names_of_layer) for n in names_of_layer[layer]][:12]
            raise TieError(f"tie {i} {list(names)}: {missing[0]!r} is not a parameter of the model; its "
                           f"parameters are named like {some}")
        copies = sorted((TiedCopy(n, stage_of[where[n][0]], where[n][0]) for n in names),
                        key=lambda c: (c.stage, names.index(c.name)))
        first = copies[0]
        spec = where[first.name][1]
        for c in copies[1:]:
            other = where[c.name][1]
            if tuple(other.shape) != tuple(spec.shape) or other.dtype != spec.dtype:
                raise TieError(f"tie {i}: {first.name!r} (stage {first.stage}) is {spec} but {c.name!r} "
                               f"(stage {c.stage}) is {other}: tied parameters must have the same shape and dtype")
        ties.append(Tie(i, tuple(copies), spec))
    return TiePlan(tuple(ties))


def prepare_stage(stage: Any, plan: TiePlan, model: Any) -> Any:
    """Give ``stage`` its part of ``plan`` (``stage.tied``) and make its copies start as each
    tie's first copy does: that value is computed here from the model (the first copy's layer,
    built alone), not sent. Call it on a freshly built stage, before training or loading a
    checkpoint (which then overrides the copies with what it holds)."""
    from pipetrain.optim import Optimizer
    from pipetrain.stages import ties as framework

    s = stage.spec.index
    mine = plan.on_stage(s) if plan else None
    stage.tied = mine
    if mine is None:
        return stage
    values = {}
    for tie in mine.held():
        first = tie.copies[0]
        copies = [n for n in tie.on(s) if n != first.name]
        if not copies:
            continue
        if first.stage == s:
            value = framework.read_param(stage, first.name)
        else:
            alone = model.build_stage(StageSpec(first.stage, stage.spec.num_stages, first.layer, first.layer + 1),
                                      optimizer=Optimizer())  # (it only initializes parameters)
            value = framework.read_param(alone, first.name)
        values.update({n: value for n in copies})
    if values:
        framework.write_params(stage, values)
    return stage

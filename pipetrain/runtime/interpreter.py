"""Runs one stage's action list: the only place that gives actions meaning.

Both executors drive a ``StageProgram``: the reference executor steps all
stages in one process, passing boundary values through in-memory mailboxes;
the Dask worker runs one program in its compute thread over the transport.
Because each stage's numbers depend only on its own actions, in its order,
both produce the same bits.

A stage that can split its backward (``split_backward`` "always" or "auto",
torch stages after the first) runs a B followed by its SEND_GRAD as: input
gradient, send, then weight gradients (reported with ``Hooks.on_weights``), so
the previous stage gets its gradient before this one computes what only its
next update reads. "auto" splits only a flush schedule's last backward of each
step: the previous stage waits for that gradient to finish its step, while in
the steady state it has work of its own and a split would only cost.

A stage with a delay correction (``stage.correction`` other than "none",
``pipetrain.stages.corrections``) gets each forward's delay from the
schedule (``Schedule.delays``): ``forward(k, x, version=v, delay=d)``.

Norm actions (``schedule/norms.py``, clipping by global norm): ``N v`` adds
the stage's ``grad_sq_norm()`` to the partial sum received from stage + 1
(RECV_N), SEND_N passes it down and SEND_T / RECV_T carry the total back up,
all as float64 scalars; ``UPDATE v`` then runs ``update(new_version=v,
grad_scale=min(1, clip_norm / sqrt(total)))`` with the stage's ``clip_norm``
(and reports ``Hooks.on_grad_norm``). Without a RECV_T (stage 0, or pipedream's
per-stage rule) the stage's own sum is the total.

Tie actions (``schedule/ties.py``, tied weights) run in ``runtime/ties.py``'s
``TieReducer``, built from the stage's ``tied`` (``pipetrain.ties.prepare_stage``);
with ties, a stage's norm counts each tied parameter at its first copy only.
Under pipedream the ties have no actions: they ride on the F/B and eval
messages (``runtime/tie_carry.py``'s ``TieCarrier``, which wraps the links and
runs the stage's forward, backward and eval with the carried values).

Replica actions (``schedule/replicas.py``, ``replicas`` > 1) run in
``runtime/replicas.py``'s ``ReplicaReducer``: replica ``replica`` reads the
job's micro-batch ``k * replicas + replica`` for its local k (losses are
reported by that id too), and before each update sums the stage's gradients
with its other replicas' (``Hooks.on_reduced`` hears which micro-batches the
sum holds); the update's last backward runs through the reducer where the stage
can stream it, so its first gradient buckets leave while it computes the rest.

Eval blocks (``schedule/evaluation.py``) run forward-only with the stage's
latest weights (``stage.evaluate``): stage 0 reads the held-out inputs, the
last stage the held-out targets, from ``heldout``, and once it has every
held-out micro-batch of a block it reports their mean loss
(``Hooks.on_eval``), in held-out id order, as ``reference.evaluate`` means it.
"""
from __future__ import annotations

import math
import time
from functools import partial
from typing import Any, Callable, Protocol

import numpy as np

from pipetrain.schedule.actions import NORMS, REPLICAS, TIES, Action, Kind
from pipetrain.schedule.schedule import Schedule
from pipetrain.schedule.ties import CARRIED

Tree = Any
_RECVS = (Kind.RECV_ACT, Kind.RECV_GRAD, Kind.RECV_EVAL, Kind.RECV_NORM, Kind.RECV_TOTAL, Kind.RECV_TIE, Kind.RECV_TIED)


class Links(Protocol):
    """How a stage reaches its neighbours. Links whose every received message is a buffer of
    its own, the receiver's to write, say so with ``received_are_fresh = True`` (the replica
    reduction then sums into it; the default is False)."""

    def ready(self, kind: Kind, k: int) -> bool:
        """Whether RECV ``kind`` of micro-batch k would return at once."""

    def recv(self, kind: Kind, k: int) -> Tree: ...

    def send(self, kind: Kind, k: int, version: int, tree: Tree, *, wait_follows: bool = False,
             to: int | None = None) -> None:
        """``wait_follows``: the stage's next action will wait for a message
        (a hint: an executor may write inline then, and hand off otherwise).
        ``to``: a SEND_R for replica ``to`` alone (by default every other replica)."""


class Hooks:
    """What an executor wants to hear about; override what you need."""

    def on_loss(self, k: int, loss: float) -> None: ...

    def on_eval(self, step: int, loss: float) -> None:
        """The last stage's mean held-out loss of the eval block after ``step`` steps."""

    def on_checkpoint(self, cut: int, stage: Any) -> None: ...

    def on_reduced(self, version: int, ids: list[int]) -> None:
        """Replicas: the update to ``version`` applies the gradients of the job's micro-batches
        ``ids`` (every replica's, as their parts said: ``runtime/replicas.py``)."""

    def on_grad_norm(self, version: int, norm: float, *, stage: int) -> None:
        """The gradient norm stage ``stage``'s update to ``version`` clipped by (schedule/norms.py)."""

    def on_action(self, action: Action, start: float, end: float) -> None: ...

    def on_weights(self, k: int, version: int, start: float, end: float) -> None:
        """A split backward's weight gradients of micro-batch k ran in [start, end]
        (after its SEND_GRAD, reported just before; see ``StageProgram``)."""


class StageProgram:
    def __init__(self, stage: Any, schedule: Schedule, *, source: Any, links: Links, hooks: Hooks | None = None,
                 clock: Callable[[], float] = time.perf_counter, heldout: Any = None, evaluation: Any = None,
                 replica: int = 0, replicas: int = 1, bucket_bytes: int | None = None, exchange: str = "auto"):
        self.stage = stage
        self.index = stage.spec.index
        self.actions = schedule.stage_actions(self.index)
        self.last_use = schedule.last_use(self.index)
        self.source, self.links = source, links
        self.replica, self.replicas, self.bucket_bytes = replica, replicas, bucket_bytes
        self.exchange = exchange  # how the replicas sum their gradients (runtime/replicas.py)
        if replicas > 1:
            from pipetrain.data import ReplicaSource

            self.source = ReplicaSource(source, replica=replica, replicas=replicas)
        self.hooks = hooks or Hooks()
        self.clock = clock
        self.position = 0
        self._inputs: dict[int, Tree] = {}
        self._outputs: dict[int, Tree] = {}
        self._grads: dict[int, Tree] = {}
        self._input_grads: dict[int, Tree] = {}
        self._weights_due: int | None = None  # micro-batch whose weight gradients follow its SEND_GRAD
        self._split_at = schedule.split_positions(self.index, getattr(stage, "split_backward", "never"))
        corrected = getattr(stage, "correction", "none") != "none"
        self._delays = schedule.delays(self.index) if corrected else None
        # Evaluation: the held-out source and the EvalSpec that numbered the eval messages.
        self.heldout, self.evaluation = heldout, evaluation
        self._eval_inputs: dict[int, Tree] = {}
        self._eval_outputs: dict[int, Tree] = {}
        self._eval_losses: dict[int, dict[int, float]] = {}  # step -> held-out id -> loss
        # Clipping: the partial squared-norm sums and totals by update version, float64 scalars.
        self.clip_norm = getattr(stage, "clip_norm", None)
        self._norm_in: dict[int, float] = {}
        self._norm_sum: dict[int, float] = {}
        self._norm_total: dict[int, float] = {}
        # Only a schedule that still updates needs norms: a recovery whose rollback is the run's last
        # cut resumes with nothing left but checkpoints.
        updates = any(a.kind is Kind.UPDATE for a in self.actions)
        if self.clip_norm and updates and not any(a.kind is Kind.NORM for a in self.actions):
            raise ValueError(f"stage {self.index}: the optimizer clips by norm (clip_norm = {self.clip_norm}) but "
                             f"the schedule has no norm actions: build it with clip=True (ScheduleSpec.clip)")
        self.carrier = None
        self.ties = self._tie_reducer(stage, schedule)
        self.reducer = self._replica_reducer(stage, updates)
        self._stream_at = self._streamed_backwards()
        if any(a.kind is Kind.EVAL_F for a in self.actions) and (heldout is None or evaluation is None):
            raise ValueError(f"stage {self.index}: the schedule evaluates, but no held-out source and EvalSpec "
                             f"were given")

    def _tie_reducer(self, stage: Any, schedule: Schedule) -> Any:
        tied, sums = getattr(stage, "tied", None), any(a.kind is Kind.TIE for a in self.actions)
        if tied is not None and schedule.name in CARRIED:
            from pipetrain.runtime.tie_carry import CarryingLinks, TieCarrier

            self.carrier = TieCarrier(stage, tied)
            self.links = CarryingLinks(self.links, self.carrier)
            return None
        if tied is not None and not sums:
            raise ValueError(f"stage {self.index}: the stage holds tied weights but the schedule has no tie "
                             f"actions: build it with the ties' spans (ScheduleSpec.ties, TiePlan.spans)")
        if tied is None and sums:
            raise ValueError(f"stage {self.index}: the schedule sums tied weights but the stage was not given "
                             f"its ties (pipetrain.ties.prepare_stage)")
        if tied is None:
            return None
        from pipetrain.runtime.ties import TieReducer

        return TieReducer(stage, tied, self.links, self._wait_follows)

    def _replica_reducer(self, stage: Any, updates: bool) -> Any:
        sums = any(a.kind is Kind.REDUCE for a in self.actions)
        if sums and self.replicas == 1:
            raise ValueError(f"stage {self.index}: the schedule sums replicas' gradients, but this program runs "
                             f"no replicas (StageProgram(replicas=...))")
        if self.replicas == 1:
            return None
        if updates and not sums:
            raise ValueError(f"stage {self.index}: {self.replicas} replicas, but the schedule has no replica "
                             f"actions: build it with ScheduleSpec(replicas={self.replicas})")
        from pipetrain.runtime.replicas import ReplicaReducer

        return ReplicaReducer(stage, self.links, replica=self.replica, replicas=self.replicas, hooks=self.hooks,
                              wait_follows=self._wait_follows, bucket_bytes=self.bucket_bytes,
                              exchange=self.exchange)

    def _streamed_backwards(self) -> dict[int, int]:
        """Position -> update version of each update's last backward, where the replica reduction
        sends its gradient buckets during the backward (``ReplicaReducer.backward``): not a split
        backward (its weight half runs later) nor one the tie carrier wraps."""
        if self.reducer is None or not self.reducer.streams or self.carrier is not None:
            return {}
        out, last_backward = {}, None
        for i, a in enumerate(self.actions):
            if a.kind is Kind.BACKWARD:
                last_backward = i
            elif a.kind is Kind.SEND_REDUCE and last_backward is not None and last_backward not in self._split_at:
                out[last_backward], last_backward = a.k, None
        return out

    @property
    def done(self) -> bool:
        return self.position >= len(self.actions)

    def next_action(self) -> Action | None:
        return None if self.done else self.actions[self.position]

    def can_run(self) -> bool:
        a = self.next_action()
        if a is None:
            return False
        if a.kind in _RECVS:
            return self.links.ready(a.kind, a.k)
        if a.kind is Kind.RECV_REDUCE:
            return self.reducer.ready(a.k)
        if a.kind is Kind.REDUCE:  # (the scatter exchange waits for the other replicas' sums here)
            return self.reducer.ready_to_reduce(a.k)
        return True

    def run_next(self) -> Action:
        a = self.actions[self.position]
        start = self.clock()
        self._execute(a)
        end = self.clock()
        if a.kind is Kind.SEND_GRAD and self._weights_due == a.k:
            # The split backward's second half, before anything reads the
            # stage's state (a checkpoint requested at this point included).
            self.stage.backward_weights(a.k)
            self._weights_due = None
            self.hooks.on_action(a, start, end)
            self.hooks.on_weights(a.k, a.version, end, self.clock())
        else:
            self.hooks.on_action(a, start, end)
        self._release_unread_versions()
        self.position += 1
        return a

    def run_all(self) -> None:
        while not self.done:
            self.run_next()

    def _execute(self, a: Action) -> None:
        spec = self.stage.spec
        if a.kind is Kind.RECV_ACT:
            self._inputs[a.k] = self.links.recv(a.kind, a.k)
        elif a.kind is Kind.RECV_GRAD:
            self._grads[a.k] = self.links.recv(a.kind, a.k)
        elif a.kind is Kind.FORWARD:
            x = self.source.inputs(a.k) if spec.is_first else self._inputs.pop(a.k)
            targets = self.source.targets(a.k) if spec.is_last else None
            delay = {} if self._delays is None else {"delay": self._delays[a.k]}
            forward = self.stage.forward if self.carrier is None else self.carrier.forward
            out = forward(a.k, x, version=a.version, targets=targets, **delay)
            if spec.is_last:
                k = a.k if self.replicas == 1 else a.k * self.replicas + self.replica  # the job's id
                self.hooks.on_loss(k, float(out))
            else:
                self._outputs[a.k] = out
        elif a.kind is Kind.SEND_ACT:
            self.links.send(a.kind, a.k, a.version, self._outputs.pop(a.k), wait_follows=self._wait_follows())
        elif a.kind is Kind.BACKWARD:
            grad = None if spec.is_last else self._grads.pop(a.k)
            if self.reducer is not None:
                self.reducer.on_backward(a.k)
            if self.position in self._split_at:
                self._input_grads[a.k] = self.stage.backward_input(a.k, grad)
                self._weights_due = a.k
                if self.carrier is not None:  # (a relay: holders never split, see check_carried_holder)
                    self.carrier.after_backward(a.k)
            else:
                if self.position in self._stream_at:
                    grad_in = self.reducer.backward(a.k, grad, version=self._stream_at[self.position])
                else:
                    grad_in = self.stage.backward(a.k, grad)
                if self.carrier is not None:
                    self.carrier.after_backward(a.k)
                if not spec.is_first:
                    self._input_grads[a.k] = grad_in
        elif a.kind is Kind.SEND_GRAD:
            # A split backward's weight gradients come next: work, not a wait.
            wait_follows = self._weights_due != a.k and self._wait_follows()
            self.links.send(a.kind, a.k, a.version, self._input_grads.pop(a.k), wait_follows=wait_follows)
        elif a.kind is Kind.UPDATE:
            self._update(a.version)
        elif a.kind in NORMS:
            self._norm(a)
        elif a.kind in TIES:
            self.ties.run(a)
        elif a.kind in REPLICAS:
            self.reducer.run(a)
        elif a.kind is Kind.CHECKPOINT:
            self.hooks.on_checkpoint(a.k, self.stage)
        elif a.kind is Kind.RECV_EVAL:
            self._eval_inputs[a.k] = self.links.recv(a.kind, a.k)
        elif a.kind is Kind.EVAL_F:
            self._evaluate(a)
        elif a.kind is Kind.SEND_EVAL:
            self.links.send(a.kind, a.k, a.version, self._eval_outputs.pop(a.k), wait_follows=self._wait_follows())
        else:  # pragma: no cover - Kind is closed
            raise ValueError(f"stage {self.index}: unknown action {a!r}")

    def _norm(self, a: Action) -> None:
        v = a.k
        if a.kind is Kind.RECV_NORM:
            self._norm_in[v] = float(np.asarray(self.links.recv(a.kind, v)))
        elif a.kind is Kind.NORM:  # stages p-1, ..., s in that order: the same sum on every run
            own = self.stage.grad_sq_norm() if self.ties is None else self.ties.grad_sq_norm()
            self._norm_total[v] = self._norm_sum[v] = self._norm_in.pop(v, 0.0) + own
        elif a.kind is Kind.SEND_NORM:
            self.links.send(a.kind, v, v, np.float64(self._norm_sum.pop(v)), wait_follows=self._wait_follows())
        elif a.kind is Kind.RECV_TOTAL:
            self._norm_total[v] = float(np.asarray(self.links.recv(a.kind, v)))
        else:  # SEND_TOTAL
            self.links.send(a.kind, v, v, np.float64(self._norm_total[v]), wait_follows=self._wait_follows())

    def _update(self, version: int) -> None:
        self._norm_sum.pop(version, None)
        total = self._norm_total.pop(version, None)
        if total is None:
            self.stage.update(new_version=version)
            return
        norm = math.sqrt(total)
        scale = min(1.0, self.clip_norm / norm) if self.clip_norm and norm > 0 else 1.0
        self.stage.update(new_version=version, grad_scale=scale)
        self.hooks.on_grad_norm(version, norm, stage=self.index)

    def _evaluate(self, a: Action) -> None:
        spec = self.stage.spec
        step, j = self.evaluation.decode(a.k)
        x = self.heldout.inputs(j) if spec.is_first else self._eval_inputs.pop(a.k)
        evaluate = self.stage.evaluate if self.carrier is None else partial(self.carrier.evaluate, a.k)
        out = evaluate(x, targets=self.heldout.targets(j) if spec.is_last else None)
        if not spec.is_last:
            self._eval_outputs[a.k] = out
            return
        losses = self._eval_losses.setdefault(step, {})
        losses[j] = float(out)
        if len(losses) == self.evaluation.microbatches:
            del self._eval_losses[step]
            self.hooks.on_eval(step, float(np.mean([losses[i] for i in range(self.evaluation.microbatches)])))

    def _after(self) -> Action | None:
        """The action after the one running."""
        return self.actions[self.position + 1] if self.position + 1 < len(self.actions) else None

    def _wait_follows(self) -> bool:
        """Whether the action after this one waits for a message not yet here."""
        after = self._after()
        return after is not None and after.kind in _RECVS and not self.links.ready(after.kind, after.k)

    def _release_unread_versions(self) -> None:
        # A version stays while a later action reads it; the latest one always
        # stays because the next UPDATE starts from it.
        held = self.stage.versions()
        latest = max(held)
        for v in held:
            if v != latest and self.last_use.get(v, -1) <= self.position:
                self.stage.release(v)

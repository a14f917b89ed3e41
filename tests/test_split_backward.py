"""A split backward (torch stages after the first): the interpreter sends the
input gradient before the stage computes its weight gradients, and the run
gives the same bits as with one fused backward per micro-batch."""
import numpy as np
import pytest
from torch import nn

from pipetrain.data import ArraySource
from pipetrain.optim import Optimizer
from pipetrain.partitioning import partition
from pipetrain.runtime.interpreter import Hooks, StageProgram
from pipetrain.runtime.reference import build_stages, run_reference
from pipetrain.schedule.actions import Kind
from pipetrain.schedule.builders import build_schedule
from pipetrain.stages.torch_stage import TorchSequential

RNG = np.random.default_rng(0)
SOURCE = ArraySource(RNG.standard_normal((96, 12), dtype=np.float32), RNG.integers(0, 4, 96).astype(np.int64),
                     microbatch_size=4, seed=1)


def _loss(logits, labels):
    return nn.functional.cross_entropy(logits, labels)


def _stages(split_backward):
    layers = [lambda: nn.Linear(12, 16), nn.Tanh, lambda: nn.Linear(16, 16), nn.Tanh,
              lambda: nn.Linear(16, 16), nn.Tanh, lambda: nn.Linear(16, 4)]
    model = TorchSequential(layers, loss=_loss, seed=0, device="cpu", split_backward=split_backward)
    part = partition(model, 3, method="explicit", boundaries=[2, 4], example_input=SOURCE.inputs(0))
    return build_stages(part, Optimizer("adam", lr=1e-2))


@pytest.mark.parametrize("policy", [True, "auto"])
@pytest.mark.parametrize("schedule_name", ["gpipe", "1f1b", "pipedream", "2bw"])
def test_split_runs_give_the_fused_runs_bits(schedule_name, policy):
    schedule = build_schedule(schedule_name, num_stages=3, microbatches=4, steps=3, checkpoint_every=4)
    fused = run_reference(schedule, stages=_stages(False), source=SOURCE, keep_checkpoints=True)
    split_stages = _stages(policy)
    assert [s.split_backward for s in split_stages] == ["never"] + [{True: "always", "auto": "auto"}[policy]] * 2
    split = run_reference(schedule, stages=split_stages, source=SOURCE, keep_checkpoints=True)
    assert split.losses == fused.losses
    for cut in fused.checkpoints:  # checkpoints are taken after the weight gradients
        for s, state in fused.checkpoints[cut].items():
            for name, value in state.items():
                assert np.array_equal(value, split.checkpoints[cut][s][name]), (cut, s, name)


class _Log(Hooks):
    def __init__(self, log):
        self.log = log

    def on_action(self, action, start, end):
        if action.kind is Kind.SEND_GRAD:
            self.log.append(("sent", action.k))

    def on_weights(self, k, version, start, end):
        assert end >= start
        self.log.append(("weights reported", k))


class _Links:
    """Two stages in one process; records when the gradient leaves stage 1."""

    def __init__(self, boxes, stage, log):
        self.boxes, self.stage, self.log = boxes, stage, log

    def ready(self, kind, k):
        return (kind, k) in self.boxes[self.stage]

    def recv(self, kind, k):
        return self.boxes[self.stage].pop((kind, k))

    def send(self, kind, k, version, tree, *, wait_follows=False):
        if kind is Kind.SEND_ACT:
            self.boxes[self.stage + 1][(Kind.RECV_ACT, k)] = tree
        else:
            self.log.append(("gradient on the wire", k))
            self.boxes[self.stage - 1][(Kind.RECV_GRAD, k)] = tree


def test_the_input_gradient_leaves_before_the_weight_gradients_are_computed(monkeypatch):
    log: list = []
    layers = [lambda: nn.Linear(12, 16), nn.Tanh, lambda: nn.Linear(16, 4)]
    model = TorchSequential(layers, loss=_loss, seed=0, device="cpu", split_backward=True)
    part = partition(model, 2, method="explicit", boundaries=[2], example_input=SOURCE.inputs(0))
    stages = build_stages(part, Optimizer("sgd", lr=0.1))
    real = stages[1].backward_weights
    monkeypatch.setattr(stages[1], "backward_weights", lambda k: (log.append(("weights computed", k)), real(k)))
    schedule = build_schedule("1f1b", num_stages=2, microbatches=2, steps=1)
    boxes = [{}, {}]
    programs = [StageProgram(s, schedule, source=SOURCE, links=_Links(boxes, i, log), hooks=_Log(log))
                for i, s in enumerate(stages)]
    while not all(p.done for p in programs):
        for p in programs:
            while p.can_run():
                p.run_next()
    for k in range(2):
        order = [log.index((what, k)) for what in ("gradient on the wire", "weights computed", "sent",
                                                    "weights reported")]
        assert order == sorted(order), log


class _CountWeights(Hooks):
    def __init__(self):
        self.split: list[int] = []  # micro-batches whose weight gradients ran after the send
        self.backwards = 0

    def on_action(self, action, start, end):
        if action.kind is Kind.BACKWARD:
            self.backwards += 1

    def on_weights(self, k, version, start, end):
        self.split.append(k)


@pytest.mark.parametrize("schedule_name, policy, split", [
    ("1f1b", "auto", [3, 7, 11]),      # the step's last backward: the previous stage waits for it to end the step
    ("gpipe", "auto", [3, 7, 11]),
    ("pipedream", "auto", []),         # no flush: nothing to gain, only the split's bookkeeping
    ("2bw", "auto", []),
    ("1f1b", True, list(range(12))),   # every backward that sends a gradient
    ("pipedream", True, list(range(12))),
    ("1f1b", False, []),
])
def test_which_backwards_run_split(schedule_name, policy, split):
    schedule = build_schedule(schedule_name, num_stages=3, microbatches=4, steps=3, checkpoint_every=4)
    hooks = [_CountWeights() for _ in range(3)]
    stages = _stages(policy)
    boxes = [{}, {}, {}]
    programs = [StageProgram(s, schedule, source=SOURCE, links=_Links(boxes, i, []), hooks=h)
                for i, (s, h) in enumerate(zip(stages, hooks))]
    while not all(p.done for p in programs):
        for p in programs:
            while p.can_run():
                p.run_next()
    assert hooks[0].split == []  # the first stage sends no gradient
    for h in hooks[1:]:
        assert sorted(h.split) == split and h.backwards == 12

"""The interpreter tells the links when a send is followed by a wait: the
stage's next action receives a message that is not there yet. The Dask
links write such a message from the compute thread (lowest latency, the stage
would idle anyway) and hand every other one to the channel's thread."""
import pytest

from models import mlp
from pipetrain.optim import Optimizer
from pipetrain.partitioning import partition
from pipetrain.runtime.interpreter import StageProgram
from pipetrain.runtime.reference import build_stages
from pipetrain.schedule.actions import Kind
from pipetrain.schedule.builders import build_schedule
from pipetrain.stages.jax_stage import JaxSequential

SOURCE = mlp.source(64, microbatch_size=4, seed=0)


class _RecordingLinks:
    def __init__(self, boxes, stage, program, sends):
        self.boxes, self.stage, self.sends = boxes, stage, sends
        self.program = program

    def ready(self, kind, k):
        return (kind, k) in self.boxes[self.stage]

    def recv(self, kind, k):
        return self.boxes[self.stage].pop((kind, k))

    def send(self, kind, k, version, tree, *, wait_follows=False):
        actions = self.program[0].actions
        after = actions[self.program[0].position + 1] if self.program[0].position + 1 < len(actions) else None
        must_wait = (after is not None and after.kind in (Kind.RECV_ACT, Kind.RECV_GRAD)
                     and (after.kind, after.k) not in self.boxes[self.stage])
        self.sends.append((self.stage, kind, k, wait_follows, must_wait))
        target, key = ((self.stage + 1, (Kind.RECV_ACT, k)) if kind is Kind.SEND_ACT
                       else (self.stage - 1, (Kind.RECV_GRAD, k)))
        self.boxes[target][key] = tree


@pytest.mark.parametrize("schedule_name", ["1f1b", "pipedream"])
def test_sends_say_whether_the_stage_waits_next(schedule_name):
    model = JaxSequential(mlp.layers(sizes=(12, 10)), loss=mlp.loss_fn, seed=0)
    part = partition(model, 2, example_input=SOURCE.inputs(0))
    stages = build_stages(part, Optimizer("sgd", lr=0.1))
    schedule = build_schedule(schedule_name, num_stages=2, microbatches=4, steps=2)
    boxes, sends, holders = [{}, {}], [], [[None], [None]]
    programs = []
    for i, stage in enumerate(stages):
        program = StageProgram(stage, schedule, source=SOURCE, links=_RecordingLinks(boxes, i, holders[i], sends))
        holders[i][0] = program
        programs.append(program)
    # Stage 1 runs as far as it can before stage 0 moves on, so both cases occur.
    while not all(p.done for p in programs):
        for p in reversed(programs):
            while p.can_run():
                p.run_next()
    assert len(sends) == 2 * 4 * 2  # steps x micro-batches x (activation, gradient)
    assert all(said == must for _, _, _, said, must in sends)
    assert {said for *_, said, _ in sends} == {True, False}

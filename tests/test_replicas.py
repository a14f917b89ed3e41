"""Replicated pipelines in one process (schedule/replicas.py, runtime/replicas.py): the
schedule pass, the data split, and the reference executor with d replicas against one
pipeline with d times the micro-batches, and against the unpartitioned model."""
from __future__ import annotations

import numpy as np
import pytest

from models import mlp
from oracles import full_gradient, initial_params
from pipetrain.optim import Optimizer
from pipetrain.partitioning import partition
from pipetrain.runtime.reference import build_stages, run_reference
from pipetrain.runtime.replicas import ReplicaMismatch, ReplicaReducer
from pipetrain.schedule.actions import Action, Kind
from pipetrain.schedule.builders import ScheduleSpec
from pipetrain.schedule.replicas import check_replica_actions
from pipetrain.schedule.schedule import ScheduleError
from pipetrain.schedule.simulator import simulate

LAYERS = mlp.layers(sizes=(12, 10, 8))
SOURCE = mlp.source(512, microbatch_size=8, seed=3)
SCHEDULES = ["gpipe", "1f1b", "pipedream", "2bw"]


def _model():
    from pipetrain.stages.jax_stage import JaxSequential

    return JaxSequential(LAYERS, loss=mlp.loss_fn, seed=0)


def _part(p):
    return partition(_model(), p, boundaries=[3] if p == 2 else None, example_input=SOURCE.inputs(0))


def _run(name, *, p=2, d=1, m=4, steps=3, optimizer=Optimizer("sgd", lr=0.1), accumulate=1, **spec):
    part = _part(p)
    schedule = ScheduleSpec(name, num_stages=p, microbatches=m, steps=steps, replicas=d, accumulate=accumulate,
                            **spec).build()
    stages = [st for _ in range(d) for st in build_stages(part, optimizer)]
    return run_reference(schedule, stages=stages, source=SOURCE, replicas=d)


@pytest.mark.parametrize("name", SCHEDULES)
def test_the_pass_puts_a_sum_before_every_update_and_the_schedule_checks(name):
    m = 4
    schedule = ScheduleSpec(name, num_stages=2, microbatches=m, steps=2, replicas=2, checkpoint_every=m).build()
    simulate(schedule)  # the static checks include check_replica_actions
    for s, acts in enumerate(schedule.actions):
        kinds = [a.kind for a in acts]
        updates = [i for i, k in enumerate(kinds) if k is Kind.UPDATE]
        for i in updates:
            v = acts[i].version
            assert acts[i - 2:i] == (Action(s, Kind.RECV_REDUCE, v), Action(s, Kind.REDUCE, v))
            send = acts.index(Action(s, Kind.SEND_REDUCE, v))
            last_b = max(j for j in range(i) if kinds[j] is Kind.BACKWARD)
            # posted right after the update's last backward (and the send of its input gradient)
            assert send == last_b + 1 + (kinds[last_b + 1] is Kind.SEND_GRAD)
    # a cut still lands after the update
    assert schedule.cut_points(0) or schedule.checkpoint_cuts()


def test_a_misplaced_sum_is_refused():
    schedule = ScheduleSpec("1f1b", num_stages=1, microbatches=2, steps=1, replicas=2).build()
    acts = list(schedule.actions[0])
    send = next(i for i, a in enumerate(acts) if a.kind is Kind.SEND_REDUCE)
    acts.insert(0, acts.pop(send))  # before the backwards it should hold
    from dataclasses import replace
    with pytest.raises(ScheduleError, match="sent before a backward"):
        check_replica_actions(replace(schedule, actions=(tuple(acts),)), 0)
    with pytest.raises(ScheduleError, match="replicas: must be an integer >= 1"):
        ScheduleSpec("1f1b", num_stages=1, microbatches=2, steps=1, replicas=0)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_sync_replicas_match_one_pipeline_with_d_times_the_microbatches(name):
    d, m = 2, 4
    two = _run(name, d=d, m=m)
    one = _run(name, d=1, m=d * m)
    assert sorted(two.losses) == sorted(one.losses) == list(range(3 * d * m))
    # the sum over replicas is added in another order than one pipeline's accumulator: float tolerance
    for k in one.losses:
        assert two.losses[k] == pytest.approx(one.losses[k], rel=1e-5)
    for a, b in zip(two.state_dicts(), one.state_dicts()):
        for key in a:
            if key.startswith("v"):
                np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_replicas_gradient_equals_the_unpartitioned_models():
    d, m = 2, 3
    part = _part(2)
    schedule = ScheduleSpec("1f1b", num_stages=2, microbatches=m, steps=1, replicas=d).build()
    # stop right after the sum, before the update: the accumulators hold the replicas' sums
    from dataclasses import replace
    schedule = replace(schedule, actions=tuple(tuple(a for a in acts if a.kind is not Kind.UPDATE)
                                               for acts in schedule.actions))
    stages = [st for _ in range(d) for st in build_stages(part, Optimizer("sgd", lr=0.1))]
    run_reference(schedule, stages=stages, source=SOURCE, replicas=d)
    params = initial_params(LAYERS, SOURCE.inputs(0))
    oracle = full_gradient(LAYERS, mlp.loss_fn, params, [(SOURCE.inputs(k), SOURCE.targets(k)) for k in range(d * m)])
    oracle_leaves = [np.asarray(x) for g in oracle for x in __import__("jax").tree_util.tree_leaves(g)]
    got = []
    for st in stages[:2]:
        state = st.state_dict()
        assert int(state["meta/count"]) == d * m
        got += [state[n] / (d * m) for n in sorted(k for k in state if k.startswith("acc/"))]
    assert len(got) == len(oracle_leaves)
    assert sorted(float(np.abs(g).sum()) for g in got) == pytest.approx(
        sorted(float(np.abs(g).sum()) for g in oracle_leaves), rel=1e-5)
    # every replica holds the same sums, bit for bit
    for a, b in zip(stages[:2], stages[2:]):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(np.array_equal(sa[n], sb[n]) for n in sa)


@pytest.mark.parametrize("name", SCHEDULES)
def test_replicas_stay_bit_identical_and_each_microbatch_counts_once(name):
    d = 2
    result = _run(name, d=d, m=4, steps=3, optimizer=Optimizer("adam", lr=1e-2))
    assert sorted(result.losses) == list(range(3 * 4 * d))
    p = 2
    for r in range(1, d):
        for a, b in zip(result.replica_stages[:p], result.replica_stages[r * p:(r + 1) * p]):
            sa, sb = a.state_dict(), b.state_dict()
            assert sa.keys() == sb.keys()
            assert all(np.array_equal(sa[n], sb[n]) for n in sa), name


def test_pipedream_with_accumulation_and_clipping_under_replicas_runs_the_same_twice():
    a = _run("pipedream", d=2, m=4, accumulate=2, clip=True,
             optimizer=Optimizer("sgd", lr=0.1, clip_norm=0.5))
    b = _run("pipedream", d=2, m=4, accumulate=2, clip=True,
             optimizer=Optimizer("sgd", lr=0.1, clip_norm=0.5))
    assert a.losses == b.losses
    for x, y in zip(a.state_dicts(), b.state_dicts()):
        assert all(np.array_equal(x[n], y[n]) for n in x)


class _Links:
    def __init__(self, parts):
        self.parts = parts

    def ready(self, kind, k):
        return True

    def recv(self, kind, k):
        return self.parts[k]

    def send(self, *args, **kwargs):
        pass


def test_a_part_for_other_microbatches_or_shapes_is_refused_before_it_is_added():
    part = _part(1)
    stage = build_stages(part, Optimizer("sgd", lr=0.1))[0]
    from pipetrain.stages import replica_grads

    grads, count = replica_grads.read(stage)
    good = {"grads": grads, "count": np.asarray(0, np.int64), "ids": np.zeros(0, np.int64)}
    cases = {"micro-batches": {**good, "ids": np.array([5], np.int64)},
             "is float32": {**good, "grads": {n: g[..., :1] for n, g in grads.items()}},
             "count": {**good, "count": np.asarray(3, np.int64)},
             "not a replica part": [1, 2]}
    for what, bad in cases.items():
        links = _Links({})
        reducer = ReplicaReducer(stage, links, replica=0, replicas=2, hooks=None, wait_follows=lambda: False)
        links.parts[reducer.wire_k(0, 1)] = bad
        reducer.run(Action(0, Kind.SEND_REDUCE, 0))
        with pytest.raises(ReplicaMismatch, match=what):
            reducer.run(Action(0, Kind.RECV_REDUCE, 0))


@pytest.mark.parametrize("fresh", [True, False])
@pytest.mark.parametrize("replica", [0, 1, 2])
def test_the_sum_is_the_left_fold_in_replica_order_and_never_writes_this_replicas_part(replica, fresh):
    """The order matters in float32 (1e8 + 1 - 1e8 is 0 one way, 1 another): every replica gets
    (p0 + p1) + p2 bit for bit, its own part (a view of its accumulator) unchanged, and a
    received part is summed into only where the links say it is the receiver's own buffer."""
    rng = np.random.default_rng(replica)
    parts = [rng.standard_normal(1000).astype(np.float32) * scale for scale in (1e8, 1.0, 1e-3)]
    parts[0][:3], parts[1][:3], parts[2][:3] = 1e8, 1.0, -1e8
    want = (parts[0] + parts[1]) + parts[2]
    given = [p.copy() for p in parts]
    links = _Links({})
    links.received_are_fresh = fresh
    reducer = ReplicaReducer(build_stages(_part(1), Optimizer("sgd", lr=0.1))[0], links, replica=replica,
                             replicas=3, hooks=None, wait_follows=lambda: False)
    total = reducer._summed(given)
    assert total.tobytes() == want.tobytes()
    assert given[replica].tobytes() == parts[replica].tobytes()
    into_received = any(np.shares_memory(total, g) for r, g in enumerate(given) if r != replica)
    assert into_received == fresh
    if not fresh:
        assert all(g.tobytes() == p.tobytes() for g, p in zip(given, parts))


def test_the_simulator_charges_the_exchange_before_each_update():
    schedule = ScheduleSpec("1f1b", num_stages=2, microbatches=4, steps=2, replicas=2).build()
    free, costly = simulate(schedule).makespan, simulate(schedule, reduce_cost=3.0).makespan
    # each step's update on the last stage to finish waits 3 more, and the next step waits for it
    assert free < costly <= free + 2 * 3.0
    with pytest.raises(ScheduleError, match="reduce_cost"):
        simulate(schedule, reduce_cost=-1.0)


@pytest.mark.parametrize("name,d,clip", [("1f1b", 1, True), ("pipedream", 1, True), ("1f1b", 2, False),
                                         ("pipedream", 2, True), ("2bw", 2, True)])
def test_the_last_eval_block_sees_the_last_update_whatever_the_passes_put_before_it(name, d, clip):
    # The eval pass places its block after the step's last B *and* what belongs to it: the norm,
    # tie and replica actions before the U, and the U itself (it once stopped at the first of them).
    from pipetrain.runtime.reference import evaluate
    from pipetrain.schedule.evaluation import EvalSpec

    part = _part(2)
    optimizer = Optimizer("sgd", lr=0.1, clip_norm=0.5 if clip else None)
    schedule = ScheduleSpec(name, num_stages=2, microbatches=4, steps=2, replicas=d, clip=clip).build()
    stages = [st for _ in range(d) for st in build_stages(part, optimizer)]
    result = run_reference(schedule, stages=stages, source=SOURCE, replicas=d, heldout=SOURCE,
                           evaluation=EvalSpec(3, every=1))
    assert result.evals[2] == evaluate(result.stages, SOURCE, range(3))

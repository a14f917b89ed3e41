"""Gradient clipping by global norm (``Optimizer.clip_norm``, schedule/norms.py).

- The pass puts the scalar reduction before every UPDATE (gpipe, 1f1b, 2bw) or
  each stage's own norm (pipedream); the simulator runs every clipped schedule
  without deadlock under the runtime's credits and rejects misplaced norm actions.
- Sync schedules: JAX, torch, Keras and mixed chains end at the weights of
  tests/oracles.py's numpy ``sync_weights`` (global norm over all stages), and
  the JAX and mixed chains at those of ``optax.clip_by_global_norm`` + momentum SGD on
  the unpartitioned twin model.
- 2bw (global) and pipedream (per stage) against ``clipped_async_weights``.
- The norm every update clipped by reaches ``Hooks.on_grad_norm``; a torch stage
  that splits its backward clips to the same bits as a fused one.
- A norm frame is one float64 scalar, and only on its own edge direction.
"""
import dataclasses

import numpy as np
import optax
import pytest

from oracles import NumpyOptimizer, clipped_async_weights, full_gradient, global_norm, initial_params, sync_weights
from pipetrain.optim import Optimizer
from pipetrain.runtime.interpreter import Hooks
from pipetrain.runtime.transport import MessageKind
from pipetrain.runtime.reference import run_reference
from pipetrain.schedule.actions import Action, Kind
from pipetrain.schedule.builders import ScheduleSpec, build_schedule
from pipetrain.schedule.simulator import ScheduleError, simulate
from test_lr_schedules import _case, _weights, twin_grad_fn

CLIP = 0.05  # below every update's gradient norm in these runs: each one is clipped


def _opt(name="momentum", lr=0.5, **kw):  # (not Adam: its steps barely change when a gradient is scaled)
    return Optimizer(name, lr=lr, clip_norm=CLIP, **kw)


def test_the_pass_puts_the_reduction_before_each_update():
    s = build_schedule("1f1b", num_stages=3, microbatches=3, steps=1, clip=True)
    tails = [" ".join(str(a) for a in acts[-7:]) for acts in s.actions]
    assert tails[0].endswith("0B2 0RECV_N1 0N1 0SEND_T1 0U1")
    assert tails[1].endswith("1SEND_B2 1RECV_N1 1N1 1SEND_N1 1RECV_T1 1SEND_T1 1U1")
    assert tails[2].endswith("2SEND_B2 2N1 2SEND_N1 2RECV_T1 2U1")
    local = build_schedule("pipedream", num_stages=3, microbatches=3, steps=1, clip=True)
    assert all(not {a.kind for a in acts} & {Kind.SEND_NORM, Kind.SEND_TOTAL} for acts in local.actions)
    assert [str(a) for a in local.actions[0] if a.kind in (Kind.NORM, Kind.UPDATE)][:2] == ["0N1", "0U1"]
    spec = ScheduleSpec("1f1b", num_stages=2, microbatches=2, steps=1)
    assert "clip" not in spec.to_dict()  # manifests without clipping stay as they were
    assert dataclasses.replace(spec, clip=True).to_dict()["clip"] is True


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "2bw", "pipedream"])
@pytest.mark.parametrize("p", [1, 2, 4])
def test_clipped_schedules_simulate_without_deadlock(name, p):
    m = max(p, 4)
    s = build_schedule(name, num_stages=p, microbatches=m, steps=3, clip=True, checkpoint_every=m)
    report = simulate(s, credits=p + 1, send_cost=0.1)  # the runtime's default credits
    updates = [a for a in s.actions[0] if a.kind is Kind.UPDATE]
    assert [a for a in s.actions[0] if a.kind is Kind.NORM] == [Action(0, Kind.NORM, u.version) for u in updates]
    assert report.makespan > 0


def _without(schedule, stage, drop):
    acts = tuple(a for a in schedule.actions[stage] if not drop(a))
    return dataclasses.replace(schedule, actions=schedule.actions[:stage] + (acts,) + schedule.actions[stage + 1:])


def test_the_simulator_rejects_misplaced_norm_actions():
    s = build_schedule("1f1b", num_stages=3, microbatches=3, steps=2, clip=True)
    with pytest.raises(ScheduleError, match="1N1 .* needs 1RECV_N1 before it"):
        simulate(_without(s, 1, lambda a: a.kind is Kind.RECV_NORM and a.k == 1))
    late = list(s.actions[2])
    i = late.index(Action(2, Kind.NORM, 1))
    late.insert(i - 3, late.pop(i))  # before the stage's last backward of the step
    with pytest.raises(ScheduleError, match="must come right before 2U1"):
        simulate(dataclasses.replace(s, actions=s.actions[:2] + (tuple(late),)))
    with pytest.raises(ScheduleError, match="needs 0N1 before it"):
        acts = list(s.actions[0])
        j = acts.index(Action(0, Kind.SEND_TOTAL, 1))
        acts[j - 1], acts[j] = acts[j], acts[j - 1]
        simulate(dataclasses.replace(s, actions=(tuple(acts),) + s.actions[1:]))


def test_bad_clip_norm_is_named_and_a_schedule_without_norms_is_refused():
    with pytest.raises(ValueError, match="optimizer.clip_norm"):
        Optimizer("sgd", lr=0.1, clip_norm=-1.0)
    stage_list, source, _ = _case("jax", _opt())
    with pytest.raises(ValueError, match="stage 0: the optimizer clips by norm.*clip=True"):
        run_reference(build_schedule("1f1b", num_stages=2, microbatches=2, steps=1), stages=stage_list,
                      source=source)


def test_a_clipped_run_resumed_at_its_last_cut_has_nothing_to_clip():
    # A recovery whose rollback is the final cut resumes with no update left: no norm actions are
    # needed, and the stage must not refuse its (empty) schedule for lacking them.
    stage_list, source, _ = _case("jax", _opt())
    tail = build_schedule("1f1b", num_stages=2, microbatches=2, steps=1, clip=True, first_microbatch=2)
    assert not any(a.kind is Kind.UPDATE for s in range(2) for a in tail.stage_actions(s))
    run_reference(tail, stages=stage_list, source=source)


class NormLog(Hooks):
    def __init__(self):
        self.norms = {}

    def on_grad_norm(self, version, norm, *, stage):
        self.norms.setdefault(version, []).append(norm)


def _run(framework, schedule, opt, *, m=2, steps=3, **kw):
    stage_list, source, layout = _case(framework, opt, **kw)
    params0 = [_weights(s, 0) for s in stage_list]
    log = NormLog()
    run_reference(build_schedule(schedule, num_stages=len(stage_list), microbatches=m, steps=steps, clip=True),
                  stages=stage_list, source=source, hooks=log)
    return stage_list, params0, layout, source, log


def _assert_close(stage_list, want, version, what):
    for s, stage in enumerate(stage_list):
        got = _weights(stage, version)
        for n, w in want[s].items():
            np.testing.assert_allclose(got[n], w, rtol=1e-4, atol=2e-6, err_msg=f"{what} stage {s} {n}")


@pytest.mark.slow
@pytest.mark.parametrize("framework,schedule", [("jax", "1f1b"), ("jax", "gpipe"), ("torch", "1f1b"),
                                                ("keras", "1f1b"), ("mixed", "1f1b")])
def test_sync_clipping_follows_the_numpy_oracle(framework, schedule):
    if framework in ("keras", "mixed"):
        pytest.importorskip("tensorflow")
    m, steps = 2, 3
    stage_list, params0, layout, source, log = _run(framework, schedule, _opt(), m=m, steps=steps)
    grad_fn = twin_grad_fn(layout, source)
    oracle = sync_weights(grad_fn, params0, microbatches=m, steps=steps, clip_norm=CLIP,
                          optimizers=[NumpyOptimizer("momentum", 0.5) for _ in params0])
    _assert_close(stage_list, oracle, steps, framework)
    # every stage heard the same global norm for each update, and it is the first step's true norm
    assert sorted(log.norms) == [1, 2, 3] and all(len(set(v)) == 1 == len(v) // len(stage_list)
                                                   for v in log.norms.values())
    first = [{n: sum(np.asarray(g[s][n]) for g in (grad_fn(k, params0) for k in range(m))) / m for n in params0[s]}
             for s in range(len(params0))]
    assert log.norms[1][0] == pytest.approx(global_norm(first), rel=1e-5)
    assert log.norms[1][0] > CLIP  # so the clipping did something
    unclipped = sync_weights(grad_fn, params0, microbatches=m, steps=steps,
                             optimizers=[NumpyOptimizer("momentum", 0.5) for _ in params0])
    w0 = layout[0][0][1]
    assert not np.allclose(_weights(stage_list[0], steps)[w0], unclipped[0][w0], rtol=1e-3, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["jax", "mixed"])
def test_sync_clipping_equals_optax_on_the_unpartitioned_model(framework):
    if framework == "mixed":
        pytest.importorskip("tensorflow")
    from models import mixed, mlp

    m, steps, lr = 2, 3, 0.5
    stage_list, _, layout, source, _ = _run(framework, "1f1b", _opt(lr=lr), m=m, steps=steps)
    layers = mlp.layers(sizes=mixed.SIZES, kind="tanh")
    params = initial_params(layers, source.inputs(0))
    tx = optax.chain(optax.clip_by_global_norm(CLIP), optax.sgd(lr, momentum=0.9))
    state = tx.init(params)
    for t in range(steps):
        grads = full_gradient(layers, mlp.loss_fn, params, [(source.inputs(k), source.targets(k))
                                                            for k in range(t * m, (t + 1) * m)])
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    dense = [p for layer, p in zip(layers, params) if layer.name.startswith("dense")]
    for i, ((sw, w, transposed), (sb, b)) in enumerate(layout):
        got_w, got_b = _weights(stage_list[sw], steps)[w], _weights(stage_list[sb], steps)[b]
        np.testing.assert_allclose(got_w.T if transposed else got_w, np.asarray(dense[i]["w"]), rtol=1e-4, atol=2e-6)
        np.testing.assert_allclose(got_b, np.asarray(dense[i]["b"]), rtol=1e-4, atol=2e-6)


@pytest.mark.slow
@pytest.mark.parametrize("framework,schedule,accumulate", [("jax", "2bw", 1), ("torch", "2bw", 1),
                                                           ("jax", "pipedream", 1), ("torch", "pipedream", 2)])
def test_async_clipping_follows_the_oracle(framework, schedule, accumulate):
    m, steps = 2, 3
    stage_list, source, layout = _case(framework, _opt())
    params0 = [_weights(s, 0) for s in stage_list]
    run_reference(build_schedule(schedule, num_stages=len(stage_list), microbatches=m, steps=steps, clip=True,
                                 accumulate=accumulate), stages=stage_list, source=source)
    oracle = clipped_async_weights(twin_grad_fn(layout, source), params0, schedule=schedule, microbatches=m,
                                   steps=steps, accumulate=accumulate, clip_norm=CLIP,
                                   optimizers=[NumpyOptimizer("momentum", 0.5) for _ in params0])
    _assert_close(stage_list, oracle, max(stage_list[0].versions()), f"{framework} {schedule}")
    if schedule == "pipedream":  # per stage, not global: the global rule ends elsewhere
        other = clipped_async_weights(twin_grad_fn(layout, source), params0, schedule="2bw", microbatches=m,
                                      steps=steps, clip_norm=CLIP,
                                      optimizers=[NumpyOptimizer("momentum", 0.5) for _ in params0])
        assert not np.allclose(_weights(stage_list[0], max(stage_list[0].versions()))[layout[0][0][1]],
                               other[0][layout[0][0][1]], rtol=1e-3)


@pytest.mark.slow
def test_a_split_backward_clips_to_the_fused_bits():
    runs = []
    for split in (False, "always"):
        stage_list, *_ = _run("torch", "1f1b", _opt(), split_backward=split)
        runs.append([s.state_dict() for s in stage_list])
    for fused, split in zip(*runs):
        assert fused.keys() == split.keys()
        assert all(np.array_equal(fused[n], split[n]) for n in fused)


def test_a_norm_frame_is_one_float64_scalar():
    from pipetrain.runtime.transport import wire
    from pipetrain.runtime.transport.errors import Rejected

    def meta(kind, leaves):
        return {"g": 0, "s": 1, "kind": int(kind), "k": 1, "v": 1, "seq": 0, "tree": None, "leaves": leaves}

    assert wire.check_meta(meta(wire.MessageKind.NORM_PARTIAL, [["float64", [], 8]])) == 8
    for leaves in ([["float64", [1 << 20], 8 << 20]], [["float32", [], 4]], [], [["float64", [], 8]] * 2):
        for kind in (wire.MessageKind.NORM_PARTIAL, wire.MessageKind.NORM_TOTAL):
            with pytest.raises(Rejected, match="must hold one float64 scalar"):
                wire.check_meta(meta(kind, leaves))
    # the same leaves are fine on an activation
    assert wire.check_meta(meta(wire.MessageKind.ACTIVATION, [["float64", [1 << 20], 8 << 20]])) == 8 << 20


def test_jax_stage_grad_sq_norm_is_the_mean_gradients_norm():
    stage_list, source, layout = _case("jax", _opt())
    from stage_helpers import pipeline_step

    x, y = source.inputs(0), source.targets(0)
    x2, y2 = source.inputs(1), source.targets(1)
    assert stage_list[0].grad_sq_norm() == 0.0
    pipeline_step(stage_list, 0, x, y)
    pipeline_step(stage_list, 1, x2, y2)
    grad_fn = twin_grad_fn(layout, source)
    params0 = [_weights(s, 0) for s in stage_list]
    mean = [{n: (np.asarray(grad_fn(0, params0)[s][n]) + np.asarray(grad_fn(1, params0)[s][n])) / 2
             for n in params0[s]} for s in range(2)]
    for s in range(2):
        assert stage_list[s].grad_sq_norm() == pytest.approx(global_norm([mean[s]]) ** 2, rel=1e-5)


def test_norm_messages_travel_only_their_own_direction(caplog):
    from test_transport_security import assert_healthy, start

    # stage 1 hears the total from stage 0 and partial sums from stage 2, and nothing else
    with start(0) as up, start(1) as middle, start(2) as down:
        from_up, from_down = up.connect(middle.address, peer_stage=1), down.connect(middle.address, peer_stage=1)
        from_up.put(MessageKind.NORM_TOTAL, 4, np.float64(9.0))
        from_down.put(MessageKind.NORM_PARTIAL, 4, np.float64(2.0))
        assert float(middle.get(MessageKind.NORM_TOTAL, 4, timeout=10).tree) == 9.0
        assert float(middle.get(MessageKind.NORM_PARTIAL, 4, timeout=10).tree) == 2.0
        from_up.put(MessageKind.NORM_PARTIAL, 5, np.float64(1.0)).result(10)
        from_down.put(MessageKind.NORM_TOTAL, 5, np.float64(1.0)).result(10)
        from_up.wait_acked(timeout=10)
        from_down.wait_acked(timeout=10)
        assert not middle.has(MessageKind.NORM_PARTIAL, 5) and not middle.has(MessageKind.NORM_TOTAL, 5)
        assert middle.stats["rejected_frames"] == 2
        assert "NORM_PARTIAL on the connection from stage 0" in caplog.text
        assert "NORM_TOTAL on the connection from stage 2" in caplog.text
        assert_healthy(middle, from_up)


# ---------------------------------------------------------------- the step records' lr and grad_norm

def _book(schedule, *, p=2, m=2, accumulate=1, clip=True):
    from pipetrain.runtime.bookkeeping import StepBook
    from pipetrain.runtime.step_metrics import StepOptimizerMetrics

    spec = ScheduleSpec(schedule, num_stages=p, microbatches=m, steps=3, accumulate=accumulate, clip=clip)
    opt = Optimizer("sgd", lr=1.0, schedule="linear", decay_steps=10, min_lr=0.0, clip_norm=1.0 if clip else None)
    return StepBook(p, m, 4, metrics=StepOptimizerMetrics(optimizer=opt, schedule=spec, num_stages=p))


def _report(stage, step, norms=None, losses=None):
    return {"stage": stage, "step": step, "busy": 0.0, "wall": 1.0, "time": float(step), "losses": losses or {},
            "grad_norms": norms or {}}


def test_a_step_record_waits_for_its_updates_norm_and_logs_the_lr_it_used():
    book = _book("1f1b")
    assert book.add(_report(0, 0, losses={0: 1.0, 1: 3.0})) == []
    assert book.add(_report(1, 0)) == []  # every stage reported step 0, but not the norm of update 1 yet
    (record,) = book.add(_report(1, 1, norms={1: 0.5}))  # the last stage's next report carries it
    assert (record.step, record.loss, record.grad_norm, record.lr) == (0, 2.0, 0.5, 1.0)  # update 1 ran at count 0
    book.add(_report(0, 1))
    (record,) = book.add(_report(1, -1, norms={2: 0.25}))  # a flush
    assert (record.step, record.grad_norm, record.lr) == (1, 0.25, pytest.approx(0.9))
    unclipped = _book("1f1b", clip=False)
    unclipped.add(_report(0, 0))
    (record,) = unclipped.add(_report(1, 0))
    assert (record.grad_norm, record.lr) == (None, 1.0)


def test_pipedreams_logged_norm_combines_each_stages_own():
    book = _book("pipedream")  # an update per micro-batch: step 0 closes with update 2
    book.add(_report(0, 0, norms={1: 9.0, 2: 3.0}))
    assert book.add(_report(1, 0, norms={1: 1.0})) == []  # stage 1's norm of update 2 still missing
    (record,) = book.add(_report(1, -1, norms={2: 4.0}))
    assert record.grad_norm == pytest.approx(5.0) and record.lr == pytest.approx(0.9)  # update 2 ran at count 1


@pytest.mark.slow
@pytest.mark.parametrize("framework,schedule", [("jax", "1f1b"), ("torch", "2bw")])
def test_a_clipped_run_resumed_from_a_cut_is_bit_identical(framework, schedule):
    m, steps, cut = 2, 4, 4
    build = dict(num_stages=2, microbatches=m, steps=steps, checkpoint_every=m, clip=True)
    full_stages, source, _ = _case(framework, _opt())
    full = run_reference(build_schedule(schedule, **build), stages=full_stages, source=source, keep_checkpoints=True)
    fresh, _, _ = _case(framework, _opt())
    for s, stage in enumerate(fresh):
        stage.load_state_dict(full.checkpoints[cut][s])
    resumed = run_reference(build_schedule(schedule, first_microbatch=cut, **build), stages=fresh, source=source)
    assert {k: v for k, v in full.losses.items() if k >= cut} == resumed.losses
    for a, b in zip(full.state_dicts(), resumed.state_dicts()):
        assert a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)
    assert {v: n for s, norms in resumed.grad_norms.items() for v, n in norms.items()} == {
        v: n for s, norms in full.grad_norms.items() for v, n in norms.items() if v > cut // m}


def test_a_rollback_closes_the_steps_before_its_cut_so_later_records_still_come():
    # pipedream, p = 2, m = 2: step 1 closes with update 4, whose norms come with each stage's next
    # report. The job is lost before those: after the rollback to cut 4 no stage reports step 1 again.
    book = _book("pipedream")
    book.add(_report(0, 0, norms={1: 3.0, 2: 3.0}))
    (step0,) = book.add(_report(1, 0, norms={1: 4.0, 2: 4.0}, losses={0: 1.0, 1: 3.0}))
    assert step0.step == 0 and step0.grad_norm == pytest.approx(5.0)
    assert book.add(_report(0, 1, norms={3: 3.0, 4: 3.0})) == []
    assert book.add(_report(1, 1, norms={3: 4.0}, losses={2: 5.0})) == []  # waits for stage 1's norm of update 4
    closed = book.forget_from(4, committed_losses={0: 1.0, 1: 3.0, 2: 5.0, 3: 7.0})
    assert [(r.step, r.loss, r.grad_norm, r.samples_per_s) for r in closed] == [(1, 6.0, None, None)]
    assert closed[0].lr == pytest.approx(0.7)  # update 4 ran at count 3: the LR the schedule gives
    book.add(_report(0, 2, norms={5: 3.0, 6: 3.0}))
    assert book.add(_report(1, 2, norms={5: 4.0}, losses={4: 1.0, 5: 1.0})) == []
    (step2,) = book.add(_report(1, -1, norms={6: 4.0}))  # the new generation's records come again
    assert (step2.step, step2.loss, step2.grad_norm) == (2, 1.0, pytest.approx(5.0))
    assert book.forget_from(4) == []  # a second rollback to the same cut: nothing left to close

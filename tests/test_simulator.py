"""Simulator: every built schedule runs deadlock-free; broken ones are rejected with the right message."""
from __future__ import annotations

import dataclasses
import itertools

import pytest

from pipetrain.schedule.actions import Action, B, F, Kind, U
from pipetrain.schedule.builders import (
    ScheduleError,
    bubble_fraction_formula,
    build_schedule,
)
from pipetrain.schedule.simulator import render_grid, simulate


def _requests():
    for name, p, m, steps in itertools.product(("gpipe", "1f1b", "pipedream", "2bw"), range(1, 6), (1, 2, 3, 5, 8),
                                               (1, 3)):
        if name == "2bw" and m < p:
            continue
        accumulates = [a for a in (1, 2, 4) if m % a == 0] if name == "pipedream" else [1]
        for a in accumulates:
            unit = a if name == "pipedream" else m
            for every, first in ((None, 0), (unit, 0), (2 * unit, unit), (unit, steps * m - unit)):
                yield name, {"num_stages": p, "microbatches": m, "steps": steps, "accumulate": a,
                             "checkpoint_every": every, "first_microbatch": first}


def test_every_built_schedule_simulates():
    count = 0
    for name, kw in _requests():
        s = build_schedule(name, **kw)
        for credits, send in ((None, 0.0), (1, 0.5), (2, 0.0)):
            r = simulate(s, credits=credits, send_cost=send)
            count += 1
            remaining = s.total_microbatches - s.first_microbatch
            for st in range(s.num_stages):
                bound = {"gpipe": kw["microbatches"], "1f1b": min(s.num_stages - st, kw["microbatches"])}.get(
                    name, s.num_stages - st)
                assert r.activation_bounds[st] == bound
                # the bound is reached whenever there is enough work to reach it
                assert r.peak_live_activations[st] == min(bound, remaining), (name, kw, st)
            if name == "2bw":
                assert max(r.peak_stashed_versions) <= 2
            if name in ("gpipe", "1f1b"):
                assert max(r.peak_stashed_versions) == 1
    assert count > 500


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("fwd,bwd", [(1.0, 1.0), (1.0, 2.0), (2.0, 3.0)])
def test_flush_bubble_matches_formula(name, fwd, bwd):
    for p, m, steps in itertools.product(range(1, 6), (1, 2, 4, 8, 13), (1, 2)):
        s = build_schedule(name, num_stages=p, microbatches=m, steps=steps)
        r = simulate(s, forward_cost=fwd, backward_cost=bwd)
        assert r.bubble_fraction == pytest.approx(bubble_fraction_formula(name, p, m)), (p, m, steps)
        assert r.makespan == pytest.approx(steps * (m + p - 1) * (fwd + bwd))


def test_1f1b_p4_m8_figures():
    r = simulate(build_schedule("1f1b", num_stages=4, microbatches=8, steps=1))
    assert r.makespan == 33 and r.busy == (24, 24, 24, 24)
    assert r.bubble_fraction == pytest.approx(3 / 11) == r.formula_bubble
    assert r.peak_live_activations == (4, 3, 2, 1)
    assert r.peak_stashed_versions == (1, 1, 1, 1)


def test_pipedream_stashes_one_version_per_micro_batch_in_flight():
    r = simulate(build_schedule("pipedream", num_stages=4, microbatches=8, steps=4))
    assert r.peak_stashed_versions == (4, 3, 2, 1)
    assert r.peak_live_activations == (4, 3, 2, 1)
    assert r.formula_bubble is None


def test_async_steady_state_has_no_bubble_beyond_fill_and_drain():
    # no flush: the fill and drain are paid once over all steps
    one = simulate(build_schedule("pipedream", num_stages=4, microbatches=8, steps=1))
    many = simulate(build_schedule("pipedream", num_stages=4, microbatches=8, steps=8))
    assert many.makespan - one.makespan == pytest.approx(7 * 8 * 3)
    assert many.bubble_fraction < one.bubble_fraction


def test_timeline_costs_and_order():
    s = build_schedule("1f1b", num_stages=3, microbatches=4, steps=1)
    r = simulate(s, forward_cost=[1, 2, 1], backward_cost=[2, 4, 2])
    for st, events in enumerate(r.timeline):
        assert tuple(e.action for e in events) == s.actions[st]
        assert all(e.start <= e.end for e in events)
        assert all(a.end <= b.start + 1e-12 for a, b in itertools.pairwise(events))
        for e in events:
            want = {Kind.FORWARD: [1, 2, 1][st], Kind.BACKWARD: [2, 4, 2][st]}.get(e.action.kind, 0)
            assert e.end - e.start == want
    assert r.busy == (12, 24, 12)
    # the slow middle stage sets the pace: bubble above the uniform-cost formula
    assert r.bubble_fraction > bubble_fraction_formula("1f1b", 3, 4)


def test_send_cost_delays_the_receiver():
    s = build_schedule("1f1b", num_stages=2, microbatches=1, steps=1)
    r = simulate(s, forward_cost=1, backward_cost=1, send_cost=0.5)
    assert r.makespan == pytest.approx(5.0)  # F0, ship, F0 B0, ship, B0
    recv = next(e for e in r.timeline[1] if e.action.kind is Kind.RECV_ACT)
    assert recv.start == pytest.approx(1.5)


def test_update_cost_runs_after_the_last_backward():
    s = build_schedule("gpipe", num_stages=2, microbatches=2, steps=1)
    r = simulate(s, forward_cost=1, backward_cost=2, update_cost=[3, 0.5])
    # stage 1: F F B B (1..7) then U (7..7.5); stage 0's B 0 waits for stage 1's (5), B B (5..9), U (9..12)
    assert r.makespan == pytest.approx(12.0)
    assert r.busy == pytest.approx((9.0, 6.5))
    assert simulate(s, forward_cost=1, backward_cost=2).makespan == pytest.approx(9.0)  # updates free by default


def test_credits_slow_the_sender_down():
    s = build_schedule("gpipe", num_stages=2, microbatches=4, steps=1)
    free = simulate(s, forward_cost=1, backward_cost=1, send_cost=3.0)
    tight = simulate(s, forward_cost=1, backward_cost=1, send_cost=3.0, credits=1)
    assert tight.makespan > free.makespan
    sends = [e.start for e in tight.timeline[0] if e.action.kind is Kind.SEND_ACT]
    recvs = [e.start for e in tight.timeline[1] if e.action.kind is Kind.RECV_ACT]
    for j in range(1, len(sends)):
        assert sends[j] >= recvs[j - 1]  # at most one unacknowledged activation on the edge


def test_split_positions_follow_the_policy():
    s = build_schedule("1f1b", num_stages=3, microbatches=4, steps=2)
    last_of_step = {i for i, a in enumerate(s.actions[1])
                    if a.kind is Kind.BACKWARD and a.k % 4 == 3}
    every = {i for i, a in enumerate(s.actions[1]) if a.kind is Kind.BACKWARD}
    assert s.split_positions(1, "auto") == last_of_step and len(last_of_step) == 2
    assert s.split_positions(1, "always") == every and s.split_positions(1, "never") == frozenset()
    assert s.split_positions(0, "always") == frozenset()  # the first stage sends no gradient
    pipedream = build_schedule("pipedream", num_stages=3, microbatches=4, steps=2)
    assert pipedream.split_positions(2, "auto") == frozenset()  # no flush: nothing to gain
    with pytest.raises(ValueError, match="split_backward policy must be one of"):
        s.split_positions(1, "sometimes")


def test_a_split_backward_sends_before_its_weight_gradients():
    s = build_schedule("1f1b", num_stages=2, microbatches=4, steps=2)
    fused = simulate(s, forward_cost=1, backward_cost=2)
    auto = simulate(s, forward_cost=1, backward_cost=2, weight_cost=1, split_backward="auto")
    # The same work, less waiting: stage 0 gets the step's last gradient a W earlier.
    assert auto.busy == pytest.approx(fused.busy)
    assert auto.makespan == pytest.approx(28.0) and fused.makespan == pytest.approx(30.0)
    assert [(e.action.k, e.end - e.start) for e in auto.weights[1]] == [(3, 1.0), (7, 1.0)]
    assert auto.weights[0] == () and fused.weights == ((), ())
    for w in auto.weights[1]:  # right after its SEND_B, before the stage's next action
        send = next(e for e in auto.timeline[1] if e.action.kind is Kind.SEND_GRAD and e.action.k == w.action.k)
        after = auto.timeline[1][auto.timeline[1].index(send) + 1]
        assert send.end == w.start and after.start >= w.end
        backward = next(e for e in auto.timeline[1] if e.action == w.action)
        assert backward.end - backward.start == pytest.approx(1.0)  # the input-gradient half
    assert "W3" in render_grid(s, auto) and "W" not in render_grid(s, fused)
    every = simulate(s, forward_cost=1, backward_cost=2, weight_cost=1, split_backward="always")
    assert len(every.weights[1]) == 8


# --- broken schedules --------------------------------------------------------------------------

def _with_stage(schedule, stage, actions, **changes):
    acts = list(schedule.actions)
    acts[stage] = tuple(actions)
    return dataclasses.replace(schedule, actions=tuple(acts), **changes)


def test_swapped_forward_and_backward_is_rejected():
    s = build_schedule("gpipe", num_stages=1, microbatches=2, steps=1)
    acts = list(s.actions[0])  # F0 F1 B0 B1 U1
    acts[0], acts[2] = acts[2], acts[0]
    with pytest.raises(ScheduleError, match=r"stage 0: 0B0@v0 \(position 0\) runs before its forward 0F0"):
        simulate(_with_stage(s, 0, acts))


def test_dropped_send_is_rejected():
    s = build_schedule("1f1b", num_stages=3, microbatches=3, steps=1)
    acts = [a for a in s.actions[1] if not (a.kind is Kind.SEND_ACT and a.k == 2)]
    with pytest.raises(ScheduleError, match=r"stage 2: 2RECV_F2 has no matching 1SEND_F2 on stage 1"):
        simulate(_with_stage(s, 1, acts))
    acts = [a for a in s.actions[2] if not (a.kind is Kind.SEND_GRAD and a.k == 0)]
    with pytest.raises(ScheduleError, match=r"stage 1: 1RECV_B0 has no matching 2SEND_B0 on stage 2"):
        simulate(_with_stage(s, 2, acts))


def test_version_never_produced_is_rejected():
    s = build_schedule("pipedream", num_stages=2, microbatches=2, steps=1)
    acts = [dataclasses.replace(a, version=7) if a.k == 1 and a.kind in (Kind.FORWARD, Kind.BACKWARD) else a
            for a in s.actions[1]]
    with pytest.raises(ScheduleError, match=r"stage 1: 1F1@v7 \(position \d+\) reads version 7, which stage 1 "
                                            r"does not hold \(held: \[1\]\)"):
        simulate(_with_stage(s, 1, acts))


def test_backward_with_another_version_is_rejected():
    s = build_schedule("pipedream", num_stages=2, microbatches=2, steps=1)
    acts = [dataclasses.replace(a, version=1) if a.kind is Kind.BACKWARD and a.k == 1 else a for a in s.actions[0]]
    with pytest.raises(ScheduleError, match=r"0B1@v1 .* uses version 1 but 0F1 used version 0.*weight stashing"):
        simulate(_with_stage(s, 0, acts))


def test_missing_and_duplicate_microbatches_are_rejected():
    s = build_schedule("gpipe", num_stages=1, microbatches=3, steps=1)
    with pytest.raises(ScheduleError, match=r"stage 0: micro-batches 1 have no F"):
        simulate(_with_stage(s, 0, [F(0, 0, 0), F(0, 2, 0), B(0, 0, 0), B(0, 2, 0), U(0, 1)]))
    with pytest.raises(ScheduleError, match=r"runs F 0 a second time"):
        simulate(_with_stage(s, 0, [F(0, 0, 0), F(0, 0, 0)]))
    with pytest.raises(ScheduleError, match=r"outside this schedule's range \[0, 3\)"):
        simulate(_with_stage(s, 0, [F(0, 3, 0)]))


def test_wrong_update_version_is_rejected():
    s = build_schedule("gpipe", num_stages=1, microbatches=1, steps=2)
    acts = [F(0, 0, 0), B(0, 0, 0), U(0, 2), F(0, 1, 1), B(0, 1, 1), U(0, 3)]
    with pytest.raises(ScheduleError, match=r"0U2 \(position 2\) produces version 2, but the latest is 0"):
        simulate(_with_stage(s, 0, acts))


def test_activation_bound_is_enforced():
    gpipe = build_schedule("gpipe", num_stages=2, microbatches=4, steps=1)
    with pytest.raises(ScheduleError, match=r"stage 0: 0F2@v0 .* makes 3 live activations .* above 1f1b's bound of 2"):
        simulate(dataclasses.replace(gpipe, name="1f1b"))


def test_checkpoint_in_the_wrong_place_is_rejected():
    s = build_schedule("gpipe", num_stages=1, microbatches=2, steps=2, checkpoint_every=2)
    acts = list(s.actions[0])  # F0 F1 B0 B1 U1 C2 ...
    c = acts.index(Action(0, Kind.CHECKPOINT, 2))
    acts.insert(3, acts.pop(c))
    with pytest.raises(ScheduleError, match=r"0C2 \(position 3\): .* missing B of 1"):
        simulate(_with_stage(s, 0, acts))


def test_deadlock_prints_grid_and_blocked_actions():
    s = build_schedule("gpipe", num_stages=2, microbatches=2, steps=1)
    # stage 0 waits for the gradient of 0 before it sends the activation of 1: a cycle
    acts = list(s.actions[0])  # F0 S0 F1 S1 R0 B0 R1 B1 U1
    acts.insert(3, acts.pop(4))
    with pytest.raises(ScheduleError) as err:
        simulate(_with_stage(s, 0, acts))
    text = str(err.value)
    assert "schedule 'gpipe' deadlocks" in text
    assert "stage 0: blocked at 0RECV_B0@v0 (position 3), waits for 1SEND_B0, which stage 1 has not run" in text
    assert "stage 1: blocked at 1RECV_F1@v0 (position 2), waits for 0SEND_F1, which stage 0 has not run" in text
    assert "stage 0 F0 F1" in text and "stage 1    F0" in text  # the grid so far


def test_credit_deadlock_is_reported():
    s = build_schedule("gpipe", num_stages=2, microbatches=2, steps=1)
    acts = list(s.actions[1])  # R0 F0 R1 F1 B0 S0 B1 S1 U1: receive 1 before 0
    acts[0:4] = [acts[2], acts[3], acts[0], acts[1]]
    simulate(_with_stage(s, 1, acts))  # fine with unbounded credits
    with pytest.raises(ScheduleError, match=r"stage 0: blocked at 0SEND_F1@v0 .* waits for a credit: 1 sent on "
                                            r"edge 0->1 not yet received"):
        simulate(_with_stage(s, 1, acts), credits=1)


def test_bad_simulation_arguments():
    s = build_schedule("1f1b", num_stages=2, microbatches=2, steps=1)
    with pytest.raises(ScheduleError, match=r"forward_cost: expected one cost per stage \(2\), got 3"):
        simulate(s, forward_cost=[1, 1, 1])
    with pytest.raises(ScheduleError, match=r"backward_cost: stage 1's cost must be a finite number > 0"):
        simulate(s, backward_cost=[1, 0])
    with pytest.raises(ScheduleError, match=r"update_cost: stage 0's cost must be a finite number >= 0"):
        simulate(s, update_cost=[-1, 0])
    with pytest.raises(ScheduleError, match=r"send_cost: must be a number >= 0"):
        simulate(s, send_cost=-1)
    with pytest.raises(ScheduleError, match=r"credits: must be None"):
        simulate(s, credits=0)
    with pytest.raises(ScheduleError, match=r"weight_cost: stage 1's 2 is not below its backward_cost 2"):
        simulate(s, backward_cost=2, weight_cost=[0, 2])
    with pytest.raises(ScheduleError, match=r"split_backward: split_backward policy must be one of"):
        simulate(s, split_backward="yes")


# --- rendering --------------------------------------------------------------------------------

def test_grid_gpipe_p2_m2():
    s = build_schedule("gpipe", num_stages=2, microbatches=2, steps=1)
    assert render_grid(s, simulate(s, forward_cost=1, backward_cost=1)) == (
        "time    0              5\n"
        "stage 0 F0 F1       B0 B1\n"
        "stage 1    F0 F1 B0 B1")


def test_grid_uses_the_smallest_cost_as_column():
    s = build_schedule("1f1b", num_stages=2, microbatches=1, steps=1)
    grid = render_grid(s, simulate(s, forward_cost=1, backward_cost=2))
    assert grid.splitlines()[1:] == ["stage 0 F0          B0 B0", "stage 1    F0 B0 B0"]


def test_render_1f1b_p4_m8():
    text = simulate(build_schedule("1f1b", num_stages=4, microbatches=8, steps=1)).render()
    lines = text.splitlines()
    assert lines[0] == "schedule 1f1b: 4 stages, 8 micro-batches/step, 1 step (micro-batches 0..7)"
    assert "stage 3          F0 B0 B0 F1 B1 B1" in text
    assert "makespan 33   bubble 27.3% simulated, 27.3% by formula (p-1)/(m+p-1) = 3/11" in text
    assert max(len(line) for line in lines) <= 120


def test_long_grids_wrap_and_truncate():
    s = build_schedule("gpipe", num_stages=4, microbatches=64, steps=1)
    grid = render_grid(s)
    assert "truncated" not in grid and max(len(line) for line in grid.splitlines()) <= 120
    assert "B63" in grid
    long = build_schedule("pipedream", num_stages=4, microbatches=50, steps=4)
    grid = render_grid(long)
    assert "... grid truncated: showing time slots 0-255 of" in grid

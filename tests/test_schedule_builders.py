"""Schedule builders: exact action lists, version rules, checkpoints, resumption, validation."""
from __future__ import annotations

import pytest

from pipetrain.schedule.actions import Kind
from pipetrain.schedule.builders import (
    ScheduleError,
    bubble_fraction_formula,
    build_schedule,
)
from pipetrain.schedule.simulator import simulate

COMPUTE_AND_STATE = (Kind.FORWARD, Kind.BACKWARD, Kind.UPDATE, Kind.CHECKPOINT)


def listing(schedule, stage, kinds=COMPUTE_AND_STATE) -> str:
    return " ".join(repr(a) for a in schedule.actions[stage] if a.kind in kinds)


def full(schedule, stage) -> str:
    return " ".join(repr(a) for a in schedule.actions[stage])


# --- exact lists, written out by hand ---------------------------------------------------------

def test_gpipe_p2_m3_with_communication():
    s = build_schedule("gpipe", num_stages=2, microbatches=3, steps=1)
    assert full(s, 0) == ("0F0@v0 0SEND_F0@v0 0F1@v0 0SEND_F1@v0 0F2@v0 0SEND_F2@v0 "
                          "0RECV_B0@v0 0B0@v0 0RECV_B1@v0 0B1@v0 0RECV_B2@v0 0B2@v0 0U1")
    assert full(s, 1) == ("1RECV_F0@v0 1F0@v0 1RECV_F1@v0 1F1@v0 1RECV_F2@v0 1F2@v0 "
                          "1B0@v0 1SEND_B0@v0 1B1@v0 1SEND_B1@v0 1B2@v0 1SEND_B2@v0 1U1")
    assert s.initial_versions == ((0,), (0,))


def test_gpipe_two_steps_with_checkpoints():
    s = build_schedule("gpipe", num_stages=2, microbatches=3, steps=2, checkpoint_every=3)
    assert listing(s, 0) == ("0F0@v0 0F1@v0 0F2@v0 0B0@v0 0B1@v0 0B2@v0 0U1 0C3 "
                             "0F3@v1 0F4@v1 0F5@v1 0B3@v1 0B4@v1 0B5@v1 0U2 0C6")
    assert s.checkpoint_cuts() == (3, 6)


def test_1f1b_p2_m3():
    s = build_schedule("1f1b", num_stages=2, microbatches=3, steps=1)
    assert listing(s, 0) == "0F0@v0 0F1@v0 0B0@v0 0F2@v0 0B1@v0 0B2@v0 0U1"
    assert listing(s, 1) == "1F0@v0 1B0@v0 1F1@v0 1B1@v0 1F2@v0 1B2@v0 1U1"
    assert full(s, 0).startswith("0F0@v0 0SEND_F0@v0 0F1@v0 0SEND_F1@v0 0RECV_B0@v0 0B0@v0 0F2@v0")


def test_1f1b_p3_m4_warmup_steady_cooldown():
    s = build_schedule("1f1b", num_stages=3, microbatches=4, steps=1)
    assert listing(s, 0) == "0F0@v0 0F1@v0 0F2@v0 0B0@v0 0F3@v0 0B1@v0 0B2@v0 0B3@v0 0U1"
    assert listing(s, 1) == "1F0@v0 1F1@v0 1B0@v0 1F2@v0 1B1@v0 1F3@v0 1B2@v0 1B3@v0 1U1"
    assert listing(s, 2) == "2F0@v0 2B0@v0 2F1@v0 2B1@v0 2F2@v0 2B2@v0 2F3@v0 2B3@v0 2U1"


def test_1f1b_fewer_microbatches_than_stages():
    s = build_schedule("1f1b", num_stages=4, microbatches=2, steps=1)
    assert listing(s, 0) == "0F0@v0 0F1@v0 0B0@v0 0B1@v0 0U1"
    assert listing(s, 3) == "3F0@v0 3B0@v0 3F1@v0 3B1@v0 3U1"


def test_pipedream_p2_m3_two_steps():
    s = build_schedule("pipedream", num_stages=2, microbatches=3, steps=2)
    assert listing(s, 0) == ("0F0@v0 0F1@v0 0B0@v0 0U1 0F2@v1 0B1@v0 0U2 0F3@v2 0B2@v1 0U3 "
                             "0F4@v3 0B3@v2 0U4 0F5@v4 0B4@v3 0U5 0B5@v4 0U6")
    assert listing(s, 1) == ("1F0@v0 1B0@v0 1U1 1F1@v1 1B1@v1 1U2 1F2@v2 1B2@v2 1U3 "
                             "1F3@v3 1B3@v3 1U4 1F4@v4 1B4@v4 1U5 1F5@v5 1B5@v5 1U6")


def test_pipedream_accumulate_2():
    s = build_schedule("pipedream", num_stages=2, microbatches=4, steps=1, accumulate=2, checkpoint_every=2)
    assert listing(s, 0) == "0F0@v0 0F1@v0 0B0@v0 0F2@v0 0B1@v0 0U1 0C2 0F3@v1 0B2@v0 0B3@v1 0U2 0C4"
    assert listing(s, 1) == "1F0@v0 1B0@v0 1F1@v0 1B1@v0 1U1 1C2 1F2@v1 1B2@v1 1F3@v1 1B3@v1 1U2 1C4"


def test_2bw_p2_m2_three_steps():
    s = build_schedule("2bw", num_stages=2, microbatches=2, steps=3)
    assert listing(s, 0) == ("0F0@v0 0F1@v0 0B0@v0 0F2@v0 0B1@v0 0U1 0F3@v0 0B2@v0 0F4@v1 0B3@v0 0U2 "
                             "0F5@v1 0B4@v1 0B5@v1 0U3")
    assert listing(s, 1) == ("1F0@v0 1B0@v0 1F1@v0 1B1@v0 1U1 1F2@v0 1B2@v0 1F3@v0 1B3@v0 1U2 "
                             "1F4@v1 1B4@v1 1F5@v1 1B5@v1 1U3")


def test_communication_lowering_placement():
    s = build_schedule("1f1b", num_stages=3, microbatches=4, steps=2)
    for st, acts in enumerate(s.actions):
        for i, a in enumerate(acts):
            if a.kind is Kind.FORWARD and st > 0:
                assert acts[i - 1].kind is Kind.RECV_ACT and acts[i - 1].k == a.k
            if a.kind is Kind.FORWARD and st < 2:
                assert acts[i + 1].kind is Kind.SEND_ACT and acts[i + 1].k == a.k
            if a.kind is Kind.BACKWARD and st < 2:
                assert acts[i - 1].kind is Kind.RECV_GRAD and acts[i - 1].k == a.k
            if a.kind is Kind.BACKWARD and st > 0:
                assert acts[i + 1].kind is Kind.SEND_GRAD and acts[i + 1].k == a.k
    assert not any(a.kind in (Kind.RECV_ACT, Kind.SEND_GRAD) for a in s.actions[0])
    assert not any(a.kind in (Kind.SEND_ACT, Kind.RECV_GRAD) for a in s.actions[2])


# --- version rules ----------------------------------------------------------------------------

@pytest.mark.parametrize("p,m,steps,a", [(1, 4, 2, 1), (3, 4, 3, 2), (4, 6, 2, 3), (5, 2, 5, 1), (4, 8, 2, 4)])
def test_pipedream_versions_follow_the_formula(p, m, steps, a):
    s = build_schedule("pipedream", num_stages=p, microbatches=m, steps=steps, accumulate=a)
    for st, acts in enumerate(s.actions):
        w = p - st
        for x in acts:
            if x.kind in (Kind.FORWARD, Kind.BACKWARD):
                assert x.version == max(0, x.k - w + 1) // a, repr(x)
        assert [x.version for x in acts if x.kind is Kind.UPDATE] == list(range(1, steps * m // a + 1))


@pytest.mark.parametrize("p,m,steps", [(1, 1, 3), (2, 2, 4), (3, 5, 3), (4, 4, 4), (5, 7, 3)])
def test_2bw_versions_delay_one_and_two_live(p, m, steps):
    s = build_schedule("2bw", num_stages=p, microbatches=m, steps=steps)
    for acts in s.actions:
        for x in acts:
            if x.kind in (Kind.FORWARD, Kind.BACKWARD):
                assert x.version == max(0, x.k // m - 1), repr(x)
        assert [x.version for x in acts if x.kind is Kind.UPDATE] == list(range(1, steps + 1))
    assert max(simulate(s).peak_stashed_versions) <= 2


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_flush_versions_are_the_step(name):
    s = build_schedule(name, num_stages=3, microbatches=2, steps=3)
    for acts in s.actions:
        assert all(x.version == x.k // 2 for x in acts if x.kind in (Kind.FORWARD, Kind.BACKWARD))
        assert [x.version for x in acts if x.kind is Kind.UPDATE] == [1, 2, 3]


# --- checkpoints and resumption ---------------------------------------------------------------

def test_checkpoint_cuts():
    s = build_schedule("1f1b", num_stages=2, microbatches=2, steps=5, checkpoint_every=4)
    assert s.checkpoint_cuts() == (4, 8, 10)  # every 4, plus the end
    r = build_schedule("1f1b", num_stages=2, microbatches=2, steps=5, checkpoint_every=4, first_microbatch=6)
    assert r.checkpoint_cuts() == (8, 10)
    assert build_schedule("1f1b", num_stages=2, microbatches=2, steps=2, checkpoint_every=100).checkpoint_cuts() == (4,)
    assert build_schedule("1f1b", num_stages=2, microbatches=2, steps=2).checkpoint_cuts() == ()


def test_checkpoint_sits_after_the_backward_and_its_update():
    for name, kw in (("gpipe", {}), ("1f1b", {}), ("2bw", {}), ("pipedream", {"accumulate": 2})):
        s = build_schedule(name, num_stages=3, microbatches=4, steps=3, checkpoint_every=4, **kw)
        for acts in s.actions:
            for i, a in enumerate(acts):
                if a.kind is Kind.CHECKPOINT:
                    before = [x for x in acts[:i] if x.kind in COMPUTE_AND_STATE]
                    assert before[-1].kind is Kind.UPDATE
                    assert before[-2].kind is Kind.BACKWARD and before[-2].k == a.k - 1


RESUMABLE = [
    ("gpipe", {"num_stages": 3, "microbatches": 2, "steps": 4}, 2),
    ("1f1b", {"num_stages": 4, "microbatches": 3, "steps": 3}, 3),
    ("2bw", {"num_stages": 3, "microbatches": 3, "steps": 4}, 3),
    ("2bw", {"num_stages": 4, "microbatches": 4, "steps": 3}, 4),
    ("pipedream", {"num_stages": 4, "microbatches": 4, "steps": 3, "accumulate": 1}, 1),
    ("pipedream", {"num_stages": 3, "microbatches": 4, "steps": 3, "accumulate": 2}, 2),
    ("pipedream", {"num_stages": 5, "microbatches": 6, "steps": 2, "accumulate": 3}, 3),
]


def _versions(schedule):
    return {(a.stage, a.kind, a.k): a.version for acts in schedule.actions for a in acts
            if a.kind in (Kind.FORWARD, Kind.BACKWARD)}


@pytest.mark.parametrize("name,kw,unit", RESUMABLE)
def test_resumed_schedule_continues_the_full_run(name, kw, unit):
    total = kw["steps"] * kw["microbatches"]
    whole = build_schedule(name, checkpoint_every=unit, **kw)
    whole_versions = _versions(whole)
    at_cuts = simulate(whole).versions_at_checkpoints
    for cut in range(unit, total + 1, unit):
        resumed = build_schedule(name, first_microbatch=cut, checkpoint_every=unit, **kw)
        simulate(resumed)
        # every F/B carries the version it has in the full run
        for key, v in _versions(resumed).items():
            assert whole_versions[key] == v, (cut, key)
        for st in range(kw["num_stages"]):
            acts = whole.actions[st]
            c = next(i for i, a in enumerate(acts) if a.kind is Kind.CHECKPOINT and a.k == cut)
            before, after = acts[: c + 1], resumed.actions[st]
            # each B applied once, each update produced once, across the cut
            b_before = [a.k for a in before if a.kind is Kind.BACKWARD]
            b_after = [a.k for a in after if a.kind is Kind.BACKWARD]
            assert sorted(b_before + b_after) == list(range(total))
            u_before = [a.version for a in before if a.kind is Kind.UPDATE]
            u_after = [a.version for a in after if a.kind is Kind.UPDATE]
            assert u_before + u_after == [a.version for a in acts if a.kind is Kind.UPDATE]
            # forwards in flight at the cut are re-run, not lost: every F >= cut is in the resumed run
            assert sorted(a.k for a in after if a.kind is Kind.FORWARD) == list(range(cut, total))
            # the checkpoint holds exactly the versions the resumed run starts with
            assert at_cuts[st][cut] == resumed.initial_versions[st], (cut, st)


def test_resumed_pipedream_restarts_warmup_with_old_versions():
    s = build_schedule("pipedream", num_stages=3, microbatches=4, steps=2, accumulate=2, first_microbatch=2)
    assert listing(s, 0) == ("0F2@v0 0F3@v0 0F4@v1 0B2@v0 0F5@v1 0B3@v0 0U2 0F6@v2 0B4@v1 0F7@v2 0B5@v1 0U3 "
                             "0B6@v2 0B7@v2 0U4")
    assert s.initial_versions == ((0, 1), (0, 1), (1,))


def test_resumed_2bw_at_last_step_keeps_the_latest_version():
    # mini-batch 2 reads version 1, but U 3 starts from version 2: both must be restored
    s = build_schedule("2bw", num_stages=2, microbatches=2, steps=3, first_microbatch=4)
    assert s.initial_versions == ((1, 2), (1, 2))
    assert build_schedule("2bw", num_stages=2, microbatches=2, steps=3, first_microbatch=6).actions == ((), ())


def test_first_microbatch_zero_starts_from_version_zero():
    for name in ("gpipe", "1f1b", "pipedream", "2bw"):
        s = build_schedule(name, num_stages=3, microbatches=3, steps=2)
        assert s.initial_versions == ((0,), (0,), (0,))


# --- validation -------------------------------------------------------------------------------

@pytest.mark.parametrize("name,kw,match", [
    ("zb", {}, r"name: unknown schedule 'zb'; known: gpipe, 1f1b, pipedream, 2bw"),
    ("1f1b", {"num_stages": 0}, r"num_stages: must be an integer >= 1, got 0"),
    ("1f1b", {"microbatches": 0}, r"microbatches: must be an integer >= 1"),
    ("1f1b", {"steps": -1}, r"steps: must be an integer >= 1"),
    ("pipedream", {"accumulate": 0}, r"accumulate: must be an integer >= 1"),
    ("gpipe", {"accumulate": 2}, r"accumulate: only pipedream accumulates"),
    ("2bw", {"accumulate": 2}, r"accumulate: only pipedream accumulates"),
    ("pipedream", {"microbatches": 4, "accumulate": 3}, r"accumulate: must divide microbatches"),
    ("2bw", {"num_stages": 4, "microbatches": 3}, r"microbatches: 2bw needs microbatches >= num_stages"),
    ("1f1b", {"microbatches": 4, "checkpoint_every": 6},
     r"checkpoint_every: must be a positive multiple of microbatches=4"),
    ("2bw", {"microbatches": 4, "checkpoint_every": 0}, r"checkpoint_every: must be a positive multiple"),
    ("pipedream", {"microbatches": 4, "accumulate": 2, "checkpoint_every": 3},
     r"checkpoint_every: must be a positive multiple of accumulate=2"),
    ("1f1b", {"microbatches": 4, "steps": 2, "first_microbatch": 9}, r"first_microbatch: must be in \[0, 8\]"),
    ("1f1b", {"microbatches": 4, "steps": 2, "first_microbatch": -4}, r"first_microbatch: must be in"),
    ("gpipe", {"microbatches": 4, "steps": 2, "first_microbatch": 2}, r"first_microbatch: 2 is not a checkpoint cut"),
    ("pipedream", {"microbatches": 4, "steps": 2, "accumulate": 2, "first_microbatch": 3}, r"multiple of accumulate=2"),
])
def test_invalid_requests_name_the_field(name, kw, match):
    args = {"num_stages": 2, "microbatches": 4, "steps": 2} | kw
    with pytest.raises(ScheduleError, match=match):
        build_schedule(name, **args)


def test_valid_edge_requests():
    build_schedule("pipedream", num_stages=4, microbatches=1, steps=3)  # async needs no full mini-batch
    build_schedule("pipedream", num_stages=2, microbatches=4, steps=2, accumulate=2, first_microbatch=2)
    build_schedule("2bw", num_stages=3, microbatches=3, steps=2, first_microbatch=6, checkpoint_every=3)


def test_bubble_formula():
    assert bubble_fraction_formula("1f1b", 4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction_formula("gpipe", 1, 5) == 0.0
    assert bubble_fraction_formula("gpipe", 2, 1) == pytest.approx(0.5)
    with pytest.raises(ScheduleError, match="pipedream"):
        bubble_fraction_formula("pipedream", 4, 8)

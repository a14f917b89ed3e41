"""Schedule.delays: every micro-batch's delay, read off the schedule's own actions,
matches the definitions, and a schedule resumed at a cut keeps the full run's."""
import pytest

from pipetrain.schedule.builders import build_schedule

P, M, STEPS = 4, 8, 3


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_flush_schedules_have_no_delay(name):
    s = build_schedule(name, num_stages=P, microbatches=M, steps=STEPS)
    assert all(d == 0 for stage in range(P) for d in s.delays(stage).values())


def test_pipedream_delay_is_the_number_of_updates_in_flight():
    s = build_schedule("pipedream", num_stages=P, microbatches=M, steps=STEPS)
    for stage in range(P):
        w = P - stage  # micro-batches in flight on this stage
        # Warm-up: micro-batch k has seen k updates made while it was in flight; then w - 1.
        assert s.delays(stage) == {k: min(k, w - 1) for k in range(M * STEPS)}


def test_pipedream_with_accumulation_delays_only_what_crosses_an_update():
    a = 4
    s = build_schedule("pipedream", num_stages=P, microbatches=M, steps=STEPS, accumulate=a)
    for stage in range(P):
        w = P - stage
        read = {k: max(0, k - w + 1) // a for k in range(M * STEPS)}
        assert s.delays(stage) == {k: k // a - read[k] for k in read}
    assert [s.delays(0)[k] for k in range(4, 8)] == [1, 1, 1, 0]  # read before update 1, applied after it


def test_2bw_delay_is_one_after_the_first_minibatch():
    s = build_schedule("2bw", num_stages=P, microbatches=M, steps=STEPS)
    for stage in range(P):
        assert s.delays(stage) == {k: 0 if k < M else 1 for k in range(M * STEPS)}


@pytest.mark.parametrize("name,accumulate", [("pipedream", 1), ("pipedream", 2), ("2bw", 1)])
def test_a_resumed_schedule_keeps_the_full_runs_delays(name, accumulate):
    cut = M
    full = build_schedule(name, num_stages=P, microbatches=M, steps=STEPS, accumulate=accumulate, checkpoint_every=M)
    resumed = build_schedule(name, num_stages=P, microbatches=M, steps=STEPS, accumulate=accumulate,
                             checkpoint_every=M, first_microbatch=cut)
    for stage in range(P):
        assert resumed.delays(stage) == {k: d for k, d in full.delays(stage).items() if k >= cut}

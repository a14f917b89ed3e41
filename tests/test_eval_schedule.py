"""Evaluation during training as a schedule pass (pipetrain/schedule/evaluation.py), without a cluster.

- The pass adds eval blocks at the evaluation points and changes nothing else;
  each block reads the version the module's docstring names; the simulator
  accepts the result (and refuses broken eval actions).
- The reference executor's eval losses equal oracles written independently:
  for gpipe / 1f1b the unpartitioned model trained step by step with SGD, for
  pipedream / 2bw the published update rules (tests/oracles.py), each
  evaluated on the held-out micro-batches with the versions the schedule says.
- A schedule resumed at a cut reports the same eval losses bit for bit.
- The job core logs each step's eval once, carries the evals into the
  checkpoint manifest, and restores them on a resume.
- Config and fit refuse what cannot work, naming the field.
"""
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import mlp
from models.layers import apply_sequence
from oracles import async_rule_weights, full_gradient, initial_params
from pipetrain.config import ConfigError, from_dict
from pipetrain.jobspec import JobSpec
from pipetrain.observe.progress import Progress
from pipetrain.observe.records import EvalRecord, read_records
from pipetrain.optim import Optimizer
from pipetrain.partitioning import partition
from pipetrain.runtime.core import JobCore
from pipetrain.runtime.core_events import (CheckpointView, Commit, EvalReport, JobSettings, Placed, ShardWritten,
                                           ShowEval, Started, WriteRecord)
from pipetrain.runtime.reference import build_stages, run_reference
from pipetrain.schedule.actions import EVALUATION, Action, Kind
from pipetrain.schedule.builders import build_schedule
from pipetrain.schedule.evaluation import EvalSpec
from pipetrain.schedule.schedule import ScheduleError
from pipetrain.schedule.simulator import simulate

LAYERS = mlp.layers(sizes=(12, 10, 8))  # 7 layers
SOURCE = mlp.source(512, microbatch_size=8, seed=3)
HELDOUT = mlp.source(128, microbatch_size=8, seed=11)
BOUNDARIES = (2, 5)
RANGES = [(0, 2), (2, 5), (5, 7)]
LR = 0.1


def _stages(optimizer=Optimizer("sgd", lr=LR)):
    from pipetrain.stages.jax_stage import JaxSequential

    part = partition(JaxSequential(LAYERS, loss=mlp.loss_fn, seed=0), 3, boundaries=list(BOUNDARIES),
                     example_input=SOURCE.inputs(0))
    return build_stages(part, optimizer)


def _heldout_loss(flat_params, n):
    return float(np.mean([float(mlp.loss_fn(apply_sequence(LAYERS, flat_params, jnp.asarray(HELDOUT.inputs(j))),
                                            jnp.asarray(HELDOUT.targets(j)))) for j in range(n)]))


def _without_eval(schedule):
    return tuple(tuple(a for a in acts if a.kind not in EVALUATION) for acts in schedule.actions)


# --- the pass ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,accumulate", [("gpipe", 1), ("1f1b", 1), ("pipedream", 1), ("pipedream", 2),
                                             ("2bw", 1)])
@pytest.mark.parametrize("first", [0, 4, 8])
def test_the_pass_adds_eval_blocks_reading_the_documented_version(name, accumulate, first):
    m, steps, p, n = 4, 4, 3, 3
    schedule = build_schedule(name, num_stages=p, microbatches=m, steps=steps, accumulate=accumulate,
                              checkpoint_every=4, first_microbatch=first)
    spec = EvalSpec(n, every=3)
    evaluated = spec.apply(schedule)
    assert _without_eval(evaluated) == schedule.actions  # training untouched
    want_steps = [t for t in (0, 3, 4) if t * m >= first]
    for s, acts in enumerate(evaluated.actions):
        evals = [a for a in acts if a.kind is Kind.EVAL_F]
        assert [spec.decode(a.k) for a in evals] == [(t, j) for t in want_steps for j in range(n)]
        for a in evals:
            t = spec.decode(a.k)[0]
            assert a.version == (t * m // accumulate if name == "pipedream" else t), (s, a)
        kinds = {a.kind for a in acts if a.kind in EVALUATION}
        assert (Kind.RECV_EVAL in kinds) == (s > 0) and (Kind.SEND_EVAL in kinds) == (s < p - 1)
    for credits in (None, 2, p + 1):
        simulate(evaluated, credits=credits)  # checks the eval actions and runs them without deadlock


def test_eval_blocks_sit_after_the_step_update_before_its_checkpoint():
    schedule = EvalSpec(1, every=1).apply(build_schedule("1f1b", num_stages=2, microbatches=2, steps=2,
                                                         checkpoint_every=2))
    assert [repr(a) for a in schedule.actions[1][:9]] == [
        "1RECV_E0@v0", "1E0@v0", "1RECV_F0@v0", "1F0@v0", "1B0@v0", "1SEND_B0@v0", "1RECV_F1@v0", "1F1@v0",
        "1B1@v0"]
    assert [repr(a) for a in schedule.actions[1][9:14]] == ["1SEND_B1@v0", "1U1", "1RECV_E1@v1", "1E1@v1", "1C2"]


def test_one_credit_deadlocks_an_async_eval_and_the_spec_refuses_it():
    schedule = EvalSpec(3, every=1).apply(build_schedule("pipedream", num_stages=3, microbatches=4, steps=2))
    with pytest.raises(ScheduleError, match="deadlocks"):
        simulate(schedule, credits=1)
    spec = JobSpec.from_settings(schedule="pipedream", credits=1, eval_every=1)
    with pytest.raises(ValueError, match="credits: pipedream with evaluation needs credits >= 2"):
        spec.evaluation(HELDOUT)
    assert JobSpec.from_settings(schedule="1f1b", credits=1).evaluation(HELDOUT) == EvalSpec(8, every=0)


def test_the_simulator_refuses_broken_eval_actions():
    good = EvalSpec(2).apply(build_schedule("gpipe", num_stages=2, microbatches=2, steps=1))
    acts = list(good.actions[1])
    no_recv = [a for a in acts if not (a.kind is Kind.RECV_EVAL and a.k == 1)]
    with pytest.raises(ScheduleError, match=r"1E1@v0 \(position \d+\) has no input: no 1RECV_E1"):
        simulate(type(good)(**{**good.__dict__, "actions": (good.actions[0], tuple(no_recv))}))
    stale = [Action(1, Kind.EVAL_F, a.k, 0) if a.kind is Kind.EVAL_F and a.k == 2 else a for a in acts]
    with pytest.raises(ScheduleError, match="evaluates with version 0, but an evaluation uses the stage's latest"):
        simulate(type(good)(**{**good.__dict__, "actions": (good.actions[0], tuple(stale))}))


def test_eval_spec_refuses_bad_values_naming_them():
    with pytest.raises(ScheduleError, match="eval_every: must be an integer >= 0"):
        EvalSpec(2, every=-1)
    with pytest.raises(ScheduleError, match="eval_microbatches: must be an integer >= 1"):
        EvalSpec(0)
    assert EvalSpec(2, every=3).steps(7) == (0, 3, 6, 7) and EvalSpec(2).steps(5) == (0, 5)


# --- numbers against oracles ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_sync_eval_equals_the_unpartitioned_model_after_each_step(name):
    m, steps, n = 4, 3, 3
    result = run_reference(build_schedule(name, num_stages=3, microbatches=m, steps=steps), stages=_stages(),
                           source=SOURCE, heldout=HELDOUT, evaluation=EvalSpec(n, every=1))
    params = initial_params(LAYERS, SOURCE.inputs(0))
    want = {0: _heldout_loss(params, n)}
    for t in range(steps):
        batches = [(SOURCE.inputs(k), SOURCE.targets(k)) for k in range(t * m, (t + 1) * m)]
        grads = full_gradient(LAYERS, mlp.loss_fn, params, batches)
        params = jax.tree_util.tree_map(lambda w, g: w - LR * g, params, grads)
        want[t + 1] = _heldout_loss(params, n)
    assert sorted(result.evals) == [0, 1, 2, 3]
    for t in want:
        assert result.evals[t] == pytest.approx(want[t], rel=1e-5), f"step {t}"
    assert result.evals[3] < result.evals[0]


@pytest.mark.parametrize("name,accumulate", [("pipedream", 1), ("pipedream", 2), ("2bw", 1)])
def test_async_eval_equals_the_published_rule_at_the_documented_version(name, accumulate):
    m, steps, n = 4, 3, 2
    result = run_reference(build_schedule(name, num_stages=3, microbatches=m, steps=steps, accumulate=accumulate),
                           stages=_stages(), source=SOURCE, heldout=HELDOUT, evaluation=EvalSpec(n, every=1))
    versions = async_rule_weights(LAYERS, mlp.loss_fn, initial_params(LAYERS, SOURCE.inputs(0)), RANGES, SOURCE,
                                  schedule=name, microbatches=m, steps=steps, accumulate=accumulate, lr=LR)
    for t in range(steps + 1):
        v = t * m // accumulate if name == "pipedream" else t
        flat = [layer for s in range(3) for layer in versions[s][v]]
        assert result.evals[t] == pytest.approx(_heldout_loss(flat, n), rel=1e-5), f"step {t}, version {v}"


@pytest.mark.parametrize("name", ["1f1b", "pipedream", "2bw"])
def test_a_run_resumed_at_a_cut_reports_the_same_evals_bit_for_bit(name):
    m, steps, cut = 4, 4, 8
    spec = EvalSpec(2, every=1)
    full_stages = _stages(Optimizer("adam", lr=1e-2))
    full = run_reference(build_schedule(name, num_stages=3, microbatches=m, steps=steps, checkpoint_every=4),
                         stages=full_stages, source=SOURCE, heldout=HELDOUT, evaluation=spec, keep_checkpoints=True)
    resumed_stages = _stages(Optimizer("adam", lr=1e-2))
    for stage, state in zip(resumed_stages, (full.checkpoints[cut][s] for s in range(3))):
        stage.load_state_dict(state)
    rest = run_reference(build_schedule(name, num_stages=3, microbatches=m, steps=steps, checkpoint_every=4,
                                        first_microbatch=cut),
                         stages=resumed_stages, source=SOURCE, heldout=HELDOUT, evaluation=spec)
    assert sorted(rest.evals) == [2, 3, 4]  # the cut's own eval runs again, first
    assert {t: full.evals[t] for t in rest.evals} == rest.evals


# --- the job core ----------------------------------------------------------------------------------

def _running_core(**fields):
    core = JobCore(JobSettings(num_stages=2, microbatches=2, steps=4, microbatch_size=8, job_id="j", store="/ckpt"))
    core.handle(Started(now=1.0, **fields))
    core.handle(Placed({0: "tcp://a:1", 1: "tcp://b:1"}, now=2.0))
    return core


def test_the_core_logs_each_steps_eval_once_and_commits_the_evals_with_the_checkpoint():
    core = _running_core()
    first = core.handle(EvalReport(0, 1, step=0, loss=2.5, now=3.0))
    assert first == [WriteRecord(EvalRecord(step=0, heldout_loss=2.5)), ShowEval(0, 2.5)]
    assert core.handle(EvalReport(0, 1, step=0, loss=2.5, now=3.1)) == []  # a re-run block: logged once
    assert core.handle(EvalReport(0, 0, step=1, loss=9.0, now=3.2)) == []  # only the last stage computes a loss
    core.handle(EvalReport(0, 1, step=2, loss=2.0, now=3.3))
    core.handle(EvalReport(0, 1, step=3, loss=1.9, now=3.4))  # after the cut: not in its manifest
    core.handle(ShardWritten(0, 0, cut=4, record={}, now=4.0))
    commit = core.handle(ShardWritten(0, 1, cut=4, record={}, now=4.0))
    assert isinstance(commit[0], Commit) and commit[0].manifest["evals"] == {"0": 2.5, "2": 2.0}


def test_a_resumed_core_restores_the_evals_and_does_not_log_them_again():
    view = CheckpointView(cut=4, path="/ckpt/step-4", evals={0: 2.5, 2: 2.0})
    core = _running_core(resume=True, previous_generation=0, latest=view)
    g = core.generation
    assert core.handle(EvalReport(g, 1, step=2, loss=2.0, now=5.0)) == []
    assert core.handle(EvalReport(g, 1, step=4, loss=1.5, now=5.0))[0] == WriteRecord(
        EvalRecord(step=4, heldout_loss=1.5))
    assert core.evals == {0: 2.5, 2: 2.0, 4: 1.5}


# --- config, fit, progress ---------------------------------------------------------------------------

def _config(**data):
    return {"model": {"entry": "models.mlp:build"}, "data": {"train": "models.mlp:source", **data}}


@pytest.mark.parametrize("data,message", [
    ({"eval_every": -1, "heldout": "models.mlp:source"}, "data.eval_every: must be >= 0"),
    ({"eval_every": 2}, "data.eval_every: evaluates on held-out data: give data.heldout"),
    ({"eval_every": 2, "heldout": "models.mlp:source", "eval_microbatches": 0},
     "data.eval_every: needs data.eval_microbatches >= 1"),
    ({"eval_every": "2"}, "data.eval_every: expected int"),
])
def test_config_refuses_a_bad_eval_every_naming_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(_config(**data), origin="job.toml")
    assert from_dict(_config(eval_every=2, heldout="models.mlp:source")).data.eval_every == 2


def test_fit_refuses_eval_every_without_heldout():
    from pipetrain.api import fit

    with pytest.raises(ValueError, match="eval_every=2: evaluation reads held-out data: give heldout="):
        fit(mlp.build(sizes=(8,)), SOURCE, num_stages=2, executor="reference", eval_every=2, steps=2,
            microbatches=2, progress=False)


def test_reference_fit_logs_eval_records_and_shows_them_on_the_progress_line(tmp_path):
    from pipetrain.api import fit

    part = partition(mlp.build(sizes=(12, 10)), 2, example_input=SOURCE.inputs(0))
    result = fit(part, SOURCE, heldout=HELDOUT, executor="reference", schedule="1f1b", microbatches=2, steps=4,
                 eval_every=2, eval_microbatches=2, optimizer=Optimizer("sgd", lr=LR), run_dir=str(tmp_path),
                 progress=False)
    evals = [r for r in read_records(tmp_path / "metrics.jsonl") if isinstance(r, EvalRecord)]
    assert [(r.step, r.heldout_loss) for r in evals] == sorted(result.evals.items())
    assert [r.step for r in evals] == [0, 2, 4]
    assert (result.heldout_before, result.heldout_after) == (result.evals[0], result.evals[4])
    end = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert end["type"] == "end" and end["heldout_loss"] == result.heldout_after

    out = io.StringIO()
    bar = Progress(4, stream=out, every=1)
    bar.eval(0, 2.5)
    bar.step(0, loss=2.0, samples_per_s=None, busy=[])
    bar.eval(2, 1.75)
    bar.step(2, loss=1.5, samples_per_s=None, busy=[])
    bar.eval(4, 1.25)
    lines = out.getvalue().splitlines()
    assert lines[0] == "held-out loss 2.5000 before training"
    assert lines[1].endswith("held-out 2.5000 (step 0)") and lines[2].endswith("held-out 1.7500 (step 2)")
    assert lines[3] == "held-out loss 1.2500 after step 4"

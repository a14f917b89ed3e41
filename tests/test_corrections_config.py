"""How a delay correction is asked for, and refused: Optimizer, fit, the job config,
and a stage that is not told the delay."""
import pytest

from models import mlp
from pipetrain.config import ConfigError, from_dict
from pipetrain.optim import Optimizer, with_correction
from pipetrain.stages.base import StageSpec

JOB = {"model": {"entry": "models.mlp:build"}, "data": {"train": "models.mixed:train_source"}}


def test_the_optimizer_names_the_known_corrections():
    with pytest.raises(ValueError, match="correction: 'nesterov' is not one of none, predict, dcasgd, dcasgd-a"):
        Optimizer("adam", correction="nesterov")
    with pytest.raises(ValueError, match="dc_mean_square: must be in"):
        Optimizer("adam", correction="dcasgd-a", dc_mean_square=1.0)


def test_with_correction_carries_it_and_checks_the_schedule():
    assert with_correction(Optimizer("sgd"), "predict", schedule="2bw").correction == "predict"
    assert with_correction(Optimizer("sgd", correction="dcasgd"), None, schedule="pipedream").correction == "dcasgd"
    with pytest.raises(ValueError, match="correction: 1f1b has no delayed gradients to correct"):
        with_correction(Optimizer("sgd"), "predict", schedule="1f1b")
    with pytest.raises(ValueError, match="'predict' given, but the optimizer carries 'dcasgd'"):
        with_correction(Optimizer("sgd", correction="dcasgd"), "predict", schedule="2bw")
    optax = pytest.importorskip("optax")
    with pytest.raises(ValueError, match="needs a pipetrain.Optimizer"):
        with_correction(optax.sgd(0.1), "predict", schedule="2bw")


def test_the_job_config_validates_schedule_correction():
    cfg = from_dict({**JOB, "schedule": {"name": "pipedream", "correction": "predict"}})
    assert cfg.schedule.correction == "predict"
    with pytest.raises(ConfigError, match="schedule.correction: gpipe has no delayed gradients"):
        from_dict({**JOB, "schedule": {"name": "gpipe", "correction": "dcasgd"}})
    with pytest.raises(ConfigError, match="schedule.correction: 'x' is not one of"):
        from_dict({**JOB, "schedule": {"name": "2bw", "correction": "x"}})


def test_fit_refuses_a_correction_for_a_flush_schedule_before_any_work():
    from pipetrain.api import fit

    source = mlp.source(64, microbatch_size=8)
    with pytest.raises(ValueError, match="1f1b has no delayed gradients"):
        fit(mlp.build(), source, num_stages=2, schedule="1f1b", correction="predict", executor="reference",
            progress=False)


def test_a_stage_with_a_correction_needs_the_delay():
    # A wrapper that forgets to pass it on must not silently turn the correction off.
    model = mlp.build(sizes=(8,))
    model.trace_specs(mlp.source(64, microbatch_size=8).inputs(0))
    stage = model.build_stage(StageSpec(0, 2, 0, 2), optimizer=Optimizer("sgd", correction="predict"))
    assert stage.correction == "predict"
    with pytest.raises(ValueError, match="stage 0, micro-batch 0: correction 'predict' needs each forward's delay"):
        stage.forward(0, mlp.source(64, microbatch_size=8).inputs(0), version=0)

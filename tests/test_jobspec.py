"""JobSpec: one description of a job, from the TOML or from fit's keywords alike."""
import pytest

from pipetrain.config import from_dict
from pipetrain.jobspec import DEFAULT_CHECKPOINT_EVERY, JobSpec
from pipetrain.optim import Optimizer


def _config(**sections):
    raw = {"run_dir": "/runs/x", "model": {"entry": "models.mlp:build"}, "data": {"train": "models.mlp:train_source"},
           **sections}
    return from_dict(raw, origin="job.toml")


def test_the_toml_and_fits_keywords_describe_the_same_job():
    cfg = _config(schedule={"name": "pipedream", "microbatches": 8, "steps": 4, "accumulate": 2},
                  checkpoint={"every": 16, "keep": 2}, cluster={"max_restarts": 1, "credits": 3},
                  optimizer={"name": "adam", "lr": 0.01})
    from_toml = JobSpec.from_config(cfg)
    from_keywords = JobSpec.from_settings(schedule="pipedream", microbatches=8, steps=4, accumulate=2,
                                          optimizer=Optimizer("adam", lr=0.01), checkpoint_every=16,
                                          keep_checkpoints=2, run_dir="/runs/x", max_restarts=1, credits=3)
    assert from_toml == from_keywords
    assert from_toml.checkpoint_url == "/runs/x/checkpoints"
    assert from_toml.schedule_spec(3).checkpoint_every == 16


def test_a_correction_in_the_toml_reaches_the_optimizer_the_stages_get():
    cfg = _config(schedule={"name": "pipedream", "correction": "predict"})
    assert JobSpec.from_config(cfg).optimizer.correction == "predict"


def test_a_checkpoint_directory_without_an_interval_gets_the_default_one():
    spec = JobSpec.from_settings(schedule="1f1b", microbatches=8, checkpoint_dir="/ck")
    assert spec.checkpoint.every == DEFAULT_CHECKPOINT_EVERY and spec.checkpoint_url == "/ck"
    assert JobSpec.from_settings(microbatches=8).checkpoint_url is None  # nothing asked: nothing written
    spec = JobSpec.from_settings(schedule="pipedream", microbatches=8, accumulate=3, checkpoint_dir="/ck")
    assert spec.checkpoint.every % 3 == 0 and spec.checkpoint.every >= DEFAULT_CHECKPOINT_EVERY


def test_fit_takes_a_spec_or_keywords_not_both():
    from pipetrain.api import fit

    with pytest.raises(TypeError, match="not both"):
        fit(None, None, spec=JobSpec(), steps=3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'stepz'"):
        fit(None, None, stepz=3)


def test_cluster_settings_are_checked_naming_the_field():
    from pipetrain.config import ConfigError

    with pytest.raises(ConfigError, match="cluster.stop_timeout: must be > 0"):
        _config(cluster={"stop_timeout": 0.0})
    with pytest.raises(ConfigError, match="cluster.scheduler: give cluster.scheduler or cluster.scheduler_file"):
        _config(cluster={"scheduler": "tcp://a:1", "scheduler_file": "/s.json"})

"""`pipetrain train` configs of small sleep-stage jobs (models/synthetic.py), as the
tests write them: one template, the differences as arguments."""
from __future__ import annotations

_TEMPLATE = """
run_dir = "{run_dir}"
[model]
entry = "{model}"
kwargs = {{ {model_kwargs} }}
[data]
train = "models.synthetic:SleepData"
kwargs = {{ nbytes = {nbytes} }}
eval_microbatches = 0
[partition]
stages = {stages}
method = "uniform"
[schedule]
name = "{schedule}"
microbatches = {microbatches}
steps = {steps}
{extra}"""


def sleep_job_toml(run_dir, *, model: str = "models.synthetic:SleepSequential",
                   model_kwargs: str = "num_layers = 2, forward_ms = 0, backward_ms = 0", nbytes: int = 64,
                   stages: int = 2, schedule: str = "1f1b", microbatches: int = 2, steps: int = 3,
                   extra: str = "") -> str:
    """``extra``: more TOML after the [schedule] table (its own fields, then other tables)."""
    return _TEMPLATE.format(run_dir=run_dir, model=model, model_kwargs=model_kwargs, nbytes=nbytes, stages=stages,
                            schedule=schedule, microbatches=microbatches, steps=steps, extra=extra.strip() + "\n")

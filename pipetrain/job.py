"""A training job from a TOML config: what `pipetrain train` and `resume` run.

The run directory keeps everything needed to continue: ``job.json`` (the
resolved config and job id), ``metrics.jsonl``, ``checkpoints/`` and, at the
end, ``events/`` and ``summary.json``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipetrain import config as cfgmod
from pipetrain.config import ConfigError, JobConfig, resolve


RUN_FILES = ("job.json", "metrics.jsonl", "summary.json")
RUN_DIRS = ("events",)


def train_from_config(path: str, *, scheduler: str | None = None, scheduler_file: str | None = None,
                      executor: str = "dask", overrides: dict | None = None, progress: bool = True,
                      overwrite: bool = False) -> Any:
    """Start the job ``path`` describes. A run directory holding an earlier run's
    checkpoints is refused unless ``overwrite`` (which deletes that run); an
    earlier run that left none (it failed early) is replaced without asking."""
    raw = cfgmod.read_raw(path, overrides)
    cfg = cfgmod.from_dict(raw, origin=str(path))
    run_dir = Path(cfg.run_dir)
    job_file = run_dir / "job.json"
    cuts = _checkpoint_cuts(cfg)
    if cuts and not overwrite:
        previous = json.loads(job_file.read_text()) if job_file.is_file() else {}
        raise ConfigError(f"{run_dir} holds the checkpoints of an earlier run (job {previous.get('job_id')}, "
                          f"from {previous.get('source')}): `pipetrain resume {run_dir}` continues it; "
                          f"`pipetrain train {path} --overwrite` deletes it and starts over; or set run_dir to "
                          f"another directory")
    if cuts or job_file.is_file():
        _empty_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    job_id = _new_job_id()
    job_file.write_text(json.dumps({"config": raw, "job_id": job_id, "source": str(path)}, indent=2))
    return _run(cfg, job_id=job_id, scheduler=scheduler, scheduler_file=scheduler_file, executor=executor,
                progress=progress, resume=False)


def resume_run(run_dir: str, *, scheduler: str | None = None, scheduler_file: str | None = None,
               progress: bool = True) -> Any:
    job_file = Path(run_dir) / "job.json"
    if not job_file.is_file():
        raise ConfigError(f"{job_file}: not found; is {run_dir} the run directory of a pipetrain job?")
    saved = json.loads(job_file.read_text())
    cfg = cfgmod.from_dict(saved["config"], origin=str(job_file))
    if Path(cfg.run_dir).resolve() != Path(run_dir).resolve():
        cfg = _with_run_dir(cfg, run_dir)
    if not cfg.checkpoint.enabled:
        raise ConfigError(f"{job_file}: checkpoint.every and checkpoint.seconds are 0, so this job wrote no "
                          f"checkpoints to resume from")
    return _run(cfg, job_id=saved["job_id"], scheduler=scheduler, scheduler_file=scheduler_file, executor="dask",
                progress=progress, resume=True)


def _checkpoint_cuts(cfg: JobConfig) -> list[int]:
    from pipetrain.checkpoint.store import CheckpointStore

    return CheckpointStore(cfg.checkpoint_url()).cuts()


def _empty_run_dir(cfg: JobConfig) -> None:
    """Delete what a previous run left: its files, events and checkpoints (nothing else)."""
    import shutil

    from pipetrain.checkpoint.store import CheckpointStore

    run_dir = Path(cfg.run_dir)
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for name in RUN_DIRS:
        shutil.rmtree(run_dir / name, ignore_errors=True)
    CheckpointStore(cfg.checkpoint_url()).clear()


def _with_run_dir(cfg: JobConfig, run_dir: str) -> JobConfig:
    from dataclasses import replace

    return replace(cfg, run_dir=str(run_dir))


def _new_job_id() -> str:
    import uuid

    return uuid.uuid4().hex[:10]


def _run(cfg: JobConfig, *, job_id: str, scheduler: str | None, scheduler_file: str | None, executor: str,
         progress: bool, resume: bool) -> Any:
    from pipetrain.api import fit
    from pipetrain.partition import partition

    model = resolve(cfg.model.entry, "model.entry")(**cfg.model.kwargs)
    train = resolve(cfg.data.train, "data.train")(**cfg.data.kwargs)
    heldout = None
    if cfg.data.heldout:
        heldout = resolve(cfg.data.heldout, "data.heldout")(**{**cfg.data.kwargs, **cfg.data.heldout_kwargs})
    part = partition(model, cfg.partition.stages, method=cfg.partition.method, example_input=train.inputs(0),
                     boundaries=list(cfg.partition.boundaries) or None)
    say = print if progress else (lambda *a, **k: None)
    where = scheduler or scheduler_file or "an embedded local Dask cluster"
    runner = "the reference executor (one process)" if executor == "reference" else f"Dask ({where})"
    say(f"pipetrain: training {cfg.model.entry} as a {len(part.stages)}-stage '{cfg.schedule.name}' pipeline "
        f"on {runner}")
    say(str(part))
    client = _client_arg(scheduler, scheduler_file)
    result = fit(part, train, schedule=cfg.schedule.name, microbatches=cfg.schedule.microbatches,
                 steps=cfg.schedule.steps, accumulate=cfg.schedule.accumulate, optimizer=cfg.optimizer,
                 client=client,
                 checkpoint_dir=cfg.checkpoint_url() if cfg.checkpoint.enabled else None,
                 checkpoint_every=cfg.checkpoint.every, checkpoint_seconds=cfg.checkpoint.seconds,
                 keep_checkpoints=cfg.checkpoint.keep, resume=resume,
                 run_dir=cfg.run_dir, heldout=heldout, eval_microbatches=cfg.data.eval_microbatches,
                 resource=cfg.cluster.resource, placement_timeout=cfg.cluster.placement_timeout,
                 max_restarts=cfg.cluster.max_restarts, credits=cfg.cluster.credits, executor=executor,
                 progress=progress, job_id=job_id)
    summary = summarize(result, cfg)
    (Path(cfg.run_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    say(render_summary(summary))
    return result


def _client_arg(scheduler: str | None, scheduler_file: str | None) -> Any:
    if scheduler_file:
        from distributed import Client

        return Client(scheduler_file=scheduler_file)
    return scheduler


def summarize(result: Any, cfg: JobConfig) -> dict:
    losses = [h["loss"] for h in result.history if h.get("loss") is not None]
    return {
        "schedule": cfg.schedule.name, "stages": len(result.partition.stages), "executor": result.executor,
        "steps": cfg.schedule.steps, "samples": result.samples, "wall_seconds": round(result.wall_seconds, 2),
        "samples_per_s": round(result.samples_per_s, 1),
        "train_loss_first": losses[0] if losses else None, "train_loss_last": losses[-1] if losses else None,
        "heldout_loss_before": result.heldout_before, "heldout_loss_after": result.heldout_after,
        "recoveries": len(result.recoveries), "run_dir": str(cfg.run_dir),
        "checkpoint": _latest_checkpoint(cfg),
    }


def _latest_checkpoint(cfg: JobConfig) -> dict | None:
    if not cfg.checkpoint.enabled:
        return None
    from pipetrain.checkpoint.store import CheckpointStore

    latest = CheckpointStore(cfg.checkpoint_url()).latest()
    if latest is None:
        return None
    return {"cut": latest.cut, "path": latest.path, "every": cfg.checkpoint.every, "keep": cfg.checkpoint.keep}


def render_summary(s: dict) -> str:
    def fmt(x: Any) -> str:
        return "-" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)

    rows = [
        ("pipeline", f"{s['stages']} stages, schedule {s['schedule']}, executor {s['executor']}"),
        ("trained", f"{s['steps']} steps, {s['samples']} samples in {s['wall_seconds']} s "
                    f"({s['samples_per_s']} samples/s)"),
        ("train loss", f"{fmt(s['train_loss_first'])} -> {fmt(s['train_loss_last'])}"),
        ("held-out loss", f"{fmt(s['heldout_loss_before'])} -> {fmt(s['heldout_loss_after'])}"),
        ("recoveries", str(s["recoveries"])),
        ("checkpoints", "none" if not s.get("checkpoint") else
         f"every {s['checkpoint']['every'] or '-'} micro-batches, last {s['checkpoint']['keep']} kept; latest at "
         f"micro-batch {s['checkpoint']['cut']}: {s['checkpoint']['path']}"),
        ("run directory", s["run_dir"]),
    ]
    width = max(len(k) for k, _ in rows)
    return "\nsummary\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)

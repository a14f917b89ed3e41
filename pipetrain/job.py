"""A training job from a TOML config: what `pipetrain train` and `resume` run.

The run directory (``pipetrain.rundir``: its layout, and what may be
deleted there) keeps everything needed to continue: ``job.json`` (the
resolved config and job id), ``metrics.jsonl``, ``checkpoints/`` and, at the
end, ``events/`` and ``summary.json``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipetrain import config as cfgmod
from pipetrain import rundir
from pipetrain.config import ConfigError, JobConfig, resolve
from pipetrain.jobspec import JobSpec


def train_from_config(path: str, *, scheduler: str | None = None, scheduler_file: str | None = None,
                      executor: str = "dask", overrides: dict | None = None, progress: bool = True,
                      overwrite: bool = False) -> Any:
    """Start the job ``path`` describes. A run directory holding an earlier run's
    checkpoints is refused unless ``overwrite`` (which deletes that run); an
    earlier run that left none (it failed early) is replaced without asking; one
    holding anything pipetrain did not write is always refused (``rundir``)."""
    cfg, job_id = prepare_run(path, overrides=overrides, overwrite=overwrite)
    return _run(cfg, job_id=job_id, scheduler=scheduler, scheduler_file=scheduler_file, executor=executor,
                progress=progress, resume=False)


def prepare_run(path: str, *, overrides: dict | None = None, overwrite: bool = False) -> tuple[JobConfig, str]:
    """What ``train_from_config`` does before it trains (and ``pipetrain submit`` before it hands
    the job to the cluster): read and check the config, refuse or empty the run directory,
    write job.json. Returns the config and the new job's id."""
    raw = cfgmod.read_raw(path, overrides)
    cfg = cfgmod.from_dict(raw, origin=str(path))
    rundir.check_locations(cfg)
    rundir.prepare_new_run(cfg, config_path=str(path), overwrite=overwrite)
    job_id = _new_job_id()
    rundir.write_job(cfg.run_dir, {"config": raw, "job_id": job_id, "source": str(path)})
    return cfg, job_id


def start_prepared(run_dir: str, *, client: Any = None, progress: bool = True, supervisor: Any = None) -> Any:
    """Train the job ``prepare_run`` recorded in ``run_dir`` from its beginning, on ``client``
    (a detached job's first driver, ``pipetrain.detached_driver``)."""
    return _run(recorded_config(run_dir), job_id=rundir.load_job(run_dir)["job_id"], scheduler=None,
                scheduler_file=None, executor="dask", progress=progress, resume=False, client=client,
                supervisor=supervisor)


def recorded_config(run_dir: str) -> JobConfig:
    """The config job.json records for ``run_dir``, with the run directory where it is now."""
    raw = rundir.load_job(run_dir)["config"]
    return _recorded_config(run_dir, raw, origin=str(Path(run_dir) / rundir.JOB_FILE))


def resume_run(run_dir: str, *, scheduler: str | None = None, scheduler_file: str | None = None,
               progress: bool = True, steps: int | None = None, client: Any = None, supervisor: Any = None) -> Any:
    """Continue the job of ``run_dir`` from its last committed checkpoint. A run that
    already trained all its steps is left alone (returns None) unless ``steps``
    asks for more, which is recorded in its job.json first. ``client``: a
    ``distributed.Client`` to run on instead of ``scheduler`` (a detached driver's)."""
    saved = rundir.load_job(run_dir)
    job_file = Path(run_dir) / rundir.JOB_FILE
    raw = saved["config"]
    if steps is not None:
        raw = {**raw, "schedule": {**raw.get("schedule", {}), "steps": steps}}
    cfg = _recorded_config(run_dir, raw, origin=f"{job_file}{' with --steps' if steps is not None else ''}")
    done = rundir.completed_steps(run_dir)
    if steps is not None and done is not None and done < steps:
        # Trained on from a finished run: its last checkpoint holds only its newest weight
        # version, so the pipeline starts again, empty, at that step (ScheduleSpec.restart_at).
        raw = {**raw, "schedule": {**raw["schedule"], "restart_at": done * cfg.schedule.microbatches}}
        cfg = _recorded_config(run_dir, raw, origin=f"{job_file} with --steps")
    if done is not None and done >= cfg.schedule.steps:
        print(f"pipetrain resume: {run_dir} is complete: it trained all {done} steps; nothing to do "
              f"(`pipetrain resume {run_dir} --steps N` trains it on to step N)")
        return None
    if not cfg.checkpoint.enabled:
        raise ConfigError(f"{job_file}: checkpoint.every and checkpoint.seconds are 0, so this job wrote no "
                          f"checkpoints to resume from")
    rundir.check_locations(cfg)
    _check_resumable(cfg, steps)
    if steps is not None:
        rundir.write_job(run_dir, {**saved, "config": raw})
    rundir.forget_summary(run_dir)
    return _run(cfg, job_id=saved["job_id"], scheduler=scheduler, scheduler_file=scheduler_file, executor="dask",
                progress=progress, resume=True, client=client, supervisor=supervisor)


def _check_resumable(cfg: JobConfig, steps: int | None) -> None:
    """Read what the resume will read before any work: a damaged generation record
    fails here (CheckpointCorruptError naming it), not once a cluster is up."""
    from pipetrain.checkpoint.store import CheckpointStore

    store = CheckpointStore(cfg.checkpoint_url())
    store.current_generation()
    if steps is None:
        return
    latest = store.latest()
    if latest is not None and latest.cut > steps * cfg.schedule.microbatches:
        raise ConfigError(f"--steps {steps}: the run's last checkpoint ({latest.path}) is already at micro-batch "
                          f"{latest.cut}, past step {steps}")


def _recorded_config(run_dir: str, raw: dict, *, origin: str) -> JobConfig:
    """A job.json's config, with its run directory where it is now (it may have been moved)."""
    from dataclasses import replace

    cfg = cfgmod.from_dict(raw, origin=origin)
    if Path(cfg.run_dir).resolve() != Path(run_dir).resolve():
        cfg = replace(cfg, run_dir=str(run_dir))
    return cfg


def _new_job_id() -> str:
    import uuid

    return uuid.uuid4().hex[:10]


def _run(cfg: JobConfig, *, job_id: str, scheduler: str | None, scheduler_file: str | None, executor: str,
         progress: bool, resume: bool, client: Any = None, supervisor: Any = None) -> Any:
    from pipetrain.api import fit
    from pipetrain.partitioning import partition

    model = resolve(cfg.model.entry, "model.entry")(**cfg.model.kwargs)
    if cfg.model.remat != "none":
        from pipetrain.memory import apply_remat

        apply_remat(model, cfg.model.remat)
    if cfg.model.ties is not None:  # replaces the model's own declaration (pipetrain.ties)
        model.ties = tuple(tuple(tie) for tie in cfg.model.ties)
    train = build_source(cfg.data.train, "data.train", cfg.data.kwargs)
    heldout = None
    if cfg.data.heldout:
        heldout = build_source(cfg.data.heldout, "data.heldout", {**cfg.data.kwargs, **cfg.data.heldout_kwargs})
    part = partition(model, cfg.partition.stages, method=cfg.partition.method, example_input=train.inputs(0),
                     boundaries=list(cfg.partition.boundaries) or None, precision=cfg.model.precision)
    say = print  # -q (progress=False) hides the progress line only, never what ran and how it went
    # The command line's --scheduler/--scheduler-file win over the config's [cluster] ones.
    if not (scheduler or scheduler_file):
        scheduler, scheduler_file = cfg.cluster.scheduler or None, cfg.cluster.scheduler_file or None
    where = scheduler or scheduler_file or (client.scheduler.address if client else "an embedded local Dask cluster")
    runner = "the reference executor (one process)" if executor == "reference" else f"Dask ({where})"
    copies = (f" x {cfg.partition.replicas} replicas ({len(part.stages) * cfg.partition.replicas} stage tasks)"
              if cfg.partition.replicas > 1 else "")
    say(f"pipetrain: training {cfg.model.entry} as a {len(part.stages)}-stage '{cfg.schedule.name}' pipeline"
        f"{copies} on {runner}")
    say(str(part))
    client = client or _client_arg(scheduler, scheduler_file)
    result = fit(part, train, spec=JobSpec.from_config(cfg), heldout=heldout, client=client, executor=executor,
                 resume=resume, progress=progress, job_id=job_id, supervisor=supervisor)
    summary = summarize(result, cfg)
    rundir.write_summary(cfg.run_dir, summary)
    say(render_summary(summary))
    return result


def build_source(entry: str, field: str, kwargs: dict) -> Any:
    """The micro-batch source ``entry`` builds, refused (naming ``field``) if it cannot be built
    or its micro-batches hold what no stage can take (strings, objects)."""
    from pipetrain.data import check_numeric

    try:
        source = resolve(entry, field)(**kwargs)
        check_numeric(source.inputs(0), "inputs(0)")
        check_numeric(source.targets(0), "targets(0)")
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{field}: {entry}: {e}") from e
    return source


def _client_arg(scheduler: str | None, scheduler_file: str | None) -> Any:
    if scheduler_file:
        from distributed import Client

        return Client(scheduler_file=scheduler_file)
    return scheduler


def summarize(result: Any, cfg: JobConfig) -> dict:
    """What the run did: ``steps`` is the job's whole length, ``steps_run`` how many of
    them this invocation trained (after ``resumed_from_step`` came from a checkpoint),
    and samples, seconds and samples/s are this invocation's."""
    losses = [h["loss"] for h in result.history if h.get("loss") is not None]
    return {
        "schedule": cfg.schedule.name, "stages": len(result.partition.stages), "executor": result.executor,
        "steps": cfg.schedule.steps, "steps_run": result.steps_run, "resumed_from_step": result.resumed_from_step,
        "resumed_from_microbatch": result.resumed_from,
        "samples": result.samples, "wall_seconds": round(result.wall_seconds, 2),
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

    trained = f"{s.get('steps_run', s['steps'])} steps"
    if s.get("resumed_from_microbatch"):
        trained += (f" (resumed at step {s['resumed_from_step']} of {s['steps']}, from the checkpoint at "
                    f"micro-batch {s['resumed_from_microbatch']})")
    rows = [
        ("pipeline", f"{s['stages']} stages, schedule {s['schedule']}, executor {s['executor']}"),
        ("trained", f"{trained}, {s['samples']} samples in {s['wall_seconds']} s ({s['samples_per_s']} samples/s)"),
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

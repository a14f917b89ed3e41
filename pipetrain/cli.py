"""`pipetrain train | resume | submit | status | logs | cancel | simulate | partition | trace | report | export`.

Each subcommand parses its arguments and hands over to the module that does
the work; errors the user can fix (a bad config field, an unknown schedule)
print one clear line and exit 2 instead of a traceback. Ctrl-C prints one line
saying how to continue and exits 130 (the shell's code for SIGINT). SIGTERM, how
`docker stop`, Kubernetes and SLURM's `scancel` end a driver, does the same
(the stages stopped, the resume command said) and exits 143.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from pipetrain.config import REDUCE_EXCHANGES, ConfigError, parse_overrides

INTERRUPTED = 130  # 128 + SIGINT
TERMINATED = 143  # 128 + SIGTERM


def _simulate(args: argparse.Namespace) -> int:
    from pipetrain.schedule.builders import ScheduleSpec
    from pipetrain.schedule.simulator import simulate

    schedule = ScheduleSpec(args.schedule, num_stages=args.stages, microbatches=args.microbatches,
                            steps=args.steps, accumulate=args.accumulate, replicas=args.replicas).build()
    report = simulate(schedule, forward_cost=args.forward_cost, backward_cost=args.backward_cost,
                      update_cost=args.update_cost, send_cost=args.send_cost, weight_cost=args.weight_cost,
                      split_backward=args.split_backward, reduce_cost=args.reduce_cost)
    print(report.render())
    if args.replicas > 1:
        print(_replicas_line(args.stages, args.replicas)
              + f"; each update waits {args.reduce_cost:g} for the replicas' gradient exchange (--reduce-cost). "
                f"The grid is one replica's: they all run it, each over its own micro-batches (k * "
                f"{args.replicas} + r), {args.microbatches * args.replicas} of the job's per step")
    if args.model:
        print()
        print(_memory_table(_partition_of(args), schedule, args))
    return 0


def _partition(args: argparse.Namespace) -> int:
    from pipetrain.schedule.builders import build_schedule

    part = _partition_of(args)
    print(part)
    if args.replicas > 1:
        print(_replicas_line(len(part.stages), args.replicas) + "; each stage's estimate is one worker's")
        print(_exchange_line(part, args.replicas, args.reduce_exchange))
    schedule = build_schedule(args.schedule, num_stages=args.stages, microbatches=args.microbatches, steps=2,
                              accumulate=args.accumulate)
    print()
    print(_memory_table(part, schedule, args))
    return 0


def _exchange_line(part: Any, replicas: int, exchange: str) -> str:
    """How each stage's replicas sum their gradients, and what one replica sends per update
    (float32 accumulators: 4 bytes per parameter)."""
    from pipetrain.memory import format_bytes
    from pipetrain.runtime.replicas import bytes_sent, exchange_for

    shown = []
    for st in part.stages:
        nbytes = 4 * st.params
        kind = exchange_for(replicas, exchange, nbytes)
        shown.append(f"stage {st.index} {kind}, {format_bytes(bytes_sent(kind, replicas, nbytes))}")
    return f"gradient exchange per update ({exchange}; sent by each replica): " + "; ".join(shown)


def _replicas_line(stages: int, replicas: int) -> str:
    return (f"x {replicas} replicas: {stages} stages x {replicas} = {stages * replicas} stage tasks, one worker "
            f"each (replicas of a stage sum their gradients before every update)")


def _partition_of(args: argparse.Namespace):
    from pipetrain.config import resolve
    from pipetrain.partitioning import partition

    kwargs = json.loads(args.kwargs) if args.kwargs else {}
    model = resolve(args.model, "MODEL")(**kwargs)
    example_entry = args.example or args.model.split(":")[0] + ":example_input"
    example = _call_with_accepted(resolve(example_entry, "--example"), kwargs)
    boundaries = [int(b) for b in args.boundaries.split(",")] if args.boundaries else None
    return partition(model, args.stages, method=args.method, example_input=example, boundaries=boundaries,
                     precision=args.precision)


def _memory_table(part, schedule, args: argparse.Namespace) -> str:
    from pipetrain.memory import estimate_memory, format_estimates, partition_boundary_bytes, partition_layer_bytes
    from pipetrain.optim import Optimizer

    estimates = estimate_memory(partition_layer_bytes(part), schedule, optimizer=Optimizer(args.optimizer),
                                remat=args.remat, boundary_bytes=partition_boundary_bytes(part))
    return (f"{schedule.name}, {schedule.microbatches_per_step} micro-batches per step, optimizer "
            f"{args.optimizer}:\n" + format_estimates(estimates))


def _model_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    if required:
        p.add_argument("model", help="import path of a model builder, e.g. models.gpt:build")
    else:
        p.add_argument("--model", default="", help="import path of a model builder: adds its per-stage peak "
                       "memory in bytes under this schedule")
    p.add_argument("--method", default="params", choices=("uniform", "params", "flops", "profile"))
    p.add_argument("--boundaries", default="", help="explicit interior cut points, e.g. 2,4,6")
    p.add_argument("--kwargs", default="", help="JSON keyword arguments for the builder")
    p.add_argument("--example", default="", help="import path of an example-input function "
                   "(default: example_input in the model's module)")
    p.add_argument("--optimizer", default="adam", choices=("sgd", "momentum", "adam", "adamw"),
                   help="for the memory estimate: the optimizer's state (default adam)")
    p.add_argument("--remat", default="none", choices=("none", "stage", "layer"),
                   help="for the memory estimate: activation rematerialization (default none)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="bf16: bfloat16 boundary specs and activation bytes, float32 masters (default fp32)")


def _train(args: argparse.Namespace) -> int:
    from pipetrain.job import train_from_config

    train_from_config(args.config, scheduler=args.scheduler, scheduler_file=args.scheduler_file,
                      executor=args.executor, overrides=parse_overrides(args.set or []),
                      progress=not args.quiet, overwrite=args.overwrite)
    return 0


def _resume(args: argparse.Namespace) -> int:
    from pipetrain.job import resume_run

    resume_run(args.run_dir, scheduler=args.scheduler, scheduler_file=args.scheduler_file, progress=not args.quiet,
               steps=args.steps)
    return 0


def _submit(args: argparse.Namespace) -> int:
    from pipetrain.detached import describe, resubmit, submit

    where = dict(scheduler=args.scheduler, scheduler_file=args.scheduler_file)
    if args.resume:
        if args.set or args.overwrite:
            raise ConfigError("--set and --overwrite are for a new job; --resume continues one as it was")
        submitted = resubmit(args.config, **where)
    else:
        submitted = submit(args.config, overrides=parse_overrides(args.set or []), overwrite=args.overwrite, **where)
    print(describe(submitted, _scheduler_text(args)))
    return 0


def _status(args: argparse.Namespace) -> int:
    from pipetrain.detached import find_job, job_record, task_state
    from pipetrain.job_status import status_lines

    with _optional_client(args) as client:
        run_dir, job_id = find_job(args.job, client)
        task = task_state(client, job_record(client, job_id).get("task")) if client else None
    print("\n".join(status_lines(run_dir, job_id, task=task, at=_scheduler_text(args))))
    return 0


def _logs(args: argparse.Namespace) -> int:
    from pipetrain.detached import find_job
    from pipetrain.job_status import show_logs

    with _optional_client(args) as client:  # only to find a job named by its id
        run_dir, _ = find_job(args.job, client)
    try:
        show_logs(run_dir, follow=args.follow)
    except KeyboardInterrupt:  # how -f is left before the job ends
        pass
    return 0


def _cancel(args: argparse.Namespace) -> int:
    from pipetrain.detached import cancel, find_job
    from pipetrain.job_status import resume_hint

    with _optional_client(args) as client:
        run_dir, job_id = find_job(args.job, client)
        stopped = cancel(client, run_dir, job_id, say=lambda text: print(f"pipetrain cancel: {text}"))
    if stopped:
        print(f"pipetrain cancel: resume it with {resume_hint(run_dir, _scheduler_text(args))}")
    return 0 if stopped else 1


def _optional_client(args: argparse.Namespace):
    """A client of the scheduler the arguments name (closed after the block), or None."""
    from contextlib import nullcontext

    if not (args.scheduler or args.scheduler_file):
        return nullcontext(None)
    from pipetrain.detached import connect

    return connect(args.scheduler, args.scheduler_file)


def _scheduler_text(args: argparse.Namespace) -> str:
    if getattr(args, "scheduler_file", None):
        return f"--scheduler-file {args.scheduler_file}"
    return f"--scheduler {args.scheduler or 'ADDR'}"


def _trace(args: argparse.Namespace) -> int:
    from pipetrain.observe.trace import trace_command

    return trace_command(args.run_dir)


def _report(args: argparse.Namespace) -> int:
    from pipetrain.observe.report import report_command

    return report_command(args.run_dir)


def _export(args: argparse.Namespace) -> int:
    from pipetrain.export import describe, export

    print(describe(export(args.run_dir, args.out, fmt=args.format, step=args.step,
                          with_optimizer=args.with_optimizer, overwrite=args.overwrite)))
    return 0


def _call_with_accepted(fn, kwargs: dict):
    """Call ``fn`` with those of the builder's keyword arguments it accepts
    (``example_input(context=...)`` shares some with ``build``, not all)."""
    import inspect

    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def _cluster_args(p: argparse.ArgumentParser) -> None:
    _scheduler_args(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line (the summary is still printed)")


def _scheduler_args(p: argparse.ArgumentParser, *, required: bool = False) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--scheduler", default=None, help="address of a running Dask scheduler (tcp://host:8786)")
    g.add_argument("--scheduler-file", default=None, help="Dask scheduler file")


def _detached_parsers(sub: Any) -> None:
    p = sub.add_parser("submit", help="start a job whose driver runs on the cluster: it goes on without this process")
    p.add_argument("config", help="the job config (with --resume: the run directory of a stopped job)")
    _scheduler_args(p, required=True)
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a config field, as for train")
    p.add_argument("--overwrite", action="store_true", help="delete the earlier run in the run directory, as for train")
    p.add_argument("--resume", action="store_true", help="continue the stopped job of the run directory CONFIG")
    p.set_defaults(run=_submit)

    for name, run, summary in (("status", _status, "where a job is: running, finished, cancelled, resumable"),
                               ("logs", _logs, "a job's metrics log and its driver's lines, readable"),
                               ("cancel", _cancel, "stop a detached job's driver and stages; the run stays resumable")):
        p = sub.add_parser(name, help=summary)
        p.add_argument("job", metavar="JOB_ID|RUN_DIR", help="a job id (needs the scheduler) or a run directory")
        _scheduler_args(p, required=name == "cancel")
        if name == "logs":
            p.add_argument("-f", "--follow", action="store_true", help="print what is added until the job ends")
        p.set_defaults(run=run)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pipetrain", description="Pipeline-parallel training on Dask.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run a training job from a TOML config")
    p.add_argument("config")
    _cluster_args(p)
    p.add_argument("--executor", choices=("dask", "reference"), default="dask",
                   help="'reference' runs every stage in this process (the numerics oracle)")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="override a config field, e.g. --set schedule.steps=20")
    p.add_argument("--overwrite", action="store_true",
                   help="the run directory holds an earlier run: delete it (files, events, checkpoints) and start over")
    p.set_defaults(run=_train)

    p = sub.add_parser("resume", help="continue a stopped job from its last committed checkpoint")
    p.add_argument("run_dir")
    _cluster_args(p)
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="train the job to N steps in all (recorded in its job.json); also continues a finished run")
    p.set_defaults(run=_resume)
    _detached_parsers(sub)

    p = sub.add_parser("simulate", help="print a schedule's stage x time grid, bubble and memory")
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--schedule", default="1f1b")
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--forward-cost", type=float, default=1.0)
    p.add_argument("--backward-cost", type=float, default=2.0)
    p.add_argument("--update-cost", type=float, default=0.0, help="time of one optimizer update (default 0)")
    p.add_argument("--send-cost", type=float, default=0.0, help="latency of one message between stages (default 0)")
    p.add_argument("--split-backward", default="never", choices=("never", "always", "auto"),
                   help="which backwards send their input gradient before computing the weight gradients "
                        "(as TorchSequential's split_backward; default never)")
    p.add_argument("--weight-cost", type=float, default=0.0,
                   help="the weight-gradient part of --backward-cost, run after the send when split (default 0)")
    p.add_argument("--replicas", type=int, default=1, help="copies of the pipeline (pipeline x data parallelism)")
    p.add_argument("--reduce-cost", type=float, default=0.0,
                   help="with --replicas: time of one update's gradient exchange between replicas (default 0)")
    _model_args(p, required=False)
    p.set_defaults(run=_simulate)

    p = sub.add_parser("partition", help="show how a model is cut into stages, and each stage's peak memory")
    _model_args(p, required=True)
    p.add_argument("--stages", type=int, required=True)
    p.add_argument("--schedule", default="1f1b", help="for the memory estimate (default 1f1b)")
    p.add_argument("--microbatches", type=int, default=8, help="for the memory estimate (default 8)")
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--replicas", type=int, default=1, help="copies of the pipeline (pipeline x data parallelism)")
    p.add_argument("--reduce-exchange", default="auto", choices=REDUCE_EXCHANGES,
                   help="with --replicas: how each stage's replicas sum their gradients (default auto: scatter "
                        "from 3 replicas for stages of 4 MiB of gradients or more)")
    p.set_defaults(run=_partition)

    p = sub.add_parser("trace", help="Chrome/Perfetto trace and Gantt chart of a run")
    p.add_argument("run_dir")
    p.set_defaults(run=_trace)

    p = sub.add_parser("report", help="loss and throughput plots of a run")
    p.add_argument("run_dir")
    p.set_defaults(run=_report)

    p = sub.add_parser("export", help="merge a committed checkpoint's stage shards into one artifact")
    p.add_argument("run_dir")
    p.add_argument("out", help="the file to write")
    p.add_argument("--format", required=True, choices=("safetensors", "torch", "flax", "keras"))
    p.add_argument("--step", type=int, default=None, metavar="K",
                   help="the checkpoint at step K (default: the newest that verifies)")
    p.add_argument("--with-optimizer", action="store_true", help="add the optimizer state (safetensors only)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(run=_export)
    return ap


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message says all a user needs: no traceback for them. The
    OSErrors are those of the run directory (the path is in the message)."""
    from pipetrain.checkpoint.manifest import CheckpointError
    from pipetrain.detached import DetachedJobError
    from pipetrain.errors import JobFailed
    from pipetrain.runtime.placement import PlacementError

    errors: list[type[BaseException]] = [ConfigError, ValueError, FileNotFoundError, NotADirectoryError,
                                         IsADirectoryError, PermissionError, PlacementError, CheckpointError,
                                         JobFailed, DetachedJobError]
    if "pipetrain.runtime.driver" in sys.modules:  # its own JobFailed, until it raises pipetrain.errors'
        errors.append(sys.modules["pipetrain.runtime.driver"].JobFailed)
    return tuple(errors)


def _interrupted(error: BaseException) -> bool:
    """A Ctrl-C: KeyboardInterrupt itself, or JobInterrupted once the driver has stopped the stages."""
    from pipetrain.errors import JobInterrupted

    driver = sys.modules.get("pipetrain.runtime.driver")
    kinds = (KeyboardInterrupt, JobInterrupted, getattr(driver, "JobInterrupted", JobInterrupted))
    return isinstance(error, kinds)


def _how_to_continue(args: argparse.Namespace) -> str:
    """What to run after an interrupted `train` or `resume`, from what its run directory holds."""
    from pipetrain import rundir

    if args.command not in ("train", "resume"):
        return ""
    try:
        if args.command == "resume":
            run_dir = args.run_dir
        else:
            from pipetrain.config import load

            run_dir = load(args.config, parse_overrides(args.set or [])).run_dir
    except Exception:  # the config was never valid, so no run started
        return ""
    job, _ = rundir.read_job(run_dir)
    if job is None:
        return f"; no run started in {run_dir}"
    checkpoint = job["config"].get("checkpoint", {})
    if not (checkpoint.get("every") or checkpoint.get("seconds")):
        again = f"pipetrain train {job.get('source') or 'CONFIG'} --overwrite"
        return f"; this job writes no checkpoints, so `{again}` starts it over"
    return f"; `pipetrain resume {run_dir}` continues it from its last committed checkpoint"


def _sigterm_as_interrupt() -> list[bool]:
    """Make SIGTERM a KeyboardInterrupt in this (the main) thread, so that the driver stops the
    stages as for a Ctrl-C; the flag says whether one came.
    Python's default for SIGTERM is to die on the spot: the stage tasks would run on with no
    driver, and the user would get no word of how to continue."""
    import signal

    came = [False]

    def on_sigterm(signum: int, frame: Any) -> None:
        came[0] = True
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # main() called off the main thread: signals are not ours to take
        pass
    return came


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    terminated = _sigterm_as_interrupt()
    try:
        return args.run(args)
    except BaseException as e:
        if _interrupted(e) and not os.environ.get("PIPETRAIN_DEBUG"):
            # JobInterrupted's message already says where to resume; a bare Ctrl-C (while
            # partitioning, say) is told from what the run directory holds.
            said = f"interrupted{_how_to_continue(args)}" if isinstance(e, KeyboardInterrupt) else str(e)
            by = " (SIGTERM)" if terminated[0] else ""
            print(f"pipetrain {args.command}{by}: {said}", file=sys.stderr)
            return TERMINATED if terminated[0] else INTERRUPTED
        if not isinstance(e, _user_errors()) or os.environ.get("PIPETRAIN_DEBUG"):
            raise
        print(f"pipetrain {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

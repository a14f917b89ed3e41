"""Metrics sinks besides metrics.jsonl: TensorBoard event files written by tensorboardX
and read back here from their TFRecord framing, and fit's callbacks.

Everything runs in this process (the reference executor, a numpy or tiny JAX model).
"""
import logging
import struct

import numpy as np
import pytest

import pipetrain
from pipetrain.cli import main
from job_configs import sleep_job_toml
from pipetrain.config import ConfigError, from_dict
from pipetrain.jobspec import JobSpec
from pipetrain.observe.progress import MetricsLog
from pipetrain.observe.records import (EndRecord, RecoveryRecord, StartRecord, StepRecord, read_records,
                                       records_of)
from pipetrain.observe.sinks import CallbackSink, TensorBoardSink

tensorboardX = pytest.importorskip("tensorboardX")
from tensorboardX.crc32c import crc32c  # noqa: E402
from tensorboardX.proto.event_pb2 import Event  # noqa: E402


def masked_crc32c(data: bytes) -> int:
    """The TFRecord format's checksum: CRC-32C, rotated right by 15 bits, plus a constant."""
    x = crc32c(data) & 0xFFFFFFFF
    return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(logdir) -> list[Event]:
    """Every Event of every event file in ``logdir``, checking the TFRecord framing
    (u64 length, masked crc32c of it, the Event proto, masked crc32c of that)."""
    files = sorted(logdir.glob("events.out.tfevents.*"))
    assert files, f"no event files in {logdir}"
    events = []
    for path in files:
        data, at = path.read_bytes(), 0
        while at < len(data):
            header = data[at:at + 8]
            (length,), (length_crc,) = struct.unpack("<Q", header), struct.unpack("<I", data[at + 8:at + 12])
            assert length_crc == masked_crc32c(header)
            body = data[at + 12:at + 12 + length]
            (body_crc,) = struct.unpack("<I", data[at + 12 + length:at + 16 + length])
            assert body_crc == masked_crc32c(body)
            event = Event()
            event.ParseFromString(body)
            events.append(event)
            at += 16 + length
    return events


def scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(global step, value)], in the order written."""
    out: dict[str, list[tuple[int, float]]] = {}
    for event in read_events(logdir):
        for value in event.summary.value:
            if value.HasField("simple_value"):
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def texts(logdir) -> list[str]:
    return [v.tensor.string_val[0].decode() for e in read_events(logdir) for v in e.summary.value
            if v.tensor.string_val]


def f32(x: float) -> float:
    return float(np.float32(x))  # TensorBoard scalars are float32


def some_records():
    return [
        StartRecord(schedule="1f1b", stages=2, steps=3, microbatches=2, heldout_loss=2.5, executor="reference"),
        StepRecord(step=0, loss=2.25, samples_per_s=100.5, busy=[0.75, 0.5]),
        StepRecord(step=1, loss=2.125, samples_per_s=120.0, busy=[0.8, 0.6], stage0_done=1.7e9),
        RecoveryRecord(generation=1, stage=1, worker="tcp://w1", stages=[1], workers=["tcp://w1"],
                       reason="worker-died", worker_died=True, rollback_to=2, checkpoint=None,
                       skipped_checkpoints=[], detected_at=1.7e9, stop_seconds=0.1),
        StepRecord(step=2, loss=2.0, samples_per_s=None, busy=[0.9, 0.7]),
        EndRecord(heldout_loss=1.875, wall_seconds=3.0, samples_per_s=110.0, samples=48, steps=3, steps_run=3),
    ]


# -- the TensorBoard sink ---------------------------------------------------------

def test_tensorboard_event_files_hold_the_metrics_logs_values(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", sinks=[TensorBoardSink(tmp_path / "tb")])
    for record in some_records():
        log.write(record)
    log.close()
    written = read_records(tmp_path / "metrics.jsonl")
    steps = records_of(written, StepRecord)
    got = scalars(tmp_path / "tb")
    assert got["loss"] == [(r.step, f32(r.loss)) for r in steps]
    assert got["samples_per_s"] == [(r.step, f32(r.samples_per_s)) for r in steps if r.samples_per_s is not None]
    for stage in (0, 1):
        assert got[f"busy/stage{stage}"] == [(r.step, f32(r.busy[stage])) for r in steps]
    start, end = records_of(written, StartRecord)[0], records_of(written, EndRecord)[0]
    assert got["heldout_loss"] == [(0, f32(start.heldout_loss)), (3, f32(end.heldout_loss))]
    assert got["recoveries"] == [(1, 1.0)]  # one so far, after step 1
    assert "stage0_done" not in got and "step" not in got  # instants and the step number are not metrics
    assert any("worker-died" in t and "micro-batch 2" in t for t in texts(tmp_path / "tb"))
    # the wall time of each event is the record's own, as metrics.jsonl holds it
    loss_events = [e for e in read_events(tmp_path / "tb") if any(v.tag == "loss" for v in e.summary.value)]
    assert [e.wall_time for e in loss_events] == pytest.approx([r.time for r in steps])


def test_any_numeric_field_a_step_record_carries_is_logged(tmp_path):
    from dataclasses import dataclass
    from typing import ClassVar

    @dataclass(frozen=True, kw_only=True)
    class RicherStep(StepRecord):  # as a later version may write: LR and grad norm per step
        TYPE: ClassVar[str] = "step"
        lr: float | None = None
        grad_norm: float | None = None
        stage_lr: list[float] | None = None

    sink = TensorBoardSink(tmp_path)
    sink.write(RicherStep(step=4, loss=1.0, samples_per_s=None, busy=[], lr=3e-4, grad_norm=0.5,
                          stage_lr=[1e-3, 2e-3]))
    sink.close()
    got = scalars(tmp_path)
    assert got["lr"] == [(4, f32(3e-4))] and got["grad_norm"] == [(4, 0.5)]
    assert got["stage_lr/stage0"] == [(4, f32(1e-3))] and got["stage_lr/stage1"] == [(4, f32(2e-3))]


# -- callbacks --------------------------------------------------------------------

def test_a_callback_sees_every_record_in_order_stamped_as_the_file_has_it(tmp_path):
    seen = []
    log = MetricsLog(tmp_path / "metrics.jsonl", sinks=[CallbackSink(seen.append)])
    for record in some_records():
        log.write(record)
    assert seen == read_records(tmp_path / "metrics.jsonl")
    assert all(r.time is not None for r in seen)


def test_a_raising_callback_warns_once_and_the_others_go_on(tmp_path, caplog):
    def broken(record):
        raise RuntimeError("the tracking server is down")

    seen, calls = [], []
    log = MetricsLog(tmp_path / "metrics.jsonl",
                     sinks=[CallbackSink(lambda r: (calls.append(r), broken(r))), CallbackSink(broken),
                            CallbackSink(seen.append)])
    with caplog.at_level(logging.WARNING, logger="pipetrain.observe"):
        for record in some_records():
            log.write(record)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # once per callback, not per record
    assert "callback test_a_raising_callback_warns_once_and_the_others_go_on.<locals>.broken raised" in warnings[1]
    assert "'start' record" in warnings[1] and "tracking server" in warnings[1]
    assert len(calls) == len(seen) == len(some_records())  # still called; the next sink still served
    assert len(read_records(tmp_path / "metrics.jsonl")) == len(some_records())


# -- fit --------------------------------------------------------------------------

def jax_data():
    rng = np.random.default_rng(0)
    return pipetrain.ArraySource(rng.normal(size=(64, 16)).astype(np.float32),
                                 rng.integers(0, 4, 64).astype(np.int32), microbatch_size=8)


def jax_layers():
    from models.layers import activation, dense

    return [dense(32, name="d0"), activation("tanh", name="t0"), dense(4, name="d1")]


def test_fit_with_tensorboard_and_callbacks_writes_both_and_a_raising_callback_does_not_stop_it(tmp_path, caplog):
    from models.layers import cross_entropy

    seen = []

    def broken(record):
        raise ValueError("nope")

    with caplog.at_level(logging.WARNING, logger="pipetrain.observe"):
        result = pipetrain.fit(jax_layers(), jax_data(), heldout=jax_data(), eval_microbatches=2, num_stages=2,
                               loss=cross_entropy, steps=3, microbatches=2, schedule="gpipe",
                               executor="reference", progress=False, run_dir=str(tmp_path), tensorboard=True,
                               callbacks=[seen.append, broken])
    written = read_records(tmp_path / "metrics.jsonl")
    # The held-out losses before and after come from the stages' eval blocks (eval records).
    assert seen == written and [r.TYPE for r in seen] == ["start", "eval", "step", "step", "step", "eval", "end"]
    history = [h["loss"] for h in result.history]
    assert [r.loss for r in records_of(written, StepRecord)] == history
    got = scalars(tmp_path / "tensorboard")
    assert got["loss"] == [(t, f32(loss)) for t, loss in enumerate(history)]
    assert got["heldout_loss"] == [(0, f32(result.heldout_before)), (3, f32(result.heldout_after))]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "broken" in warnings[0] and "'start' record" in warnings[0]


def test_fit_tensorboard_needs_a_run_dir_and_callbacks_a_list():
    with pytest.raises(ValueError, match="tensorboard=True .* give run_dir"):
        pipetrain.fit(jax_layers(), jax_data(), num_stages=2, steps=1, microbatches=2, executor="reference",
                      progress=False, tensorboard=True, loss=_loss())
    with pytest.raises(TypeError, match=r"callbacks=\[fn\]"):
        pipetrain.fit(jax_layers(), jax_data(), num_stages=2, steps=1, microbatches=2, executor="reference",
                      progress=False, callbacks=print, loss=_loss())


def _loss():
    from models.layers import cross_entropy

    return cross_entropy


# -- the config and the run directory ---------------------------------------------

BASE = {"model": {"entry": "m:f"}, "data": {"train": "d:f"}}


def test_observe_tensorboard_is_read_from_the_config_and_reaches_the_jobspec():
    cfg = from_dict({**BASE, "observe": {"tensorboard": True}})
    assert cfg.observe.tensorboard is True
    assert JobSpec.from_config(cfg).observe == JobSpec.from_settings(tensorboard=True).observe
    assert JobSpec.from_config(from_dict(BASE)).observe.tensorboard is False


def test_a_tensorboard_value_that_is_not_a_boolean_names_the_field():
    with pytest.raises(ConfigError, match=r"observe\.tensorboard: expected bool, got str 'yes'"):
        from_dict({**BASE, "observe": {"tensorboard": "yes"}})
    with pytest.raises(ConfigError, match=r"observe\.tensorbord: unknown field"):
        from_dict({**BASE, "observe": {"tensorbord": True}})




def test_train_writes_tensorboard_files_that_overwrite_replaces_and_a_foreign_file_among_them_stops(tmp_path,
                                                                                                   capsys):
    run_dir = tmp_path / "run"
    config = tmp_path / "job.toml"
    config.write_text(sleep_job_toml(run_dir, extra="[observe]\ntensorboard = true"))

    def train(*extra):
        return main(["train", str(config), "--executor", "reference", "-q", *extra])

    assert train() == 0
    losses = [r.loss for r in records_of(read_records(run_dir / "metrics.jsonl"), StepRecord)]
    assert [v for _, v in scalars(run_dir / "tensorboard")["loss"]] == [f32(x) for x in losses]
    first = sorted(p.name for p in (run_dir / "tensorboard").iterdir())

    (run_dir / "tensorboard" / "notes.txt").write_text("mine")
    assert train("--overwrite") == 2
    assert "tensorboard/notes.txt" in capsys.readouterr().err
    assert (run_dir / "tensorboard" / "notes.txt").exists()

    (run_dir / "tensorboard" / "notes.txt").unlink()
    (run_dir / "tensorboard" / first[0]).rename(run_dir / "tensorboard" / "events.out.tfevents.1.earlier-host")
    assert train("--overwrite") == 0  # an earlier run's event files are pipetrain's: replaced
    now = sorted(p.name for p in (run_dir / "tensorboard").iterdir())
    assert "events.out.tfevents.1.earlier-host" not in now and len(now) == 1

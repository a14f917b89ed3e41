"""`pipetrain export`: a checkpoint written by real stages through the real store, merged
into one artifact, loaded into the unpartitioned model of its framework: its outputs
equal the pipeline's (the stages' forwards chained on the same input)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from pipetrain import rundir
from pipetrain.checkpoint.store import CheckpointStore
from pipetrain.config import resolve
from pipetrain.export import ExportError, export
from pipetrain.optim import Optimizer
from pipetrain.partitioning import partition
from pipetrain.stages.tensors import to_numpy
from stage_helpers import pipeline_step

M = 2  # micro-batches per step
DATA = {"train": "models.mlp:source", "kwargs": {"n": 64, "microbatch_size": 8}}


def torch_model(seed=0):
    from torch import nn

    from pipetrain.stages.torch_stage import TorchSequential

    def loss(logits, labels):
        return nn.functional.cross_entropy(logits, labels.long())

    return TorchSequential([lambda: nn.Linear(16, 8), nn.Tanh, lambda: nn.Linear(8, 4)], loss=loss, seed=seed,
                           device="cpu")


def keras_model(seed=0):
    import keras
    import tensorflow as tf

    from pipetrain.stages.tf_stage import KerasSequential

    def loss(logits, labels):
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(tf.cast(labels, tf.int32), logits))

    return KerasSequential([lambda: keras.layers.Dense(8, activation="tanh"), lambda: keras.layers.Dense(4)],
                           loss=loss, seed=seed)


def make_run(tmp_path, entry, kwargs, boundaries, *, steps=2, keep=3):
    """A run directory whose job.json names ``entry``, and a committed checkpoint after each
    of ``steps`` steps, written by the stages themselves (all their versions kept)."""
    run = tmp_path / "run"
    raw = {"run_dir": str(run), "model": {"entry": entry, "kwargs": kwargs}, "data": DATA,
           "partition": {"stages": len(boundaries) + 1, "boundaries": boundaries},
           "schedule": {"name": "gpipe", "microbatches": M, "steps": steps},
           "optimizer": {"name": "adam", "lr": 0.05}, "checkpoint": {"every": M, "keep": keep}}
    rundir.write_job(run, {"config": raw, "job_id": "export-test", "source": "test"})
    model = resolve(entry, "model.entry")(**kwargs)
    source = resolve(DATA["train"], "data.train")(**DATA["kwargs"])
    part = partition(model, len(boundaries) + 1, boundaries=boundaries, example_input=source.inputs(0))
    stages = [model.build_stage(spec, optimizer=Optimizer("adam", lr=0.05)) for spec in part.specs()]
    store = CheckpointStore(str(run / rundir.CHECKPOINTS_DIR), keep=keep)
    store.begin_generation(1)
    for step in range(steps):
        for j in range(M):
            k = step * M + j
            pipeline_step(stages, k, source.inputs(k), source.targets(k), version=step)
        for s in stages:
            s.update(new_version=step + 1)
        cut = (step + 1) * M
        records = [store.write_shard(cut, i, s.state_dict(), generation=1) for i, s in enumerate(stages)]
        store.commit(cut, records=records, generation=1, num_stages=len(stages),
                     manifest={"partition": {"boundaries": list(boundaries), "method": "explicit"}})
    return run, model, stages, source.inputs(100)


def pipeline_output(stages, x, y=None):
    """The last stage's output (JAX), or its loss on targets ``y`` (a torch or Keras last
    stage gives only that)."""
    for s in stages[:-1]:
        x = to_numpy(s.evaluate(x))
    out = stages[-1].evaluate(x, targets=y)
    return out if y is not None else to_numpy(out)


def jax_apply(model, params, x):
    params = {**model.init_params(), **params}  # layers without parameters are in no artifact but flax's
    for name, layer in zip(model.layer_names(), model.layers):
        x = layer.apply(params[name], x)
    return np.asarray(x)


@pytest.mark.slow
def test_safetensors_of_a_jax_model_holds_its_layer_paths_and_the_newest_weights(tmp_path, capsys):
    from safetensors.numpy import load_file

    from pipetrain.export_formats import nested

    run, model, stages, x = make_run(tmp_path, "models.mlp:build", {"sizes": [8]}, [2])
    out = tmp_path / "model.safetensors"
    result = export(str(run), str(out), fmt="safetensors")
    assert (result.step, result.cut, result.framework) == (2, 2 * M, "jax")
    tensors = load_file(str(out))  # the real safetensors reader
    assert set(tensors) == {"dense0/w", "dense0/b", "dense1/w", "dense1/b"}
    side = json.loads((tmp_path / "model.safetensors.json").read_text())
    assert side["step"] == 2 and side["framework"] == "jax" and side["checkpoint"].endswith("step-0000000004")
    np.testing.assert_allclose(jax_apply(model, nested(tensors), x), pipeline_output(stages, x), rtol=1e-5, atol=1e-6)
    # the newest version, not version 0 (training moved the weights)
    assert not np.allclose(tensors["dense0/w"], model.init_params()["dense0"]["w"])

    # --step 1: the older checkpoint; --with-optimizer adds the state under optimizer/stage{s}/
    older = tmp_path / "step1.safetensors"
    assert export(str(run), str(older), fmt="safetensors", step=1, with_optimizer=True).cut == M
    t1 = load_file(str(older))
    assert not np.allclose(t1["dense0/w"], tensors["dense0/w"])
    opt = sorted(n for n in t1 if n.startswith("optimizer/"))
    assert opt and {n.split("/")[1] for n in opt} == {"stage0", "stage1"}
    assert any(n.endswith("mu/dense0/w") for n in opt)

    # the CLI: the same export, one line saying what it wrote
    from pipetrain.cli import main

    assert main(["export", str(run), str(tmp_path / "cli.safetensors"), "--format", "safetensors"]) == 0
    assert "wrote " in capsys.readouterr().out
    assert load_file(str(tmp_path / "cli.safetensors")).keys() == tensors.keys()


@pytest.mark.slow
def test_flax_bytes_restore_into_the_unpartitioned_jax_model(tmp_path):
    from flax import serialization

    run, model, stages, x = make_run(tmp_path, "models.mlp:build", {"sizes": [8, 8]}, [2, 4])
    out = tmp_path / "params.msgpack"
    export(str(run), str(out), fmt="flax")
    params = serialization.from_bytes(model.init_params(), out.read_bytes())
    np.testing.assert_allclose(jax_apply(model, params, x), pipeline_output(stages, x), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_torch_state_dict_loads_into_the_unpartitioned_torch_model(tmp_path):
    import torch

    from pipetrain.export_formats import unpartitioned_torch

    run, model, stages, x = make_run(tmp_path, "test_export:torch_model", {}, [1])
    y = np.arange(len(x)) % 4
    out = tmp_path / "model.pt"
    export(str(run), str(out), fmt="torch")
    whole = unpartitioned_torch(model)
    whole.load_state_dict(torch.load(out, weights_only=True), strict=True)
    with torch.no_grad():
        xt = torch.from_numpy(np.asarray(x))
        boundary, logits = whole[:1](xt).numpy(), whole(xt)
        loss = float(model.loss(logits, torch.from_numpy(y)))
    np.testing.assert_allclose(boundary, to_numpy(stages[0].evaluate(x)), rtol=1e-5, atol=1e-6)
    assert loss == pytest.approx(pipeline_output(stages, x, y), rel=1e-5)


@pytest.mark.slow
def test_keras_weights_load_into_the_unpartitioned_keras_model(tmp_path):
    pytest.importorskip("tensorflow")
    from pipetrain.export_formats import unpartitioned_keras

    run, model, stages, x = make_run(tmp_path, "test_export:keras_model", {}, [1])
    out = tmp_path / "model.weights.h5"
    export(str(run), str(out), fmt="keras")
    y = np.arange(len(x)) % 4
    whole = unpartitioned_keras(model, np.asarray(x))  # fresh: its initial weights
    before = float(model.loss(whole(np.asarray(x)), y))
    whole.load_weights(str(out))
    boundary, loss = whole.layers[0](np.asarray(x)), float(model.loss(whole(np.asarray(x)), y))
    np.testing.assert_allclose(np.asarray(boundary), to_numpy(stages[0].evaluate(x)), rtol=1e-5, atol=1e-6)
    assert loss == pytest.approx(pipeline_output(stages, x, y), rel=1e-5) and loss != pytest.approx(before)


@pytest.mark.slow
def test_errors_say_what_was_found(tmp_path):
    run, _, _, _ = make_run(tmp_path, "models.mlp:build", {"sizes": [8]}, [2])
    out = str(tmp_path / "a.safetensors")
    with pytest.raises(ExportError, match=r"no checkpoint at cut 6 .*step 1 \(cut 2, committed\), "
                                          r"step 2 \(cut 4, committed\)"):
        export(str(run), out, fmt="safetensors", step=3)
    with pytest.raises(ExportError, match="--format torch is for a torch model, but models.mlp:build is a jax model"
                                          ".*safetensors or flax"):
        export(str(run), out, fmt="torch")
    with pytest.raises(ExportError, match="--with-optimizer is for --format safetensors only"):
        export(str(run), out, fmt="flax", with_optimizer=True)
    export(str(run), out, fmt="safetensors")
    with pytest.raises(ExportError, match="exists already; pass --overwrite"):
        export(str(run), out, fmt="safetensors")
    export(str(run), out, fmt="safetensors", overwrite=True)

    # a torn newest checkpoint is passed over; with none left, each one found is named with why
    ckpt = run / rundir.CHECKPOINTS_DIR
    (ckpt / "step-0000000004" / "stage-1.safetensors").write_bytes(b"torn")
    assert export(str(run), out, fmt="safetensors", overwrite=True).cut == M
    with pytest.raises(ExportError, match="step 2.* is corrupt"):
        export(str(run), out, fmt="safetensors", step=2, overwrite=True)
    (ckpt / "step-0000000002" / "COMMITTED").unlink()
    with pytest.raises(ExportError, match=r"no committed checkpoint that verifies: .*step-0000000002: uncommitted "
                                          r"\(not committed.*step-0000000004: corrupt"):
        export(str(run), out, fmt="safetensors", overwrite=True)

    # through the CLI: one line, exit 2
    cli = subprocess.run([sys.executable, "-m", "pipetrain", "export", str(run), out, "--format", "safetensors"],
                         capture_output=True, text=True, cwd=str(tmp_path))
    assert cli.returncode == 2 and cli.stderr.count("\n") == 1, cli.stderr
    assert cli.stderr.startswith("pipetrain export: error: ") and "exists already" in cli.stderr


def test_mixed_models_export_only_as_safetensors(tmp_path, monkeypatch):
    from pipetrain import export as export_module

    class Mixed:
        framework, frameworks = "mixed", ["jax", "torch"]

    rundir.write_job(tmp_path, {"config": {"run_dir": str(tmp_path), "model": {"entry": "x:y"}, "data": DATA},
                                "job_id": "j", "source": "t"})
    store = CheckpointStore(str(tmp_path / rundir.CHECKPOINTS_DIR))
    store.begin_generation(1)
    r = store.write_shard(8, 0, {"v0/w": np.zeros(2, np.float32)}, generation=1)
    store.commit(8, records=[r], generation=1, num_stages=1)
    monkeypatch.setattr("pipetrain.config.resolve", lambda entry, field: lambda **_: Mixed())
    with pytest.raises(ExportError, match=r"mixed-framework model \(jax, torch\): a mixed model exports only as "
                                          r"--format safetensors"):
        export_module.export(str(tmp_path), str(tmp_path / "m.pt"), fmt="torch")


@pytest.mark.slow
def test_safetensors_of_a_mixed_model_loads_part_by_part(tmp_path):
    """JAX -> torch -> Keras (models/mixed.py): each part's tensors under part{i}/, in that
    part's own names; loaded into each part's unpartitioned model and chained, the loss
    is the pipeline's."""
    pytest.importorskip("tensorflow")
    import torch
    from safetensors.numpy import load_file

    from pipetrain.export_formats import nested, unpartitioned_torch
    from pipetrain.stages.tf_stage import _variable_names

    run, model, stages, x = make_run(tmp_path, "models.mixed:build", {}, [2, 4])
    y = np.arange(len(x)) % 4
    out = tmp_path / "mixed.safetensors"
    with pytest.raises(ExportError, match="mixed-framework model .*only as --format safetensors"):
        export(str(run), str(tmp_path / "m.weights.h5"), fmt="keras")
    assert export(str(run), str(out), fmt="safetensors").framework == "mixed"
    tensors = load_file(str(out))
    parts = {}
    for name, a in tensors.items():
        part, _, local = name.partition("/")
        parts.setdefault(part, {})[local] = a
    assert sorted(parts) == ["part0", "part1", "part2"]
    jax_part, torch_part, keras_part = model.parts
    h = jax_apply(jax_part, nested(parts["part0"]), x)
    whole = unpartitioned_torch(torch_part)
    whole.load_state_dict({k: torch.from_numpy(v) for k, v in parts["part1"].items()}, strict=True)
    with torch.no_grad():
        h = whole(torch.from_numpy(h)).numpy()
    for i in range(len(keras_part)):
        layer, _ = keras_part.make_layer(i, h)
        for name, variable in zip(_variable_names(i, layer), layer.trainable_variables):
            variable.assign(parts["part2"][name])
        h = np.asarray(layer(h))
    loss = float(keras_part.loss(h, y))
    assert loss == pytest.approx(pipeline_output(stages, x, y), rel=1e-5)


def test_export_imports_no_framework():
    code = ("import sys, pipetrain.export, pipetrain.export_formats; "
            "print([m for m in ('jax', 'torch', 'tensorflow', 'keras', 'flax') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"

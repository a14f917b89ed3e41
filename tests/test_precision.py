"""Mixed precision (precision = "bf16"): bfloat16 compute and boundary tensors,
float32 masters, optimizer state and loss, in every framework.

The oracle for the gradients is the float32 unpartitioned model (one stage)
of the same framework. One SGD update with lr 1 turns the gradient into a
weight difference read from the stages' state dicts (float32 masters: the
difference of two float32 weights is exact to ~1e-7 relative to the weight,
far below what is measured here). Tolerances: bfloat16 keeps 8 significant
bits, a unit roundoff u = 2^-8 = 0.39%; each layer rounds its inputs, its
weights and its output once, so on this 5-layer MLP the gradient's relative
error should be a few u. We require a relative L2 error under 3% (~8u) and a
cosine similarity over 0.999, and, so the test cannot pass on float32
compute, a relative error over 1e-4 (float32 gives ~1e-7).
"""
import numpy as np
import pytest

from pipetrain.optim import Optimizer
from pipetrain.partitioning import partition
from pipetrain.stages.precision import PrecisionError, with_precision
from pipetrain.stages.tensors import to_numpy
from stage_helpers import batch, pipeline_step, stages
from test_corrections_frameworks import keras_model, torch_model
from test_remat import jax_model

SGD1 = Optimizer("sgd", lr=1.0)
MODELS = {"jax": jax_model, "torch": torch_model, "keras": keras_model}


def gradient(model, boundaries):
    """The loss of micro-batch 0 and the gradient of every parameter (one flat
    float64 vector, in parameter-name order), from one SGD lr-1 update."""
    if hasattr(model, "parts"):  # a MixedSequential has no len(): its partition gives the stage specs
        cut = partition(model, len(boundaries) + 1, method="explicit", boundaries=boundaries, example_input=batch(0)[0])
        built = [model.build_stage(spec, optimizer=SGD1) for spec in cut.specs()]
    else:
        built = stages(model, boundaries, opt=SGD1)
    before = [s.state_dict() for s in built]
    loss = pipeline_step(built, 0, *batch(0))
    for s in built:
        s.update(new_version=1)
    parts = {}
    for s, old in zip(built, before):
        new = s.state_dict()
        for name in old:
            if name.startswith("v0/"):
                assert new[name.replace("v0/", "v1/")].dtype == np.float32, f"stage {s.spec.index} {name}"
                parts[name[3:]] = old[name].astype(np.float64) - new[name.replace("v0/", "v1/")]
    return loss, np.concatenate([parts[n].ravel() for n in sorted(parts)])


@pytest.mark.parametrize("framework", ["jax", "torch", "keras"])
def test_bf16_gradients_are_within_bf16_tolerance_of_the_fp32_model(framework):
    loss32, g32 = gradient(MODELS[framework](), [])
    loss16, g16 = gradient(with_precision(MODELS[framework](), "bf16"), [2, 4])
    relative = np.linalg.norm(g16 - g32) / np.linalg.norm(g32)
    cosine = g16 @ g32 / (np.linalg.norm(g16) * np.linalg.norm(g32))
    assert 1e-4 < relative < 0.03, relative
    assert cosine > 0.999, cosine
    assert abs(np.linalg.norm(g16) / np.linalg.norm(g32) - 1) < 0.03
    assert isinstance(loss16, float) and abs(loss16 - loss32) < 0.03 * abs(loss32)


@pytest.mark.parametrize("framework", ["jax", "torch", "keras"])
def test_bf16_boundaries_carry_bfloat16_and_masters_stay_float32(framework):
    model = with_precision(MODELS[framework](), "bf16")
    built = stages(model, [2, 4], opt=Optimizer("adam", lr=1e-2))
    x, y = batch(0)
    h = built[0].forward(0, x, version=0)
    assert to_numpy(h).dtype.name == "bfloat16"  # the activation stage 0 sends
    h2 = built[1].forward(0, to_numpy(h), version=0)
    assert isinstance(built[2].forward(0, to_numpy(h2), version=0, targets=y), float)
    g = built[2].backward(0)
    assert to_numpy(g).dtype.name == "bfloat16"  # the gradient stage 2 sends back
    g1 = built[1].backward(0, to_numpy(g))
    assert to_numpy(g1).dtype.name == "bfloat16"
    assert built[0].backward(0, to_numpy(g1)) is None
    for s in built:
        s.update(new_version=1)
    state = built[1].state_dict()
    dtypes = {n: a.dtype.name for n, a in state.items() if not n.startswith("meta/")}
    floats = {n: d for n, d in dtypes.items() if not d.startswith(("int", "uint"))}  # (adam's step count)
    assert set(floats.values()) == {"float32"}, dtypes  # the weight versions, adam's moments, the accumulator
    assert {n.split("/")[0] for n in floats} >= {"v0", "v1", "opt", "acc"}, sorted(floats)


def test_the_partition_sees_the_wire_dtype_and_halves_the_bytes():
    import jax

    from pipetrain.memory import partition_boundary_bytes
    from pipetrain.runtime.links import payload_bound
    from pipetrain.runtime.plan import boundary_specs

    x = batch(0)[0]
    fp32 = partition(jax_model(), 3, method="explicit", boundaries=[2, 4], example_input=x)
    bf16 = partition(jax_model(), 3, method="explicit", boundaries=[2, 4], example_input=x, precision="bf16")
    assert fp32.precision == "fp32" and bf16.precision == "bf16" and "precision bf16" in str(bf16)
    assert str(boundary_specs(bf16, 1)) == "bfloat16[None,32]" and str(boundary_specs(fp32, 1)) == "float32[None,32]"
    assert [2 * b for b in (s.output_bytes for s in bf16.stages)] == [s.output_bytes for s in fp32.stages]
    assert [(2 * i if s else i, 2 * o) for s, (i, o) in enumerate(partition_boundary_bytes(bf16))] == \
        partition_boundary_bytes(fp32)  # (stage 0's input is data, as it is)
    assert bf16.stages[0].input_specs.dtype == "float32"
    # What one micro-batch keeps for its backward: the estimate is what the real stage's
    # VJP holds, in both precisions (under bf16 XLA keeps the float32 weight and recasts
    # it in the backward, so only the activations shrink).
    for part in (fp32, bf16):
        built = stages(part.model, [2, 4])
        built[1].forward(0, to_numpy(built[0].forward(0, x, version=0)), version=0)
        kept = sum(a.nbytes for a in jax.tree_util.tree_leaves(built[1]._pending[0][1]))
        assert sum(part.stages[1].layer_saved_bytes) == kept, part.precision
    assert sum(bf16.stages[1].layer_saved_bytes) < sum(fp32.stages[1].layer_saved_bytes)
    from models.layers import cross_entropy, dense
    from pipetrain.stages.jax_stage import JaxSequential

    wide = JaxSequential([dense(256, name="a"), dense(4, name="b")], loss=cross_entropy, example_input=x)
    bounds = [payload_bound(boundary_specs(partition(wide, 2, example_input=x, precision=p), 1))
              for p in ("fp32", "bf16")]
    assert bounds[1] < bounds[0] and abs(bounds[0] / bounds[1] - 2) < 0.01, bounds  # 1 GiB -> 512 MiB


def test_a_real_boundary_message_carries_half_the_bytes():
    from pipetrain.runtime.transport.wire import Message, MessageKind, encode

    payloads = {}
    for precision in ("fp32", "bf16"):
        first = stages(with_precision(jax_model(), precision), [2, 4])[0]
        out = first.forward(0, batch(0)[0], version=0)
        meta, buffers = encode(Message(MessageKind.ACTIVATION, 0, to_numpy(out), stage=0), seq=0)
        payloads[precision] = sum(b.nbytes for b in buffers)
        assert meta["leaves"][0][0] == {"fp32": "float32", "bf16": "bfloat16"}[precision]
    assert payloads["bf16"] * 2 == payloads["fp32"] == 8 * 32 * 4


def test_mixed_jax_to_torch_bf16_pipeline_tracks_fp32():
    from torch import nn

    from models.layers import activation, dense
    from pipetrain.stages.mixed import MixedSequential
    from pipetrain.stages.torch_stage import TorchSequential

    def model():
        from pipetrain.stages.jax_stage import JaxSequential

        head = JaxSequential([dense(32, name="d0"), activation("tanh", name="t0")], loss=None,
                             example_input=batch(0)[0])
        tail = TorchSequential([lambda: nn.Linear(32, 32), nn.Tanh, lambda: nn.Linear(32, 4)], device="cpu",
                               loss=lambda out, y: nn.functional.cross_entropy(out, y.long()))
        return MixedSequential([head, tail])

    part = partition(model(), 2, method="uniform", example_input=batch(0)[0], precision="bf16")
    assert part.precision == "bf16" and part.stages[0].output_specs.dtype == "bfloat16"
    assert model().parts[0].precision == "fp32"  # partition set a copy, not the caller's model
    loss32, g32 = gradient(model(), [2])  # (a mixed model is always cut: fp32 at the same cut, = unpartitioned)
    loss16, g16 = gradient(part.model, [2])
    relative = np.linalg.norm(g16 - g32) / np.linalg.norm(g32)
    assert 1e-4 < relative < 0.03 and abs(loss16 - loss32) < 0.03 * abs(loss32), (relative, loss16, loss32)


def test_unsupported_precisions_and_models_are_refused_clearly():
    from pipetrain.stages.base import StageSpec
    from pipetrain.stages.jax_layers import Layer

    import jax.numpy as jnp

    from pipetrain.stages.jax_stage import JaxSequential

    with pytest.raises(PrecisionError, match="JaxSequential: precision must be one of 'fp32', 'bf16', got 'fp16'"):
        JaxSequential(jax_model().layers, loss=None, precision="fp16")
    with pytest.raises(PrecisionError, match="precision: precision must be one of 'fp32', 'bf16', got 'fp8'"):
        partition(jax_model(), 1, example_input=batch(0)[0], precision="fp8")

    class Wrapper:  # a SequentialModel without the option
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            if name == "precision":
                raise AttributeError(name)
            return getattr(self.inner, name)

    with pytest.raises(PrecisionError, match="Wrapper has no precision option"):
        with_precision(Wrapper(jax_model()), "bf16")
    # one model, one precision: a MixedSequential's parts must agree
    from pipetrain.stages.mixed import MixedSequential

    with pytest.raises(PrecisionError, match=r"MixedSequential: its parts have precisions \['bf16', 'fp32'\]"):
        partition(MixedSequential([with_precision(jax_model(), "bf16"), torch_model()]), 2,
                  example_input=batch(0)[0])
    # bfloat16 parameters cannot be float32 masters
    half = Layer("half", lambda key, x: {"w": jnp.ones((x.shape[-1], 4), jnp.bfloat16)}, lambda p, x: x @ p["w"])
    model = JaxSequential([half], loss=lambda o, y: o.mean(), example_input=batch(0)[0], precision="bf16")
    with pytest.raises(PrecisionError, match="stage 0: parameter 'half.*is bfloat16; precision 'bf16' keeps float32"):
        model.build_stage(StageSpec(0, 1, 0, 1), optimizer=SGD1)


def _bf16_stages(framework, opt, **kw):
    return stages(with_precision(MODELS[framework](**kw), "bf16"), [2, 4], opt=opt)


@pytest.mark.parametrize("framework,schedule", [("jax", "2bw"), ("torch", "1f1b"), ("keras", "pipedream")])
def test_a_bf16_run_resumed_from_a_checkpoint_cut_is_bit_identical(framework, schedule):
    from pipetrain.runtime.reference import run_reference
    from pipetrain.schedule.builders import build_schedule
    from stage_helpers import Batches

    opt = Optimizer("adam", lr=1e-2, clip_norm=0.5 if schedule != "pipedream" else None)
    m, cut = 4, 8
    build = dict(num_stages=3, microbatches=m, steps=4, checkpoint_every=m, clip=opt.clip_norm is not None)
    full = run_reference(build_schedule(schedule, **build), stages=_bf16_stages(framework, opt), source=Batches(),
                         keep_checkpoints=True)
    saved = full.checkpoints[cut]  # stage -> its state at the cut
    assert all(a.dtype == np.float32 for st in saved.values() for n, a in st.items() if n.startswith("v"))
    fresh = _bf16_stages(framework, opt)
    for s, stage in enumerate(fresh):
        stage.load_state_dict(saved[s])
    resumed = run_reference(build_schedule(schedule, first_microbatch=cut, **build), stages=fresh, source=Batches())
    assert {k: v for k, v in full.losses.items() if k >= cut} == resumed.losses
    for a, b in zip(full.state_dicts(), resumed.state_dicts()):
        assert a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)


def test_bf16_with_remat_split_backward_and_a_delay_correction_trains_the_same():
    """remat recomputes the same bfloat16 operations, a split torch backward gives the
    same bits as a fused one, and a delay correction (operating on the float32
    masters) runs under bf16 as under fp32."""
    from pipetrain.runtime.reference import run_reference
    from pipetrain.schedule.builders import build_schedule
    from stage_helpers import Batches

    def trained(built, schedule="1f1b"):
        run_reference(build_schedule(schedule, num_stages=3, microbatches=4, steps=2), stages=built, source=Batches())
        return [s.state_dict() for s in built]

    adam = Optimizer("adam", lr=1e-2)
    for framework in ("jax", "torch"):
        plain = trained(_bf16_stages(framework, adam))
        for remat in ("stage", "layer"):
            model = with_precision(MODELS[framework](), "bf16")
            model.remat = remat
            for a, b in zip(plain, trained(stages(model, [2, 4], opt=adam))):
                for n in a:
                    np.testing.assert_allclose(np.asarray(b[n], np.float64), np.asarray(a[n], np.float64),
                                               rtol=1e-5, atol=1e-6, err_msg=f"{framework} remat {remat} {n}")
    fused = trained(_bf16_stages("torch", adam, split_backward=False))
    split = trained(_bf16_stages("torch", adam, split_backward=True))
    assert all(np.array_equal(a[n], b[n]) for a, b in zip(fused, split) for n in a)
    corrected = Optimizer("momentum", lr=0.1, correction="dcasgd")
    for framework in ("jax", "torch"):
        states = trained(_bf16_stages(framework, corrected), "pipedream")
        assert all(a.dtype == np.float32 for st in states for n, a in st.items() if n.startswith(("v", "corr/")))


def _job(tmp_path, precision):
    config = tmp_path / f"{precision}.toml"
    config.write_text(f'run_dir = "{tmp_path / precision}"\n[model]\nentry = "models.gpt:build"\n'
                      f'precision = "{precision}"\n'
                      'kwargs = { context = 8, d_model = 16, n_heads = 2, n_layers = 2 }\n'
                      '[data]\ntrain = "models.text:CharWindows"\nkwargs = { context = 8, microbatch_size = 4 }\n'
                      '[partition]\nstages = 2\n[schedule]\nname = "1f1b"\nmicrobatches = 2\nsteps = 3\n')
    return str(config)


def test_a_job_config_trains_the_flagship_gpt_in_bf16(tmp_path):
    from pipetrain.config import ConfigError
    from pipetrain.job import train_from_config

    runs = {p: train_from_config(_job(tmp_path, p), executor="reference", progress=False) for p in ("fp32", "bf16")}
    assert runs["bf16"].partition.precision == "bf16" and runs["fp32"].partition.precision == "fp32"
    assert runs["bf16"].partition.stages[0].output_specs.dtype == "bfloat16"
    losses = {p: [r.losses[k] for k in sorted(r.losses)] for p, r in runs.items()}
    assert losses["bf16"] != losses["fp32"]
    np.testing.assert_allclose(losses["bf16"], losses["fp32"], rtol=0.02)  # ~ln 97 = 4.6 nats: a few u
    state = runs["bf16"].stage_state(0)
    assert all(a.dtype == np.float32 for n, a in state.items() if n.startswith(("v", "opt/mu", "opt/nu")))
    with pytest.raises(ConfigError, match="model.precision: 'fp16' is not one of fp32, bf16"):
        train_from_config(_job(tmp_path, "fp16"), executor="reference", progress=False)

"""Per-stage peak memory in bytes: the estimate's arithmetic, what each framework's
autodiff keeps (against the tensors its rules save), and the command line."""
import numpy as np
import pytest

from pipetrain.memory import LayerBytes, MemoryEstimateError, estimate_memory, partition_layer_bytes
from pipetrain.optim import Optimizer
from pipetrain.partitioning import partition
from pipetrain.schedule.builders import build_schedule

MB, IN, HIDDEN, OUT = 8, 16, 32, 4


def two_layer_stages(p):
    # stage s: one layer of 1000 parameter bytes keeping 300 bytes, with a 100-byte input
    return [[LayerBytes(params=1000, saved=300, input=100), LayerBytes(params=1000, saved=200, input=50)]
            for _ in range(p)]


def test_1f1b_holds_one_version_and_p_minus_s_microbatches():
    p, m = 4, 8
    est = estimate_memory(two_layer_stages(p), build_schedule("1f1b", num_stages=p, microbatches=m, steps=2),
                          optimizer=Optimizer("adam"))
    for s, e in enumerate(est):
        assert (e.weight_versions, e.live_microbatches) == (1, p - s)
        # one version + adam's two slots + the accumulator, and (p - s) micro-batches' 500 bytes
        assert e.total == 2000 * (1 + 2 + 1) + (p - s) * 500


def test_gpipe_holds_the_whole_step_and_sgd_has_no_state():
    est = estimate_memory(two_layer_stages(2), build_schedule("gpipe", num_stages=2, microbatches=6, steps=1),
                          optimizer=Optimizer("sgd", lr=0.1))
    assert [e.live_microbatches for e in est] == [6, 6]
    assert [e.optimizer for e in est] == [0, 0]
    assert est[0].total == 2000 * 2 + 6 * 500


def test_pipedream_stashes_versions_and_a_correction_adds_its_state():
    p = 4
    schedule = build_schedule("pipedream", num_stages=p, microbatches=8, steps=2)
    plain = estimate_memory(two_layer_stages(p), schedule, optimizer=Optimizer("momentum", lr=0.1))
    # weight stashing: stage s holds a version for each of its p - s micro-batches in flight
    assert [e.weight_versions for e in plain] == [p - s for s in range(p)]
    assert [e.weights for e in plain] == [2000 * (p - s) for s in range(p)]
    ms = estimate_memory(two_layer_stages(p), schedule, optimizer=Optimizer("momentum", lr=0.1, correction="dcasgd-a"))
    assert [e.correction for e in ms] == [2000] * p
    pred = estimate_memory(two_layer_stages(p), schedule, optimizer=Optimizer("momentum", lr=0.1, correction="predict"))
    assert [e.correction for e in pred] == [e.weights for e in plain]


def test_remat_keeps_inputs_and_recomputes_one_microbatch():
    schedule = build_schedule("1f1b", num_stages=2, microbatches=8, steps=1)
    none, stage, layer = (estimate_memory(two_layer_stages(2), schedule, remat=r) for r in ("none", "stage", "layer"))
    assert (none[0].activations, none[0].recompute) == (2 * 500, 0)
    assert (stage[0].activations, stage[0].recompute) == (2 * 100, 500)  # the stage input kept; all recomputed
    assert (layer[0].activations, layer[0].recompute) == (2 * 150, 300)  # each layer's input; the largest layer
    assert stage[0].total == stage[0].between_actions + 500
    with pytest.raises(MemoryEstimateError, match="remat"):
        estimate_memory(two_layer_stages(2), schedule, remat="full")
    with pytest.raises(MemoryEstimateError, match="1 stages of layers for a schedule of 2"):
        estimate_memory(two_layer_stages(1), schedule)


def test_jax_layers_keep_what_their_vjp_holds():
    import jax

    from models.layers import activation, cross_entropy, dense
    from pipetrain.stages.jax_stage import JaxSequential

    model = JaxSequential([dense(HIDDEN, name="d0"), activation("tanh", name="t0"), dense(OUT, name="d1")],
                          loss=cross_entropy)
    x = np.ones((MB, IN), np.float32)
    part = partition(model, 3, method="uniform", example_input=x)
    # The oracle: each layer's VJP computed for real under jit, as the JAX stage's
    # forward returns it; what it holds is what a micro-batch in flight keeps
    # (jit outputs are buffers of their own, the weights included).
    expected, params = [], model.init_params()
    for i, (layer, name) in enumerate(zip(model.layers, model.layer_names())):
        vjp_of = (lambda p, x, f=layer.apply: jax.vjp(f, p, x)[1]) if i else (
            lambda p, x, f=layer.apply: jax.vjp(lambda q: f(q, x), p)[1])
        expected.append(sum(a.nbytes for a in jax.tree_util.tree_leaves(jax.jit(vjp_of)(params[name], x))))
        x = layer.apply(params[name], x)
    assert [s.layer_saved_bytes[0] for s in part.stages] == expected
    assert expected[0] == MB * IN * 4  # the first dense layer's weight gradient reads its input
    assert expected[2] == MB * HIDDEN * 4 + HIDDEN * OUT * 4  # the second also its weight, for the input gradient
    assert [s.layer_input_bytes[0] for s in part.stages] == [MB * IN * 4, MB * HIDDEN * 4, MB * HIDDEN * 4]
    assert partition_layer_bytes(part)[0][0].params == (IN * HIDDEN + HIDDEN) * 4


def test_torch_layers_keep_what_autograd_saves_but_not_their_parameters():
    from torch import nn

    from pipetrain.stages.torch_stage import TorchSequential

    model = TorchSequential([lambda: nn.Linear(IN, HIDDEN), nn.ReLU, lambda: nn.Linear(HIDDEN, OUT)],
                            loss=nn.functional.cross_entropy, device="cpu")
    part = partition(model, 3, method="uniform", example_input=np.zeros((MB, IN), np.float32))
    saved = [s.layer_saved_bytes[0] for s in part.stages]
    # Linear saves its input (the weight it also saves is a parameter); ReLU saves its output
    assert saved == [MB * IN * 4, MB * HIDDEN * 4, MB * HIDDEN * 4]
    assert part.stages[0].memory_bytes == (IN * HIDDEN + HIDDEN) * 4 + MB * IN * 4


def test_partition_command_prints_each_stages_peak_bytes(capsys):
    from pipetrain.cli import main

    assert main(["partition", "models.gpt:build", "--stages", "2", "--schedule", "pipedream", "--remat",
                 "stage"]) == 0
    out = capsys.readouterr().out
    assert "Peak memory per stage (tensors only; remat 'stage')" in out and "pipedream, 8 micro-batches" in out
    rows = [line.split() for line in out.splitlines() if line[:2] in ("0 ", "1 ")]
    assert [r[1] for r in rows[-2:]] == ["2", "1"]  # versions held: stage 0 stashes one per micro-batch in flight


def test_placement_needs_follow_the_schedule_and_remat():
    from models import gpt, text
    from pipetrain.memory import apply_remat, placement_needs

    data = text.CharWindows(split="train", microbatch_size=16)
    model = gpt.build()
    part = partition(model, 2, method="params", example_input=data.inputs(0))
    needs = {name: placement_needs(part, build_schedule(name, num_stages=2, microbatches=8, steps=1),
                                   optimizer=Optimizer("adam")) for name in ("gpipe", "1f1b")}
    # gpipe keeps all 8 micro-batches of a step; 1f1b at most 2 on stage 0
    assert all(g > 3 * f for g, f in zip(needs["gpipe"], needs["1f1b"]))
    assert needs["1f1b"][0] > part.stages[0].memory_bytes  # more than parameters + one micro-batch
    apply_remat(model, "stage")
    remat = placement_needs(part, build_schedule("gpipe", num_stages=2, microbatches=8, steps=1),
                            optimizer=Optimizer("adam"))
    assert all(r < g / 3 for r, g in zip(remat, needs["gpipe"]))


def test_bf16_activations_and_buffers_take_two_bytes_an_element_and_the_masters_four():
    from torch import nn

    from pipetrain.memory import partition_boundary_bytes
    from pipetrain.stages.torch_stage import TorchSequential

    def estimate(precision):
        model = TorchSequential([lambda: nn.Linear(IN, HIDDEN), nn.ReLU, lambda: nn.Linear(HIDDEN, OUT)],
                                loss=nn.functional.cross_entropy, device="cpu", precision=precision)
        part = partition(model, 3, method="uniform", example_input=np.zeros((MB, IN), np.float32))
        gpipe = build_schedule("gpipe", num_stages=3, microbatches=4, steps=1)
        return part, estimate_memory(partition_layer_bytes(part), gpipe, optimizer=Optimizer("adam"),
                                     boundary_bytes=partition_boundary_bytes(part))

    (_, fp32), (part16, bf16) = estimate("fp32"), estimate("bf16")
    # Linear keeps its bf16 input, and after the first stage the bf16 weight copy its input
    # gradient reads (a tensor of its own, not a parameter); ReLU its bf16 output
    assert [s.layer_saved_bytes[0] for s in part16.stages] == [MB * IN * 2, MB * HIDDEN * 2,
                                                               MB * HIDDEN * 2 + OUT * HIDDEN * 2]
    for a, b in zip(fp32, bf16):
        assert (b.weights, b.optimizer, b.gradients) == (a.weights, a.optimizer, a.gradients)  # float32 masters
        assert 2 * b.buffers == a.buffers  # the boundary tensors the transport holds
    assert [2 * b.activations for b in bf16[:2]] == [a.activations for a in fp32[:2]]

"""partition(): the exact balanced split against brute force, each cost method, the table, the errors."""
import itertools
import subprocess
import sys

import numpy as np
import pytest

from models.layers import activation, cross_entropy, dense
from pipetrain.partitioning import Partition, StagePlan, balanced_boundaries, partition
from pipetrain.stages.base import PartitionError, StageSpec, TensorSpec, stage_ranges
from pipetrain.stages.jax_layers import Layer

X = np.zeros((8, 16), np.float32)


def mlp():
    from pipetrain.stages.jax_stage import JaxSequential

    return JaxSequential([dense(64, name="d0"), activation("tanh", name="t0"), dense(32, name="d1"),
                          activation("tanh", name="t1"), dense(4, name="d2")], loss=cross_entropy)


def stage_costs(costs, cuts, transfer):
    n = len(costs)
    return [sum(costs[a:b]) + (transfer[b - 1] if b < n else 0.0) for a, b in stage_ranges(cuts, n)]


# ---------------------------------------------------------------- the DP

def test_dp_bottleneck_equals_brute_force_on_random_costs():
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(1, 10))
        stages = int(rng.integers(1, n + 1))
        costs = list(rng.uniform(0, 10, n) if trial % 3 else rng.integers(0, 4, n).astype(float))  # ties too
        transfer = list(rng.uniform(0, 3, n)) if trial % 2 else [0.0] * n
        cuts = balanced_boundaries(costs, stages, transfer=transfer)
        assert len(cuts) == stages - 1 and all(0 < c < n for c in cuts) and cuts == sorted(set(cuts))
        best = min(max(stage_costs(costs, list(c), transfer)) for c in itertools.combinations(range(1, n), stages - 1))
        assert max(stage_costs(costs, cuts, transfer)) == pytest.approx(best, rel=1e-12, abs=1e-12), (costs, stages)


def test_dp_prefers_balanced_stages_among_equal_bottlenecks():
    # bottleneck 10 (the big layer) either way; the rest should still be spread out
    assert balanced_boundaries([10, 1, 1, 1, 1], 3) == [1, 3]
    assert balanced_boundaries([1.0] * 8, 4) == [2, 4, 6]
    assert balanced_boundaries([5.0], 1) == []


def test_transfer_cost_moves_the_cut_to_a_small_boundary():
    costs = [1.0, 1.0, 1.0, 1.0]
    assert balanced_boundaries(costs, 2) == [2]
    assert balanced_boundaries(costs, 2, transfer=[0.0, 5.0, 0.0, 0.0]) in ([1], [3])


# ---------------------------------------------------------------- methods on a small MLP

def test_uniform_balances_layer_counts_and_reports_specs():
    p = partition(mlp(), 3, method="uniform", example_input=X)
    assert isinstance(p, Partition) and p.method == "uniform" and p.num_stages == 3
    assert [s.end - s.start for s in p.stages] in ([2, 2, 1], [2, 1, 2], [1, 2, 2])
    assert p.specs() == [StageSpec(i, 3, s.start, s.end) for i, s in enumerate(p.stages)]
    assert p.boundaries == tuple(s.start for s in p.stages[1:])
    first, last = p.stages[0], p.stages[-1]
    assert first.input_specs == TensorSpec((8, 16), "float32")
    assert last.output_specs == TensorSpec((8, 4), "float32") and last.output_bytes == 8 * 4 * 4
    assert sum(s.params for s in p.stages) == 16 * 64 + 64 + 64 * 32 + 32 + 32 * 4 + 4
    for s in p.stages:
        assert s.memory_bytes == 4 * s.params + sum(s.layer_saved_bytes) and sum(s.layer_saved_bytes) > 0


def test_params_method_minimizes_the_largest_parameter_count():
    m = mlp()
    m.trace_specs(X)
    counts = m.layer_param_counts()
    p = partition(m, 2, method="params", example_input=X)
    best = min(max(sum(counts[a:b]) for a, b in stage_ranges([c], 5)) for c in range(1, 5))
    assert max(s.params for s in p.stages) == best
    assert [s.cost for s in p.stages] == [float(s.params) for s in p.stages]


def test_flops_and_profile_methods():
    m = mlp()
    flops = partition(m, 2, method="flops", example_input=X)
    costs = m.layer_costs("flops", X)
    assert [s.cost for s in flops.stages] == [sum(costs[s.start:s.end]) for s in flops.stages]
    assert flops.bottleneck.cost == min(max(sum(costs[:c]), sum(costs[c:])) for c in range(1, 5))
    prof = partition(m, 2, method="profile", example_input=X, repeats=2)
    assert all(s.cost > 0 for s in prof.stages) and prof.method == "profile"
    assert "cost (s)" in str(prof)


def test_explicit_boundaries_are_kept():
    p = partition(mlp(), 3, example_input=X, boundaries=[1, 4])
    assert p.boundaries == (1, 4) and p.method == "explicit"
    assert [s.layer_names for s in p.stages] == [("d0",), ("t0", "d1", "t1"), ("d2",)]
    q = partition(mlp(), 3, method="params", example_input=X, boundaries=[1, 4])
    assert q.boundaries == (1, 4) and q.cost_method == "params" and q.stages[0].cost == 16 * 64 + 64


def test_count_transfer_adds_the_output_bytes_over_bandwidth_to_the_sender():
    p = partition(mlp(), 2, method="uniform", example_input=X, count_transfer=True, bandwidth=1024.0)
    first = p.stages[0]
    assert first.transfer_cost == pytest.approx(first.output_bytes / 1024.0)
    assert p.stages[-1].transfer_cost == 0.0
    assert "xfer" in str(p)


def test_table_lists_stages_layers_params_cost_share_and_outputs():
    text = str(partition(mlp(), 2, method="params", example_input=X))
    lines = text.splitlines()
    assert "2 stages" in lines[0] and "'params'" in lines[0]
    assert lines[1].split()[:4] == ["stage", "layers", "params", "cost"]
    assert "100%" in text and "float32[8,4]" in text and "d0" in text
    assert len(lines) == 4


def test_partition_needs_only_the_protocol_and_imports_no_framework():
    code = ("import sys, pipetrain.partitioning\n"
            "bad = [m for m in ('jax', 'torch', 'tensorflow', 'flax', 'optax') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    tiny = _ListModel([3, 1, 1, 1])  # a plain-Python SequentialModel
    p = partition(tiny, 2, method="params", example_input=TensorSpec((2,), "float32"))
    assert p.boundaries == (1,) and isinstance(p.stages[0], StagePlan)
    assert p.stages[0].memory_bytes == 4 * 3 + 8  # 4 bytes per parameter when the model does not say


class _ListModel:
    framework = "none"

    def __init__(self, params):
        self.params = params

    def layer_names(self):
        return [f"l{i}" for i in range(len(self.params))]

    def layer_param_counts(self):
        return list(self.params)

    def trace_specs(self, example_input):
        return [example_input] * len(self.params)

    def layer_costs(self, method, example_input, *, repeats=5):
        return [float(p) for p in self.params]

    def build_stage(self, spec, *, optimizer):
        raise NotImplementedError


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs, match", [
    ({"num_stages": 6}, "6 stages for a model of 5 layers"),
    ({"num_stages": 0}, "num_stages must be an int >= 1, got 0"),
    ({"num_stages": 3, "boundaries": [2]}, "1 boundaries make 2 stages, but num_stages is 3"),
    ({"num_stages": 3, "boundaries": [2, 5]},
     "boundary 5 \\(start of stage 2\\) is out of range: cut points lie in 1..4"),
    ({"num_stages": 2, "boundaries": [0]}, "boundary 0 \\(start of stage 1\\) is out of range"),
    ({"num_stages": 3, "boundaries": [3, 3]}, "strictly increasing: stage 2 would start at layer 3 \\(t1\\)"),
    ({"num_stages": 3, "boundaries": [3, 2]}, "stage 2 would start at layer 2 \\(d1\\)"),
    ({"num_stages": 2, "method": "magic"}, "method 'magic' is not one of"),
    ({"num_stages": 2, "method": "explicit"}, "needs boundaries"),
])
def test_bad_requests_are_named(kwargs, match):
    with pytest.raises(PartitionError, match=match):
        partition(mlp(), example_input=X, **kwargs)


def test_layer_whose_input_does_not_fit_names_the_stage_and_layer():
    from pipetrain.stages.jax_stage import JaxSequential

    narrow = Layer("narrow", lambda k, s: {"w": np.zeros((7, 2), np.float32)}, lambda p, x: x @ p["w"])
    m = JaxSequential([dense(8, name="a"), activation("tanh", name="act"), narrow], loss=cross_entropy)
    with pytest.raises(PartitionError, match=r"stage 1: layer 2 \(narrow\): its input float32\[8,8\], "
                                             r"the output of layer 1 \(act\), does not fit"):
        partition(m, 2, example_input=X, boundaries=[2])
    with pytest.raises(PartitionError, match=r"layer 2 \(narrow\)"):
        partition(m, 2, method="params", example_input=X)

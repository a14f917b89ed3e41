"""bench/vs_torch_pipelining.py runs end to end at toy sizes and keeps its JSON contract."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "vs_torch_pipelining.py"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_vs_torch_pipelining_smoke():
    out = subprocess.run([sys.executable, str(BENCH), "--steps", "2", "--warmup", "1", "--repeats", "1",
                          "--width", "32", "--depth", "2", "--batch", "32"],
                         capture_output=True, text=True, timeout=110, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    rates = result["samples_per_s"]
    assert set(rates) == {"torch_single", "torch_pipelining_1f1b", "pipetrain_1f1b", "pipetrain_pipedream"}
    assert all(rate > 0 for rate in rates.values())
    # The ceiling is what the measured kernels allow with free communication:
    # no run can beat it (a margin for the median's noise at toy sizes).
    ceilings = result["ceiling_samples_per_s"]
    assert set(ceilings) >= {"pipetrain_1f1b", "pipetrain_pipedream"}
    assert all(rates[name] <= 1.5 * ceilings[name] for name in ("pipetrain_1f1b", "pipetrain_pipedream"))
    assert result["ratio_to_single"]["torch_single"] == 1.0
    assert result["no_flush_bound_vs_perfect_1f1b"] == pytest.approx((8 + 2 - 1) / 8)  # m=8, p=2
    # The sync contestants train the same model on the same data with the same math.
    loss = result["last_loss"]
    assert loss["pipetrain_1f1b"] == pytest.approx(loss["torch_single"], rel=1e-5)
    assert loss["torch_pipelining_1f1b"] == pytest.approx(loss["torch_single"], rel=1e-5)
    assert loss["pipetrain_pipedream"] != loss["torch_single"]  # async: later micro-batches see updated weights


def _time_to_accuracy(monkeypatch):
    # bench/ is not a package: its scripts import each other by file name.
    monkeypatch.syspath_prepend(str(BENCH.parent))
    import time_to_accuracy

    return time_to_accuracy


@pytest.mark.timeout(60)
def test_time_to_accuracy_pieces(monkeypatch):
    """bench/time_to_accuracy.py: samples to a target, the target, the configurations it
    compares and the simulated rates, each against numbers worked out by hand."""
    tta = _time_to_accuracy(monkeypatch)
    curve = [(100, 3.0), (200, 2.0), (300, 2.6), (400, 1.5)]
    assert tta.samples_to(curve, 2.5) == pytest.approx(150.0)  # first crossing, linear in between
    # Between the rebound to 2.6 and 1.5: the last evaluation above the target counts.
    assert tta.samples_to(curve, 1.75) == pytest.approx(300 + 100 * (2.6 - 1.75) / (2.6 - 1.5))
    assert tta.samples_to(curve, 3.5) == 100.0  # met at the first evaluation
    assert tta.samples_to(curve, 1.0) is None
    # The target is the lowest loss reached so far, not the top of the spike at 300.
    assert tta.lowest_by(curve, 300) == pytest.approx(2.0)
    assert tta.lowest_by(curve, 150) == pytest.approx(2.5)
    assert tta.mean_curve([{"curve": [(1, 2.0), (2, 4.0)]}, {"curve": [(1, 3.0)]}]) == [(1, 2.5)]

    summary = {"1f1b": {"mean": 2.9}, "gpipe": {"mean": 2.9}, "pipedream": {"mean": 2.8},
               "pipedream+dcasgd-a": {"mean": 2.7}, "pipedream/acc8": {"mean": 2.85},
               "pipedream/acc8+predict": {"mean": 2.83}, "2bw": {"mean": 3.1}, "2bw+predict": {"mean": 3.2}}
    assert tta.best_configs(summary) == ["1f1b", "gpipe", "pipedream+dcasgd-a", "pipedream/acc8+predict", "2bw"]

    # Several convergence files: each configuration at the lr of its lowest mean held-out loss.
    def run(config, seed, heldout):
        return {"config": config, "seed": seed, "heldout": heldout, "train_last": heldout, "max_delay": [0]}

    at_1e3 = {"args": {"lr": 1e-3}, "runs": [run("1f1b", s, 2.5) for s in (0, 1)]
              + [run("pipedream", s, 2.4) for s in (0, 1)]}
    at_2e3 = {"args": {"lr": 2e-3}, "runs": [run("1f1b", 0, 2.3), run("1f1b", 1, 2.45)]
              + [run("pipedream", s, 2.6) for s in (0, 1)]}
    lr_of, runs, summary = tta.best_learning_rates([at_1e3, at_2e3])
    assert lr_of == {"1f1b": 2e-3, "pipedream": 1e-3}
    assert [r["heldout"] for r in runs["1f1b"]] == [2.3, 2.45] and summary["1f1b"]["mean"] == pytest.approx(2.375)

    # With F=1, B=2 ms on every stage and free updates and messages, a flush step takes
    # (m+p-1)(F+B) and a step without one m(F+B): the ratio is the flush bound.
    m = tta.M
    for p in (2, 4, 8):
        costs = {"F": [1.0] * p, "B": [2.0] * p, "U": [0.0] * p}
        sync = tta.simulated_rate("1f1b", p, costs, 0.0, clip=False)
        assert sync == pytest.approx(m * tta.MICROBATCH / ((m + p - 1) * 3.0) * 1e3)
        no_flush = tta.simulated_rate("pipedream+dcasgd-a", p, costs, 0.0, clip=False)
        assert no_flush / sync == pytest.approx((m + p - 1) / m)
        # The recipe's clipping: 1f1b's chain of 2(p-1) norm messages (0.5 ms each) runs while the
        # backward drains towards stage 0, so it costs 1f1b nothing here; pipedream clips per stage.
        for config in ("1f1b", "pipedream"):
            plain = tta.simulated_rate(config, p, costs, 0.5, clip=False)
            assert tta.simulated_rate(config, p, costs, 0.5, clip=True) == pytest.approx(plain)


REPLICAS_BENCH = BENCH.parent / "replicas.py"


def _replicas_bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH.parent))
    import replicas

    return replicas


@pytest.mark.timeout(60)
def test_replicas_rate_and_ideal(monkeypatch):
    """bench/replicas.py's throughput: the job's micro-batches between stage 0's reports of step
    ``first`` and the last step (the steps before ``first`` left out), by hand."""
    bench = _replicas_bench(monkeypatch)
    history = [{"step": 2, "stage0_done": 13.0}, {"step": 0, "stage0_done": 10.0}, {"step": 1, "stage0_done": 11.0},
               {"step": 3, "stage0_done": 15.0}]
    assert bench.steady_rate(history, first=0, microbatches_per_step=8) == pytest.approx(3 * 8 / 5.0)
    assert bench.steady_rate(history, first=1, microbatches_per_step=4, samples_per_microbatch=32) == \
        pytest.approx(2 * 4 * 32 / 4.0)
    with pytest.raises(ValueError, match="need at least 5 steps"):
        bench.steady_rate(history, first=3, microbatches_per_step=8)
    # m = 16, p = 2, F + B = 30 ms: 16 / (17 * 0.03) micro-batches per second.
    assert bench.ideal_rate(16) == pytest.approx(16 / (17 * 0.030))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_replicas_bench_smoke():
    """bench/replicas.py --quick: d = 1, 2, 4 sleep pipelines and pipetrain d=2 against torch DDP
    run end to end, keep the JSON contract, and the two DDP contestants train the same."""
    out = subprocess.run([sys.executable, str(REPLICAS_BENCH), "--quick"], capture_output=True, text=True,
                         timeout=380, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    eff = result["scaling_efficiency"]
    assert set(eff) == {"1", "2", "4"} and eff["1"] == 1.0
    # Loose, so a loaded machine cannot fail it: d replicas must still run faster than one.
    assert all(eff[d] * int(d) > 1.0 for d in ("2", "4")), result
    # (1 MiB stages scatter only when asked: the fourth contestant)
    assert result["scaling_efficiency_scatter_d4"] > 0 and result["scatter_gain_d4_paired_median"] > 0
    assert result["vs_torch_ddp"] > 0 and all(v > 0 for v in result["ddp_samples_per_s"].values())
    assert 0 < result["client_cpu_share"] < 2
    # Same initial weights, micro-batches, SGD: the step losses agree (float32, another summation order).
    loss = result["ddp_last_loss"]
    assert loss["pipetrain"] == pytest.approx(loss["torch_ddp"], rel=1e-4)


@pytest.mark.timeout(120)
def test_torch_adapter_bench_smoke():
    """bench/torch_adapter.py --quick: the three contestants run, train the same model (the two
    stage bindings to the bit), and the JSON keeps its keys."""
    pytest.importorskip("torch")
    bench = Path(__file__).resolve().parent.parent / "bench" / "torch_adapter.py"
    out = subprocess.run([sys.executable, str(bench), "--quick"], capture_output=True, text=True, timeout=110,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result["ms_per_step"]) == {"plain torch", "TorchStage", "TorchStage (functional_call)"}
    assert result["same_bits"] is True and result["plain_close"] is True
    assert all(row["best_ms"] > 0 for row in result["ms_per_step"].values())


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_reduce_engines_bench_smoke():
    """bench/reduce_engines.py: both of pipetrain's exchanges and gloo reduce the same buffer at
    d = 3 (each process checks every element of its sum), and the JSON keeps its keys."""
    pytest.importorskip("torch")
    bench = Path(__file__).resolve().parent.parent / "bench" / "reduce_engines.py"
    out = subprocess.run([sys.executable, str(bench), "--sizes", "65536", "--replicas", "3", "--iterations", "3",
                          "--repeats", "1"], capture_output=True, text=True, timeout=180, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result["reduce_ms"]) == {f"{e} d=3 64 KiB" for e in ("direct", "scatter", "gloo")}
    assert result["ratio"]["d=3 64 KiB"] > 0 and result["scatter_ratio"]["d=3 64 KiB"] > 0

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

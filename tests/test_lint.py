"""ruff finds nothing in the code, the tests, the benchmarks and the models (rules in pyproject.toml)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_reports_nothing():
    pytest.importorskip("ruff", reason="ruff is not installed (it is in the dev extra, which make install installs)")
    # Run from the repo root so ruff reads its settings from pyproject.toml.
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "pipetrain", "tests", "bench", "models"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, f"ruff check failed:\n{proc.stdout}{proc.stderr}"

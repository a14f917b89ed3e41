"""Test-wide settings.

The kernels of this process run single-threaded, like the workers of the
embedded cluster (pipetrain.runtime.local), so that results computed here and
in worker processes can be compared bit for bit. Set before JAX loads.
"""
import os
import sys
from pathlib import Path

from pipetrain.runtime.local import single_thread_env

for _name, _value in single_thread_env().items():
    os.environ.setdefault(_name, _value)

# `models` and the test oracles import from the repository root and tests/.
_ROOT = Path(__file__).resolve().parent.parent
for _path in (_ROOT, _ROOT / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

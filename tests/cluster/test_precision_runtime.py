"""bf16 on real worker processes: the Dask run equals the reference executor
bit for bit (losses and every state entry) for a clipped JAX 2bw pipeline and
a JAX -> torch -> Keras 1f1b one, the boundary tensors the workers exchange
are bfloat16 (the transport checks them against the partition's specs), and
the checkpoint files on disk hold float32 masters."""
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from models import mixed, mlp
from pipetrain.api import fit
from pipetrain.optim import Optimizer
from pipetrain.partitioning import partition
from stage_helpers import assert_runs_equal

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

OPT = Optimizer("adam", lr=1e-2, clip_norm=0.5)


def _header(path: Path) -> dict:
    """A safetensors file's JSON header, read from the file's own bytes."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length])


def test_bf16_jax_pipeline_equals_reference_and_checkpoints_float32_masters(client, tmp_path):
    source = mlp.source(1024, microbatch_size=16, seed=1)
    part = partition(mlp.build(sizes=(32, 32, 32)), 3, method="params", example_input=source.inputs(0),
                     precision="bf16")
    assert [str(s.output_specs) for s in part.stages[:2]] == ["bfloat16[16,32]", "bfloat16[16,32]"]
    kwargs = dict(schedule="2bw", microbatches=4, steps=4, optimizer=OPT, progress=False)
    dask_run = fit(part, source, client=client, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=8, **kwargs)
    reference = fit(part, source, executor="reference", **kwargs)
    assert_runs_equal(dask_run, reference)
    fp32 = fit(part, source, executor="reference", precision="fp32", **kwargs)
    assert fp32.partition.precision == "fp32" and fp32.losses != reference.losses  # bf16 took part
    np.testing.assert_allclose(list(reference.losses.values()), list(fp32.losses.values()), rtol=0.05)

    shards = sorted((tmp_path / "ckpt").rglob("*.safetensors"))
    assert len(shards) >= 3, shards
    for shard in shards:
        header = _header(shard)
        dtypes = {name: t["dtype"] for name, t in header.items() if name != "__metadata__"}
        weights = {n: d for n, d in dtypes.items() if n.startswith(("v", "opt/mu", "opt/nu", "acc/"))}
        assert weights and set(weights.values()) == {"F32"}, (shard, dtypes)
        assert "bfloat16" not in json.dumps(header.get("__metadata__", {})), shard


def test_bf16_mixed_pipeline_equals_reference_bit_for_bit(client):
    pytest.importorskip("tensorflow")
    source = mixed.train_source(n=512, microbatch_size=16)
    part = partition(mixed.build(), 3, boundaries=[2, 4], example_input=source.inputs(0), precision="bf16")
    kwargs = dict(schedule="1f1b", microbatches=4, steps=3, optimizer=OPT, progress=False)
    dask_run = fit(part, source, client=client, **kwargs)
    assert_runs_equal(dask_run, fit(part, source, executor="reference", **kwargs))
    assert all(v.dtype == np.float32 for st in dask_run.states for n, v in st.items() if n.startswith("v"))

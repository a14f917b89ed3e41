"""SIGKILL one replica's worker in a replicated pipeline (p = 2 stages x d = 2 replicas,
four worker processes): every replica rolls back to the last committed cut and the run
equals the uninterrupted reference run of the same layout bit for bit, every micro-batch
of the job applied exactly once on every task."""
from collections import Counter

import pytest

from models import mlp
from pipetrain.api import fit
from pipetrain.optim import Optimizer
from pipetrain.partitioning import partition
from reliability.chaos import ChaosModel, Fault, fired
from stage_helpers import assert_runs_equal

pytestmark = [pytest.mark.reliability, pytest.mark.slow, pytest.mark.cluster]

DATA = mlp.source(2048, microbatch_size=16, seed=1)
M, STEPS, D = 4, 4, 2  # the job's micro-batches 0..31 (8 per step), each replica's 0..15
EVERY = 8  # the job's micro-batches: cuts 8, 16, 24 (each replica's 4, 8, 12)


def _assert_exactly_once(result, total: int) -> None:
    """Every micro-batch of the job applied exactly once on every task."""
    for task, ledger in enumerate(result.ledgers):
        counts = Counter(k for first, end in ledger["applied"] for k in range(first, end))
        assert sorted(counts) == list(range(total)) and set(counts.values()) == {1}, f"task {task}"


def _streaming_torch_job(tmp_path, fault: Fault, *, stages: int, replicas: int):
    """The torch MLP of test_replica_buckets cut into ``stages``, with ``fault`` (its chaos twin) and
    without (the oracle's), the markers directory, and fit's settings: 1f1b, ``replicas``, 800-byte
    gradient buckets streamed during each update's last backward."""
    from test_replica_buckets import _model as torch_model

    markers = tmp_path / "markers"
    markers.mkdir()
    chaos = ChaosModel(torch_model(split_backward=False), faults=[fault], marker_dir=str(markers),
                       checkpoint_dir=str(tmp_path / "checkpoints"))
    part = partition(chaos, stages, method="uniform", example_input=DATA.inputs(0))
    plain = partition(torch_model(split_backward=False), stages, method="uniform", example_input=DATA.inputs(0))
    kwargs = dict(schedule="1f1b", microbatches=M, steps=STEPS, optimizer=Optimizer("adam", lr=1e-2),
                  progress=False, replicas=replicas, reduce_bucket_mib=800 / (1 << 20))
    return part, plain, markers, kwargs


@pytest.mark.parametrize("schedule", ["1f1b", "pipedream"])
def test_a_killed_replica_rolls_every_replica_back_bit_identical(client, tmp_path, schedule):
    # Local micro-batch 5 of stage 1 (in each replica's second step, after the job's cut 8):
    # whichever replica gets there first is killed.
    fault = Fault(1, "B", 5, after_commit=8)
    markers = tmp_path / "markers"
    markers.mkdir()
    chaos = ChaosModel(mlp.build(sizes=(32, 32)), faults=[fault], marker_dir=str(markers),
                       checkpoint_dir=str(tmp_path / "checkpoints"))
    part = partition(chaos, 2, method="uniform", example_input=DATA.inputs(0))
    kwargs = dict(schedule=schedule, microbatches=M, steps=STEPS, optimizer=Optimizer("adam", lr=1e-2),
                  progress=False, replicas=D)
    result = fit(part, DATA, client=client, checkpoint_dir=str(tmp_path / "checkpoints"), checkpoint_every=EVERY,
                 placement_timeout=30.0, job_id=f"replica-kill-{schedule}", **kwargs)
    assert fired(markers, fault) is not None
    assert 8 in [r["rollback_to"] for r in result.recoveries]

    plain = partition(mlp.build(sizes=(32, 32)), 2, method="uniform", example_input=DATA.inputs(0))
    assert_runs_equal(result, fit(plain, DATA, executor="reference", **kwargs))
    _assert_exactly_once(result, M * STEPS * D)


def test_a_replica_killed_while_its_gradient_buckets_stream_rolls_every_replica_back_bit_identical(
        client, tmp_path):
    """Torch stages that stream their buckets during each update's last backward (800-byte
    buckets: stage 1 sends [6.bias, 6.weight, 4.bias] while it computes 4.weight): stage 1's
    streamed backward of local micro-batch 7 kills its worker right after its first bucket left,
    so the other replica holds part of a part of an update that never happens."""
    pytest.importorskip("torch")
    from pipetrain.stages import replica_grads

    fault = Fault(1, "S", 7, after_commit=8, finals=3)
    part, plain, markers, kwargs = _streaming_torch_job(tmp_path, fault, stages=2, replicas=D)

    stage1 = part.model.build_stage(part.specs()[1], optimizer=kwargs["optimizer"])
    assert replica_grads.buckets(stage1, bucket_bytes=800) == (("6.bias", "6.weight", "4.bias"), ("4.weight",))
    result = fit(part, DATA, client=client, checkpoint_dir=str(tmp_path / "checkpoints"), checkpoint_every=EVERY,
                 placement_timeout=30.0, job_id="replica-kill-streaming", **kwargs)
    assert fired(markers, fault) is not None
    assert 8 in [r["rollback_to"] for r in result.recoveries]

    assert_runs_equal(result, fit(plain, DATA, executor="reference", **kwargs))
    _assert_exactly_once(result, M * STEPS * D)


@pytest.mark.parametrize("fault", [Fault(0, "B", 7, after_commit=12), Fault(0, "S", 7, after_commit=12, finals=3)],
                         ids=["before-its-shares", "while-its-shares-stream"])
def test_a_replica_killed_in_the_scatter_exchange_rolls_every_replica_back_bit_identical(client, tmp_path, fault):
    """d = 3 (the scatter exchange: each replica sums a third of every gradient and shares
    that sum), one torch stage streaming 800-byte buckets: local micro-batch 7, the update's
    last backward of each replica's second step, kills its worker before any of its shares left
    ("B") or after the first bucket's shares left while the backward still runs ("S"). The
    other replicas have sent it their shares and wait for its own."""
    pytest.importorskip("torch")

    d, every = 3, 12  # the job's cuts 12, 24, 36 (each replica's 4, 8, 12)
    part, plain, markers, kwargs = _streaming_torch_job(tmp_path, fault, stages=1, replicas=d)
    result = fit(part, DATA, client=client, checkpoint_dir=str(tmp_path / "checkpoints"), checkpoint_every=every,
                 placement_timeout=30.0, job_id=f"replica-kill-scatter-{fault.kind}", reduce_exchange="scatter",
                 **kwargs)
    assert fired(markers, fault) is not None
    assert 12 in [r["rollback_to"] for r in result.recoveries]

    assert_runs_equal(result, fit(plain, DATA, executor="reference", reduce_exchange="direct", **kwargs))
    _assert_exactly_once(result, M * STEPS * d)

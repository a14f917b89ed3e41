"""Gradient buckets of the replica reduction (stages/replica_grads.py, runtime/replicas.py):
a torch stage's update-last backward sends its first buckets while it still computes the rest,
and the result is the same bits as one message per part after the backward."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from models import mlp  # noqa: E402
from pipetrain.optim import Optimizer  # noqa: E402
from pipetrain.partitioning import partition  # noqa: E402
from pipetrain.runtime.reference import build_stages, run_reference  # noqa: E402
from pipetrain.runtime.replicas import ReplicaMismatch, ReplicaReducer  # noqa: E402
from pipetrain.schedule.actions import Action, Kind  # noqa: E402
from pipetrain.schedule.builders import ScheduleSpec  # noqa: E402
from pipetrain.stages import replica_grads  # noqa: E402
from pipetrain.stages.torch_stage import TorchSequential  # noqa: E402

SOURCE = mlp.source(512, microbatch_size=8, seed=3)
WIDTH = 48  # a Linear(48, 48) holds 9,408 bytes of float32 gradients


def _loss(logits, labels):
    return nn.functional.cross_entropy(logits, labels.long())


def _model(split_backward="auto"):
    layers = [lambda: nn.Linear(mlp.FEATURES, WIDTH), nn.Tanh, lambda: nn.Linear(WIDTH, WIDTH), nn.Tanh,
              lambda: nn.Linear(WIDTH, WIDTH), nn.Tanh, lambda: nn.Linear(WIDTH, mlp.NUM_CLASSES)]
    return TorchSequential(layers, loss=_loss, seed=0, split_backward=split_backward)


def _part(p, **model):
    return partition(_model(**model), p, method="uniform", example_input=SOURCE.inputs(0))


def _stage(optimizer=Optimizer("sgd", lr=0.1)):
    return build_stages(_part(1), optimizer)[0]


def test_buckets_cut_the_gradients_in_backward_order_the_same_on_every_build():
    stage = _stage()
    cut = replica_grads.buckets(stage, bucket_bytes=9000)
    order = stage.gradient_order()
    assert [n for bucket in cut for n in bucket] == order  # every parameter once, last layer first
    assert order[:2] == ["6.bias", "6.weight"] and order[-1] == "0.weight"
    sizes, _ = replica_grads.read(stage)
    assert all(sum(sizes[n].nbytes for n in bucket) >= 9000 for bucket in cut[:-1])
    assert len(cut) == 3 and cut == replica_grads.buckets(_stage(), bucket_bytes=9000)
    assert replica_grads.buckets(stage, bucket_bytes=1 << 30) == (tuple(order),)


def test_a_stage_that_cannot_stream_its_backward_sends_one_bucket():
    from pipetrain.stages.jax_stage import JaxSequential

    jax_part = partition(JaxSequential(mlp.layers(sizes=(12, 10)), loss=mlp.loss_fn, seed=0), 1,
                         example_input=SOURCE.inputs(0))
    stage = build_stages(jax_part, Optimizer("sgd", lr=0.1))[0]
    assert len(replica_grads.buckets(stage, bucket_bytes=1)) == 1


class _RecordingLinks:
    received_are_fresh = False

    def __init__(self, log):
        self.log, self.sent = log, {}

    def ready(self, kind, k):
        return True

    def send(self, kind, k, version, tree, *, wait_follows=False):
        # A copy at send time, as the transport's bytes are: a bucket sent before its sums were
        # final would show the partial values.
        self.log.append(("send", k))
        self.sent[k] = {key: ({n: np.array(g, copy=True) for n, g in value.items()} if key == "grads"
                              else np.array(value, copy=True)) for key, value in tree.items()}

    def recv(self, kind, k):
        return self.sent[k]


def test_the_first_buckets_leave_before_the_backward_reaches_the_first_layer(monkeypatch):
    monkeypatch.setattr(replica_grads, "BUCKET_BYTES", 9000)
    stage, log = _stage(), []
    final = stage._final

    def recorded(name, *args):
        log.append(("final", name))
        final(name, *args)

    monkeypatch.setattr(stage, "_final", recorded)
    links = _RecordingLinks(log)
    reducer = ReplicaReducer(stage, links, replica=0, replicas=2, hooks=None, wait_follows=lambda: False)
    assert reducer.streams and len(reducer.buckets) == 3
    for k in range(2):  # the update's first backward plain, its last one streamed
        stage.forward(k, SOURCE.inputs(k), version=0, targets=SOURCE.targets(k))
        reducer.on_backward(k)
        if k == 0:
            stage.backward(k)
        else:
            reducer.backward(k, None, version=1)
    sends = [i for i, (what, _) in enumerate(log) if what == "send"]
    first_layer = log.index(("final", "0.weight"))
    assert [log[i][1] for i in sends] == [reducer.wire_k(1, 0, 0), reducer.wire_k(1, 0, 1)]
    assert sends[0] < first_layer and sends[1] < first_layer  # sent while the backward still ran
    reducer.run(Action(0, Kind.SEND_REDUCE, 1))  # the last bucket, with the count and ids
    assert len([e for e in log if e[0] == "send"]) == 3
    want, count = replica_grads.read(stage)
    for b, names in enumerate(reducer.buckets):
        got = links.sent[reducer.wire_k(1, 0, b)]["grads"]
        assert sorted(got) == sorted(names)
        assert all(np.array_equal(got[n], want[n]) for n in names)  # the final sums, not partial ones
    assert int(links.sent[reducer.wire_k(1, 0)]["count"]) == count == 2


@pytest.mark.parametrize("name,accumulate", [("gpipe", 1), ("1f1b", 1), ("pipedream", 1), ("pipedream", 2),
                                             ("2bw", 1)])
@pytest.mark.parametrize("p", [1, 2])
def test_buckets_change_no_bit_of_a_replicated_run(monkeypatch, name, accumulate, p):
    def run(bucket_bytes):
        monkeypatch.setattr(replica_grads, "BUCKET_BYTES", bucket_bytes)
        schedule = ScheduleSpec(name, num_stages=p, microbatches=4, steps=3, replicas=2,
                                accumulate=accumulate).build()
        part = _part(p, split_backward=False)
        stages = [st for _ in range(2) for st in build_stages(part, Optimizer("momentum", lr=0.05))]
        return run_reference(schedule, stages=stages, source=SOURCE, replicas=2)

    one, bucketed = run(1 << 30), run(4000)
    assert one.losses == bucketed.losses
    for x, y in zip(one.state_dicts(), bucketed.state_dicts(), strict=True):
        assert x.keys() == y.keys() and all(np.array_equal(x[n], y[n]) for n in x)


def test_a_bucket_that_holds_other_parameters_is_refused(monkeypatch):
    monkeypatch.setattr(replica_grads, "BUCKET_BYTES", 9000)
    stage = _stage()
    reducer = ReplicaReducer(stage, _RecordingLinks([]), replica=0, replicas=2, hooks=None,
                             wait_follows=lambda: False)
    stage.forward(0, SOURCE.inputs(0), version=0, targets=SOURCE.targets(0))
    reducer.on_backward(0)
    stage.backward(0)
    reducer.run(Action(0, Kind.SEND_REDUCE, 0))
    own = reducer.links.sent
    grads = {**own[reducer.wire_k(0, 0, 0)]["grads"], **own[reducer.wire_k(0, 0, 1)]["grads"]}
    swapped = {reducer.wire_k(0, 1, 0): {"grads": grads},  # buckets 0 and 1 in one message
               reducer.wire_k(0, 1, 1): {"grads": {}},
               reducer.wire_k(0, 1): own[reducer.wire_k(0, 0)]}
    reducer.links.sent.update(swapped)
    with pytest.raises(ReplicaMismatch, match="bucket 0 of update 0 from replica 1 is not that bucket"):
        reducer.run(Action(0, Kind.RECV_REDUCE, 0))


def test_the_bucket_size_is_a_cluster_setting_checked_by_name(tmp_path):
    from pipetrain.config import ConfigError, from_dict
    from pipetrain.jobspec import JobSpec

    raw = {"run_dir": str(tmp_path), "model": {"entry": "models.mlp:build"},
           "data": {"train": "models.mlp:train_source"}}
    config = from_dict({**raw, "cluster": {"reduce_bucket_mib": 2}}, origin="job.toml")
    assert config.cluster.reduce_bucket_bytes == 2 << 20
    for bad in (0, -1.0, "big"):
        with pytest.raises(ConfigError, match="cluster.reduce_bucket_mib"):
            from_dict({**raw, "cluster": {"reduce_bucket_mib": bad}}, origin="job.toml")
    assert JobSpec.from_settings(reduce_bucket_mib=0.5).cluster.reduce_bucket_bytes == 1 << 19

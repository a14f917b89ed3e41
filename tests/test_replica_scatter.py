"""The scatter exchange of the replica reduction (runtime/replicas.py): replica q sums the q-th
d-th of every gradient and shares that sum, which moves 2 (d - 1) / d of the bytes the direct
exchange moves and gives the same bits (each element is still p0 + p1 + ... left to right)."""
from __future__ import annotations

import numpy as np
import pytest

from models import mlp
from pipetrain.optim import Optimizer
from pipetrain.partitioning import partition
from pipetrain.runtime import reference
from pipetrain.runtime.reference import build_stages, run_reference
from pipetrain.runtime.replicas import SCATTER_BYTES, ReplicaMismatch, ReplicaReducer, exchange_for, share
from pipetrain.schedule.actions import Action, Kind
from pipetrain.schedule.builders import ScheduleSpec
from pipetrain.stages import replica_grads
from test_replicas import _part as _jax_part  # the same JAX MLP, p = 1 or 2

SOURCE = mlp.source(512, microbatch_size=8, seed=3)
SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("pipedream", 1), ("pipedream", 2), ("2bw", 1)]


def _torch_part(p):
    pytest.importorskip("torch")
    from torch import nn

    from pipetrain.stages.torch_stage import TorchSequential

    layers = [lambda: nn.Linear(mlp.FEATURES, 48), nn.Tanh, lambda: nn.Linear(48, 47), nn.Tanh,
              lambda: nn.Linear(47, mlp.NUM_CLASSES)]  # 47: shares of unequal sizes
    model = TorchSequential(layers, loss=lambda y, t: nn.functional.cross_entropy(y, t.long()), seed=0,
                            split_backward=False)
    return partition(model, p, method="uniform", example_input=SOURCE.inputs(0))


def _run(part, name, *, p, d, exchange, accumulate=1, steps=3):
    schedule = ScheduleSpec(name, num_stages=p, microbatches=4, steps=steps, replicas=d,
                            accumulate=accumulate).build()
    stages = [st for _ in range(d) for st in build_stages(part, Optimizer("momentum", lr=0.05))]
    return run_reference(schedule, stages=stages, source=SOURCE, replicas=d, exchange=exchange)


def _assert_same_bits(x, y):
    assert x.losses == y.losses
    for a, b in zip(x.state_dicts(), y.state_dicts(), strict=True):
        assert a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)


def test_auto_is_direct_up_to_two_replicas_and_for_small_stages_and_scatter_otherwise():
    assert [exchange_for(d) for d in (1, 2, 3, 4, 8)] == ["direct", "direct", "scatter", "scatter", "scatter"]
    assert exchange_for(4, nbytes=SCATTER_BYTES - 1) == "direct" and exchange_for(4, nbytes=SCATTER_BYTES) == "scatter"
    assert exchange_for(2, nbytes=1 << 30) == "direct"
    assert exchange_for(4, "direct") == "direct" and exchange_for(2, "scatter") == "scatter"
    with pytest.raises(ValueError, match="one of auto, direct, scatter"):
        exchange_for(3, "ring")


@pytest.mark.parametrize("size", [0, 1, 2, 3, 5, 47, 48 * 47])
@pytest.mark.parametrize("d", [2, 3, 4])
def test_the_shares_cover_every_element_once_in_order(size, d):
    array = np.arange(size, dtype=np.float32)
    if size >= 2 and size % 2 == 0:
        array = array.reshape(2, -1)
    parts = [share(array, q, d) for q in range(d)]
    assert np.array_equal(np.concatenate(parts), array.reshape(-1))
    assert max(p.size for p in parts) - min(p.size for p in parts) <= 1
    assert all(np.shares_memory(p, array) for p in parts if p.size)  # views: nothing copied to send them


@pytest.mark.parametrize("name,accumulate", SCHEDULES)
@pytest.mark.parametrize("d", [3, 4])
def test_scatter_gives_the_bits_of_the_direct_exchange_jax(name, accumulate, d):
    part = _jax_part(2)
    direct = _run(part, name, p=2, d=d, exchange="direct", accumulate=accumulate)
    scatter = _run(part, name, p=2, d=d, exchange="scatter", accumulate=accumulate)
    _assert_same_bits(direct, scatter)
    states = [st.state_dict() for st in scatter.replica_stages]
    assert len(states) == 2 * d
    for s in range(2):  # every replica of a stage holds the same bits
        for r in range(1, d):
            assert all(np.array_equal(states[s][n], states[r * 2 + s][n]) for n in states[s])


@pytest.mark.parametrize("name,accumulate", SCHEDULES)
@pytest.mark.parametrize("p", [1, 2])
def test_scatter_gives_the_bits_of_the_direct_exchange_torch_with_streamed_buckets(monkeypatch, name,
                                                                                     accumulate, p):
    monkeypatch.setattr(replica_grads, "BUCKET_BYTES", 700)  # several buckets, sent during the backward
    part = _torch_part(p)
    stage = build_stages(part, Optimizer("sgd", lr=0.1))[-1]
    assert len(replica_grads.buckets(stage)) >= 2
    _assert_same_bits(_run(part, name, p=p, d=3, exchange="direct", accumulate=accumulate),
                      _run(part, name, p=p, d=3, exchange="scatter", accumulate=accumulate))


def test_scatter_sends_each_replica_2_d_minus_1_over_d_of_the_bytes(monkeypatch):
    sent: dict[str, dict[int, int]] = {"direct": {}, "scatter": {}}
    send = reference._Links.send

    def counted(self, kind, k, version, tree, *, wait_follows=False, to=None):
        if kind is Kind.SEND_REDUCE:
            peers = 1 if to is not None else self.replicas - 1
            nbytes = sum(np.asarray(g).nbytes for g in tree["grads"].values()) * peers
            sent[mode][self.stage] = sent[mode].get(self.stage, 0) + nbytes
        return send(self, kind, k, version, tree, wait_follows=wait_follows, to=to)

    monkeypatch.setattr(reference._Links, "send", counted)
    part, d = _jax_part(1), 4
    for mode in ("direct", "scatter"):
        _run(part, "1f1b", p=1, d=d, exchange=mode, steps=2)
    grad_bytes = sum(g.nbytes for g in replica_grads.read(build_stages(part, Optimizer())[0])[0].values())
    for r in range(d):
        assert sent["direct"][r] == 2 * (d - 1) * grad_bytes  # two updates, d - 1 whole parts each
        assert abs(sent["scatter"][r] - 2 * 2 * (d - 1) / d * grad_bytes) <= 2 * 2 * d * 4 * 8  # (rounding)


def test_fit_takes_the_exchange_and_either_gives_the_same_run():
    from pipetrain.api import fit

    part = _jax_part(2)
    kw = dict(executor="reference", progress=False, schedule="1f1b", microbatches=4, steps=2,
              optimizer=Optimizer("sgd", lr=0.1), replicas=3)
    direct = fit(part, SOURCE, reduce_exchange="direct", **kw)
    scatter = fit(part, SOURCE, reduce_exchange="scatter", **kw)
    assert direct.losses == scatter.losses and direct.history == scatter.history


class _Links:
    """Two replicas' worth of mail for one reducer under test: what it sends, and what its
    peers are made to have sent it."""
    received_are_fresh = True

    def __init__(self):
        self.sent: list[tuple[int, int | None, dict]] = []
        self.inbox: dict[int, dict] = {}

    def ready(self, kind, k):
        return k in self.inbox

    def send(self, kind, k, version, tree, *, wait_follows=False, to=None):
        self.sent.append((k, to, tree))

    def recv(self, kind, k):
        return self.inbox.pop(k)


def _reducer_after_one_backward(d=3, replica=1):
    stage = build_stages(_jax_part(1), Optimizer("sgd", lr=0.1))[0]
    stage.forward(0, SOURCE.inputs(0), version=0, targets=SOURCE.targets(0))
    stage.backward(0)
    links = _Links()
    reducer = ReplicaReducer(stage, links, replica=replica, replicas=d, hooks=_Ledger(), wait_follows=lambda: False,
                             exchange="scatter")
    reducer.on_backward(0)
    return stage, links, reducer


class _Ledger:
    def __init__(self):
        self.reduced = {}

    def on_reduced(self, v, ids):
        self.reduced[v] = ids


def test_each_peer_gets_its_own_share_and_r_puts_the_shares_sums_together():
    d = 3
    stage, links, reducer = _reducer_after_one_backward(d=d, replica=1)
    own, _ = replica_grads.read(stage)
    reducer.run(Action(0, Kind.SEND_REDUCE, 0))
    assert sorted(to for _, to, _ in links.sent) == [0, 2]
    for k, to, tree in links.sent:
        assert k == reducer.wire_k(0, 1)
        assert all(np.array_equal(g, share(own[n], to, d)) for n, g in tree["grads"].items())
    # The peers' parts of share 1: replica r's gradients are (r + 1) x this one's.
    for r in (0, 2):
        links.inbox[reducer.wire_k(0, r)] = {"grads": {n: (r + 1) * share(g, 1, d) for n, g in own.items()},
                                             "count": np.asarray(1, np.int64), "ids": np.asarray([0], np.int64)}
    links.sent.clear()
    assert reducer.ready(0) and not reducer.ready_to_reduce(0)
    reducer.run(Action(0, Kind.RECV_REDUCE, 0))
    ((k, to, tree),) = links.sent  # this share's sum, to every other replica
    assert k == reducer.wire_k(0, 1, summed=True) and to is None
    for n, g in tree["grads"].items():
        want = share(own[n], 1, d)
        assert np.array_equal(g, (want * 1 + want) + 3 * want)  # replica order: 1x, 2x (own), 3x
    for r in (0, 2):
        links.inbox[reducer.wire_k(0, r, summed=True)] = {"grads": {n: np.full_like(share(g, r, d), r + 10)
                                                                    for n, g in own.items()}}
    assert reducer.ready_to_reduce(0)
    reducer.run(Action(0, Kind.REDUCE, 0))
    total, count = replica_grads.read(stage)
    assert count == 3 and reducer.hooks.reduced[0] == [0, 1, 2]
    for n, g in total.items():
        assert np.array_equal(share(g, 0, d), np.full_like(share(g, 0, d), 10))
        assert np.array_equal(share(g, 1, d), np.asarray(tree["grads"][n]))
        assert np.array_equal(share(g, 2, d), np.full_like(share(g, 2, d), 12))


def test_a_share_or_a_sum_of_the_wrong_size_is_refused_naming_the_replica_and_parameter():
    d = 3
    stage, links, reducer = _reducer_after_one_backward(d=d, replica=0)
    own, _ = replica_grads.read(stage)
    reducer.run(Action(0, Kind.SEND_REDUCE, 0))
    for r in (1, 2):  # replica 2 sends its whole part instead of share 0
        grads = {n: (share(g, 0, d) if r == 1 else g) for n, g in own.items()}
        links.inbox[reducer.wire_k(0, r)] = {"grads": grads, "count": np.asarray(1, np.int64),
                                             "ids": np.asarray([0], np.int64)}
    with pytest.raises(ReplicaMismatch, match="from replica 2: .* is float32"):
        reducer.run(Action(0, Kind.RECV_REDUCE, 0))

    stage, links, reducer = _reducer_after_one_backward(d=d, replica=0)
    reducer.run(Action(0, Kind.SEND_REDUCE, 0))
    for r in (1, 2):
        links.inbox[reducer.wire_k(0, r)] = {"grads": {n: share(g, 0, d) for n, g in own.items()},
                                             "count": np.asarray(1, np.int64), "ids": np.asarray([0], np.int64)}
    reducer.run(Action(0, Kind.RECV_REDUCE, 0))
    name = sorted(own)[0]
    for r in (1, 2):
        sums = {n: share(g, r, d).copy() for n, g in own.items()}
        if r == 2:
            sums[name] = sums[name][:-1]
        links.inbox[reducer.wire_k(0, r, summed=True)] = {"grads": sums}
    with pytest.raises(ReplicaMismatch, match=f"replica 2's sum of its share of {name}"):
        reducer.run(Action(0, Kind.REDUCE, 0))


def test_the_exchange_is_a_cluster_setting_checked_by_name(tmp_path):
    from pipetrain.config import ConfigError, from_dict
    from pipetrain.jobspec import JobSpec

    raw = {"run_dir": str(tmp_path), "model": {"entry": "models.mlp:build"},
           "data": {"train": "models.mlp:train_source"}}
    assert from_dict({**raw, "cluster": {"reduce_exchange": "scatter"}}, origin="job.toml").cluster.reduce_exchange \
        == "scatter"
    with pytest.raises(ConfigError, match="cluster.reduce_exchange"):
        from_dict({**raw, "cluster": {"reduce_exchange": "ring"}}, origin="job.toml")
    assert JobSpec.from_settings(reduce_exchange="direct").cluster.reduce_exchange == "direct"

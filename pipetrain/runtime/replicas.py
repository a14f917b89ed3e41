"""The replica actions of one stage (``schedule/replicas.py``), for ``StageProgram``.

Keyed by the update version v. ``SEND_R v`` reads the stage's accumulated
gradient sums and their count (``stages/replica_grads.py``) and sends them,
with the local ids of the micro-batches they hold, to every other replica of
this stage; on the wire each part is numbered by v and its sender's
replica r, so the d - 1 parts of one update never collide. ``RECV_R v`` takes
the others' parts, each checked before it is used: the same parameter names,
shapes and dtypes as this replica's, the same count and the same micro-batch
ids (every replica runs the same schedule, so a part for other micro-batches
is a broken peer, not a timing). ``R v`` adds the d parts in replica order
and writes the sum and the total count back: the update then applies the
mean over the d replicas' micro-batches, and the job's ids those are
(``global_id``) go to ``Hooks.on_reduced``, the ledger's evidence.

Buckets (``replica_grads.buckets``): a stage whose backward reports each parameter's
sum as it becomes final (``backward_streaming``: torch stages) has its gradients cut
into groups of about 1 MiB, in the order the backward finishes them; the update's last
backward runs through ``backward`` here, which sends every bucket but the last to the
other replicas the moment it is complete, while the backward computes the rest (DDP's
overlap). ``SEND_R v`` sends what is left (every bucket not sent yet, and the last one
with the count and the ids). A part is then n_buckets messages, numbered
``2 * ((v * d + r) * n_buckets + b)``; each is checked to hold exactly its bucket's names.
The sums are the same arrays either way, so bucketing changes no bit of the result.

Exchanges (``exchange_for``). ``direct``: every replica sends its whole part to each of the
others and adds all d parts itself: one hop, (d - 1) x the stage's gradient bytes out and in.
``scatter`` (the default from d = 3): replica q owns the q-th d-th of every parameter's
flattened elements (``share``); each replica sends every other replica q only share q of its
part (in SEND_R, and the streamed buckets during the backward), RECV_R adds the d parts of
its own share in replica order and sends that sum to the others, and R puts the d shares'
sums together. Two hops, 2 (d - 1) / d x the bytes each way (a ring's, without its 2 (d - 1)
hops) and 1 / d of the additions. Each element is still ``p0 + p1 + ... + p(d-1)``, left to
right, so both exchanges give the same bits (tested), and R waits for the others' sums
(``ready_to_reduce``). On the wire a replica's shares are numbered as its parts, odd where they
are sums: ``2 * ((v * d + r) * n_buckets + b) + summed``.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from pipetrain.config import REDUCE_EXCHANGES as EXCHANGES
from pipetrain.errors import PipetrainError
from pipetrain.schedule.actions import Action, Kind
from pipetrain.schedule.replicas import global_id
from pipetrain.stages import replica_grads


class ReplicaMismatch(PipetrainError, ValueError):
    """A replica's part of a gradient sum that does not match this replica's (a broken peer:
    not worth a retry)."""


# The least gradient bytes per stage for which ``auto`` scatters. bench/reduce_engines.py, d = 3
# and 4 processes on 2 cores: scattered, 256 KiB took 1.25-1.44x the direct exchange's time (the
# second hop costs more than the bytes it saves), 1 MiB 0.81-1.0x, 4 MiB 0.70-0.79x; in a
# pipeline (bench/replicas.py, d = 4) the two were at parity with 1 MiB stages, and scatter
# gave 1.00-1.08x the throughput with 8 MiB stages.
SCATTER_BYTES = 4 << 20


def exchange_for(replicas: int, exchange: str = "auto", nbytes: int | None = None) -> str:
    """The exchange a stage's ``replicas`` use (see the module) for ``nbytes`` of gradients:
    ``auto`` is direct up to d = 2, where scatter moves the same bytes in two hops instead of one,
    and for stages under ``SCATTER_BYTES``; scatter otherwise."""
    if exchange not in EXCHANGES:
        raise ValueError(f"the replica exchange must be one of {', '.join(EXCHANGES)}, got {exchange!r}")
    if exchange == "auto":
        big = nbytes is None or nbytes >= SCATTER_BYTES
        return "scatter" if replicas >= 3 and big else "direct"
    return exchange


def bytes_sent(exchange: str, replicas: int, nbytes: int) -> int:
    """The gradient bytes one replica of a stage with ``nbytes`` of gradients sends per update:
    d - 1 whole parts (direct), or its d - 1 other shares and its own share's sum to d - 1 replicas."""
    d = replicas
    if d == 1:
        return 0
    return (d - 1) * nbytes if exchange == "direct" else 2 * nbytes * (d - 1) // d


def stage_exchange(stage: Any, replicas: int, exchange: str = "auto") -> str:
    """``exchange_for`` this stage's gradients: the same on every replica of the stage."""
    grads, _ = replica_grads.read(stage, copy=False)  # only their sizes
    return exchange_for(replicas, exchange, sum(g.nbytes for g in grads.values()))


def share(array: np.ndarray, q: int, d: int) -> np.ndarray:
    """Replica q's share of ``array`` under the scatter exchange: its flattened elements
    ``size * q // d`` up to ``size * (q + 1) // d`` (a view where ``array`` is contiguous)."""
    flat = array.reshape(-1)
    return flat[flat.size * q // d: flat.size * (q + 1) // d]


class ReplicaReducer:
    def __init__(self, stage: Any, links: Any, *, replica: int, replicas: int, hooks: Any,
                 wait_follows: Callable[[], bool], bucket_bytes: int | None = None, exchange: str = "auto"):
        if not 0 <= replica < replicas:
            raise ValueError(f"replica {replica} is not one of 0..{replicas - 1}")
        self.stage, self.links, self.hooks, self.wait_follows = stage, links, hooks, wait_follows
        self.replica, self.replicas = replica, replicas
        self.exchange = stage_exchange(stage, replicas, exchange)
        self.index = stage.spec.index
        self.buckets = replica_grads.buckets(stage, bucket_bytes=bucket_bytes)
        self._bucket_of = {name: b for b, names in enumerate(self.buckets[:-1]) for name in names}
        self._pending: list[int] = []  # local ids of the backwards since the last update
        self._parts: dict[int, dict[int, dict]] = {}  # v -> replica -> its part
        self._sent: dict[int, set[int]] = {}  # v -> the buckets its last backward sent already
        self._own_sums: dict[int, dict[str, np.ndarray]] = {}  # v -> this replica's share of the total (scatter)

    @property
    def streams(self) -> bool:
        """Whether the update's last backward should run through ``backward`` (it sends buckets)."""
        return len(self.buckets) > 1

    def peers(self) -> list[int]:
        return [r for r in range(self.replicas) if r != self.replica]

    def wire_k(self, version: int, replica: int, bucket: int | None = None, *, summed: bool = False) -> int:
        """The wire's k of replica ``replica``'s bucket ``bucket`` (default: the last, which carries
        the count and ids) of update ``version``, or of its share's sum (``summed``, scatter):
        unique per message of a generation."""
        n = len(self.buckets)
        return 2 * ((version * self.replicas + replica) * n + (n - 1 if bucket is None else bucket)) + summed

    def on_backward(self, k: int) -> None:
        self._pending.append(k)

    def ready(self, version: int) -> bool:
        """Whether RECV_R ``version`` would return at once (every other replica's part is here)."""
        return all(self.links.ready(Kind.RECV_REDUCE, self.wire_k(version, r, b))
                   for r in self.peers() for b in range(len(self.buckets)))

    def ready_to_reduce(self, version: int) -> bool:
        """Whether R ``version`` would return at once (scatter: every other share's sum is here)."""
        return self.exchange == "direct" or all(
            self.links.ready(Kind.RECV_REDUCE, self.wire_k(version, r, b, summed=True))
            for r in self.peers() for b in range(len(self.buckets)))

    def backward(self, k: int, grad_outputs: Any, *, version: int) -> Any:
        """Update ``version``'s last backward, sending each bucket but the last as soon as its sums are final."""
        left = [set(names) for names in self.buckets[:-1]]
        sent = self._sent.setdefault(version, set())

        def on_final(name: str) -> None:
            b = self._bucket_of.get(name)
            if b is not None and name in left[b]:
                left[b].discard(name)
                if not left[b]:
                    self._send_bucket(version, b)
                    sent.add(b)

        return self.stage.backward_streaming(k, grad_outputs, on_final)

    def _send_bucket(self, v: int, b: int, grads: dict | None = None, *, extra: dict | None = None) -> None:
        # Views, not copies: nothing changes a final sum after the update's last backward
        # (R v replaces the accumulator, see replica_grads.write), so the channel threads may send it as is.
        if grads is None:
            grads, _ = replica_grads.read(self.stage, copy=False, only=self.buckets[b])
        k, names = self.wire_k(v, self.replica, b), self.buckets[b]
        if self.exchange == "direct":
            tree = {"grads": {name: grads[name] for name in names}, **(extra or {})}
            self.links.send(Kind.SEND_REDUCE, k, v, tree, wait_follows=False)
            return
        for q in self.peers():  # scatter: replica q sums share q
            tree = {"grads": {name: share(grads[name], q, self.replicas) for name in names}, **(extra or {})}
            self.links.send(Kind.SEND_REDUCE, k, v, tree, wait_follows=False, to=q)

    def run(self, a: Action) -> None:
        v = a.k
        if a.kind is Kind.SEND_REDUCE:
            grads, count = replica_grads.read(self.stage, copy=False)
            ids = np.asarray(self._pending, dtype=np.int64)
            self._parts.setdefault(v, {})[self.replica] = {"grads": grads, "count": count, "ids": ids}
            sent = self._sent.pop(v, set())
            for b in range(len(self.buckets) - 1):
                if b not in sent:
                    self._send_bucket(v, b, grads)
            self._send_bucket(v, len(self.buckets) - 1, grads,
                              extra={"count": np.asarray(count, np.int64), "ids": ids})
        elif a.kind is Kind.RECV_REDUCE:
            own = self._parts[v][self.replica]
            if self.exchange == "scatter":  # the others' parts of this replica's share
                mine = {name: share(g, self.replica, self.replicas) for name, g in own["grads"].items()}
                own = {**own, "grads": mine}
            for r in self.peers():
                self._parts[v][r] = self._checked(self._received(v, r), own, sender=r, v=v)
            if self.exchange == "scatter":
                self._send_own_sum(v, own["grads"])
        else:  # REDUCE
            self._reduce(v)

    def _send_own_sum(self, v: int, mine: dict[str, np.ndarray]) -> None:
        """Scatter: add the d parts of this replica's share (``mine``: its own part of it), in replica
        order, and send the sum to the others."""
        order = [mine if r == self.replica else self._parts[v][r]["grads"] for r in range(self.replicas)]
        sums = {name: self._summed([part[name] for part in order]) for name in order[0]}
        self._own_sums[v] = sums
        for b, names in enumerate(self.buckets):
            tree = {"grads": {name: sums[name] for name in names}}
            # R comes next and waits for the others' sums: the compute thread may as well write its own.
            self.links.send(Kind.SEND_REDUCE, self.wire_k(v, self.replica, b, summed=True), v, tree,
                            wait_follows=True)

    def _received(self, v: int, r: int, *, summed: bool = False) -> Any:
        """Replica r's part of update v (or, ``summed``, its share's sum), its buckets put together
        (each checked to hold its own names)."""
        if len(self.buckets) == 1 and not summed:
            return self.links.recv(Kind.RECV_REDUCE, self.wire_k(v, r))
        grads: dict = {}
        for b, names in enumerate(self.buckets):
            tree = self.links.recv(Kind.RECV_REDUCE, self.wire_k(v, r, b, summed=summed))
            keys = {"grads", "count", "ids"} if b == len(self.buckets) - 1 and not summed else {"grads"}
            held = tree.get("grads") if isinstance(tree, dict) else None
            if not isinstance(held, dict) or set(tree) != keys or set(held) != set(names):
                got = sorted(held)[:4] if isinstance(held, dict) else type(tree).__name__
                raise ReplicaMismatch(f"stage {self.index} replica {self.replica}: bucket {b} of update {v} from "
                                      f"replica {r} is not that bucket ({got}, expected {sorted(names)[:4]}...)")
            grads.update(held)
            last = tree
        return {"grads": grads} if summed else {"grads": grads, "count": last["count"], "ids": last["ids"]}

    def _reduce(self, v: int) -> None:
        parts = self._parts.pop(v)
        order = [parts[r] for r in range(self.replicas)]  # replica order, whatever order they arrived in
        if self.exchange == "scatter":
            total = self._gathered(v, order[self.replica]["grads"])
        else:
            total = {name: self._summed([part["grads"][name] for part in order]) for name in order[0]["grads"]}
        replica_grads.write(self.stage, total, sum(p["count"] for p in order), copy=False)
        ids = sorted(global_id(int(k), replica=r, replicas=self.replicas)
                     for r, part in enumerate(order) for k in part["ids"])
        self._pending = []
        self.hooks.on_reduced(v, ids)

    def _gathered(self, v: int, grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Scatter: the total, put together from this replica's share's sum and the others' (each
        checked to be share r of the parameter in ``grads``, this replica's part: shape and dtype)."""
        sums = {self.replica: self._own_sums.pop(v)}
        for r in self.peers():
            sums[r] = self._received(v, r, summed=True)["grads"]
        total = {}
        for name, g in grads.items():
            out = np.empty(g.shape, g.dtype)
            for r in range(self.replicas):
                part, want = np.asarray(sums[r][name]), share(g, r, self.replicas)
                if part.shape != want.shape or part.dtype != g.dtype:
                    raise ReplicaMismatch(f"stage {self.index} replica {self.replica}: replica {r}'s sum of its "
                                          f"share of {name} for update {v} is {part.dtype}{list(part.shape)}, "
                                          f"expected {g.dtype}{list(want.shape)}")
                share(out, r, self.replicas)[...] = part
            total[name] = out
        return total

    def _summed(self, parts: list[np.ndarray]) -> np.ndarray:
        """``parts[0] + parts[1] + ... + parts[d-1]``, left to right (the same bits on every replica),
        into a received part's own buffer where the links say each message arrives in a buffer of its
        own (``received_are_fresh``: the transport decodes into one; the reference executor hands
        the sender's arrays over). This replica's part is a view of its accumulator and is never
        written; without a fresh writable part a new array takes the sum."""
        into, mine = None, parts[self.replica]
        if getattr(self.links, "received_are_fresh", False):
            into = next((p for r, p in enumerate(parts[:2]) if r != self.replica and p.flags.writeable
                         and not np.may_share_memory(p, mine)), None)
        total = np.add(parts[0], parts[1], out=into)
        for part in parts[2:]:
            np.add(total, part, out=total)
        return total

    def _checked(self, tree: Any, own: dict, *, sender: int, v: int) -> dict:
        where = f"stage {self.index} replica {self.replica}: the gradients for update {v} from replica {sender}"
        if not isinstance(tree, dict) or set(tree) != {"grads", "count", "ids"} or not isinstance(tree["grads"], dict):
            raise ReplicaMismatch(f"{where} are not a replica part ({type(tree).__name__} "
                                  f"{sorted(tree) if isinstance(tree, dict) else ''})")
        grads = tree["grads"]
        if set(grads) != set(own["grads"]):
            raise ReplicaMismatch(f"{where} name the parameters {sorted(grads)[:4]}..., this stage has "
                                  f"{sorted(own['grads'])[:4]}...")
        out = {}
        for name, mine in own["grads"].items():
            g = np.asarray(grads[name])
            if g.shape != mine.shape or g.dtype != mine.dtype:
                raise ReplicaMismatch(f"{where}: {name} is {g.dtype}{list(g.shape)}, this stage's is "
                                      f"{mine.dtype}{list(mine.shape)}")
            out[name] = g
        ids = np.asarray(tree["ids"])
        if ids.dtype != np.int64 or ids.shape != own["ids"].shape or not np.array_equal(ids, own["ids"]):
            raise ReplicaMismatch(f"{where} hold micro-batches {ids.tolist()[:8]}, this replica's hold "
                                  f"{own['ids'].tolist()[:8]} (every replica runs the same schedule)")
        count = np.asarray(tree["count"])
        if count.shape != () or int(count) != own["count"]:
            raise ReplicaMismatch(f"{where} count {count.tolist()} backwards, this replica's {own['count']}")
        return {"grads": out, "count": int(count), "ids": ids}


def renumbered(state: dict[str, np.ndarray], *, latest: int) -> dict[str, np.ndarray]:
    """A stage's checkpoint ``state`` with its weight versions renumbered so its latest is ``latest``.

    A job checkpointed with d replicas and resumed with d' has the same weights at the cut
    (micro-batch G of the job: the first G micro-batches applied), but each replica's schedule
    counts its own updates, G / d / (micro-batches per update) of them, so the same version has
    another number under d'. Every version moves by the same offset, and what it is numbered by in
    the state (``v{n}/...``, a predicting correction's ``corr/step/v{n}/...``, ``meta/versions``,
    ``meta/latest``) with it; the optimizer's own step count is the updates actually applied and
    stays.
    """
    import re

    if "meta/latest" not in state:
        raise NotImplementedError("replicas: a checkpoint without meta/latest cannot be resumed with another "
                                  "number of replicas")
    offset = latest - int(state["meta/latest"])
    if offset == 0:
        return state

    def moved(name: str) -> str:
        return re.sub(r"(^|/)v(\d+)/", lambda m: f"{m.group(1)}v{int(m.group(2)) + offset}/", name, count=1)

    out = {moved(name): value for name, value in state.items()}
    out["meta/latest"] = np.asarray(latest, np.int64)
    if "meta/versions" in out:
        out["meta/versions"] = np.asarray(state["meta/versions"], np.int64) + offset
    return out

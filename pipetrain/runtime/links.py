"""A stage's links to its neighbours over the transport, for ``StageProgram``.

Opening them is the rendezvous: the stage listens on its worker's host,
publishes its address on the control plane, then connects to the stage it
sends activations to (s + 1) and the one it sends gradients to (s - 1).
Every connection proves it holds the job's secret for this job, edge and
generation (the transport's handshake), and each inbound edge is bounded by
what it carries (``payload_bound``). A RECV waits in short slices so a stop
from the driver (recovery) or a vanished peer ends the wait promptly instead
of hanging the task.
"""
from __future__ import annotations

import math
import os
import queue
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

from pipetrain.errors import RetryableError
from pipetrain.runtime.transport import DEFAULT_MAX_PAYLOAD, Endpoint, MessageKind, TransportTimeout, wire
from pipetrain.runtime.tie_carry import carried_specs
from pipetrain.schedule.actions import Kind
from pipetrain.schedule.ties import CARRIED
from pipetrain.stages.tensors import to_numpy
from pipetrain.tree import flatten

# What each of the schedule's transfer actions moves on the wire.
_WIRE_KIND = {Kind.RECV_ACT: MessageKind.ACTIVATION, Kind.SEND_ACT: MessageKind.ACTIVATION,
              Kind.RECV_GRAD: MessageKind.GRADIENT, Kind.SEND_GRAD: MessageKind.GRADIENT}
_WIRE_KIND.update({Kind.RECV_EVAL: MessageKind.EVAL_ACTIVATION, Kind.SEND_EVAL: MessageKind.EVAL_ACTIVATION})
# The channel each send goes out on: eval activations share the forward one (its order and credits).
_CHANNEL_OF = {Kind.SEND_ACT: Kind.SEND_ACT, Kind.SEND_GRAD: Kind.SEND_GRAD, Kind.SEND_EVAL: Kind.SEND_ACT}
# Clipping's scalars (schedule/norms.py): partial sums go down with the gradients, the total up.
_WIRE_KIND.update({Kind.RECV_NORM: MessageKind.NORM_PARTIAL, Kind.SEND_NORM: MessageKind.NORM_PARTIAL,
                   Kind.RECV_TOTAL: MessageKind.NORM_TOTAL, Kind.SEND_TOTAL: MessageKind.NORM_TOTAL})
_CHANNEL_OF.update({Kind.SEND_NORM: Kind.SEND_GRAD, Kind.SEND_TOTAL: Kind.SEND_ACT})
# Tied weights (schedule/ties.py): the same directions, with tensors (their shapes checked by runtime/ties.py).
_WIRE_KIND.update({Kind.RECV_TIE: MessageKind.TIE_PARTIAL, Kind.SEND_TIE: MessageKind.TIE_PARTIAL,
                   Kind.RECV_TIED: MessageKind.TIE_TOTAL, Kind.SEND_TIED: MessageKind.TIE_TOTAL})
_CHANNEL_OF.update({Kind.SEND_TIE: Kind.SEND_GRAD, Kind.SEND_TIED: Kind.SEND_ACT})
# Replicated pipelines (schedule/replicas.py): each replica's part goes to every other replica of the stage.
_WIRE_KIND.update({Kind.SEND_REDUCE: MessageKind.REPLICA_PART, Kind.RECV_REDUCE: MessageKind.REPLICA_PART})


class Stopped(RetryableError, RuntimeError):
    """The driver stopped this generation (a recovery is under way)."""


class _Sender:
    """Sends on one channel in order, never making the compute thread wait.

    Asked to write inline (the stage would wait next anyway), with credit in
    hand and nothing queued, the compute thread writes the message itself: no
    thread hand-off, the lowest latency. Otherwise it hands the host copy to
    this channel's thread, which waits for credit and writes, and goes on
    computing. The hand-over queue holds at most the channel's ``credits``
    messages, so the stage still cannot run ahead of the schedule's memory
    bound. One thread per channel: a send blocked on the previous stage's
    credit never holds back one to the next stage.
    """

    def __init__(self, links: "TransportLinks", channel: Any):
        self.links, self.channel = links, channel
        self.pending: queue.Queue = queue.Queue(maxsize=max(1, channel.credits))
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"pipetrain-send-{channel.peer}", daemon=True)
        self.thread.start()

    def submit(self, item: tuple, *, inline: bool) -> None:
        # Asked to (the stage would wait next anyway), nothing queued or being
        # written (only this thread enqueues, so this stays true until it does)
        # and credit in hand: write it now.
        if inline and self.pending.unfinished_tasks == 0 and self.channel.in_flight < self.channel.credits:
            self.raise_error()
            self._put(*item)
            return
        deadline = time.monotonic() + self.links.timeout
        while True:
            self.raise_error()
            try:
                self.pending.put(item, timeout=self.links.wait_slice)
                return
            except queue.Full:
                self.links._check_stop_or_deadline(deadline, f"waiting to send {item[0].name} of micro-batch {item[1]}")

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while True:
            item = self.pending.get()
            if item is None:
                self.pending.task_done()
                return
            try:
                if self.error is None:
                    self._put(*item)
            except BaseException as e:  # handed to the compute thread at its next send or flush
                self.error = e
            finally:
                self.pending.task_done()

    def _put(self, wire_kind: Any, k: int, tree: Any, version: int) -> None:
        deadline = time.monotonic() + self.links.timeout
        while True:
            try:
                self.channel.put(wire_kind, k, tree, version=version, timeout=self.links.wait_slice)
                return
            except TransportTimeout:
                self.links._check_stop_or_deadline(deadline, f"waiting for credit to send {wire_kind.name} of "
                                                             f"micro-batch {k}")

    def drain(self) -> None:
        self.pending.join()
        self.raise_error()

    def close(self) -> None:
        self.pending.put(None)
        self.thread.join(timeout=self.links.timeout)


class TransportLinks:
    # Every message is decoded into a buffer of its own (wire.BufferPool), which its receiver may write.
    received_are_fresh = True

    def __init__(self, endpoint: Endpoint, *, to_next: Any, to_prev: Any, control: Any,
                 wait_slice: float = 0.5, timeout: float = 600.0, expect_input: Any = None,
                 to_replicas: dict | None = None):
        self.endpoint, self.control = endpoint, control
        self.wait_slice, self.timeout = wait_slice, timeout
        self.expect_input = expect_input
        self.senders = {kind: _Sender(self, channel)
                        for kind, channel in ((Kind.SEND_ACT, to_next), (Kind.SEND_GRAD, to_prev))
                        if channel is not None}
        # One sender per other replica of this stage (by replica index), so a slow one never holds back the rest.
        self.replica_senders = {r: _Sender(self, channel) for r, channel in (to_replicas or {}).items()}

    def ready(self, kind: Kind, k: int) -> bool:
        return self.endpoint.has(_WIRE_KIND[kind], k)

    def recv(self, kind: Kind, k: int) -> Any:
        expect = self.expect_input if kind in (Kind.RECV_ACT, Kind.RECV_EVAL) else None
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return self.endpoint.get(_WIRE_KIND[kind], k, timeout=self.wait_slice, expect=expect).tree
            except TransportTimeout:
                self._check_stop_or_deadline(deadline, f"waiting for {kind.value} of micro-batch {k}")

    def send(self, kind: Kind, k: int, version: int | None, tree: Any, *, wait_follows: bool = False,
             to: int | None = None) -> None:
        """Send ``tree``. ``to``: only to replica ``to`` of this stage (a SEND_R; by default a
        replica part goes to every other replica). With ``wait_follows`` (the stage's next action waits for
        a message that is not there yet) the compute thread writes it itself:
        the lowest latency, at no cost to a stage that would idle. Otherwise the
        channel's thread writes it while the stage computes on: a loopback write
        of a few hundred KiB takes the writer 0.1-0.5 ms on 2 busy cores."""
        # The host copy is made here, in the compute thread, so the stage's
        # arrays are never read while its next action runs.
        if kind is Kind.SEND_REDUCE:  # the same host copy to every other replica (read only)
            item = (_WIRE_KIND[kind], k, to_numpy(tree), version or 0)
            for r, sender in self.replica_senders.items():
                if to is None or r == to:
                    sender.submit(item, inline=wait_follows)
            return
        self.senders[_CHANNEL_OF[kind]].submit((_WIRE_KIND[kind], k, to_numpy(tree), version or 0),
                                               inline=wait_follows)

    def _check_stop_or_deadline(self, deadline: float, what: str) -> None:
        if self.control.stopped():
            raise Stopped(f"stage {self.endpoint.stage}: stopped by the driver while {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"stage {self.endpoint.stage}: gave up after {self.timeout:.0f} s {what}")

    def flush(self) -> None:
        """Wait until the neighbours took everything sent (before the task ends)."""
        for sender in [*self.senders.values(), *self.replica_senders.values()]:
            sender.drain()
            sender.channel.wait_acked(timeout=self.timeout)

    def close(self) -> None:
        for sender in [*self.senders.values(), *self.replica_senders.values()]:
            sender.close()


class _Endpoint(Endpoint):
    """The transport's endpoint, whose edges also carry the tie relay's messages
    (schedule/ties.py): partial sums from s + 1, the totals from s - 1, as clipping's
    scalars go. (A subclass, not an edit of endpoint.py, which is being reworked:
    its edge rule should name these kinds, and then this class goes.)"""

    def _adopt(self, link: Any, admitted: Any) -> None:
        super()._adopt(link, admitted)
        if admitted.sender in self.replica_peers:
            return
        link.carries += ((MessageKind.TIE_TOTAL,) if admitted.sender == self.stage - 1
                         else (MessageKind.TIE_PARTIAL,))


def _listen_host() -> str:
    try:
        from distributed import get_worker
        from distributed.comm.addressing import get_address_host

        return get_address_host(get_worker().address)
    except (ImportError, ValueError):
        return "127.0.0.1"


def _security() -> Any:
    # The worker's own Security: stage-to-stage traffic is TLS exactly when
    # the worker's connections to the scheduler are.
    try:
        from distributed import get_worker

        return get_worker().security
    except (ImportError, ValueError):
        return None


# How large one message on an edge may be (the transport refuses a frame
# declaring more before allocating anything for it; only a peer that passed
# the handshake gets that far, so this guards against a broken peer, not an
# outsider). The boundary specs fix every dimension but the free ones (None:
# batch, sequence length), so a tensor's bound is its fixed part times
# FREE_POSITIONS, 1M rows or positions per micro-batch (8 sequences of 128k
# tokens), clamped to [MIN_BOUND, MAX_BOUND]: a GPT-2-sized boundary
# (768 float32 wide) gets 3 GiB, a narrow one 64 MiB, a corrupt 2^40-byte
# length is refused either way. PIPETRAIN_MAX_MESSAGE_BYTES (set on the
# workers) replaces the rule, for bigger micro-batches.
FREE_POSITIONS = 1 << 20
MIN_BOUND = 64 << 20
MAX_BOUND = 8 << 30
BOUND_ENV = "PIPETRAIN_MAX_MESSAGE_BYTES"


def payload_bound(specs: Any) -> int:
    """The most payload bytes a message matching ``specs`` (a pytree of TensorSpec) may take."""
    if os.environ.get(BOUND_ENV):
        return int(os.environ[BOUND_ENV])
    if specs is None:
        return DEFAULT_MAX_PAYLOAD
    total = 0
    for spec in flatten(specs)[0]:
        fixed = math.prod(d for d in spec.shape if d is not None and d != -1)
        free = any(d is None or d == -1 for d in spec.shape)
        total += fixed * wire.np_dtype(spec.dtype).itemsize * (FREE_POSITIONS if free else 1) + wire.ALIGN
    return min(MAX_BOUND, max(MIN_BOUND, total))


def edge_bounds(job: Any) -> dict[int, int]:
    """Per sending stage: activations from s - 1 have the shapes of this stage's
    inputs, gradients from s + 1 those of its outputs; an edge that relays tied
    gradients (schedule/ties.py) also fits their message, and under pipedream,
    where the tied tensors ride on the activations and input gradients
    (runtime/tie_carry.py), those messages grow by them."""
    s = job.spec.index
    tied = job.ties.on_stage(s) if getattr(job, "ties", None) else None
    if _carries_ties(job):
        return {s - 1: payload_bound(carried_specs(tied, s - 1, job.input_specs)),
                s + 1: payload_bound(carried_specs(tied, s, job.output_specs))}
    bounds = {s - 1: payload_bound(job.input_specs), s + 1: payload_bound(job.output_specs)}
    if tied is not None:
        for sender, edge in ((s - 1, s - 1), (s + 1, s)):
            specs = tied.specs_across(edge)
            if specs:
                need = sum(spec.nbytes + wire.ALIGN for spec in specs.values())
                bounds[sender] = max(bounds[sender], need)
    return bounds


def _carries_ties(job: Any) -> bool:
    return bool(getattr(job, "ties", None)) and job.schedule.name in CARRIED


def _expected_input(job: Any) -> Any:
    """What activations from s - 1 match: the input specs, with the ties they carry under pipedream."""
    if not _carries_ties(job):
        return job.input_specs
    return carried_specs(job.ties.on_stage(job.spec.index), job.spec.index - 1, job.input_specs)


def task_bounds(job: Any, replica_bytes: int = 0) -> dict[int, int]:
    """``edge_bounds`` keyed by the senders' endpoint ids (replica r's stage s is r * p + s),
    with each other replica's part bounded by the stage's gradient bytes (``replica_bytes``)."""
    offset = job.task - job.spec.index
    bounds = {sender + offset: bound for sender, bound in edge_bounds(job).items()}
    for peer in job.replica_peers:
        bounds[peer] = replica_bytes
    return bounds


def _credits(job: Any) -> int:
    # Enough for the schedule's in-flight bound, so credit never stalls a
    # stage that the schedule lets run ahead; the user may ask for fewer.
    return job.credits or job.spec.num_stages + 1


@contextmanager
def open_links(job: Any, control: Any, *, replica_bytes: int = 0, replica_messages: int = 1
               ) -> Iterator[TransportLinks]:
    """The stage's links; its endpoint is named by its task id (``StageJob.task``: replica r's
    stage s is r * p + s), so one replica's stages are neighbours as a lone pipeline's are.
    ``replica_bytes``: how large one of its replicas' parts of a gradient sum may be;
    ``replica_messages``: how many messages (buckets) one part takes. A replica channel has
    credit for two updates' parts, so a replica one update ahead never waits for credit."""
    spec, task = job.spec, job.task
    senders = tuple(t for t, there in ((task - 1, not spec.is_first), (task + 1, not spec.is_last)) if there)
    endpoint = _Endpoint.start(stage=task, secret=job.secret, job_id=job.job_id, host=_listen_host(),
                              security=_security(), credits=_credits(job), generation=job.generation,
                              max_payload=task_bounds(job, replica_bytes), backend=job.transport,
                              replica_peers=job.replica_peers,
                              senders=senders + job.replica_peers if job.replica_peers else None)
    to_next = to_prev = links = None
    to_replicas: dict = {}
    try:
        control.publish_address(task, endpoint.address)
        if not spec.is_last:
            to_next = endpoint.connect(control.peer_address(task + 1, timeout=job.connect_timeout),
                                       peer_stage=task + 1)
        if not spec.is_first:
            to_prev = endpoint.connect(control.peer_address(task - 1, timeout=job.connect_timeout),
                                       peer_stage=task - 1)
        for peer in job.replica_peers:  # (replica r's stage s is task r * p + s)
            to_replicas[peer // spec.num_stages] = endpoint.connect(
                control.peer_address(peer, timeout=job.connect_timeout), peer_stage=peer,
                credits=max(_credits(job), 2 * replica_messages))
        links = TransportLinks(endpoint, to_next=to_next, to_prev=to_prev, control=control,
                               expect_input=_expected_input(job), to_replicas=to_replicas)
        yield links
        links.flush()
    finally:
        if links is not None:
            links.close()
        for channel in (to_next, to_prev, *to_replicas.values()):
            if channel is not None:
                channel.close()
        endpoint.close()

"""What a stage-to-stage message looks like in bytes, and back.

A message is a small header ``(generation, stage, kind, k, version)`` plus a
pytree of host arrays. On a byte stream one message is::

    prefix   16 bytes: magic "PTW1", meta length (u32), payload length (u64)
    meta     JSON: header, per-channel sequence number, tree structure,
             and per leaf [dtype, shape, nbytes]; at most MAX_META bytes
             (over tcp://, a layout's later messages carry a 40-byte
             binary meta instead: ``compact.py``)
    payload  the leaves' raw bytes, each starting on a 64-byte boundary;
             at most the receiving edge's bound (``max_payload``)

Frames flow only after the connection's handshake (``handshake.py``): a
stream that does not begin with a valid, MAC-checked OFFER never reaches
the frame parser. Even then every declared size is checked before anything
is allocated for it: the meta against MAX_META, the payload against the
edge's bound, and (``check_meta``) every leaf's nbytes against its dtype and
shape, their aligned sum against the declared payload length.

Arrays are never pickled: the sender hands the arrays' own memory to the
socket (``memoryview``), the receiver reads the payload straight into one
pooled buffer and builds every leaf as a numpy view on it
(``np.frombuffer``). Shape and dtype travel with every message, so successive
micro-batches may differ in shape. A pooled buffer goes back to its pool when
the last array built on it is dropped, so a steady pipeline reuses its
receive buffers instead of faulting in fresh pages for every micro-batch.
"""
from __future__ import annotations

import enum
import json
import struct
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipetrain.errors import PipetrainError
from pipetrain.runtime.transport.errors import Rejected
from pipetrain.tree import Tree, dtype_name, flatten, paths, unflatten

MAGIC = b"PTW1"
PREFIX = struct.Struct("<4sIQ")
ALIGN = 64  # every leaf starts 64-byte aligned in the receive buffer (SIMD, DLPack)
_PADDING = bytes(ALIGN)
# The meta is the header, the tree's structure and ~40 bytes per leaf: a
# boundary of a few tensors takes a few hundred bytes, and 64 KiB still
# holds ~1,500 leaves. It is read into the reader's fixed staging area, so a
# declared meta length never makes the receiver allocate (before this bound
# a prefix declaring 2 GiB grew the worker by that much).
MAX_META = 64 << 10


class MessageKind(enum.IntEnum):
    """What a message on the wire is (not to be confused with the schedule's action kinds,
    ``pipetrain.schedule.actions.Kind``: SEND_ACT and RECV_ACT both move an ACTIVATION)."""

    ACTIVATION = 1  # forward: stage i -> i+1
    GRADIENT = 2  # backward: stage i+1 -> i
    CONTROL = 3  # runtime's own messages (stop, checkpoint, ...); tree may be None
    ACK = 4  # credit return; sent by the transport itself
    BYE = 5  # the sender closes cleanly; sent by the transport itself
    NORM_PARTIAL = 6  # clipping (schedule/norms.py): a float64 partial squared norm, stage i -> i-1
    NORM_TOTAL = 7  # the whole model's squared norm, stage i -> i+1
    EVAL_ACTIVATION = 8  # forward-only evaluation (schedule/evaluation.py): stage i -> i+1
    TIE_PARTIAL = 9  # tied weights (schedule/ties.py): partial sums of tied gradients, stage i -> i-1
    TIE_TOTAL = 10  # the tied gradients' sums, stage i -> i+1
    REPLICA_PART = 11  # replicated pipelines (schedule/replicas.py): a replica's gradient sums, to each other one


@dataclass
class Message:
    """One message as the runtime sees it. ``stage`` is the sender's index."""

    kind: MessageKind
    k: int
    tree: Tree = None
    version: int = 0
    stage: int = -1
    generation: int = 0
    info: Any = None  # small JSON-able extra (control messages)
    nbytes: int = field(default=0, compare=False)


class BoundaryMismatch(PipetrainError, ValueError):
    """A tree crossing a stage boundary does not match the receiver's spec."""


def np_dtype(name: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes  # bfloat16, float8_*: installed with JAX

        return np.dtype(getattr(ml_dtypes, name))


def _is_numeric(dtype: np.dtype) -> bool:
    # ml_dtypes' types (bfloat16, float8_*) are kind "V" without fields
    return dtype.kind in "biufc" or (dtype.kind == "V" and dtype.names is None and dtype.subdtype is None
                                     and dtype.name != f"void{dtype.itemsize * 8}")


_DTYPES: dict[str, np.dtype] = {}  # dtype names seen in metas, checked once each


def _dtype(name: Any) -> np.dtype:
    dtype = _DTYPES.get(name) if type(name) is str else None
    if dtype is None:
        try:
            dtype = np_dtype(name)
        except Exception:  # noqa: BLE001 - any name numpy and ml_dtypes do not know
            raise Rejected(f"unknown dtype {str(name)[:40]!r}") from None
        if not _is_numeric(dtype) or dtype.itemsize == 0:
            raise Rejected(f"dtype {str(name)[:40]!r} is not a numeric array type")
        _DTYPES[name] = dtype
    return dtype


KIND_OF = {int(kind): kind for kind in MessageKind}
# Clipping's norm messages are one float64 scalar each: anything else is refused before any allocation.
SCALAR_KINDS = (int(MessageKind.NORM_PARTIAL), int(MessageKind.NORM_TOTAL))
ONE_FLOAT64 = [["float64", [], 8]]
MAX_ACKS = 1024  # = acks.MAX_ACKS (not imported: acks.py is the endpoint's, wire.py imports no transport module)


def check_meta(meta: Any) -> int:
    """The payload length ``meta``'s leaves take (aligned); ``Rejected`` unless it is a
    well-formed header whose every leaf's nbytes is its shape's size times its dtype's.
    (Once per message: written for speed, it costs about what parsing the JSON does.)"""
    try:
        if not (type(meta["g"]) is type(meta["s"]) is type(meta["k"]) is type(meta["v"]) is type(meta["seq"])
                is int and meta["kind"] in KIND_OF):
            raise Rejected("the frame's meta has a header field that is not an integer, or an unknown kind")
        end = 0
        for dtype, shape, nbytes in meta["leaves"]:
            size = _dtype(dtype).itemsize
            for d in shape:
                if type(d) is not int or d < 0:
                    raise Rejected(f"a leaf has shape {str(shape)[:60]}, not a list of sizes")
                size *= d
            if nbytes != size:
                raise Rejected(f"a leaf declares {str(nbytes)[:20]} bytes, but {dtype}{list(shape)} takes {size}")
            end += -end % ALIGN + size
        acks = meta.get("acks")  # credits riding on the frame (acks.py): a short list of sequence numbers
        if acks is not None and not (type(acks) is list and len(acks) <= MAX_ACKS
                                     and all(type(seq) is int for seq in acks)):
            raise Rejected(f"a frame's acks are {str(acks)[:60]}, not a list of at most {MAX_ACKS} integers")
        if meta["kind"] in SCALAR_KINDS and meta["leaves"] != ONE_FLOAT64:
            raise Rejected(f"a {KIND_OF[meta['kind']].name} frame must hold one float64 scalar, not "
                           f"{str(meta['leaves'])[:60]}")
        return end
    except (KeyError, TypeError, ValueError):  # not a dict, a field missing, a leaf not [dtype, shape, nbytes]
        raise Rejected("the frame's meta is not a header: {g, s, kind, k, v, seq, leaves: [[dtype, shape, "
                       "nbytes], ...]}") from None


def host_array(leaf: Any, where: str) -> np.ndarray:
    """A C-contiguous, native-endian numpy array of the leaf (no copy when it is one)."""
    array = np.asarray(leaf)
    if not array.flags.c_contiguous:  # (np.ascontiguousarray would make 0-d arrays 1-d)
        array = array.copy(order="C")
    if not _is_numeric(array.dtype):  # strings, objects, records: their name does not describe their bytes
        raise TypeError(f"tensor {where} has dtype {array.dtype}; only numeric arrays cross stage boundaries")
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return array


def encode(message: Message, seq: int) -> tuple[dict, list[np.ndarray]]:
    """The message's meta (JSON-able) and its leaves as flat uint8 arrays (views, no copy)."""
    leaves, structure = flatten(message.tree)
    try:
        arrays = [host_array(leaf, "") for leaf in leaves]
    except TypeError:  # not sendable: name the tensor (names are built only then: they cost per message)
        for leaf, name in zip(leaves, paths(message.tree)):
            host_array(leaf, name)
        raise
    meta = {
        "g": message.generation,
        "s": message.stage,
        "kind": int(message.kind),
        "k": message.k,
        "v": message.version,
        "seq": seq,
        "tree": structure,
        "leaves": [[dtype_name(a), list(a.shape), a.nbytes] for a in arrays],
    }
    if message.info is not None:
        meta["info"] = message.info
    return meta, [a.reshape(-1).view(np.uint8) for a in arrays]


def control_meta(kind: MessageKind, seq: int, generation: int = 0, stage: int = -1) -> dict:
    """Meta of a transport-internal message without payload (ACK, BYE)."""
    return {"g": generation, "s": stage, "kind": int(kind), "k": -1, "v": 0, "seq": seq, "tree": None, "leaves": []}


def leaf_offsets(meta: dict) -> tuple[list[int], int]:
    """Where each leaf starts in the payload, and the payload length."""
    offsets, end = [], 0
    for _, _, nbytes in meta["leaves"]:
        end += -end % ALIGN
        offsets.append(end)
        end += nbytes
    return offsets, end


_BARE_HEAD = b'{"g":%d,"s":%d,"kind":%d,"k":%d,"v":%d,"seq":%d,"tree":null,"leaves":[]}'


def frames(meta: dict, buffers: list[np.ndarray]) -> list[Any]:
    """The bytes of one message as a list to hand to a socket in order."""
    if not buffers and meta["tree"] is None and len(meta) == 8:  # an ACK or BYE: once per message, so formatted
        head = _BARE_HEAD % (meta["g"], meta["s"], meta["kind"], meta["k"], meta["v"], meta["seq"])
        return [PREFIX.pack(MAGIC, len(head), 0) + head]
    head = json.dumps(meta, separators=(",", ":")).encode()
    if len(head) > MAX_META:  # the receiver would drop it: say so here, where the tree is
        raise ValueError(f"{len(meta['leaves'])} leaves need a {len(head)}-byte meta, over the wire's "
                         f"{MAX_META}-byte limit: send fewer, larger tensors across a stage boundary")
    return payload_frames(head, meta, buffers)


def payload_frames(head: bytes, meta: dict, buffers: list[np.ndarray]) -> list[Any]:
    """The prefix, ``head`` (the meta's bytes, JSON or ``compact.py``'s) and ``meta``'s leaves, aligned."""
    offsets, total = leaf_offsets(meta)
    out: list[Any] = [PREFIX.pack(MAGIC, len(head), total) + head]
    position = 0
    for offset, buf in zip(offsets, buffers):
        if offset > position:
            out.append(_PADDING[: offset - position])
        if buf.nbytes:
            out.append(memoryview(buf))
        position = offset + buf.nbytes
    return out


def decode(meta: dict, payload: np.ndarray | list[np.ndarray]) -> Message:
    """Build the message on ``payload``: one uint8 buffer (stream) or one per leaf."""
    leaves, end, total = [], 0, 0
    if isinstance(payload, list):
        for piece, (dtype, shape, nbytes) in zip(payload, meta["leaves"]):
            piece = np.asarray(piece).reshape(-1).view(np.uint8)
            leaves.append(piece.view(_dtype(dtype)).reshape(tuple(shape)))
            total += nbytes
    else:
        for dtype, shape, nbytes in meta["leaves"]:
            end += -end % ALIGN
            leaves.append(payload[end : end + nbytes].view(_dtype(dtype)).reshape(tuple(shape)))
            end += nbytes
            total += nbytes
    return Message(
        kind=KIND_OF[meta["kind"]],
        k=meta["k"],
        tree=unflatten(meta["tree"], leaves),
        version=meta["v"],
        stage=meta["s"],
        generation=meta["g"],
        info=meta.get("info"),
        nbytes=total,
    )


class BufferPool:
    """Receive buffers by power-of-two size class, reused once no array uses them.

    ``take`` wraps a raw buffer in a fresh numpy array whose base is a
    memoryview; every leaf built on it keeps that memoryview alive, and a
    finalizer on it returns the raw buffer to the pool. Lock-free: a bounded
    deque per size class, since finalizers run in whichever thread drops the
    last array.
    """

    MIN_CLASS = 4096

    def __init__(self, *, keep_per_class: int = 4):
        self._keep = keep_per_class
        self._free: dict[int, deque] = {}
        self.allocated = 0
        self.reused = 0
        self._watching: dict[int, weakref.ref] = {}

    def take(self, nbytes: int) -> np.ndarray:
        size = max(self.MIN_CLASS, 1 << max(0, nbytes - 1).bit_length())
        free = self._free.setdefault(size, deque(maxlen=self._keep))
        try:
            raw = free.pop()
            self.reused += 1
        except IndexError:
            spare = np.empty(size + ALIGN, np.uint8)  # numpy aligns small arrays to 16 only
            start = -spare.ctypes.data % ALIGN
            raw = spare[start : start + size]
            self.allocated += 1
        buffer = np.frombuffer(memoryview(raw), np.uint8, count=nbytes)
        # A weakref with a callback (kept alive in _watching until it fires): a third of what
        # weakref.finalize costs per message.
        # (keyed by id: a weakref hashes as its referent, and a writable memoryview has no hash)
        ref = weakref.ref(buffer.base, lambda ref: (self._watching.pop(id(ref), None), free.append(raw)))
        self._watching[id(ref)] = ref
        return buffer


def _shape_fits(expected: tuple, got: tuple) -> bool:
    return len(expected) == len(got) and all(e is None or e == -1 or e == g for e, g in zip(expected, got))


def check_boundary(expected_specs: Tree, tree: Tree, *, sender_stage: int, receiver_stage: int) -> None:
    """Raise ``BoundaryMismatch`` naming both stages and the tensor when ``tree``
    does not match ``expected_specs`` (a pytree of ``TensorSpec``; a dimension
    of None or -1 accepts any size, e.g. a variable sequence length)."""
    where = f"stage {sender_stage} -> stage {receiver_stage}"
    expected_leaves, expected_structure = flatten(expected_specs)
    leaves, structure = flatten(tree)
    if structure != expected_structure:
        raise BoundaryMismatch(
            f"{where}: the tree has leaves {paths(tree)} but stage {receiver_stage} expects {paths(expected_specs)}"
        )
    for name, spec, leaf in zip(paths(tree), expected_leaves, leaves):
        shape, dtype = tuple(leaf.shape), dtype_name(leaf)
        if dtype != spec.dtype or not _shape_fits(tuple(spec.shape), shape):
            got = f"{dtype}[{','.join(map(str, shape))}]"
            raise BoundaryMismatch(
                f"{where}: tensor {name} is {got} but stage {receiver_stage} expects {spec}"
            )

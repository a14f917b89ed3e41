"""Compact frame headers on a tcp:// link: a micro-batch's meta in 40 bytes instead of JSON.

A stage sends the same tree, with the same dtypes and shapes, micro-batch
after micro-batch; only the header integers (k, version, sequence number,
the acks riding along) change. Encoding, parsing and checking that JSON meta
was a third of the Python work per small message (``bench/transport.py``).
So a link's writer names each tree layout once, in a JSON meta carrying
``"schema": id``, and sends every later message of that layout with a binary
meta instead::

    COMPACT  40 bytes: tag 0x01, kind (u8), generation, stage (i32),
             k, version, seq (i64), schema id, number of acks (u16)
    acks     one i64 per ack

(a JSON meta starts with ``{``, so the first byte tells the two apart).
Frames on one connection arrive in order, so the receiver has the layout
before the first compact frame that names it.

The receiver checks a layout once, with ``wire.check_meta``, when it is
named; a compact frame is then checked against it: its meta length against
its number of acks (at most ``wire``'s limit), its kind, its schema id
(named before on this link, else ``Rejected``), its payload length against
the layout's. At most ``MAX_SCHEMAS`` layouts per link on either side: a
sender whose shapes keep changing goes on with JSON metas, and a receiver
refuses a schema id beyond the bound. Messages with an ``info`` (control
messages) always go as JSON.
"""
from __future__ import annotations

import json
import struct
from typing import Any

from pipetrain.runtime.transport import wire
from pipetrain.runtime.transport.errors import Rejected

__all__ = ["COMPACT", "MAX_SCHEMAS", "LayoutTable", "LayoutWriter"]

COMPACT = struct.Struct("<BB2xiiqqqHH")
TAG = 1
MAX_SCHEMAS = 64
_ACK = struct.Struct("<q")
_HEAD_KEYS = ("g", "s", "kind", "k", "v", "seq", "tree", "leaves")


def _layout_key(meta: dict) -> Any:
    """A hashable name for ``meta``'s tree structure and leaves (dtype, shape, nbytes)."""
    tree = meta["tree"]
    structure = tree if type(tree) is str else json.dumps(tree, separators=(",", ":"))
    return structure, tuple((dtype, tuple(shape), nbytes) for dtype, shape, nbytes in meta["leaves"])


class LayoutWriter:
    """A link's sending side: ``frames(meta, buffers)`` like ``wire.frames``, compact where it can be.
    Not thread-safe: the link calls it under its write lock, so frames leave in the order they name layouts."""

    def __init__(self) -> None:
        self._ids: dict[Any, int] = {}

    def frames(self, meta: dict, buffers: list) -> list:
        if "info" in meta or not meta["leaves"] or len(meta) > 9 or (len(meta) == 9 and "acks" not in meta):
            return wire.frames(meta, buffers)
        key = _layout_key(meta)
        schema = self._ids.get(key)
        if schema is None:
            if len(self._ids) < MAX_SCHEMAS:
                self._ids[key] = len(self._ids)
                return wire.frames({**meta, "schema": self._ids[key]}, buffers)  # names the layout
            return wire.frames(meta, buffers)
        acks = meta.get("acks", ())
        try:
            head = COMPACT.pack(TAG, meta["kind"], meta["g"], meta["s"], meta["k"], meta["v"], meta["seq"], schema,
                                len(acks)) + b"".join(_ACK.pack(seq) for seq in acks)
        except struct.error:  # an integer beyond the compact fields' range: JSON carries any
            return wire.frames(meta, buffers)
        return wire.payload_frames(head, meta, buffers)


class LayoutTable:
    """A link's receiving side: the layouts its peer named, and the compact metas that use them."""

    def __init__(self) -> None:
        self._layouts: dict[int, tuple[Any, list, int]] = {}  # id -> (tree, leaves, payload length)

    def named(self, meta: dict, payload_len: int) -> None:
        """Remember the layout of a checked JSON meta that names one (``"schema"``)."""
        schema = meta.get("schema")
        if schema is None:
            return
        if type(schema) is not int or not 0 <= schema < MAX_SCHEMAS:
            raise Rejected(f"a frame names layout {str(schema)[:20]}, not an id below {MAX_SCHEMAS}")
        self._layouts[schema] = (meta["tree"], meta["leaves"], payload_len)

    def meta(self, head: memoryview, payload_len: int) -> dict:
        """The meta of a compact frame (``head``: its meta bytes), checked; ``Rejected`` if it is not one."""
        if len(head) < COMPACT.size:
            raise Rejected(f"a compact frame's meta has {len(head)} bytes, under the header's {COMPACT.size}")
        tag, kind, g, s, k, v, seq, schema, n_acks = COMPACT.unpack_from(head)
        if tag != TAG or kind not in wire.KIND_OF:
            raise Rejected(f"a compact frame's meta has tag {tag} and kind {kind}: not a pipetrain header")
        if len(head) != COMPACT.size + n_acks * _ACK.size or n_acks > wire.MAX_ACKS:
            raise Rejected(f"a compact frame's meta has {len(head)} bytes for {n_acks} acks (at most "
                           f"{wire.MAX_ACKS}, {_ACK.size} bytes each)")
        layout = self._layouts.get(schema)
        if layout is None:
            raise Rejected(f"a compact frame uses layout {schema}, which this link never named")
        tree, leaves, needed = layout
        if needed != payload_len:
            raise Rejected(f"a compact frame's layout {schema} takes {needed} bytes but its prefix says "
                           f"{payload_len}")
        if kind in wire.SCALAR_KINDS and leaves != wire.ONE_FLOAT64:
            raise Rejected(f"a {wire.KIND_OF[kind].name} frame must hold one float64 scalar, not {str(leaves)[:60]}")
        meta = dict(zip(_HEAD_KEYS, (g, s, kind, k, v, seq, tree, leaves)))
        if n_acks:
            meta["acks"] = [seq for (seq,) in _ACK.iter_unpack(head[COMPACT.size:])]
        return meta

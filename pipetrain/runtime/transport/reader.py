"""Parsing the wire framing off a byte stream, straight into pooled buffers.

The two stream backends' links (``stream.SocketLink`` over tcp://,
``tls.TlsLink`` over tls://) each own a ``FrameReader``; the ``dask`` backend
leaves framing to distributed.comm. The frame format is ``wire.py``'s.
"""
from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np

from pipetrain.runtime.transport import compact, wire
from pipetrain.runtime.transport.errors import Rejected

__all__ = ["FrameReader"]

_EMPTY = np.empty(0, np.uint8)  # the payload of a message that has none


class FrameReader:
    """Parses wire frames from a byte stream, payloads straight into pooled buffers.

    The owner asks ``buffer()`` where the next bytes go, reads into it, and
    reports ``consumed(n)``: headers land in a small staging area, a payload's
    bytes beyond what staging already holds are read directly into its buffer.
    Every declared size is checked before anything is allocated for it
    (``Rejected``, which ends the link): the meta against ``wire.MAX_META``
    (so it always fits in staging), the payload against ``max_payload``, the
    leaves against both (``wire.check_meta``; a compact meta against the
    layout its link named, ``compact.py``).
    """

    STAGING = 256 * 1024
    assert STAGING >= wire.PREFIX.size + wire.MAX_META

    def __init__(self, pool: wire.BufferPool, deliver: Callable[[dict, np.ndarray], None], *, max_payload: int):
        self._pool, self._deliver = pool, deliver
        self.max_payload = max_payload
        self._staging = memoryview(bytearray(self.STAGING))
        self._filled = 0
        self._payload: np.ndarray | None = None  # message being read into its pooled buffer
        self._payload_view: memoryview | None = None
        self._payload_got = 0
        self._payload_meta: dict | None = None
        self._layouts = compact.LayoutTable()  # what the peer's compact metas refer to

    def buffer(self) -> memoryview:
        if self._payload_view is not None:
            return self._payload_view[self._payload_got :]
        return self._staging[self._filled :]

    def consumed(self, nbytes: int) -> None:
        if self._payload_view is not None:
            self._payload_got += nbytes
            if self._payload_got == len(self._payload_view):
                meta, payload = self._payload_meta, self._payload
                self._payload = self._payload_view = self._payload_meta = None
                self._deliver(meta, payload)
            return
        self._filled += nbytes
        self._parse_staging()

    def _refuse(self, magic: bytes, meta_len: int, payload_len: int) -> None:
        if magic != wire.MAGIC:
            raise Rejected(f"bad magic {bytes(magic)!r}: not a pipetrain frame")
        if meta_len > wire.MAX_META:
            raise Rejected(f"a frame declares a {meta_len}-byte meta, over the {wire.MAX_META}-byte limit")
        if payload_len > self.max_payload:
            raise Rejected(f"a frame declares a {payload_len}-byte payload, over this edge's bound of "
                           f"{self.max_payload} bytes")

    def _parse_staging(self) -> None:
        view, position = self._staging, 0
        while self._filled - position >= wire.PREFIX.size:
            magic, meta_len, payload_len = wire.PREFIX.unpack_from(view, position)
            if magic != wire.MAGIC or meta_len > wire.MAX_META or payload_len > self.max_payload:
                self._refuse(magic, meta_len, payload_len)
            head_end = position + wire.PREFIX.size + meta_len
            if head_end > self._filled:
                break  # the rest of the meta is still on its way (it fits: STAGING > MAX_META)
            head = view[position + wire.PREFIX.size : head_end]
            if meta_len and head[0] == compact.TAG:  # a layout this link named before (compact.py)
                meta = self._layouts.meta(head, payload_len)
            else:
                try:
                    meta = json.loads(bytes(head))
                except (ValueError, RecursionError):
                    raise Rejected("a frame's meta is not valid JSON") from None
                needed = wire.check_meta(meta)
                if needed != payload_len:
                    raise Rejected(f"a frame's leaves take {needed} bytes but its prefix declares {payload_len}")
                self._layouts.named(meta, payload_len)
            payload = self._pool.take(payload_len) if payload_len else _EMPTY
            have = min(payload_len, self._filled - head_end)
            if have:
                payload[:have] = view[head_end : head_end + have]
            position = head_end + have
            if have < payload_len:  # the rest goes straight into the pooled buffer
                self._payload, self._payload_view = payload, memoryview(payload)
                self._payload_got, self._payload_meta = have, meta
                break
            self._deliver(meta, payload)
        rest = self._filled - position
        if rest and position:
            view[:rest] = bytes(view[position : self._filled])
        self._filled = rest

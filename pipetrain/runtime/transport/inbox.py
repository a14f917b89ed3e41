"""A stage's inbox: what it received and has not taken yet, at most one per (kind, k).

``Endpoint`` (``endpoint.py``) files every admitted, current-generation message
here and ``get`` takes from it. The inbox also remembers which ids were
taken in this generation, so that a second message for a (kind, k) that is
buffered, or for one already taken, is refused (``file``) instead of
displacing the real one or being used twice. Not thread-safe: the endpoint
holds its lock around every call.
"""
from __future__ import annotations

import bisect
import itertools
from typing import Any

from pipetrain.runtime.transport.wire import Message, MessageKind

__all__ = ["Inbox"]


class _Taken:
    """The micro-batch ids of one kind taken in this generation, as sorted disjoint
    runs [start, end): a pipeline takes them nearly in order, so this stays a
    handful of runs however long the job runs."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def __contains__(self, k: int) -> bool:
        i = bisect.bisect_right(self.starts, k) - 1
        return i >= 0 and k < self.ends[i]

    def add(self, k: int) -> None:
        i = bisect.bisect_right(self.starts, k) - 1
        if i >= 0 and k < self.ends[i]:
            return
        extends_left = i >= 0 and self.ends[i] == k
        extends_right = i + 1 < len(self.starts) and self.starts[i + 1] == k + 1
        if extends_left and extends_right:
            self.ends[i] = self.ends.pop(i + 1)
            del self.starts[i + 1]
        elif extends_left:
            self.ends[i] = k + 1
        elif extends_right:
            self.starts[i + 1] = k
        else:
            self.starts.insert(i + 1, k)
            self.ends.insert(i + 1, k + 1)


class Inbox:
    """Buffered messages by (kind, k), each as (arrival, message, link, seq)."""

    def __init__(self) -> None:
        self._items: dict[tuple[MessageKind, int], tuple] = {}
        self._taken: dict[MessageKind, _Taken] = {}
        self._arrivals = itertools.count()

    def __contains__(self, key: tuple[MessageKind, int]) -> bool:
        return key in self._items

    def keys(self) -> list[tuple[MessageKind, int]]:
        return list(self._items)

    def file(self, message: Message, link: Any, seq: int) -> str | None:
        """Buffer ``message``; or, when that would be a protocol violation, say why (and keep it out)."""
        key = (message.kind, message.k)
        if key in self._items:
            return f"a second {message.kind.name} k={message.k} while the first is buffered"
        taken = self._taken.get(message.kind)
        if taken is not None and message.k in taken:
            return f"{message.kind.name} k={message.k} was already taken in this generation"
        self._items[key] = (next(self._arrivals), message, link, seq)
        return None

    def take(self, kind: MessageKind, k: int | None) -> tuple | None:
        """The item for (kind, k), or the earliest of ``kind`` when k is None; None if not there."""
        if k is None:
            keys = [key for key in self._items if key[0] == kind]
            if not keys:
                return None
            key = min(keys, key=lambda key: self._items[key][0])
        else:
            key = (kind, k)
            if key not in self._items:
                return None
        taken = self._taken.get(kind)
        if taken is None:
            taken = self._taken[kind] = _Taken()
        taken.add(key[1])
        return self._items.pop(key)

    def fence(self, generation: int) -> list[tuple]:
        """A new generation: drop (and return) the items older than it, forget what was taken."""
        self._taken.clear()
        stale = [key for key, item in self._items.items() if item[1].generation < generation]
        return [self._items.pop(key) for key in stale]

"""Who reads a plain tcp:// link: the loop thread, or the thread that waits for a message.

Handing every received frame from the loop thread to the compute thread cost
a thread wake-up per message (and the GIL passed between the two), most of
a small message's round trip. So the thread blocked in ``Endpoint.get``
reads its links' sockets itself, straight into the pooled buffers, while it
waits; the loop reads them only while nobody waits (a large activation still
arrives while the stage computes).

Ownership is kept by the kernel, not by hand-offs. Each link's socket is in
two epoll sets of its endpoint's ``Readiness``:

- the loop's, with ``EPOLLONESHOT``: when it fires the loop reads the link
  (under the link's ``read_lock``) and re-arms it;
- the waiter's, level-triggered, polled only by a thread inside ``get``.

A waiter ``claim``s every link (takes its ``read_lock``, disarms it in the
loop's set), polls its own set and reads what is ready, and on ``release``
gives each lock back and re-arms the loop. A loop wake-up that races a claim
finds the lock taken and does nothing: the claimer re-arms when it lets go.
No thread wakes another on the common path. Linux (epoll) only; elsewhere the
loop reads everything, as before (``available()``).
"""
from __future__ import annotations

import select
import threading
from typing import Any

__all__ = ["Readiness", "available"]


def available() -> bool:
    return hasattr(select, "epoll")


class Readiness:
    """The two epoll sets of one endpoint's plain tcp:// links. Made on the loop thread."""

    def __init__(self, loop: Any):
        self.loop = loop
        self.loop_thread = threading.get_ident()
        self._loop_set = select.epoll()
        self._wait_set = select.epoll()
        self._links: dict[int, Any] = {}  # fd -> link, every link not finished
        self._waited: set[int] = set()  # fds registered in the waiter's set
        self._claim = threading.Lock()  # one waiter reads at a time; others wait on the endpoint's condition
        loop.add_reader(self._loop_set.fileno(), self._loop_ready)

    def add(self, link: Any) -> None:
        """Start reading ``link`` (on the loop until a waiter claims it)."""
        # In the loop's set before a waiter can see it: a claim in between would find nothing
        # to disarm, and the loop's first wake-up would then find the link taken and pass.
        self._loop_set.register(link.fd, select.EPOLLIN | select.EPOLLONESHOT)
        self._links[link.fd] = link

    def remove(self, link: Any) -> None:
        """Stop watching ``link`` (from any thread; it is finished)."""
        if self._links.get(link.fd) is link:
            del self._links[link.fd]
            for epoll in (self._loop_set, self._wait_set):
                try:
                    epoll.unregister(link.fd)
                except (OSError, ValueError):  # not registered there, or the set is closed
                    pass
            self._waited.discard(link.fd)

    def close(self) -> None:  # on the loop thread, after every link finished
        self.loop.remove_reader(self._loop_set.fileno())
        self._loop_set.close()
        self._wait_set.close()

    # -- the loop thread
    def _loop_ready(self) -> None:
        for fd, _ in self._loop_set.poll(0):
            link = self._links.get(fd)
            if link is None or not link.read_lock.acquire(blocking=False):
                continue  # a waiter holds it: it re-arms the link when it lets go
            try:
                link.read_ready(limit=link.READS_PER_WAKEUP)
            finally:
                link.read_lock.release()
            self._arm(link)

    def _arm(self, link: Any) -> None:
        if not link.finished:
            try:
                self._loop_set.modify(link.fd, select.EPOLLIN | select.EPOLLONESHOT)
            except (OSError, ValueError):  # finished meanwhile
                pass

    # -- the waiting thread
    def claim(self) -> list | None:
        """Take every link's reads from the loop; None if another thread is waiting already."""
        if not self._claim.acquire(blocking=False):
            return None
        claimed = []
        for link in list(self._links.values()):
            link.read_lock.acquire()  # the loop holds it only while it reads
            claimed.append(link)
            try:
                if link.fd not in self._waited:
                    self._wait_set.register(link.fd, select.EPOLLIN)
                    self._waited.add(link.fd)
                # ONESHOT without EPOLLIN: a hang-up is reported once, not on every loop wake-up
                self._loop_set.modify(link.fd, select.EPOLLONESHOT)
            except (OSError, ValueError):  # finished meanwhile: nothing to read there
                pass
        return claimed

    def pump(self, claimed: list, timeout: float) -> None:
        """Wait up to ``timeout`` s for bytes on the claimed links and read all there is."""
        try:
            events = self._wait_set.poll(max(timeout, 0))
        except ValueError:  # closed: the endpoint is shutting down
            return
        if not events:
            return
        by_fd = {link.fd: link for link in claimed}
        for fd, _ in events:
            link = by_fd.get(fd)
            if link is not None and not link.finished:
                link.read_ready(limit=None)

    def release(self, claimed: list) -> None:
        for link in claimed:
            link.read_lock.release()  # before re-arming: a wake-up in between would find it taken
            self._arm(link)
        self._claim.release()

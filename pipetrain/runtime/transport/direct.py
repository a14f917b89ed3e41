"""Who reads a plain tcp:// link: the loop thread, or the thread that waits for a message.

Handing every received frame from the loop thread to the compute thread cost
a thread wake-up per message (and the GIL passed between the two), most of
a small message's round trip. So the thread blocked in ``Endpoint.get``
reads its links' sockets itself, straight into the pooled buffers, while it
waits; the loop reads them only while nobody waits (a large activation still
arrives while the stage computes).

Ownership is kept by the kernel, not by hand-offs. Each link's socket is in
the loop's epoll set of its endpoint's ``Readiness`` with ``EPOLLONESHOT``:
when it fires the loop reads the link (under the link's ``read_lock``) and
re-arms it.

A waiter ``claim``s the links that can carry the kind it waits for (an
activation comes only on the link from stage s - 1: one link, not all of
them): it takes each one's ``read_lock``, disarms it in the loop's set,
``poll``s their sockets (a ``select.poll`` made for the claim: no syscall to
set it up) and reads what is ready, and on ``release`` gives each lock back
and re-arms the loop. Every other link stays the loop's meanwhile. A loop
wake-up that races a claim finds the lock taken and does nothing: the
claimer re-arms when it lets go. No thread wakes another on the common path,
and a wait costs two ``epoll_ctl`` per link it claims (one before this:
two per link of the endpoint). Linux (epoll) only; elsewhere the loop reads
everything, as before (``available()``).
"""
from __future__ import annotations

import select
import threading
from typing import Any

__all__ = ["Claim", "Readiness", "available"]


def available() -> bool:
    return hasattr(select, "epoll")


class Claim:
    """The links one waiter reads, and the poll set of their sockets."""

    def __init__(self, links: list):
        self.links = links
        self.by_fd = {link.fd: link for link in links}
        self.poller = select.poll()
        for fd in self.by_fd:
            self.poller.register(fd, select.POLLIN)


class Readiness:
    """The loop's epoll set of one endpoint's plain tcp:// links, and who reads each. Made on the loop thread."""

    def __init__(self, loop: Any):
        self.loop = loop
        self.loop_thread = threading.get_ident()
        self._loop_set = select.epoll()
        self._links: dict[int, Any] = {}  # fd -> link, every link not finished
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
            try:
                self._loop_set.unregister(link.fd)
            except (OSError, ValueError):  # not registered there, or the set is closed
                pass

    def close(self) -> None:  # on the loop thread, after every link finished
        self.loop.remove_reader(self._loop_set.fileno())
        self._loop_set.close()

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
    def claim(self, kind: Any) -> Claim | None:
        """Take the reads of every link that carries ``kind`` from the loop; None if another
        thread is waiting already, or no link carries it yet (the loop files what comes)."""
        if not self._claim.acquire(blocking=False):
            return None
        links = [link for link in list(self._links.values()) if kind in getattr(link, "carries", ())]
        if not links:
            self._claim.release()
            return None
        for link in links:
            link.read_lock.acquire()  # the loop holds it only while it reads
            try:
                # ONESHOT without EPOLLIN: a hang-up is reported once, not on every loop wake-up
                self._loop_set.modify(link.fd, select.EPOLLONESHOT)
            except (OSError, ValueError):  # finished meanwhile: nothing to read there
                pass
        return Claim(links)

    def pump(self, claim: Claim, timeout: float) -> None:
        """Wait up to ``timeout`` s for bytes on the claimed links and read all there is."""
        events = claim.poller.poll(max(timeout, 0) * 1e3)
        for fd, _ in events:
            link = claim.by_fd.get(fd)
            if link is None:
                continue
            if link.finished:  # its socket is closing: poll would report it at once, every time
                claim.poller.unregister(fd)
                del claim.by_fd[fd]
                continue
            link.read_ready(limit=None)

    def release(self, claim: Claim) -> None:
        for link in claim.links:
            link.read_lock.release()  # before re-arming: a wake-up in between would find it taken
            self._arm(link)
        self._claim.release()

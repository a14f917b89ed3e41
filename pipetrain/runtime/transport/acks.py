"""Credits that ride on data: the acknowledgements an endpoint owes, deferred to its next send.

Taking a message (``Endpoint.get``) owes its sender a credit. A standalone
ACK frame for it costs a send here and, worse, a wake-up of a thread in the
sender's process just to read 80 bytes. A stage usually sends its next data
message to the same neighbour soon after (the echo of a ping-pong; 1f1b's
last stage: the gradient for the activation it took), so the credit waits,
and leaves with that message as its meta's ``"acks"`` (the sequence numbers
it returns, for the receiver's channel back to us).

A credit never waits long, and only where a message back is likely: it is
deferred only on an edge this endpoint also sends on (a channel to the same
stage and generation; otherwise it leaves at once), and what is owed leaves
as standalone ACK frames before this endpoint's next ``get`` (whether or not
it waits), before a send to any other peer, before a ``put`` blocks on
credit, in ``wait_acked`` and on ``close``. So a credit is late by at most
the stage's computation between two transport calls, and two stages cannot
wait on each other's withheld credits: whoever waits has sent what it owed.
"""
from __future__ import annotations

import threading
from typing import Any

__all__ = ["AckBook", "MAX_ACKS"]

# The most acks one data frame may carry (checked in wire.check_meta before use).
# What one endpoint can owe a peer is bounded by that peer's credits; this is generous.
MAX_ACKS = 1024


class AckBook:
    """Acks owed, by the inbound link whose messages were taken. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owed: dict[Any, list[int]] = {}  # link -> sequence numbers

    def owe(self, link: Any, seq: int) -> None:
        with self._lock:
            self._owed.setdefault(link, []).append(seq)

    def take_for(self, peer_stage: int, generation: int) -> tuple[tuple[Any, list[int]] | None,
                                                                  list[tuple[Any, list[int]]]]:
        """What rides on a message to stage ``peer_stage`` (the link from it of ``generation``,
        its seqs), and everything else owed, which the caller sends standalone now."""
        with self._lock:
            if not self._owed:
                return None, []
            riding = None
            rest = []
            for link, seqs in self._owed.items():
                admitted = link.admitted
                if (riding is None and admitted.sender == peer_stage and admitted.generation == generation
                        and len(seqs) <= MAX_ACKS):
                    riding = (link, seqs)
                else:
                    rest.append((link, seqs))
            self._owed = {}
        return riding, rest

    def take_all(self) -> list[tuple[Any, list[int]]]:
        with self._lock:
            owed, self._owed = list(self._owed.items()), {}
        return owed

"""Connections closed a moment ago: answer their stragglers with an ACK, not a reset.

A flow leaves the engine as soon as both FINs are acknowledged. The guest
does not know our ACK of its FIN arrived until it sees it: on a busy TCG guest
that ACK can reach it after its retransmission timer fired, and the guest
sends its FIN again. Without a memory of the connection that FIN belongs to
no flow, and the guest would get an RST for a connection that closed cleanly.
This table is the small part of TIME_WAIT (RFC 9293 3.6.1) vhostnet needs: the
final sequence numbers of recently closed 4-tuples, for a bounded time and
number, so a retransmitted FIN or ACK is answered with the final ACK.
"""

from __future__ import annotations

from collections import OrderedDict

Key = tuple[bytes, int, bytes, int]

LINGER_SECONDS = 60.0  # Linux's TIME_WAIT length
MAX_REMEMBERED = 4096  # oldest forgotten first; a forgotten straggler just gets the RST


class RecentlyClosed:
    """4-tuple -> (our final sequence number, the guest's), wire values, with an expiry."""

    def __init__(self, linger: float = LINGER_SECONDS, limit: int = MAX_REMEMBERED) -> None:
        self._linger = linger
        self._limit = limit
        self._entries: OrderedDict[Key, tuple[int, int, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def remember(self, key: Key, our_seq: int, their_seq: int, now: float) -> None:
        self._entries.pop(key, None)
        self._entries[key] = (our_seq, their_seq, now + self._linger)
        while len(self._entries) > self._limit:
            self._entries.popitem(last=False)

    def final_numbers(self, key: Key, now: float) -> tuple[int, int] | None:
        """(seq, ack) to answer a straggler of ``key`` with, or None if it is not remembered."""
        self._expire(now)
        entry = self._entries.get(key)
        return None if entry is None else entry[:2]

    def forget(self, key: Key) -> None:
        """A new connection (SYN) takes the 4-tuple over."""
        self._entries.pop(key, None)

    def _expire(self, now: float) -> None:
        # Entries are in expiry order (same linger for all), so only the head can be stale.
        while self._entries:
            key, (_, _, expiry) = next(iter(self._entries.items()))
            if expiry > now:
                return
            del self._entries[key]

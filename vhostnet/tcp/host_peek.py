"""The peek and discard half of ``TcpHost`` (vhostnet/tcp/host.py): host data for the guest.

Host -> guest data stays in the socket until the guest acknowledged it (see
``vhostnet.tcp.engine``): a ``Peek`` reads at an offset without consuming (SO_PEEK_OFF where
the kernel supports it for TCP, Linux 6.9 and later; otherwise the whole prefix is peeked and
sliced), a ``Discard`` drops what the guest acknowledged (one recv(MSG_TRUNC), no copy).

A Peek (the guest's whole window) is offered to the direct-peek hook first
(``set_direct_peek``: the TCP fast path peeks straight into the guest's RX ring in one
call); what it leaves is peeked here, ``PEEK_BUDGET`` bytes at most (the engine asks again
for the rest). The fast path also does a streaming flow's whole ACK round itself (discard and
the next direct peek in one call), and the round after its socket turned readable
(``set_direct_read``: the next direct peek without a Peek command), and tells the reader here
after it (``streamed``).

The reader (``TcpHost``'s readiness) follows every peek and discard: armed with SO_RCVLOWAT one
byte above what is already peeked after a peek came back short, stopped while the guest's
window is full (its ACK asks for more).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import IntEnum

from vhostnet.tcp._fast import discard_acked
from vhostnet.tcp.engine import TcpEngine
from vhostnet.tcp.flow import Discard, Peek
from vhostnet.tcp.host_sockets import HostSocket, peek_at, probe_peek_off, set_lowat
from vhostnet.tcp.sender import PEEK_BUDGET

log = logging.getLogger("vhostnet.tcp.host")


class DirectPeek(IntEnum):
    """How a direct peek (``set_direct_peek``) ended (the values of ext/tcp_fast_rx.pxi)."""

    RING_FULL = 0  # the guest's RX ring had no room for the rest
    DONE = 1  # everything asked for went to the guest
    DRAINED = 2  # the socket held no more
    EOF = 3  # the peer closed; nothing was delivered


DirectPeekHook = Callable[[int, int, int, int, float], "tuple[int, int] | None"]
DirectReadHook = Callable[[int, float], bool]


class PeekGlue:
    """``TcpHost``'s ``Peek`` and ``Discard`` executors and what follows them (a mixin: the
    sockets, the engine, the clock and the reader are ``TcpHost``'s)."""

    engine: TcpEngine
    clock: Callable[[], float]
    _sockets: dict[int, HostSocket]
    # SO_PEEK_OFF works on TCP sockets here (learnt from the first socket; read by the fast
    # path, which peeks only where it does).
    peek_off: bool | None = None
    _direct_peek: DirectPeekHook | None = None
    _direct_read: DirectReadHook | None = None

    # The reader's two moves (TcpHost's readiness half defines them).
    def _stop_reading(self, entry: HostSocket) -> None:
        raise NotImplementedError

    def _arm_entry(self, entry: HostSocket, already_peeked: int) -> None:
        raise NotImplementedError

    def set_direct_peek(self, hook: DirectPeekHook | None) -> None:
        """Offer every ``Peek`` to ``hook(flow_id, fd, offset, length, now)`` first (the fast
        path peeks straight into the guest's RX ring and tells the engine itself). It answers
        None (not taken: peek here), or (status, bytes delivered) with a ``DirectPeek`` status
        or -errno; after RING_FULL the rest is peeked here (up to PEEK_BUDGET). None: no hook."""
        self._direct_peek = hook

    def set_direct_read(self, hook: DirectReadHook | None) -> None:
        """Offer each readable event of a flow's socket to ``hook(flow_id, now)`` first: True,
        it did the engine's ``on_readable`` and the Peek that follows in one round itself (the
        fast path peeks the window's next bytes into the guest's RX ring and tells the engine
        and ``streamed``); False: the engine's way. None: no hook."""
        self._direct_read = hook

    def _peek(self, command: Peek) -> None:
        entry = self._sockets.get(command.flow_id)
        if entry is None:
            return
        flow_id, offset, length, now = command.flow_id, command.offset, command.length, self.clock()
        if self.peek_off is None:
            self.peek_off = probe_peek_off(entry.sock)
        direct = None
        if self._direct_peek is not None and self.peek_off:
            direct = self._direct_peek(flow_id, entry.fd, offset, length, now)
        delivered = 0
        if direct is None or direct[0] == DirectPeek.RING_FULL:
            # The Python way, for all of it or for what the guest's RX ring had no room for,
            # PEEK_BUDGET at a time (the engine asks again for the rest).
            if direct is not None:
                delivered = direct[1]
            want = min(length - delivered, PEEK_BUDGET)
            try:
                data, eof = (peek_at(entry.sock, self.peek_off, offset + delivered, want) if want > 0
                             else (b"", False))
            except OSError as error:
                self.engine.on_host_error(flow_id, error.errno or 0, now)
                return
            eof = eof and not delivered  # else the next peek finds it
            drained = len(data) < want
        else:
            status, delivered = direct
            if status < 0:
                self.engine.on_host_error(flow_id, -status, now)
                return
            data, eof = b"", status == DirectPeek.EOF
            drained = status != DirectPeek.DONE
        entry.peek_awaited = False
        if eof:
            self._stop_reading(entry)
            self.engine.on_host_eof(flow_id, now)
            return
        fin_next = self._reader_after_peek(entry, offset, delivered + len(data), drained)
        self.engine.on_peeked(flow_id, offset + delivered, data, now)
        if fin_next:
            self.engine.on_host_eof(flow_id, now)

    def _reader_after_peek(self, entry: HostSocket, offset: int, got: int,
                           drained: bool) -> bool:
        """The reader after a peek of ``got`` bytes at ``offset`` (``drained``: the socket held
        no more). True: the peer's FIN is next, the engine is told after the peek's answer."""
        entry.peeked_until = offset + got
        if drained and entry.peer_fin and got:
            # The FIN was in when the socket turned readable and this peek took all before
            # it: the EOF now, not after one more readable event (a reply and its close, the
            # end of most short connections, take one event).
            self._stop_reading(entry)
            return True
        if drained and (got or offset == 0):
            self._arm_entry(entry, entry.peeked_until)
        else:
            # The guest's window is full (its ACK asks for more), or woken with nothing new
            # (memory pressure keeps the socket readable): wait until the guest's ACK frees
            # queue space instead of spinning. (Mostly stopped already, in a download.)
            if entry.reading:
                self._stop_reading(entry)
            entry.rearm_on_discard = drained
        return False

    def _discard(self, command: Discard) -> None:
        entry = self._sockets.get(command.flow_id)
        if entry is None:
            return
        try:
            # One recv(MSG_TRUNC) of the whole length: TCP drops the bytes without copying.
            remaining = command.length - discard_acked(entry.fd, command.length)
        except OSError as error:
            self.engine.on_host_error(command.flow_id, error.errno or 0, self.clock())
            return
        self._discarded(command.flow_id, entry, command.length, remaining)

    def _discarded(self, flow_id: int, entry: HostSocket, length: int, missing: int) -> None:
        """The reader after ``length`` acknowledged bytes left the queue (``missing`` of them
        were not there)."""
        if missing:
            log.error("TCP flow %d: %d acknowledged bytes missing", flow_id, missing)
        entry.peeked_until = max(0, entry.peeked_until - length)
        if entry.rearm_on_discard:
            entry.rearm_on_discard = False
            self._arm_entry(entry, entry.peeked_until)
        elif entry.reading and entry.peeked_until + 1 != entry.lowat:
            set_lowat(entry, entry.peeked_until + 1)

    def streamed(self, flow_id: int, acked: int, dropped: int, offset: int,
                 direct: tuple[int, int] | None, now: float) -> None:
        """The fast path did a streaming flow's round itself (``TcpFastPath.stream_round``; the
        engine knows it already): ``dropped`` of the ``acked`` bytes discarded, then, unless
        ``direct`` is None, a direct peek at ``offset`` that answered ``direct`` (status,
        bytes delivered; as ``set_direct_peek``'s hook). The reader as after ``Discard`` and
        ``Peek``; EOF and errors go to the engine."""
        entry = self._sockets.get(flow_id)
        if entry is None:
            return
        if direct is None:
            self._discarded(flow_id, entry, acked, acked - dropped)
            return
        if dropped != acked:
            log.error("TCP flow %d: %d acknowledged bytes missing", flow_id, acked - dropped)
        status, delivered = direct
        entry.rearm_on_discard = entry.peek_awaited = False
        # The two common rounds of a download as ``_reader_after_peek`` answers them, without
        # its calls: the window filled, the reader stopped already; or (after a readable
        # socket) the socket ran dry, the reader armed: it waits past what is peeked now.
        if status == DirectPeek.DONE and not entry.reading:
            entry.peeked_until = offset + delivered
        elif status == DirectPeek.DRAINED and delivered and entry.reading and not entry.peer_fin:
            peeked = entry.peeked_until = offset + delivered
            if peeked + 1 != entry.lowat:
                set_lowat(entry, peeked + 1)
        elif status < 0:
            self.engine.on_host_error(flow_id, -status, now)
        elif status == DirectPeek.EOF:
            self._stop_reading(entry)
            self.engine.on_host_eof(flow_id, now)
        elif status == DirectPeek.RING_FULL:
            entry.peeked_until = offset + delivered  # the engine's Peek for the rest follows
        elif self._reader_after_peek(entry, offset, delivered, status != DirectPeek.DONE):
            self.engine.on_host_eof(flow_id, now)

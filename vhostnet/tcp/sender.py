"""Host -> guest: peek host data as the guest's window allows, send it, retransmit, FIN.

Data stays in the host socket until the guest acknowledges it (see
``vhostnet.tcp.engine``), so sending is a ``Peek`` command and its answer, and
retransmitting is a rewind of ``snd_nxt`` to ``snd_una`` and a new peek.
"""

from __future__ import annotations

from collections import deque

from vhostnet.stack.counters import Counters
from vhostnet.tcp.flow import Flow, Peek, Phase, TcpCommand, TcpTimeouts
from vhostnet.tcp.output import GuestOutput
from vhostnet.wire.tcp import ACK, FIN

# Upper bound of one Peek, so a huge guest window does not mean one huge read.
PEEK_BUDGET = 256 * 1024


class GuestSender:
    """The engine's sending half: what goes to the guest from the host socket, and when."""

    def __init__(self, tx: GuestOutput, stats: Counters, timeouts: TcpTimeouts,
                 commands: deque[TcpCommand]) -> None:
        self.tx = tx
        self.stats = stats
        self.timeouts = timeouts
        self.commands = commands

    def pump(self, flow: Flow, now: float) -> None:
        """Ask the glue for more host data if the guest's window has room."""
        if (
            flow.phase is not Phase.ESTABLISHED
            or flow.fin_sent
            or flow.peek_pending
            or not flow.host_readable
        ):
            return
        room = flow.snd_una + flow.snd_wnd - flow.snd_nxt
        if room <= 0:
            if flow.snd_nxt == flow.snd_una and flow.rto_at is None:
                flow.rto_at = now + flow.rto  # persist timer: probe the zero window
            return
        flow.peek_pending = True
        flow.peek_seq = flow.snd_nxt
        flow.peek_len = min(room, PEEK_BUDGET)
        self.commands.append(Peek(flow.flow_id, flow.snd_nxt - flow.snd_una, flow.peek_len))

    def send_host_data(self, flow: Flow, data: bytes | memoryview, now: float) -> None:
        self.tx.data(flow, data)
        self._sent(flow, len(data), now)

    def sent_elsewhere(self, flow: Flow, n: int, segments: int, large_segments: int,
                       now: float) -> None:
        """``n`` bytes from ``snd_nxt`` on reached the guest in ``segments`` segments
        (``large_segments`` of them for the guest to cut) without passing here: the fast
        path peeked them straight into its RX buffers."""
        self.stats.inc("tcp.segments_out", segments)
        if large_segments:
            self.stats.inc("tcp.gso_segments_out", large_segments)
        self._sent(flow, n, now)

    def _sent(self, flow: Flow, n: int, now: float) -> None:
        if flow.snd_nxt < flow.snd_max:
            self.stats.inc("tcp.retransmitted_bytes", min(n, flow.snd_max - flow.snd_nxt))
        flow.snd_nxt += n
        flow.snd_max = max(flow.snd_max, flow.snd_nxt)
        self.stats.inc("tcp.bytes_to_guest", n)
        if flow.rto_at is None:
            flow.rto_at = now + flow.rto

    def retransmit(self, flow: Flow, now: float) -> None:
        """Go back to the first unacknowledged byte; the data is still in the host socket."""
        self.stats.inc("tcp.retransmits")
        flow.dup_acks = 0
        flow.snd_nxt = flow.snd_una
        flow.rto_at = now + flow.rto
        if flow.fin_sent and flow.snd_una == flow.snd_max - 1:
            self.tx.emit(flow, FIN | ACK, seq=flow.send_seq(flow.snd_una))
            flow.snd_nxt = flow.snd_max
            return
        flow.host_readable = True
        if flow.peek_pending:
            flow.peek_seq = -1  # its answer would be for the old position
        else:
            self.pump(flow, now)

    def maybe_send_fin(self, flow: Flow, now: float) -> None:
        if (
            flow.host_eof
            and not flow.fin_sent
            and flow.phase is Phase.ESTABLISHED
            and flow.snd_una == flow.snd_max
        ):
            flow.snd_nxt = flow.snd_max
            self.tx.emit(flow, FIN | ACK, seq=flow.send_seq(flow.snd_nxt))
            flow.fin_sent = True
            flow.snd_nxt += 1
            flow.snd_max = flow.snd_nxt
            flow.rto_at = now + flow.rto
            flow.fin_at = now + self.timeouts.fin

    def retransmission_timeout(self, flow: Flow, now: float) -> bool:
        """The retransmission (or persist) timer fired; False: out of retries, give up."""
        timeouts = self.timeouts
        flow.rto = min(flow.rto * 2, timeouts.rto_max)
        if flow.snd_una == flow.snd_max and flow.phase is Phase.ESTABLISHED:
            # Nothing in flight: this is the persist timer of a zero guest window.
            if flow.snd_wnd == 0 and flow.host_readable:
                self.tx.emit(flow, ACK, seq=flow.send_seq(flow.snd_una - 1))
                flow.rto_at = now + flow.rto
            else:
                flow.rto_at = None
            return True
        flow.retries += 1
        if flow.retries > timeouts.max_retries:
            return False
        if flow.phase is not Phase.ESTABLISHED:
            self.stats.inc("tcp.retransmits")
            self.tx.syn(flow)
            flow.rto_at = now + flow.rto
            return True
        self.retransmit(flow, now)
        return True

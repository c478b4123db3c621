"""Host -> guest: peek host data as the guest's window allows, send it, retransmit, FIN.

Data stays in the host socket until the guest acknowledges it (see
``vhostnet.tcp.engine``), so sending is a ``Peek`` command and its answer, and
retransmitting is a rewind of ``snd_nxt`` to ``snd_una`` and a new peek.

The data segments are cut here as the guest's offloads allow (``segmenting``) and built
as whole Ethernet frames in one C pass (``data_frames``, the face of ``_frames`` from
ext/tcp_frames.pyx). The TCP fast path peeks straight into the guest's RX buffers with the
same cut and tells ``sent_elsewhere``.
"""

from __future__ import annotations

from collections import deque
from enum import IntEnum

from vhostnet.stack.counters import Counters
from vhostnet.tcp import _frames
from vhostnet.tcp.flow import Discard, Flow, Peek, Phase, TcpCommand, TcpTimeouts
from vhostnet.tcp.output import GuestOutput, is_ipv6
from vhostnet.wire.offload import DATA_VALID_WORD, MAX_TSO_PAYLOAD, tcp_data_word
from vhostnet.wire.tcp import ACK, CSUM_FULL, CSUM_NONE, CSUM_PARTIAL, FIN, segment_payload

# Upper bound of one Python peek (a bytes object, frames built in Python), so a huge guest
# window does not mean one huge read; a short answer below it means the socket ran dry.
PEEK_BUDGET = 256 * 1024
# Upper bound of one Peek command: the direct RX path peeks the guest's whole window straight
# into its RX ring in one call (one Python round per window, not per PEEK_BUDGET); the glue
# reads PEEK_BUDGET at a time of what it peeks itself.
WINDOW_PEEK_LIMIT = 8 << 20
# Ethernet, IP and TCP headers of every frame ``data_frames`` builds (no options), by family.
HEADERS_LEN: int = _frames.HEADERS_LEN
HEADERS6_LEN: int = _frames.HEADERS6_LEN


class L4Checksum(IntEnum):
    """How a segment's TCP checksum is left (the kernel's values, equal to ``vhostnet.wire.tcp``'s
    CSUM_* that the Python segment builder takes)."""

    FULL = _frames.CHECKSUM_FULL  # computed
    PARTIAL = _frames.CHECKSUM_PARTIAL  # the pseudo-header sum only: the guest completes it
    NONE = _frames.CHECKSUM_NONE  # zero: the guest was told the data is valid (DATA_VALID)


def data_frames(*, dst_mac: bytes, src_mac: bytes, src_ip: bytes, dst_ip: bytes, src_port: int,
                dst_port: int, seq: int, ack: int, window: int,
                data: bytes | bytearray | memoryview, seg_size: int, checksum: L4Checksum,
                mss: int) -> list[bytes | tuple[bytes, int]]:
    """``data`` as ACK segments of at most ``seg_size`` bytes (PSH on the last), the first at
    ``seq``, as the queue entries ``NetworkStack.send_ipv4_frames`` takes (a frame, or
    ``(frame, vnet word)`` when the guest is to complete or trust the L4 checksum).

    ``window`` is the raw window field (clamped to 0xFFFF); ``seq`` and ``ack`` are taken
    modulo 2**32. 4-byte addresses make IPv4 frames, 16-byte ones IPv6 frames. With
    ``L4Checksum.PARTIAL``, ``seg_size`` may reach 64 KiB: segments longer than ``mss`` (the
    guest's) carry a TCPv4 (TCPv6) GSO word, for the guest to cut.
    """
    checksum = L4Checksum(checksum)
    view = memoryview(data)
    if view.format != "B" or not view.c_contiguous:
        view = memoryview(bytes(view))
    frames = _frames.data_frames(dst_mac, src_mac, src_ip, dst_ip, src_port, dst_port,
                                 seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, window, view, seg_size,
                                 int(checksum))
    if checksum is L4Checksum.PARTIAL:
        ipv6 = len(src_ip) == 16
        headers = HEADERS6_LEN if ipv6 else HEADERS_LEN
        return [(frame, tcp_data_word(len(frame) - headers, mss, ipv6)) for frame in frames]
    if checksum is L4Checksum.NONE:
        return [(frame, DATA_VALID_WORD) for frame in frames]
    return frames


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
        flow.peek_len = min(room, WINDOW_PEEK_LIMIT)
        self.commands.append(Peek(flow.flow_id, flow.snd_nxt - flow.snd_una, flow.peek_len))

    def take_ack(self, flow: Flow, ack_wire: int, raw_window: int, dup_candidate: bool,
                 now: float) -> bool:
        """The guest's ack and (unscaled) window: discard what it acknowledged, count duplicate
        ACKs (``dup_candidate``: a segment without data or FIN) for fast retransmission, send
        what the window allows. False (counted, answered with our ACK): it acknowledged data
        never sent."""
        ack = flow.send_rel(ack_wire)
        window = raw_window << flow.snd_wscale
        if ack > flow.snd_max:
            self.stats.drop("tcp.drop.ack_unsent", "guest acknowledged data never sent")
            self.tx.ack(flow)
            return False
        if ack > flow.snd_una:
            acked = ack - flow.snd_una
            if flow.fin_sent and ack == flow.snd_max:
                flow.fin_acked = True
                acked -= 1
            if acked > 0:
                self.commands.append(Discard(flow.flow_id, acked))
            self._advance(flow, ack, now)
        elif (dup_candidate and ack == flow.snd_una and flow.snd_una < flow.snd_max
              and window == flow.snd_wnd):
            flow.dup_acks += 1
            if flow.dup_acks == 3:
                self.stats.inc("tcp.fast_retransmits")
                self.retransmit(flow, now)
        flow.snd_wnd = window
        # (The first tests of pump and maybe_send_fin, which most ACKs fail, without the calls.)
        if flow.host_readable and not flow.peek_pending:
            self.pump(flow, now)
        if flow.host_eof and not flow.fin_sent:
            self.maybe_send_fin(flow, now)
        return True

    def _advance(self, flow: Flow, ack: int, now: float) -> None:
        """``snd_una`` moves up to ``ack`` (above it): the retransmission state starts over."""
        flow.snd_una = ack
        if ack > flow.snd_nxt:  # (max() without its call: once per ACK)
            flow.snd_nxt = ack
        flow.dup_acks = 0
        flow.retries = 0
        flow.rto = self.timeouts.rto_initial
        flow.rto_at = now + flow.rto if ack < flow.snd_max else None
        if flow.fin_at is not None:
            flow.fin_at = now + self.timeouts.fin  # still closing, but making progress

    def streamed(self, flow: Flow, ack: int | None, window: int, delivered: int, segments: int,
                 large_segments: int, drained: bool, now: float) -> None:
        """One round of a streaming flow done elsewhere (the fast path's ``stream_round``): the
        guest acknowledged up to ``ack`` (relative, above ``snd_una``; its bytes are gone from
        the host socket already) with ``window`` (scaled), and ``delivered`` bytes from
        ``snd_nxt`` on reached it as ``segments`` segments (as ``sent_elsewhere``).
        ``drained``: the socket held no more (or failed, or reached EOF: the glue says which).
        A window not filled because the ring was full is asked for again (``pump``).
        ``ack`` None: no ACK came (``window`` ignored); the host socket turned readable and
        the round peeked the window's next bytes (``on_readable``, its Peek and the answer).

        ``_advance`` and ``sent_elsewhere`` written out for the one case they meet here (a flow
        simply streaming: ``snd_nxt`` is ``snd_max`` and stays so, nothing is retransmitted, no
        FIN timer runs): this runs once per ACK batch of a download, without further calls."""
        if ack is None:
            flow.host_readable = True
            ack = flow.snd_una
        else:
            flow.snd_una = ack
            flow.snd_wnd = window
            flow.dup_acks = 0
            flow.retries = 0
            flow.rto = self.timeouts.rto_initial
            flow.rto_at = None if ack == flow.snd_max else now + flow.rto
        if delivered:
            counts = self.tx.counts
            counts.segments_out += segments
            counts.gso_segments_out += large_segments
            counts.bytes_to_guest += delivered
            if flow.ack_owed_at is not None:  # (the ACK rode on the data)
                flow.ack_owed_at = None
                counts.acks_on_replies += 1
            if now - flow.data_in_at <= self.timeouts.ack_delay:
                flow.interactive = True  # (as in ``_sent``)
            flow.rcv_acked = flow.rcv_nxt
            flow.snd_nxt = flow.snd_max = flow.snd_nxt + delivered
            if flow.rto_at is None:
                flow.rto_at = now + flow.rto  # data in flight
        if drained:
            flow.host_readable = False
        elif flow.host_readable and (ack + flow.snd_wnd > flow.snd_nxt or flow.snd_nxt == ack):
            self.pump(flow, now)  # the rest of the window, or the persist timer

    def send_host_data(self, flow: Flow, data: bytes | memoryview, now: float) -> None:
        self.data(flow, data)
        self._sent(flow, len(data), now)

    def sent_elsewhere(self, flow: Flow, n: int, segments: int, large_segments: int,
                       now: float) -> None:
        """``n`` bytes from ``snd_nxt`` on reached the guest in ``segments`` segments
        (``large_segments`` of them for the guest to cut) without passing here: the fast
        path peeked them straight into its RX buffers."""
        counts = self.tx.counts
        counts.segments_out += segments
        counts.gso_segments_out += large_segments
        self._sent(flow, n, now)

    def _sent(self, flow: Flow, n: int, now: float) -> None:
        # Data segments carry our ACK of everything written to the host (recv_seq(rcv_nxt)).
        if flow.ack_owed_at is not None:
            flow.ack_owed_at = None
            self.tx.counts.acks_on_replies += 1
        if now - flow.data_in_at <= self.timeouts.ack_delay:
            # A reply soon after the guest's data: its next ACKs may wait for the next reply.
            flow.interactive = True
        flow.rcv_acked = flow.rcv_nxt
        if flow.snd_nxt < flow.snd_max:
            self.stats.inc("tcp.retransmitted_bytes", min(n, flow.snd_max - flow.snd_nxt))
        flow.snd_nxt += n
        if flow.snd_nxt > flow.snd_max:  # (max() without its call: once per send)
            flow.snd_max = flow.snd_nxt
        self.tx.counts.bytes_to_guest += n
        if flow.rto_at is None:
            flow.rto_at = now + flow.rto

    def segmenting(self, flow: Flow) -> tuple[int, int]:
        """(segment size, CSUM_* mode) of data to the guest: what the guest's offloads allow
        (large segments it cuts itself, or no L4 checksum to compute)."""
        link = self.tx.output
        ipv6 = is_ipv6(flow.guest_ip)
        if ipv6 and link.guest_mac is None:
            return flow.mss, CSUM_FULL  # send_ipv6 takes no offload word
        if link.guest_offloads.tso(ipv6):
            return MAX_TSO_PAYLOAD // flow.mss * flow.mss, CSUM_PARTIAL
        return flow.mss, CSUM_NONE if link.guest_offloads.csum else CSUM_FULL

    def data(self, flow: Flow, data: bytes | memoryview) -> None:
        """Host bytes to the guest starting at ``snd_nxt``, cut as the guest's offloads allow."""
        size, checksum = self.segmenting(flow)
        if self._data_frames(flow, data, size, checksum):
            self.tx.counts.segments_out += (len(data) + size - 1) // size
            if checksum == CSUM_PARTIAL:
                whole, rest = divmod(len(data), size)
                large = (whole if size > flow.mss else 0) + (rest > flow.mss)
                if large:
                    self.stats.inc("tcp.gso_segments_out", large)
        else:
            self._data_segments(flow, data, size, checksum)

    def _data_frames(self, flow: Flow, data: bytes | memoryview, size: int, checksum: int) -> bool:
        """Whole frames built in C (``data_frames``) once the guest's MAC is known (else the
        caller sends segment by segment through ``send_ipv4``, which sends them to the
        broadcast address and asks the guest's MAC by ARP: a rare path, only before the
        guest has sent anything)."""
        link = self.tx.output
        if link.guest_mac is None:
            return False
        send = link.send_ipv6_frames if is_ipv6(flow.guest_ip) else link.send_ipv4_frames
        send(data_frames(dst_mac=link.guest_mac, src_mac=link.gateway_mac,
                         src_ip=flow.remote_ip, dst_ip=flow.guest_ip, src_port=flow.remote_port,
                         dst_port=flow.guest_port, seq=flow.send_seq(flow.snd_nxt),
                         ack=flow.recv_seq(flow.rcv_nxt), window=self.tx.advertised_window(flow),
                         data=data, seg_size=size, checksum=L4Checksum(checksum), mss=flow.mss))
        return True

    def _data_segments(self, flow: Flow, data: bytes | memoryview, size: int, checksum: int) -> None:
        segments = segment_payload(flow.remote_ip, flow.guest_ip, flow.remote_port,
                                   flow.guest_port, flow.send_seq(flow.snd_nxt),
                                   flow.recv_seq(flow.rcv_nxt), self.tx.advertised_window(flow),
                                   data, size, checksum)
        for segment in segments:
            if checksum == CSUM_PARTIAL:
                payload_len = len(segment) - 20
                self.tx.segment(flow, segment, tcp_data_word(payload_len, flow.mss))
                if payload_len > flow.mss:
                    self.stats.inc("tcp.gso_segments_out")
            else:
                self.tx.segment(flow, segment, DATA_VALID_WORD if checksum == CSUM_NONE else 0)

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

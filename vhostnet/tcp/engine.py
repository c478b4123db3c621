"""Sans-IO TCP translator: guest TCP connections become ordinary host sockets (the passt model).

The engine terminates the guest's TCP connection itself and describes what the
host socket should do as *commands*; the glue (``vhostnet.tcp.host``) runs
them and feeds socket *events* back. Nothing here touches a socket or a clock.

Guest segments come in through ``handle_ipv4(packet, now)`` and
``handle_ipv6(packet, now, checksum_partial)``; segments for the guest go out
through ``output.send_ipv4``/``send_ipv6`` (``vhostnet.tcp.output.GuestLink``).
One engine serves both families: a flow's family is the length of its
addresses (4 or 16 bytes), and everything below is the same for both.
The C fast path hands over the segments it parses but does not take through
``handle_segment`` (no wire views). The handshake half (the guest's SYN and
connect(), accept() and our SYN, segments up to ESTABLISHED) is the base class
``ConnectionSetup`` (vhostnet/tcp/handshake.py).

Commands (``engine.commands``, a deque; see ``tcp_flow``):
    Connect(flow_id, host, port)   open a non-blocking connection
    Send(flow_id, data)            write; report ``on_sent``
    Peek(flow_id, offset, length)  read without consuming; report ``on_peeked`` or ``on_host_eof``
    Discard(flow_id, length)       consume bytes the guest acknowledged
    ShutdownWrite(flow_id)         shutdown(SHUT_WR)
    Close(flow_id, abort)          close (abort: SO_LINGER 0, i.e. send RST); the flow is gone

Events the glue reports (``send_space`` = what the host socket can take now,
SO_SNDBUF minus the bytes queued, when the glue knows it):
    on_connected(flow_id, now, send_space=None)    on_connect_failed(flow_id, errno, now)
    on_sent(flow_id, n, now, send_space=None)      on_writable(flow_id, now, send_space=None)
    on_peeked(flow_id, offset, data, now)          on_readable(flow_id, now)
    on_peeked_elsewhere(flow_id, n, segments, large_segments, now)  (before on_peeked)
    on_streamed_elsewhere(flow_id, ack, window, delivered, segments, large_segments, drained,
                          now)  (an ACK, its Discard and the next Peek, all done elsewhere;
                          ack None: on_readable and its Peek, done elsewhere)
    on_host_eof(flow_id, now)                      on_host_error(flow_id, errno, now)
    on_accepted(peer_host, peer_port, guest_port, now, send_space=None) -> flow_id | None

Data rules:
- Outbound flows: the guest gets its SYN-ACK only after the host connect()
  succeeded; failure or the SYN timer answers with RST, so the guest's
  connect() fails at once instead of timing out.
- Guest -> host: only in-order data is taken; out-of-order segments get a
  duplicate ACK and are not buffered. Data is acknowledged once the host socket
  accepted it; after a partial write the rest is dropped and the guest resends.
  On a request/response flow (``Flow.interactive``: host data followed the guest's
  within ``TcpTimeouts.ack_delay``, or a flow the guest opened, until its first owed ACK
  goes alone) the ACK is owed instead (``Flow.ack_owed_at``) and
  rides on the reply; the flow's timer sends it alone when the delay runs out (and
  the flow is interactive no more). Bulk data (two full-sized segments unacknowledged,
  at most 32 KiB), a partial write or a low window are acknowledged at once (``_ack_now``).
- Host -> guest: data stays in the host socket's receive queue until the guest
  acknowledges it; the engine peeks from ``snd_nxt - snd_una`` and discards on
  ACK, so retransmission (RTO with backoff, or three duplicate ACKs) is just a
  rewind of ``snd_nxt`` to ``snd_una`` and a new peek.
- FIN to the guest once the host reached EOF and the guest acknowledged all
  data; the guest's FIN becomes shutdown(SHUT_WR) after its data was written.
  There is no TIME_WAIT: the flow ends when both FINs are through.
"""

from __future__ import annotations

import functools
import logging
import random
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from vhostnet.stack.counters import Counters
from vhostnet.tcp.closed import RecentlyClosed
from vhostnet.tcp.flow import (
    Close,
    Flow,
    Phase,
    Segment,
    Send,
    ShutdownWrite,
    TcpCommand,
    TcpTimeouts,
)
from vhostnet.tcp.handshake import ConnectionSetup
from vhostnet.tcp.output import GuestLink, GuestOutput
from vhostnet.tcp.sender import PEEK_BUDGET, GuestSender
from vhostnet.tcp.table import FlowTable
from vhostnet.wire.checksum import PROTO_TCP, l4_checksum_ok
from vhostnet.wire.errors import MalformedPacket
from vhostnet.wire.tcp import (
    ACK,
    FIN,
    RST,
    SYN,
    TcpSegmentView,
)

log = logging.getLogger("vhostnet.tcp.engine")

# Below this much window to advertise, guest data is acknowledged at once (no delayed ACK).
ACK_NOW_WINDOW = 64 * 1024
# At this much guest data unacknowledged, an interactive flow's ACK goes at once: two
# full-sized segments, but never more than this. At a large MTU two segments are two of the
# guest's 64 KiB TSO frames, and a guest that waits for the ACK of one before the next
# (its send buffer, TSO autosizing) would be held back by the delay on every frame.
ACK_NOW_BYTES_CAP = 32 * 1024


class Ipv4Packet(Protocol):
    """What the stack hands us: an IPv4 packet whose payload is a TCP segment."""

    src: bytes
    dst: bytes
    payload: memoryview
    ttl: int
    tos: int
    checksum_partial: bool  # virtio NEEDS_CSUM: the guest left the checksum to the "device"


class Ipv6Packet(Protocol):
    """What the stack hands us for IPv6: ``upper_payload`` is the TCP segment."""

    src: bytes
    dst: bytes
    upper_payload: memoryview


class TcpEngine(ConnectionSetup):
    """All TCP flows between the guest and the host. See the module docstring for the contract."""

    def __init__(
        self,
        config: Any,
        output: GuestLink,
        *,
        timeouts: TcpTimeouts | None = None,
        counters: Counters | None = None,
        isn_source: Callable[[], int] | None = None,
    ) -> None:
        self.config = config
        self.output = output
        self.timeouts = timeouts or TcpTimeouts()
        self.stats = counters or Counters(log)
        if isn_source is None:
            # Initial sequence numbers need only be unpredictable to the guest, not secret.
            rng = random.Random()
            isn_source = functools.partial(rng.getrandbits, 32)  # (no Python frame per flow)
        self._isn = isn_source
        self.commands: deque[TcpCommand] = deque()
        self.table = FlowTable(self.stats, config.flow_limit)
        self.flows = self.table.by_key  # read-only for everyone but the engine
        self.flows_by_id = self.table.by_id
        self._timers = self.table.timers
        # How soon after an event a deadline it sets (the delayed ACK's aside) can come: its
        # flow's timer entry must be due by then (tcp/timers.py).
        self.look_ahead = min(self.timeouts.rto_initial, self.timeouts.syn, self.timeouts.fin,
                              self.timeouts.idle)
        self.tx = GuestOutput(output, self.stats, config.mtu)
        self.counts = self.tx.counts  # per-event counts as plain integers (tcp/tally.py)
        # Guest data acknowledged at once from this much on (``_ack_now``), by address length.
        self._bulk_bytes = {length: min(2 * mss, ACK_NOW_BYTES_CAP)
                            for length, mss in self.tx.mss_limits.items()}
        self.sender = GuestSender(self.tx, self.stats, self.timeouts, self.commands)
        self.recently_closed = RecentlyClosed()
        self._now = 0.0  # the latest time an event brought; closed flows linger from it
        self._wakeup: Callable[[float], None] | None = None
        self._wake_asked = 0.0  # the deadline the wake-up hook was last asked for
        self._polled_at = 0.0  # the time of the last poll_timers

    # ------------------------------------------------------------------ public

    def counters(self) -> dict[str, int]:
        """Flat "tcp.*" counters: segments, bytes, flows, drops by reason, resets, retransmits."""
        self.stats.set("tcp.flows_open", len(self.flows))
        return self.stats.snapshot()

    def set_wakeup(self, hook: Callable[[float], None] | None) -> None:
        """Call ``hook(deadline)`` when a timer (a delayed ACK) becomes due sooner than the
        caller's next ``poll_timers`` may come: the integrator brings its timer forward."""
        self._wakeup = hook

    def next_timer(self) -> float | None:
        """The earliest time ``poll_timers`` has work to do, or None."""
        return self._timers.next_deadline()

    def poll_timers(self, now: float) -> None:
        self._now = self._polled_at = now
        for flow in self._timers.due(now):
            self._run_timers(flow, now)
            self._timers.schedule(flow)

    # ------------------------------------------------------- guest segments

    def handle_ipv4(self, packet: Ipv4Packet, now: float) -> None:
        self._handle_segment(bytes(packet.src), bytes(packet.dst), packet.payload,
                             packet.checksum_partial, now)

    def handle_ipv6(self, packet: Ipv6Packet, now: float, checksum_partial: bool = False) -> None:
        """A guest TCP segment over IPv6; ``checksum_partial``: the guest left its checksum
        to the device (virtio NEEDS_CSUM at the TCP checksum field)."""
        self._handle_segment(bytes(packet.src), bytes(packet.dst), packet.upper_payload,
                             checksum_partial, now)

    def _handle_segment(self, src: bytes, dst: bytes, data: memoryview, checksum_partial: bool,
                        now: float) -> None:
        self.counts.segments_in += 1
        if not checksum_partial and not l4_checksum_ok(src, dst, PROTO_TCP, data):
            self.stats.drop("tcp.drop.bad_checksum", "TCP segment with a bad checksum")
            return
        try:
            seg = TcpSegmentView(data)
        except MalformedPacket as error:
            self.stats.drop(f"tcp.drop.{error.reason}", f"malformed TCP segment: {error}")
            return
        self.handle_segment(src, dst, seg, now)

    def handle_segment(self, src: bytes, dst: bytes, seg: Segment, now: float) -> None:
        """A guest segment from ``src`` to ``dst`` already checked as ``TcpSegmentView`` checks
        (the fast path's ``ParsedSegment``), its checksum verified or left partial; the caller
        counted it (``counts.segments_in``)."""
        key = (src, seg.src_port, dst, seg.dst_port)
        self._now = now
        flow = self.flows.get(key)
        if flow is None:
            if seg.flags & (SYN | ACK) == SYN:
                self.recently_closed.forget(key)
                self._open_outbound(key, seg, now)
                return
            final = self.recently_closed.final_numbers(key, now)
            if final is not None and not seg.flags & (RST | SYN):
                self.tx.ack_closed(key, *final)  # a straggler of a clean close
            else:
                self.tx.answer_stray(key, seg)
            return
        if self.table.tracking:
            self.table.changed.add(flow.flow_id)  # FlowTable.touch, without its call
        flow.idle_at = now + self.timeouts.idle
        if flow.phase is Phase.CONNECTING:
            self._segment_connecting(flow, seg)
        elif flow.phase is Phase.SYN_SENT:
            self._segment_syn_sent(flow, seg, now)
        elif flow.phase is Phase.SYN_RCVD:
            self._segment_syn_rcvd(flow, seg, now)
        else:
            self._segment_established(flow, seg, now)
        # ``FlowTimers.look_by`` with its test written out (per segment).
        if flow.scheduled_at is None or flow.scheduled_at > now + self.look_ahead:
            self._timers.look_by(flow, now + self.look_ahead)

    def _segment_established(self, flow: Flow, seg: Segment, now: float) -> None:
        flags = seg.flags
        if flags & RST:
            seq = flow.recv_rel(seg.seq)
            # RFC 5961: only a RST inside the window may kill the flow (blind-reset defence).
            if flow.rcv_nxt <= seq <= flow.rcv_nxt + max(self.tx.window_bytes(flow), 1):
                self._abort(flow, send_rst=False)
            else:
                self.stats.drop("tcp.drop.rst_out_of_window", "TCP RST outside the window")
            return
        if flags & SYN:
            self.tx.ack(flow)  # challenge ACK; a new SYN on a live 4-tuple is stale
            return
        payload = seg.payload
        has_fin = flags & FIN
        if flags & ACK:
            # Only a segment without data or FIN may be a duplicate ACK (fast retransmission).
            if not self.sender.take_ack(flow, seg.ack, seg.window, not payload and not has_fin,
                                        now):
                return
            if flow.host_shut and flow.fin_acked:
                self._maybe_finish(flow)  # the ACK of our FIN, after the guest's
        if (payload or has_fin) and flow.flow_id in self.flows_by_id:
            self._process_data(flow, seg, payload, has_fin, now)

    def _process_data(self, flow: Flow, seg: Segment, payload: bytes | memoryview,
                      has_fin: int, now: float) -> None:
        if flow.guest_fin:
            self.tx.ack(flow)  # a retransmission after the guest's FIN
            return
        start = flow.recv_rel(seg.seq)
        end = start + len(payload)
        if start > flow.rcv_queued:
            self.stats.inc("tcp.out_of_order")
            self.tx.ack(flow)  # duplicate ACK: tells the guest where the hole is
            return
        if end < flow.rcv_queued or (end == flow.rcv_queued and not has_fin):
            self.tx.ack(flow)  # all old: the guest missed our ACK
            return
        fresh = payload[flow.rcv_queued - start :]
        if fresh:
            flow.to_host += fresh
            flow.rcv_queued += len(fresh)
            if not flow.send_queued:
                flow.send_queued = True
                self.commands.append(Send(flow.flow_id, flow.to_host))
        if has_fin:
            flow.guest_fin = True
            flow.fin_at = now + self.timeouts.fin
        self._maybe_shutdown(flow, now)

    # ------------------------------------------------------------ host events

    def on_sent(self, flow_id: int, n: int, now: float, send_space: int | None = None) -> None:
        flow = self.flows_by_id.get(flow_id)
        if flow is None:
            return
        self.table.touch(flow_id)
        flow.send_queued = False
        if send_space is not None:
            flow.host_space = send_space
        if n > 0:
            del flow.to_host[:n]
            flow.rcv_nxt += n
            self.counts.bytes_to_host += n
            flow.idle_at = now + self.timeouts.idle
            if flow.fin_at is not None:
                flow.fin_at = now + self.timeouts.fin
        partial = bool(flow.to_host)
        if partial:
            # The host socket is full: forget the rest, the guest will send it again.
            self.stats.inc("tcp.partial_writes")
            flow.to_host.clear()
            flow.rcv_queued = flow.rcv_nxt
            if flow.guest_fin:
                flow.guest_fin = False
                flow.fin_at = None
        # (``_maybe_shutdown``'s first test without the call: most writes carry no FIN.)
        if not (flow.guest_fin and self._maybe_shutdown(flow, now)) and n > 0:
            flow.data_in_at = now
            if self._ack_now(flow, partial):
                self.tx.ack(flow)
            elif flow.ack_owed_at is None:
                self._owe_ack(flow, now)
        # (No deadline but the delayed ACK's moves earlier here: the FIN timer restarts.)

    def _ack_now(self, flow: Flow, partial: bool) -> bool:
        """Whether guest data just written is acknowledged at once rather than delayed for a
        reply to carry: unless the flow is interactive, after a partial write (the guest
        resends), at two full-sized segments not yet acknowledged (RFC 9293 3.8.6.3: bulk
        data is never slowed; ``ACK_NOW_BYTES_CAP`` at a large MTU), or when the window we
        advertise runs low."""
        # (mss_limit and window_bytes written out: this runs per request.)
        return (not flow.interactive or partial or self.timeouts.ack_delay <= 0
                or flow.rcv_nxt - flow.rcv_acked >= self._bulk_bytes[len(flow.guest_ip)]
                or flow.host_space - len(flow.to_host) < ACK_NOW_WINDOW)

    def on_written_elsewhere(self, flow_id: int, n: int, now: float,
                             send_space: int | None = None) -> None:
        """``n`` in-order guest bytes reached the host socket without a ``Send`` (the fast path
        wrote them): as if they had gone through ``to_host`` and one ``Send``."""
        flow = self.flows_by_id.get(flow_id)
        if flow is None:
            return
        flow.rcv_queued += n
        self.on_sent(flow_id, n, now, send_space)

    def on_acked_elsewhere(self, flow_id: int, ack: int, window: int, now: float) -> None:
        """The guest's newest ack and raw window of an established flow, taken from its
        segments without passing here (the fast path; duplicate ACKs never come this way)."""
        flow = self.flows_by_id.get(flow_id)
        if flow is None or flow.phase is not Phase.ESTABLISHED:
            return
        self._now = now
        self.table.touch(flow_id)
        flow.idle_at = now + self.timeouts.idle
        if self.sender.take_ack(flow, ack, window, False, now):
            self._maybe_finish(flow)
        self._timers.schedule(flow)

    def on_streamed_elsewhere(self, flow_id: int, ack: int | None, window: int, delivered: int,
                              segments: int, large_segments: int, drained: bool,
                              now: float) -> None:
        """A streaming flow's round done elsewhere, learnt once (the fast path's ``stream_round``:
        the guest's newest ack and window, taken only when the flow is simply streaming, with
        the acknowledged bytes discarded and the next ``delivered`` bytes of the window peeked
        into the guest): ``GuestSender.streamed`` records it (``ack`` relative, ``window``
        scaled), then the flow's timers. The flow is not marked changed for that: the caller
        brings its mirror up to date itself (the new ``snd_max``; the ack and window it gave
        are the ones the engine took); what else happens to the flow marks it as always.
        ``ack`` None: no ACK; the flow's host socket turned readable and the round peeked the
        window's next bytes (``on_readable``, its Peek and the answer in one)."""
        flow = self.flows_by_id.get(flow_id)
        if flow is None:
            return
        self._now = now
        flow.idle_at = now + self.timeouts.idle
        self.sender.streamed(flow, ack, window, delivered, segments, large_segments, drained, now)
        # (No deadline nearer: tcp/timers.py; ``look_by``'s test written out, as per segment.)
        if flow.scheduled_at is None or flow.scheduled_at > now + self.look_ahead:
            self._timers.look_by(flow, now + self.look_ahead)

    def on_writable(self, flow_id: int, now: float, send_space: int | None = None) -> None:
        flow = self.flows_by_id.get(flow_id)
        if flow is None or flow.phase is not Phase.ESTABLISHED:
            return
        if send_space is not None:
            flow.host_space = send_space
        self.tx.ack(flow)  # window update

    def on_readable(self, flow_id: int, now: float) -> None:
        flow = self.flows_by_id.get(flow_id)
        if flow is None:
            return
        flow.host_readable = True
        flow.idle_at = now + self.timeouts.idle
        self.sender.pump(flow, now)  # (a zero window arms the persist timer)
        if flow.scheduled_at is None or flow.scheduled_at > now + self.look_ahead:
            self._timers.look_by(flow, now + self.look_ahead)

    def on_peeked(self, flow_id: int, offset: int, data: bytes | memoryview, now: float) -> None:
        flow = self.flows_by_id.get(flow_id)
        if flow is None:
            return
        flow.peek_pending = False
        if flow.peek_seq != flow.snd_nxt or offset != flow.snd_nxt - flow.snd_una:
            self.sender.pump(flow, now)  # a rewind happened meanwhile: peek again
            return
        length = len(data)
        if length < flow.peek_len and length < PEEK_BUDGET:
            # Shorter than the glue read (its budget, or the rest of the Peek): everything
            # queued is now in flight.
            flow.host_readable = False
        if length:
            self.sender.send_host_data(flow, data, now)
            self.table.touch(flow_id)  # snd_max moved: the acks a mirror may take
        if flow.host_readable:  # (pump's first test without the call: a reply is read whole)
            self.sender.pump(flow, now)
        # The data sent here or by the fast path before (``on_peeked_elsewhere``) armed the RTO.
        if flow.scheduled_at is None or flow.scheduled_at > now + self.look_ahead:
            self._timers.look_by(flow, now + self.look_ahead)

    def on_peeked_elsewhere(self, flow_id: int, n: int, segments: int, large_segments: int,
                            now: float) -> None:
        """The pending Peek's first ``n`` bytes reached the guest from ``snd_nxt`` on without
        passing here (the fast path); ``on_peeked`` answers for the rest of it."""
        flow = self.flows_by_id.get(flow_id)
        if flow is None or not flow.peek_pending or n <= 0:
            return
        self.sender.sent_elsewhere(flow, n, segments, large_segments, now)
        self.table.touch(flow_id)  # snd_max moved: the acks a mirror may take
        flow.peek_seq = flow.snd_nxt
        flow.peek_len -= n

    def on_host_eof(self, flow_id: int, now: float) -> None:
        flow = self.flows_by_id.get(flow_id)
        if flow is None:
            return
        self.table.touch(flow_id)
        flow.peek_pending = False
        flow.host_readable = False
        flow.host_eof = True
        self.sender.maybe_send_fin(flow, now)
        self._timers.look_by(flow, now + self.look_ahead)  # our FIN's RTO and FIN timer

    def on_host_error(self, flow_id: int, errno: int, now: float) -> None:
        flow = self.flows_by_id.get(flow_id)
        if flow is None:
            return
        self.stats.inc("tcp.host_errors")
        self._abort(flow, send_rst=True)

    # ------------------------------------------------------------- internals

    def schedule(self, flow: Flow) -> None:
        """Put the flow's earliest deadline in the timer queue (after its timers changed)."""
        self._timers.schedule(flow)

    def _remove(self, flow: Flow, abort: bool) -> None:
        self.table.remove(flow)
        self.commands.append(Close(flow.flow_id, abort))

    def _abort(self, flow: Flow, send_rst: bool) -> None:
        if send_rst:
            if flow.phase is Phase.CONNECTING:
                # We never sent a SYN: the RST acknowledges the guest's SYN (RFC 9293 3.10.7.1).
                self.tx.emit(flow, RST | ACK, seq=0, ack=flow.recv_seq(flow.rcv_nxt))
            else:
                self.tx.emit(flow, RST | ACK, seq=flow.send_seq(flow.snd_nxt))
            self.stats.inc("tcp.rst_sent")
        self._remove(flow, abort=True)

    def _maybe_shutdown(self, flow: Flow, now: float) -> bool:
        """After the guest's FIN and all its data reached the host: SHUT_WR and ACK the FIN."""
        if not flow.guest_fin or flow.host_shut or flow.to_host or flow.send_queued:
            return False
        flow.host_shut = True
        flow.rcv_nxt += 1
        flow.rcv_queued = flow.rcv_nxt
        self.commands.append(ShutdownWrite(flow.flow_id))
        self._ack_fin(flow, now)
        if flow.fin_acked:  # (our FIN went first and is acknowledged: the flow is done)
            self._maybe_finish(flow)
        return True

    def _ack_fin(self, flow: Flow, now: float) -> None:
        """The ACK of the guest's FIN goes at once when our FIN is already out (it ends the
        flow) or delays are off; else it is owed like an ACK of data (RFC 9293 lets it wait,
        as Linux does): a host peer that closes within ``ack_delay`` gets its FIN to the
        guest carrying it, one segment instead of two. The flow's timer sends it alone at
        the deadline; a retransmitted FIN is answered at once (``_process_data``)."""
        if flow.fin_sent or self.timeouts.ack_delay <= 0:
            self.tx.ack(flow)
            return
        self.counts.fin_acks_delayed += 1
        if flow.ack_owed_at is None:
            self._owe_ack(flow, now)

    def _owe_ack(self, flow: Flow, now: float) -> None:
        """The ACK of the guest's data (or FIN) waits for a reply to carry it, ``ack_delay`` at
        most: the one deadline closer than ``look_ahead``, armed here. ``poll_timers`` must run
        by then (the integrator's timer ticks are coarser than the delay): the wake-up hook is
        asked unless a wake-up it was asked for is still to come no later."""
        deadline = flow.ack_owed_at = now + self.timeouts.ack_delay
        if flow.scheduled_at is None or deadline < flow.scheduled_at:
            self._timers.look_by(flow, deadline)
        if self._wakeup is None or self._polled_at < self._wake_asked <= deadline:
            return
        self._wake_asked = deadline
        self._wakeup(deadline)

    def _maybe_finish(self, flow: Flow) -> None:
        if flow.host_shut and flow.fin_acked and flow.flow_id in self.flows_by_id:
            self.counts.closed += 1
            self.recently_closed.remember(flow.key, flow.send_seq(flow.snd_nxt),
                                          flow.recv_seq(flow.rcv_nxt), self._now)
            self._remove(flow, abort=False)

    def _run_timers(self, flow: Flow, now: float) -> None:
        if flow.ack_owed_at is not None and flow.ack_owed_at <= now:
            # No reply carried the ACK in time: send it, and ACK this flow's data at once
            # again until replies follow its data (a guest waiting on its Nagle timer).
            flow.interactive = False
            self.stats.inc("tcp.delayed_acks")
            self.tx.ack(flow)
        if flow.syn_at is not None and flow.syn_at <= now:
            self.stats.inc("tcp.syn_timeouts")
            self._abort(flow, send_rst=True)
        elif flow.fin_at is not None and flow.fin_at <= now:
            self.stats.inc("tcp.fin_timeouts")
            self._abort(flow, send_rst=True)
        elif flow.idle_at is not None and flow.idle_at <= now:
            self.stats.inc("tcp.idle_timeouts")
            self._abort(flow, send_rst=True)
        elif flow.rto_at is not None and flow.rto_at <= now:
            if not self.sender.retransmission_timeout(flow, now):
                self.stats.inc("tcp.retransmit_giveups")
                self._abort(flow, send_rst=True)

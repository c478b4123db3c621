"""The Python face of the TCP fast path (``ext/tcp_fast.pyx``): in-order guest data of established
flows, IPv4 and IPv6, goes to the host socket by sendmsg(2) from the TX batch, GIL released.

``TcpEngine`` stays the authority; the C table only mirrors flows in the simple
state, with the wire values a segment must carry to teach the engine nothing
but "more data" and a newer ack or window (next sequence number, the ack and raw
window it last took, the highest ack it accepts: ``snd_max``). The engine's flow table
records the flows whose state may have moved (every guest segment it handles,
every write result, data sent to the guest (the ack limit), host EOF, removal;
``engine.table.take_changed``);
``send_batch`` brings those entries up to date before the C pass, so the mirror
is exact whenever frames are taken. The glue's before-close hook
(``TcpHost.set_before_close``) drops an entry before its socket closes, so the C
side never writes to a reused fd.

The guest's pure ACKs and window updates (and new acks on its data) are taken in C when
the engine would only take them (an ack between the one it last took and its ``snd_max``,
a non-zero window, not a duplicate ACK); C keeps each flow's newest ack and window of the
batch, nothing else.

After the pass the per-flow results are applied once per batch, before the
Python stack sees any frame of that batch: the newest ack and window through
``TcpEngine.on_acked_elsewhere`` (one call per flow, however many ACKs: data acknowledged
is discarded, more is peeked as the window allows), or, for a flow simply streaming to the
guest (established, no FIN either way, no Peek or retransmission pending: ``snd_nxt`` is
``snd_max``), as one round without commands (``stream_round``): one kernel call discards the
acknowledged bytes and peeks the window's next bytes into the RX ring (``DirectPeeker.run``
with ``discard``), the engine records both once (``TcpEngine.on_streamed_elsewhere``:
``snd_una``, ``snd_wnd``, ``snd_nxt``/``snd_max``, timers), the C entry gets its new ack
limit (``set_ack_limit``; the engine does not mark the flow changed for it) and the glue its
reader (``TcpHost.streamed``). When such a flow's host socket turns readable (the window
had room, the socket had run dry), the glue offers the event here first
(``TcpHost.set_direct_read``) and the same round runs without an ack: the window's next
bytes straight into the ring, the engine told through the same entry (``ack`` None) in place
of ``on_readable``, its Peek command and the glue's peek. Those rounds are a download's
per-batch cost, so they make few Python calls (14 per ACK batch, ``receive_batch`` to
``flush``; 15 per readable event, the loop's callback on): the device's ring
handle is kept until its ``direct_rx_generation`` changes, a clean write with the device's
watchdog on only counts its frames (``direct_rx_quiet``), each flow's segment cut is kept
until the guest's offloads or MAC change, and the engine's and the glue's halves are written
out for the one case they meet. Then ``rcv_queued``/``rcv_nxt`` advance
through ``TcpEngine.on_written_elsewhere`` (counters, idle timer, one ACK per
flow with the window computed as for any write), and the glue watches a full socket for room
as it does after its own writes. Flow state is therefore exact between batches;
``sync_all`` is the explicit hook for code that reads Flow fields (migration
export calls it first).

Host -> guest (``DirectRx``, ``peek_into_guest``): the glue offers each of the engine's
``Peek`` commands here first (``TcpHost.set_direct_peek``); while the device has one usable
RX ring and nothing waits in the guest frame queue, the kernel peeks the bytes straight into
the ring's buffers and writes the headers in place (ext/tcp_fast_rx.pxi), and the engine
learns what went (``TcpEngine.on_peeked_elsewhere``) before the glue answers the rest of the
Peek. The engine stays the one owner of every host -> guest field (``snd_nxt``, ``snd_max``,
the peek in progress, timers): the kernel gets the first sequence number, the ack and the
window with each Peek and keeps nothing between calls, so retransmissions (a rewound
``snd_nxt``) take the same way and need no sync.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from vhostnet.stack.stack import NetworkStack
from vhostnet.tcp._fast import DIRECT_DONE, DIRECT_RING_FULL, DirectPeeker, discard_acked
from vhostnet.tcp._fast import TcpFastPath as _Kernel
from vhostnet.tcp.engine import TcpEngine
from vhostnet.tcp.flow import HALF_SEQ, SEQ_MOD, Flow, Phase
from vhostnet.tcp.host import TcpHost
from vhostnet.tcp.sender import WINDOW_PEEK_LIMIT
from vhostnet.wire.checksum import PROTO_TCP

MAX_RAW_WINDOW = 0xFFFF
# ``handled`` values of ``TcpFastPath.take_batch`` (ext/tcp_fast_parse.pxi).
HANDLED_NOT = 0  # for the stack
HANDLED_PARSED = 2  # in ``last_parsed``, for the engine
# ``send_batch``'s answer when it took every frame left (read only).
NONE_LEFT = np.empty(0, dtype=np.intp)
NONE_LEFT.flags.writeable = False


class DirectRx(Protocol):
    """The device's side of direct RX: the RX ring frames may be written into now."""

    def direct_rx(self, flow: tuple[int, bytes, bytes, int, int] | None = None
                  ) -> tuple[object, object] | None:
        """The ring kernel's (queue, rx_direct capsule) (``Virtqueue.direct_rx``) of the one
        RX ring, or with several that of ``flow``'s pair (protocol, remote address, guest
        address, remote port, guest port; None: no ring); None when frames must go through
        the guest frame queue (no ring, a capture)."""

    def direct_rx_by_flow(self) -> bool:
        """Whether ``direct_rx`` picks the ring by flow (several RX rings) and so needs one."""

    def direct_rx_done(self, frames: int) -> None:
        """After a direct write of ``frames`` frames (counters, a ring that broke)."""

    # Changes whenever ``direct_rx``'s answer may (rings, capture): a handle is kept until then.
    direct_rx_generation: int
    # True while a direct write that met no ring error needs no ``direct_rx_done``, only its
    # frames counted in ``counters["rx.frames"]`` (the device's watchdog is on).
    direct_rx_quiet: bool
    counters: dict[str, int]


class TcpFastPath:
    """Mirrors simple established flows into the C table and accounts for what it wrote."""

    def __init__(self, engine: TcpEngine, host: TcpHost, stack: NetworkStack) -> None:
        self.engine = engine
        self.host = host
        self.stack = stack
        self.kernel = _Kernel()
        self._arrays: tuple | None = None
        self._arrays_of: object = None
        self._handled = np.zeros(0, dtype=np.uint8)
        self._partial_seen = 0
        self.peeker = DirectPeeker()
        self.rx: DirectRx | None = None
        # The device's one ring handle as of its ``direct_rx_generation`` (None: by flow, or no
        # ring), so a direct peek asks nothing of the device until its rings change.
        self._ring: tuple[object, object] | None = None
        self._ring_by_flow = False
        self._ring_generation: object = None
        # Each flow's (segment size, checksum mode) (``GuestSender.segmenting``), as of the
        # guest's offloads and MAC they were computed for (either changing empties it).
        self._cuts: dict[int, tuple[int, int]] = {}
        self._cuts_of: tuple[object, object] = (None, None)
        engine.table.track_changes()
        # The engine's record of changed flows (one set for its life): empty, nothing to refresh.
        self.changed = engine.table.changed
        host.set_before_close(self.unregister)
        host.set_direct_peek(self.peek_into_guest)
        host.set_direct_read(self.stream_round)
        self._after_event = host.after_event
        host.after_event = self._after_host_event
        # Per-event counts as plain integers, added to the counters when they are read: the
        # engine's (tcp/tally.py) and the frames taken, by family, which the stack counts.
        self.counts = engine.counts
        self._frames4 = self._frames6 = 0
        stack.stats.add_source(self._stack_counts)
        # Segments not taken come back parsed for the engine, for the families the stack serves.
        self.kernel.set_parse(stack.config.ipv4, stack.config.ipv6)

    @property
    def flows(self) -> int:
        return self.kernel.flows

    def unregister(self, flow_id: int) -> None:
        """Forget a flow; called before its socket closes. Its last writes were already synced."""
        self.kernel.remove(flow_id)
        self._cuts.pop(flow_id, None)

    def refresh(self) -> None:
        """Bring the C entries of changed flows up to date: register, update or drop them."""
        changed = self.changed
        if not changed:
            return  # the common case (called after every event and batch): nothing moved
        flows_by_id = self.engine.flows_by_id
        connected_fds = self.host.connected_fds
        kernel = self.kernel
        while changed:
            flow_id = changed.pop()
            flow = flows_by_id.get(flow_id)
            # Simple: in-order data is all that can happen (established, nothing buffered,
            # no FIN either way); tested before the socket is asked for (a flow opening or
            # closing changes several times and is never simple).
            if (flow is None or not flow.open_both_ways or flow.to_host or flow.send_queued
                    or flow.rcv_queued != flow.rcv_nxt):
                kernel.remove(flow_id)
                continue
            # The window field that gives the engine's snd_wnd back exactly (else no entry).
            wscale = flow.snd_wscale
            window = flow.snd_wnd >> wscale
            fd = connected_fds.get(flow_id)
            if fd is None or window > MAX_RAW_WINDOW or window << wscale != flow.snd_wnd:
                kernel.remove(flow_id)
                continue
            iss = flow.iss  # the wire sequence numbers (Flow.send_seq/recv_seq), without calls
            kernel.set(flow_id, flow.guest_ip, flow.guest_port, flow.remote_ip,
                       flow.remote_port, fd, (flow.irs + flow.rcv_nxt) % SEQ_MOD,
                       (iss + flow.snd_una) % SEQ_MOD, window, (iss + flow.snd_max) % SEQ_MOD)

    def _after_host_event(self) -> None:
        # A socket event changed flows (a reply went to the guest): bring their C entries up
        # to date now, while the guest reads, not when its next request waits for it.
        if self.changed:
            self.refresh()
        if self._after_event is not None:
            self._after_event()

    def send_batch(self, batch, count: int, now: float, left: np.ndarray | None) -> np.ndarray | None:
        """Write what the fast path can among ``batch``'s first ``count`` frames.

        ``left``: the indices other fast paths left for the stack (None: all). Returns the
        indices left after this one, or ``left`` itself when it took nothing.
        """
        if self.changed:
            self.refresh()
        if count <= 0 or self.stack.guest_mac is None:
            return left
        if self._arrays_of is not batch:
            self._arrays = batch.arrays()
            self._arrays_of = batch
            self._handled = np.zeros(len(self._arrays[1]), dtype=np.uint8)
        handled = self._handled
        if left is None:
            handled[:count] = 0
        else:
            handled[:count] = 1
            handled[left] = 0
        self.kernel.set_macs(self.stack.config.gateway_mac, self.stack.guest_mac)
        storage, offsets, lengths, vnets = self._arrays
        kernel = self.kernel
        taken = kernel.take_batch(storage, offsets, lengths, vnets, handled, count)
        parsed = kernel.last_parsed
        if parsed:
            self._deliver(batch, count, now, (count if left is None else len(left)) - taken,
                          parsed, taken)
            return NONE_LEFT
        if not taken:
            return left
        self.sync_all(now, taken)
        if taken == (count if left is None else len(left)):
            return NONE_LEFT  # the common case of a small batch: no numpy pass
        return np.flatnonzero(handled[:count] == 0)

    def _deliver(self, batch, count: int, now: float, remaining: int, parsed: list,
                 taken: int) -> None:
        """The frames the kernel did not take, in batch order: its ``ParsedSegment``s to the
        engine (``TcpEngine.handle_segment``), the others to the stack. A segment from an address
        the stack has not learned as the guest's goes to the stack too (it learns it there)."""
        if taken:
            self.sync_all(now, taken)  # before the engine sees any segment of the batch
        stack = self.stack
        receive = stack.receive_frame
        frame, vnet = batch.frame, batch.vnet
        handle = self.engine.handle_segment
        guest_ipv4 = stack.guest_ipv4
        guest_ipv6 = stack.guest_ipv6_addresses
        parsed6 = self.kernel.last_parsed6
        to_stack = to_stack6 = 0
        delivered = len(parsed)
        if delivered == remaining:
            order = None  # the common case: every frame left is a parsed segment
        else:
            order = self._handled[:count].tolist()
        segments = iter(parsed)
        for index in range(count) if order is not None else range(delivered):
            if order is not None:
                if order[index] != HANDLED_PARSED:
                    if order[index] == HANDLED_NOT:
                        receive(bytes(frame(index)), now, vnet(index))
                    continue
            seg = next(segments)
            src = seg.src
            if src == guest_ipv4 or src in guest_ipv6:
                try:
                    handle(src, seg.dst, seg, now)
                except Exception:  # a bug must cost one segment, as on the stack's path
                    stack.internal_error()
                continue
            receive(bytes(frame(seg.index)), now, vnet(seg.index))
            to_stack += 1
            to_stack6 += len(src) == 16
        engine_segments = delivered - to_stack
        self.counts.segments_in += engine_segments
        self.counts.parsed_segments += engine_segments
        self._frames6 += parsed6 - to_stack6
        self._frames4 += engine_segments - (parsed6 - to_stack6)

    def _stack_counts(self) -> dict[str, int]:
        """The frames taken, counted as the stack counts those it receives, per family."""
        frames4, frames6 = self._frames4, self._frames6
        self._frames4 = self._frames6 = 0
        counts = {"eth.rx": frames4 + frames6, "ipv4.rx": frames4, "ipv6.rx": frames6}
        return {name: value for name, value in counts.items() if value}

    def sync_all(self, now: float, taken: int = 0) -> None:
        """Apply everything the C side wrote to the engine's flows (exact Flow state after it).
        ``taken``: the frames the kernel's last pass took, counted first (``send_batch``)."""
        engine = self.engine
        stats = engine.stats
        counts = self.counts
        kernel = self.kernel
        if taken:
            taken6 = kernel.last_taken6
            self._frames4 += taken - taken6
            self._frames6 += taken6
            acks, acks6 = kernel.last_acks, kernel.last_acks6
            counts.segments_in += acks
            counts.fast_acks += acks
            counts.fast_acks6 += acks6
            counts.fast_segments6 += taken6 - acks6
        for flow_id, written, segments, host_full, _acks, newest in kernel.take_activity():
            if newest is not None and not self.stream_round(flow_id, now, *newest):
                # First, as the engine takes a segment's ack before its data.
                engine.on_acked_elsewhere(flow_id, newest[0], newest[1], now)
            if not segments:
                continue
            counts.segments_in += segments
            counts.fast_segments += segments
            counts.fast_bytes += written
            flow = engine.flows_by_id.get(flow_id)
            if flow is None:
                continue
            if host_full:
                stats.inc("tcp.partial_writes")
            space = self.host.written_elsewhere(flow_id, host_full, written)
            # As if the bytes had gone through to_host and one Send: rcv_nxt moves up,
            # the idle timer restarts and the guest gets its ACK.
            engine.on_written_elsewhere(flow_id, written, now, space)

    def set_rx(self, rx: DirectRx | None) -> None:
        """Where host data may go straight into the guest's RX buffers (None: nowhere)."""
        self.rx = rx
        self._ring = None
        self._ring_generation = None  # (another device's generation may be the same number)

    def peek_into_guest(self, flow_id: int, fd: int, offset: int, length: int,
                        now: float) -> tuple[int, int] | None:
        """Execute the engine's pending Peek straight into the RX ring (``TcpHost.set_direct_peek``
        says the answer); None: not here (no ring, frames queued before it, a stale Peek)."""
        flow = self.engine.flows_by_id.get(flow_id)
        if (flow is None or not flow.peek_pending or flow.peek_seq != flow.snd_nxt
                or offset != flow.snd_nxt - flow.snd_una):
            return None
        result = self._peek_run(flow, fd, offset, length, 0)
        if result is None:
            return None
        status, delivered, segments, large = result
        if delivered:
            self.engine.on_peeked_elsewhere(flow_id, delivered, segments, large, now)
        return status, delivered

    def stream_round(self, flow_id: int, now: float, ack_wire: int | None = None,
                     raw_window: int = 0) -> bool:
        """The guest's newest ack and window of a simply streaming flow (established, no FIN
        either way, no retransmission or Peek pending) as one round without commands: one
        kernel call discards what it acknowledged and peeks the window's next bytes straight
        into the RX ring (``DirectPeeker.run``'s ``discard``), the engine records both at once
        (``on_streamed_elsewhere``), the glue its reader (``TcpHost.streamed``). ``ack_wire``
        None: no ACK; the flow's host socket turned readable (``TcpHost.set_direct_read``): the
        window's next bytes the same way, in place of ``on_readable`` and its Peek. False: not
        such a flow or ack, no room in the window after a readable socket, or no ring to peek
        into while the window has room; nothing was done (the caller takes the engine's way)."""
        # (Lookups by ``in`` and subscript: no call, once per ACK batch of a download.)
        flows, host = self.engine.flows_by_id, self.host
        connected_fds = host.connected_fds
        if flow_id not in flows or flow_id not in connected_fds:
            return False
        flow = flows[flow_id]
        if (flow.phase is not Phase.ESTABLISHED or flow.fin_sent or flow.host_eof
                or flow.peek_pending or flow.snd_nxt != flow.snd_max or flow.fin_at is not None):
            return False
        snd_una = flow.snd_una
        if ack_wire is None:
            ack, window, readable = snd_una, flow.snd_wnd, True
        else:
            # (Flow.send_rel written out)
            ack = snd_una + ((ack_wire - flow.iss - snd_una + HALF_SEQ) % SEQ_MOD) - HALF_SEQ
            if not snd_una < ack <= flow.snd_max:
                return False
            window, readable = raw_window << flow.snd_wscale, flow.host_readable
        fd = connected_fds[flow_id]
        acked = ack - snd_una
        room = ack + window - flow.snd_nxt
        offset = flow.snd_nxt - ack
        if readable and room > 0:
            result = self._peek_run(
                flow, fd, offset, room if room < WINDOW_PEEK_LIMIT else WINDOW_PEEK_LIMIT,
                acked) if host.peek_off else None
            if result is None:
                return False
            status, delivered, segments, large = result
            dropped = self.peeker.last_dropped
            direct = status, delivered
            drained = status != DIRECT_DONE and status != DIRECT_RING_FULL
        elif ack_wire is None:
            return False  # a closed window: the engine's (persist timer)
        else:
            try:
                dropped = discard_acked(fd, acked)
            except OSError:
                return False  # the engine's Discard fails again and tells it
            direct, delivered, segments, large, drained = None, 0, 0, 0, False
        self.engine.on_streamed_elsewhere(flow_id, None if ack_wire is None else ack, window,
                                          delivered, segments, large, drained, now)
        # The entry's one field that moved (the engine does not mark the flow for refresh).
        self.kernel.set_ack_limit(flow_id, (flow.iss + flow.snd_max) % SEQ_MOD)
        host.streamed(flow_id, acked, dropped, offset, direct, now)
        return True

    def _peek_run(self, flow: Flow, fd: int, offset: int, length: int,
                  discard: int) -> tuple[int, int, int, int] | None:
        """``DirectPeeker.run`` for ``flow`` from its ``snd_nxt`` on into the RX ring its data
        may go into now, counted: (status, delivered, segments, large segments); None: no
        such ring (none, no guest MAC yet, frames queued before it), nothing done. Per ACK
        batch of a download: the device is asked for its ring only when its rings changed,
        the flow's cut only when the guest's offloads did (no Python call for either)."""
        stack = self.stack
        rx = self.rx
        guest_mac = stack.guest_mac
        if rx is None or guest_mac is None or stack.frames_to_guest:
            return None
        if rx.direct_rx_generation != self._ring_generation:
            self._ring_generation = rx.direct_rx_generation
            self._ring = rx.direct_rx()
            self._ring_by_flow = self._ring is None and rx.direct_rx_by_flow()
        ring = self._ring
        if ring is None:
            if not self._ring_by_flow:
                return None
            ring = rx.direct_rx((PROTO_TCP, flow.remote_ip, flow.guest_ip, flow.remote_port,
                                 flow.guest_port))
            if ring is None:
                return None
        cuts = self._cuts
        if self._cuts_of[0] is not stack.guest_offloads or self._cuts_of[1] is not guest_mac:
            cuts.clear()
            self._cuts_of = (stack.guest_offloads, guest_mac)
        flow_id = flow.flow_id
        if flow_id in cuts:
            size, checksum = cuts[flow_id]
        else:
            size, checksum = cuts[flow_id] = self.engine.sender.segmenting(flow)
        queue = ring[0]
        result = self.peeker.run(
            queue, ring[1], fd, offset, length, guest_mac, stack.config.gateway_mac,
            flow.remote_ip, flow.guest_ip, flow.remote_port, flow.guest_port,
            (flow.iss + flow.snd_nxt) % SEQ_MOD, (flow.irs + flow.rcv_nxt) % SEQ_MOD,
            # (``advertised_window`` without its call when nothing waits for the host: the
            # kernel clamps the field)
            flow.host_space >> flow.rcv_wscale if not flow.to_host
            else self.engine.tx.advertised_window(flow), size, flow.mss, checksum, discard)
        frames = result[2]
        if rx.direct_rx_quiet and not queue.has_new_errors and not queue.broken:
            rx.counters["rx.frames"] += frames  # all ``direct_rx_done`` would do (watchdog on)
        else:
            rx.direct_rx_done(frames)
        counts = self.counts
        counts.direct_rx_peeks += 1
        if result[1]:
            counts.direct_rx_segments += frames
        return result

    def counters(self) -> dict[str, int]:
        """Guest TCP frames left to the Python path, by reason (only reasons seen)."""
        return {f"tcp.fast_fallback.{reason}": frames
                for reason, frames in self.kernel.fallbacks().items() if frames}


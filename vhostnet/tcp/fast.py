"""The Python face of the TCP fast path (``ext/tcp_fast.pyx``): in-order guest data of established
flows goes to the host socket by sendmsg(2) from the TX batch, GIL released.

``TcpEngine`` stays the authority; the C table only mirrors flows in the simple
state, with the wire values a segment must carry to teach the engine nothing
but "more data" (next sequence number, ack, raw window). The engine's flow table
records the flows whose state may have moved (every guest segment it handles,
every write result, host EOF, removal; ``engine.table.take_changed``);
``send_batch`` brings those entries up to date before the C pass, so the mirror
is exact whenever frames are taken. The glue's before-close hook
(``TcpHost.set_before_close``) drops an entry before its socket closes, so the C
side never writes to a reused fd.

After the pass the per-flow results are applied once per batch, before the
Python stack sees any frame of that batch: ``rcv_queued``/``rcv_nxt`` advance
through ``TcpEngine.on_written_elsewhere`` (counters, idle timer, one ACK per
flow with the window computed as for any write), and the glue watches a full socket for room
as it does after its own writes. Flow state is therefore exact between batches;
``sync_all`` is the explicit hook for code that reads Flow fields (migration
export calls it first).
"""

from __future__ import annotations

import numpy as np

from vhostnet.stack.stack import NetworkStack
from vhostnet.tcp._fast import TcpFastPath as _Kernel
from vhostnet.tcp.engine import TcpEngine
from vhostnet.tcp.flow import Flow
from vhostnet.tcp.host import TcpHost

MAX_RAW_WINDOW = 0xFFFF


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
        engine.table.track_changes()
        host.set_before_close(self.unregister)

    @property
    def flows(self) -> int:
        return self.kernel.flows

    def unregister(self, flow_id: int) -> None:
        """Forget a flow; called before its socket closes. Its last writes were already synced."""
        self.kernel.remove(flow_id)

    def refresh(self) -> None:
        """Bring the C entries of changed flows up to date: register, update or drop them."""
        flows_by_id = self.engine.flows_by_id
        changed = self.engine.table.take_changed()
        while changed:
            flow_id = changed.pop()
            flow = flows_by_id.get(flow_id)
            fd = self.host.connected_fd(flow_id) if flow is not None else None
            window = _raw_window(flow) if fd is not None else None
            if window is None or not _simple(flow):
                self.kernel.remove(flow_id)
                continue
            self.kernel.set(flow_id, flow.guest_ip, flow.guest_port, flow.remote_ip,
                            flow.remote_port, fd, flow.recv_seq(flow.rcv_nxt),
                            flow.send_seq(flow.snd_una), window)

    def send_batch(self, batch, count: int, now: float, left: np.ndarray | None) -> np.ndarray | None:
        """Write what the fast path can among ``batch``'s first ``count`` frames.

        ``left``: the indices other fast paths left for the stack (None: all). Returns the
        indices left after this one, or ``left`` itself when it took nothing.
        """
        self.refresh()
        if count <= 0 or not self.kernel.flows or self.stack.guest_mac is None:
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
        taken = self.kernel.take_batch(storage, offsets, lengths, vnets, handled, count)
        if not taken:
            return left
        self.stack.count_frames_taken(taken)
        self.sync_all(now)
        return np.flatnonzero(handled[:count] == 0)

    def sync_all(self, now: float) -> None:
        """Apply everything the C side wrote to the engine's flows (exact Flow state after it)."""
        engine = self.engine
        stats = engine.stats
        for flow_id, written, segments, host_full in self.kernel.take_activity():
            stats.inc("tcp.segments_in", segments)
            stats.inc("tcp.fast_segments", segments)
            stats.inc("tcp.fast_bytes", written)
            flow = engine.flows_by_id.get(flow_id)
            if flow is None:
                continue
            if host_full:
                stats.inc("tcp.partial_writes")
            space = self.host.written_elsewhere(flow_id, host_full)
            # As if the bytes had gone through to_host and one Send: rcv_nxt moves up,
            # the idle timer restarts and the guest gets its ACK.
            engine.on_written_elsewhere(flow_id, written, now, space)

    def counters(self) -> dict[str, int]:
        """Guest TCP frames left to the Python path, by reason (only reasons seen)."""
        return {f"tcp.fast_fallback.{reason}": frames
                for reason, frames in self.kernel.fallbacks().items() if frames}


def _simple(flow: Flow) -> bool:
    """In-order data is all that can happen: established, nothing buffered, no FIN either way.
    IPv4 only: the C table is keyed by IPv4 4-tuples, IPv6 flows stay on the Python path."""
    return (
        len(flow.guest_ip) == 4
        and flow.open_both_ways
        and not flow.to_host
        and not flow.send_queued
        and flow.rcv_queued == flow.rcv_nxt
    )


def _raw_window(flow: Flow | None) -> int | None:
    """The window field that gives the engine's snd_wnd back, or None if none does exactly."""
    if flow is None:
        return None
    raw = flow.snd_wnd >> flow.snd_wscale
    if raw > MAX_RAW_WINDOW or raw << flow.snd_wscale != flow.snd_wnd:
        return None
    return raw

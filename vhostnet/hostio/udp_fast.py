"""The Python face of the UDP fast path (``ext/udp_fast.pyx``): guest datagrams of established
outbound flows (IPv4 and IPv6) go to their host sockets by sendmmsg(2) from the TX batch, GIL
released, a flow's run of equal-sized datagrams bundled into one message the kernel cuts (UDP
GSO, ``ext/udp_gso.pxi``; a flow whose bundle the kernel refuses goes back to one datagram per
message); the host's answers on those sockets come back by recvmmsg(2) as whole frames built
in a batch (``receive``), queued for the guest as one entry.

``UdpNat`` stays the authority. A flow enters the fast path once its connected
host socket exists (``register``, called by ``UdpGlue``) and leaves it before
the socket closes (``unregister``). ``send_batch`` runs before the Python stack
sees a TX batch; the frames it took are skipped by the stack, and their effect
on Python state is applied once per batch: send errors (``UdpNat.on_host_error``). A flow's
idle timer is the kernel's stamp of its last datagram either way (``last_seen``, which
``UdpNat`` reads through ``seen_elsewhere`` when it expires or exports flows), and what the
fast path adds to the stack's counters are the kernel's running totals, which ``counters``
hands to the network's sum.
What the fast path does not keep per datagram: the quote for an ICMP port
unreachable stays the one of the flow's first datagram (same addresses and ports).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sized
from typing import Any

import numpy as np

from vhostnet.hostio._udp_fast import (
    DIRECT_DRAINED,
    DIRECT_LIMIT,
    DirectRoute,
    FlowReader,
    TxKick,
    UdpFastPath,
)
from vhostnet.stack.stack import NetworkStack
from vhostnet.stack.udp_nat import UdpNat
from vhostnet.wire.checksum import PROTO_UDP

# No guest MAC told to the kernel yet (``UdpFastSender._told_guest_mac``).
_NOT_TOLD = object()
# send_batch's answer when it took every frame (read only by its callers).
NONE_LEFT = np.empty(0, dtype=np.intp)
NONE_LEFT.flags.writeable = False

# Counters that are the kernel's running totals (counter name: the kernel's attribute).
KERNEL_TOTALS = {
    "udp.drop.host_busy": "host_busy",           # the host socket's buffer was full
    "udp.gso_datagrams": "gso_datagrams",        # sent in bundles the kernel cut (UDP GSO)
    "udp.gso_refused": "gso_refused",            # flows whose bundle the kernel refused
}


class UdpFastSender:
    """Registered flows plus the per-batch bookkeeping around the C sender."""

    def __init__(self, engine: UdpNat, stack: NetworkStack) -> None:
        self.engine = engine
        self.stack = stack
        self.kernel = UdpFastPath()
        self._bound: object = None  # the TX batch whose arrays the kernel holds
        self._handled = np.zeros(0, dtype=np.uint8)
        # Host -> guest: where an empty batch comes from (the network's pool) and where a
        # filled one goes (set by the network; None: every datagram takes the Python path).
        self._new_batch: Callable[[], Any] | None = None
        self._to_guest: Callable[[Any], None] | None = None
        self._spare: Any | None = None  # taken but not filled (nothing waited): the next read's
        self._peers: dict[int, tuple[int, bytes, int]] = {}  # inbound flow -> kernel's key
        # Host -> guest straight into the RX ring: what the flows' C readers (``flow_reader``)
        # share, kept up to date here: the device offering it (``rx``), the queue whose
        # waiting frames must go first, the guest MAC the kernel was told.
        self._route = DirectRoute(stack, self._finish_direct)
        self._waiting: Sized = ()
        # The guest MAC the kernel was told (the gateway's is the config's, fixed): while it is
        # the stack's, the per-batch paths call no ``_macs_known``.
        self._told_guest_mac: object = _NOT_TOLD
        engine.seen_elsewhere = self.kernel.last_seen  # the kernel stamps its flows' activity

    @property
    def rx(self) -> Any | None:
        """The device offering direct writes into its RX ring (the network's ``set_direct_rx``;
        duck-typed as ``vhostnet.tcp.fast.DirectRx``: ``direct_rx(flow)``,
        ``direct_rx_by_flow()``, ``direct_rx_done(frames)``), or None."""
        return self._route.rx

    @rx.setter
    def rx(self, rx: Any | None) -> None:
        self._route.rx = rx
        self._route.ring = None  # (its handle: asked again)

    def flow_reader(self, flow_id: int, fallback: Callable[[], None],
                    clock: Callable[[], float]) -> Callable[[], None] | None:
        """The C reader to register on the loop for a registered flow's socket: the host's
        datagrams straight into the RX ring with no Python frame on the way, ``fallback()``
        (the glue's reader) whenever that cannot be (see ext/udp_reader.pxi); ``clock()``
        stamps the flow's activity. None for a flow not registered."""
        if not self.kernel.holds(flow_id):
            return None
        self._macs_known()  # (now: the flow's first answer need not take the Python way)
        return FlowReader(self.kernel, self._route, flow_id, fallback, clock)

    def attach_guest_output(self, new_batch: Callable[[], Any],
                            to_guest: Callable[[Any], None], waiting: Sized = ()) -> None:
        """Host datagrams of registered flows are built into ``new_batch()`` (an empty
        FrameBatch) and handed to ``to_guest(batch)``, which queues its frames for the guest
        in order (and owns the batch from then on). ``waiting``: that queue; while it holds
        frames, none goes straight into the RX ring (they would pass the queued ones)."""
        self._new_batch = new_batch
        self._to_guest = to_guest
        self._waiting = self._route.waiting = waiting
        self._spare = None

    def receive(self, flow_id: int, now: float) -> bool:
        """Take the datagrams waiting on ``flow_id``'s socket for the guest; False when this
        flow's are not the fast path's to take (the caller reads them in Python).

        Datagrams too large for one frame follow the batch through the Python stack (which
        fragments them): around those, order may change.
        """
        if not self.kernel.holds(flow_id):
            return False
        # Straight into the device's RX ring (one call less per datagram than a helper): the
        # kernel stamps the flow's activity and counts the frames (``counters``).
        rx = self.rx
        if rx is not None and not self._waiting:
            ring = rx.direct_rx()
            if ring is None and rx.direct_rx_by_flow():
                ring = rx.direct_rx(self._steering_key(flow_id))  # multiqueue: its pair's
            if ring is not None and (self._told_guest_mac is self.stack.guest_mac
                                     or self._macs_known()):
                status, frames, spilled = self.kernel.receive_direct(
                    flow_id, self.stack.config.mtu, now, *ring)
                return self._finish_direct(flow_id, status, frames, spilled, now)
        return self._receive_queued(flow_id, now)

    def _finish_direct(self, flow_id: int, status: int, frames: int,
                       spilled: tuple[bytes, ...], now: float) -> bool:
        """After a direct receive (here or in a flow's C reader): the device told, datagrams
        handed back to the stack, an error to the engine, what else waits read the old way;
        False when that is not the fast path's to do (``receive``'s answer)."""
        rx = self._route.rx
        if rx is not None:
            rx.direct_rx_done(frames)  # (also with none: the ring may have faulted)
        for payload in spilled:  # (in order; one over the MTU is fragmented there)
            self.engine.on_host_datagram(flow_id, payload, now)
        if status == DIRECT_DRAINED or status == DIRECT_LIMIT:
            return True
        if status > 0:
            self.engine.on_host_error(flow_id, status, now)
            return True
        # Ring out of buffers, or a datagram handed back: the old way reads on.
        return self._receive_queued(flow_id, now)

    def _steering_key(self, flow_id: int) -> tuple[int, bytes, bytes, int, int] | None:
        """The flow as ``DirectRx.direct_rx`` names one (the addresses the guest sees)."""
        flow = self.engine.flow(flow_id)
        if flow is None:
            return None
        return PROTO_UDP, flow.remote_ip, flow.guest_ip, flow.remote_port, flow.guest_port

    def _receive_queued(self, flow_id: int, now: float) -> bool:
        """``receive`` the old way: built into a batch queued for the guest."""
        batch = self._batch_for_guest()
        if batch is None:
            return False
        frames, error, oversized = self.kernel.receive(flow_id, self.stack.config.mtu,
                                                       *batch.arrays())
        engine = self.engine
        if frames:
            engine.touch(flow_id, now)
            self._deliver(batch, frames, "udp.rx_host")
        else:
            self._spare = batch
        for payload in oversized:
            engine.on_host_datagram(flow_id, payload, now)
        if error:
            engine.on_host_error(flow_id, error, now)
        return True

    def set_data_valid(self, on: bool) -> None:
        """Whether frames built for the guest say DATA_VALID (the guest negotiated receive
        checksums: ``Network.set_guest_offloads``): the host's kernel checked the datagram and
        the frame is built here, so the guest need not sum every payload again, costly for a
        guest without fast checksum code."""
        self.kernel.data_valid = on

    def _macs_known(self) -> bool:
        """Whether the guest's MAC is known, the kernel told it (and the gateway's) when new."""
        guest_mac = self.stack.guest_mac
        if guest_mac is None:
            return False
        if guest_mac is not self._told_guest_mac:
            self.kernel.set_macs(self.stack.config.gateway_mac, guest_mac)
            self._told_guest_mac = self._route.told_mac = guest_mac
        return True

    def register_peer(self, flow_id: int, sock: socket.socket, peer_addr: str,
                      peer_port: int) -> None:
        """An inbound flow answers ``peer_addr``:``peer_port`` through its forward's socket
        ``sock``: from now on that peer's datagrams on ``sock`` are built in C."""
        flow = self.engine.flow(flow_id)
        if flow is None or not flow.inbound:
            return
        key = (sock.fileno(), _packed(sock.family, peer_addr), peer_port)
        if self.kernel.add_peer(flow_id, *key, flow.guest_ip, flow.guest_port, flow.remote_ip,
                                flow.remote_port):
            self._peers[flow_id] = key

    def unregister_peer(self, flow_id: int) -> None:
        """Before the flow goes or its forward's socket closes."""
        key = self._peers.pop(flow_id, None)
        if key is not None:
            self.kernel.remove_peer(*key)

    def receive_forwarded(self, sock: socket.socket, now: float
                          ) -> list[tuple[bytes, str, int]] | None:
        """Take what waits on a forward's socket: registered peers' datagrams go to the guest
        from here; returns the others as (payload, peer address, peer port) for the Python
        stack (None: nothing taken here, the caller reads the socket itself)."""
        if not self.kernel.peer_count:
            return None
        batch = self._batch_for_guest()
        if batch is None:
            return None
        frames, _error, hits, left = self.kernel.receive_from(
            sock.fileno(), self.stack.config.mtu, *batch.arrays())
        # Errors on an unconnected socket are stale ICMP for some peer: nothing to do.
        engine = self.engine
        for flow_id in hits:
            engine.touch(flow_id, now)
        if frames:
            self._deliver(batch, frames, "udp.rx_forward")
        else:
            self._spare = batch
        return [(payload, socket.inet_ntop(family, address), port)
                for payload, _flow_id, family, address, port in left]

    def _batch_for_guest(self) -> Any | None:
        """An empty batch for frames toward the guest (the spare one if the last read found
        nothing), the kernel told the MACs; None while frames cannot be built here (no guest
        MAC yet, or no output attached)."""
        if self._to_guest is None or self._new_batch is None or not self._macs_known():
            return None
        if self._spare is not None:
            batch, self._spare = self._spare, None
            return batch
        return self._new_batch()

    def _deliver(self, batch: Any, frames: int, counter: str) -> None:
        """``frames`` built frames of ``batch`` to the guest, counted as the stack counts them."""
        batch.take_written(frames)
        self._count(frames, counter)
        assert self._to_guest is not None
        self._to_guest(batch)

    def _count(self, frames: int, *names: str) -> None:
        """``frames`` frames of the last receive counted as the stack counts them, and under
        ``names``."""
        counters = self.engine.counters
        for name in (*names, "udp.fast_path_rx"):
            counters.inc(name, frames)
        frames6 = self.kernel.frames6
        for name, value in (("ipv4.tx", frames - frames6), ("ipv6.tx", frames6)):
            if value:
                counters.inc(name, value)

    @property
    def flows(self) -> int:
        return self.kernel.flows

    def register(self, flow_id: int, sock: socket.socket) -> bool:
        """Take ``flow_id``'s datagrams on the fast path from now on (outbound, connected ``sock``)."""
        flow = self.engine.flow(flow_id)
        if flow is None or flow.inbound:
            return False
        return self.kernel.add(flow_id, flow.guest_ip, flow.guest_port, flow.remote_ip,
                               flow.remote_port, sock.fileno())

    def unregister(self, flow_id: int) -> None:
        """Before the flow's socket closes: no datagram may be sent on its fd any more."""
        self.kernel.remove(flow_id)

    def send_batch(self, batch, count: int, now: float) -> np.ndarray | None:
        """Send what the fast path can among ``batch``'s first ``count`` frames.

        Returns the indices of the frames left for the Python stack, or None when the
        fast path took nothing (the stack then sees every frame). Per batch, Python only
        hears of send errors; the flows' idle timers are the kernel's stamps (``last_seen``,
        read by ``UdpNat`` through ``seen_elsewhere``) and the counters its running totals,
        read by ``counters``.
        """
        if count <= 0 or not self.kernel.flows or (self._told_guest_mac is not self.stack.guest_mac
                                                   and not self._macs_known()):
            return None
        kernel = self.kernel
        if self._bound is not batch:
            arrays = batch.arrays()
            self._handled = np.zeros(len(arrays[1]), dtype=np.uint8)
            kernel.bind_batch(*arrays, self._handled)
            self._bound = self._route.bound = batch
        return self.sent(kernel.send_bound(count, now), count, now)

    def sent(self, taken: int, count: int, now: float) -> np.ndarray | None:
        """After the kernel's ``send_bound`` took ``taken`` of the bound batch's first ``count``
        frames (in ``send_batch``, or in a ``TxKick``): its send errors to the engine, and
        ``send_batch``'s answer."""
        if not taken:
            return None
        if self.kernel.nerrors:
            engine = self.engine
            for flow_id, error in self.kernel.take_errors():
                engine.on_host_error(flow_id, error, now)
        if taken == count:
            return NONE_LEFT  # the common case: no index array to build
        return np.flatnonzero(self._handled[:count] == 0)

    def tx_kick(self, fd: int, batch: Any, max_frames: int, *, fallback: Callable[[], None],
                rest: Callable[[tuple[int, bool, int | None]], None],
                busy: Callable[[], None], flush_rx: Callable[[], None],
                counters: dict[str, int], clock: Callable[[], float]) -> TxKick:
        """The C reader of a TX ring's kick eventfd ``fd``, draining into ``batch`` and
        sending its datagrams of registered flows in the same call (see ``TxKick`` in
        ext/udp_reader.pxi for the arguments and what its owner keeps up to date)."""
        return TxKick(self.kernel, self._route, fd, batch, max_frames, fallback, rest, busy,
                      flush_rx, counters, clock)

    def set_tx_sink(self, on: bool) -> None:
        """Guest frames go to a sink instead of the host (``Network.set_tx_sink``): the kick
        readers send nothing themselves then."""
        self._route.tx_sink = on

    def counters(self) -> dict[str, int]:
        """What the fast path sent, as the stack counts what it receives and sends itself
        (to be added to the stack's counters; names at zero left out)."""
        kernel = self.kernel
        taken, taken6 = kernel.datagrams_taken, kernel.datagrams_taken6
        direct, direct6 = kernel.datagrams_direct, kernel.datagrams_direct6
        counts = {"eth.rx": taken, "udp.tx_host": taken, "udp.fast_path": taken,
                  "ipv4.rx": taken - taken6, "udp.rx": taken - taken6,
                  "ipv6.rx": taken6, "udp6.rx": taken6,
                  # Received straight into the RX ring (``receive``).
                  "udp.rx_host": direct, "udp.rx_direct": direct, "udp.fast_path_rx": direct,
                  "ipv4.tx": direct - direct6, "ipv6.tx": direct6}
        counts.update((name, getattr(kernel, attribute))
                      for name, attribute in KERNEL_TOTALS.items())
        return {name: value for name, value in counts.items() if value}


def _packed(family: socket.AddressFamily, address: str) -> bytes:
    """A peer's address as the socket's recvfrom gives it, packed (scope id dropped)."""
    return socket.inet_pton(family, address.partition("%")[0])

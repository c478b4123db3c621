"""Network: the NAT stack, its protocol engines and their host-socket glue, wired together.

This is the one place that knows every engine. ``build_stack`` attaches the
sans-IO engines (ICMP, DHCP, DNS, UDP NAT; NDP/RA and DHCPv6 for IPv6) to the
dispatcher (`stack.NetworkStack`, which answers ARP itself); ``Network`` adds TCP
and TFTP, attaches each engine's I/O glue from `hostio/`, drives every
engine's timers from one list and merges every engine's counters.

The device sees only ``GuestSide``: ``receive_batch`` (frames from the guest),
``frames_to_guest`` (frames for the guest), ``flush`` (run queued host
commands), output listeners (told when frames for the guest appear, from
whatever callback produced them, so RX is filled without polling),
``device_started`` (a ring started: the guest runs here), the guest's offloads
and MAC. With several guests a device talks to a ``guests.GuestPort`` instead,
which implements the same Protocol, plus ``SwitchedFrames``.

Forwarded ports change at run time through ``add_forwards``/``remove_forwards`` (the
control socket's commands); ``forwards()`` lists them with where they came from.

Parts above this layer plug in through hooks, never the other way round:
``add_device_started_hook`` and ``add_close_hook`` (live migration, wired by
the CLI) and ``set_tx_sink`` (where guest TX batches go instead of the stack;
the benchmark's ring case discards them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Sized
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from vhostnet.guest_queue import GuestBatch, GuestBatchPool, GuestFrameQueue
from vhostnet.hostio.dns import DnsGlue
from vhostnet.hostio.icmp import IcmpGlue
from vhostnet.hostio.tftp_files import TftpRoot
from vhostnet.hostio.udp import UdpGlue
from vhostnet.hostio.udp_fast import TxKick, UdpFastSender
from vhostnet.stack.config import PortForward, StackConfig
from vhostnet.stack.counters import add_counts
from vhostnet.stack.dhcp import DhcpServer
from vhostnet.stack.dhcpv6 import Dhcpv6Server
from vhostnet.stack.dns import DnsForwarder
from vhostnet.stack.icmp import IcmpEngine
from vhostnet.stack.leases import LeasePool
from vhostnet.stack.ndp import NdpEngine
from vhostnet.stack.stack import NetworkStack
from vhostnet.stack.tftp import TftpServer
from vhostnet.stack.udp_nat import UdpNat
from vhostnet.tcp.engine import TcpEngine
from vhostnet.tcp.fast import DirectRx, TcpFastPath
from vhostnet.tcp.host import TcpHost
from vhostnet.vhost_user.ratelimit import limiter, run_each_pending, run_guarded
from vhostnet.wire.checksum import PROTO_ICMP, PROTO_TCP
from vhostnet.wire.ipv6 import NEXT_HEADER_UDP
from vhostnet.wire.offload import GuestOffloads

log = logging.getLogger(__name__)

# Timer resolution bounds: fine enough for TCP's RTO and TFTP's retries,
# coarse enough that an idle vhostnet costs nothing measurable.
MIN_TICK = 0.01
MAX_TICK = 1.0


class FrameBatch(Protocol):
    """Guest frames drained from the TX ring (``vhostnet.virtqueue.FrameBatch``), by index."""

    def frame(self, index: int) -> memoryview: ...

    def vnet(self, index: int) -> int: ...

    def arrays(self) -> tuple: ...  # the C fast paths read the batch's storage directly


class GuestSide(Protocol):
    """What a device (``NetDevice``, ``StreamDevice``) uses of the network behind it.

    ``Network`` is one (one guest, ``--max-guests 1``); ``guests.GuestPort`` is the other
    (a port of the switch, bound to its guest's own ``Network``).
    """

    @property
    def config(self) -> StackConfig: ...  # the device reads ``mtu``

    @property
    def frames_to_guest(self) -> GuestFrameQueue: ...  # frames for the guest, oldest first

    def receive_batch(self, batch: FrameBatch, count: int, now: float,
                      udp_taken: int | None = None) -> None: ...

    def flush(self) -> None: ...

    # The C reader of a TX ring's kick (``UdpFastSender.tx_kick``), or None: the device's own.
    def tx_kick(self, fd: int, batch: FrameBatch, max_frames: int, **callbacks: Any
                ) -> TxKick | None: ...

    def add_output_listener(self, listener: Callable[[], None]) -> None: ...

    def remove_output_listener(self, listener: Callable[[], None]) -> None: ...

    def set_guest_offloads(self, csum: bool, tso4: bool, tso6: bool = False) -> None: ...

    def learn_guest_mac(self, mac: bytes) -> None: ...

    def device_started(self, now: float) -> None: ...

    # The device's RX ring for the TCP fast path's direct writes (None: stop; with
    # ``owner``, only if ``owner`` is the one set).
    def set_direct_rx(self, rx: DirectRx | None, owner: DirectRx | None = None) -> None: ...


class SwitchedFrames(Protocol):
    """Frames other guests sent to this port (``--max-guests`` above 1): a device pushes
    them into its RX ring or stream after its network's own (``guests.GuestPort``)."""

    def outgoing(self) -> FrameBatch | None: ...  # frames 0.. wait; None: nothing

    def taken(self, count: int) -> None: ...  # the first ``count`` went to the guest


TxSink = Callable[[FrameBatch, int, float], None]
"""Takes ``count`` guest frames of a TX batch at ``now`` in place of the stack."""


def build_stack(config: StackConfig, leases: LeasePool | None = None) -> NetworkStack:
    """The sans-IO stack with the engines ``config`` turns on attached: ICMP (both families),
    DHCP, DNS forwarder, UDP NAT, NDP/RA, DHCPv6 (no I/O: ``Network`` adds TCP, TFTP and the
    host glue). ``leases``: the lease pool DHCP, DHCPv6, ARP, NDP and DNS use (several
    guests, or --dhcp-host); None: the one guest at ``config.guest_ipv4``."""
    stack = NetworkStack(config, leases)
    if config.icmp:
        stack.icmp = IcmpEngine(config, stack.stats, stack.send_ipv4, stack.send_ipv6)
        stack.set_protocol_handler(PROTO_ICMP, stack.icmp)
    if config.ipv6:
        # One engine for NS/NA and RS/RA: config.ndp and config.ra switch its answers.
        stack.ndp = NdpEngine(config, stack.stats, stack, leases)
        if config.dhcpv6:
            stack.dhcpv6 = Dhcpv6Server(config, stack.stats, stack.send_udp6, leases,
                                        client_mac=lambda: stack.port_mac or stack.guest_mac)
            stack.add_udp6_service(stack.dhcpv6)
    if config.dhcp and config.ipv4:
        stack.dhcp = DhcpServer(config, stack.stats, stack.send_udp, leases,
                                on_acked=stack.move_guest_ipv4,
                                port_mac=lambda: stack.port_mac)
        stack.add_udp_service(stack.dhcp)
    if config.udp:
        stack.dns = DnsForwarder(config, stack.stats, stack.send_udp, stack.send_udp6, leases)
        stack.add_udp_service(stack.dns)
        stack.add_udp6_service(stack.dns)
        stack.udp_nat = UdpNat(config, stack.stats, stack.send_ipv4, stack.send_udp,
                               lambda: stack.guest_ipv4 or config.guest_ipv4,
                               send_udp6=stack.send_udp6,
                               send_icmpv6_error=stack.send_icmpv6_error,
                               guest_ipv6=lambda: stack.guest_ipv6 or config.guest_ipv6)
        stack.set_ipv6_protocol_handler(NEXT_HEADER_UDP, stack.udp_nat)
    return stack


class TimerClient(Protocol):
    """An engine with timers: ``Network`` asks them all, in one list."""

    def poll_timers(self, now: float) -> None: ...

    def next_timer(self) -> float | None: ...


class Glue(Protocol):
    """An engine's host-socket side (``vhostnet.hostio``, ``TcpHost``): ``flush`` executes
    what the engine queued in ``engine.commands`` (nothing there: no flush needed)."""

    engine: Any

    def flush(self) -> None: ...

    def close(self) -> None: ...


ForwardProtocol = Literal["tcp", "udp"]
FROM_COMMAND_LINE = "command line"
FROM_RUN_TIME = "run time"


@dataclass(frozen=True)
class ForwardState:
    """A forwarded port as ``Network.forwards`` lists it."""

    protocol: ForwardProtocol
    forward: PortForward
    source: str  # FROM_COMMAND_LINE or FROM_RUN_TIME
    listening: bool


class ForwardGlue(Protocol):
    """The host side of forwarded ports (``TcpHost``, ``UdpGlue``)."""

    def add_forwards(self, forwards: list[PortForward]) -> None: ...

    def remove_forwards(self, forwards: list[PortForward]) -> None: ...

    def is_listening(self, forward: PortForward) -> bool: ...


def _bind_key(forward: PortForward) -> tuple:
    """Where a forward listens: two forwards with the same key cannot both be bound."""
    return forward.host_addr, forward.host_port, forward.host_if, forward.dual_stack


class Network:
    """The guest's network: stack + engines + host glue + timers, for one vhostnet process."""

    def __init__(self, config: StackConfig, loop: asyncio.AbstractEventLoop, *,
                 listen_retry: float = 0.0, leases: LeasePool | None = None) -> None:
        self.config = config
        self.loop = loop
        # The guests' addresses and names: given (shared by several guests' networks), or
        # this network's own when the config wants one (--dhcp-host with one guest).
        self._own_leases = leases is None and config.uses_lease_pool
        self.leases = config.lease_pool() if self._own_leases else leases
        # Seconds to keep retrying forwarded ports another process (a migration
        # source on this host) still holds; 0: fail at once.
        self.listen_retry = listen_retry
        self.frames_to_guest = GuestFrameQueue()
        # Storages of built batches toward the guest, handed back by the queue once consumed.
        self.guest_batches = GuestBatchPool(config.mtu)
        self.frames_to_guest.recycle = self.guest_batches.give
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when the armed timer fires (time.monotonic)
        self._closed = False
        self._device_started_hooks: list[Callable[[float], None]] = []
        self._close_hooks: list[Callable[[], None]] = []
        self._tx_sink: TxSink | None = None
        self._frames_to_sink = 0
        self._glue: list[Glue] = []
        self._glue_flushes: tuple[tuple[Sized, Callable[[], None]], ...] = ()
        self.tcp: TcpEngine | None = None
        self.tcp_fast: TcpFastPath | None = None
        self.tcp_host: TcpHost | None = None
        self.tftp: TftpServer | None = None
        self.udp_fast: UdpFastSender | None = None
        self.udp_glue: UdpGlue | None = None
        # Forwarded ports by protocol and bind key -> (forward, where it came from).
        self._forwards: dict[str, dict[tuple, tuple[PortForward, str]]] = {
            protocol: {_bind_key(f): (f, FROM_COMMAND_LINE) for f in forwards}
            for protocol, forwards in (("tcp", config.tcp_forwards),
                                       ("udp", config.udp_forwards))}
        self.stack = build_stack(config, self.leases)
        self.stack.frames_to_guest = self.frames_to_guest
        # Exceptions timers and glue survived, by reason (``errors.*`` in stats).
        self.errors: Counter[str] = Counter()
        try:
            self._attach_engines()
        except BaseException:
            self.close()
            raise
        # Every engine with timers, in one list (the stack's own engines included).
        self._timer_clients: list[TimerClient] = [
            engine for engine in (self.stack.icmp, self.stack.dns, self.stack.udp_nat, self.tcp,
                                  self.tftp, self.stack.fragments, self.stack.ndp)
                      if engine is not None]
        self._schedule_timer()

    def _attach_engines(self) -> None:
        stack, config, loop = self.stack, self.config, self.loop
        if config.tcp:
            self.tcp = TcpEngine(config, stack)
            self.tcp.set_wakeup(self._wake_at)
            stack.set_protocol_handler(PROTO_TCP, self.tcp)
            stack.set_ipv6_protocol_handler(PROTO_TCP, self.tcp)
            # No after_event hook needed: frames the engine produces wake the
            # device through frames_to_guest (GuestFrameQueue) by themselves.
            self.tcp_host = TcpHost(self.tcp, loop, listen_retry=self.listen_retry)
            self._glue.append(self.tcp_host)
            self.tcp_fast = TcpFastPath(self.tcp, self.tcp_host, stack)
        if config.tftp_root:
            self.tftp = TftpServer(config, stack, TftpRoot(config.tftp_root))
            stack.add_udp_service(self.tftp)
            if config.ipv6:
                stack.add_udp6_service(self.tftp)
        if stack.icmp is not None:
            self._glue.append(IcmpGlue(stack.icmp, loop))
        if stack.dns is not None:
            self._glue.append(DnsGlue(stack.dns, loop))
        if stack.udp_nat is not None:
            self.udp_fast = UdpFastSender(stack.udp_nat, stack)
            self.udp_fast.attach_guest_output(
                self.guest_batches.take,
                lambda batch: self.frames_to_guest.append(GuestBatch(batch)),
                self.frames_to_guest)
            # Backpressure: host UDP sockets wait while the guest's queue is backlogged.
            self.udp_glue = UdpGlue(stack.udp_nat, loop, fast_path=self.udp_fast,
                                    guest_backlogged=self.frames_to_guest.backlogged)
            self.frames_to_guest.drained_listeners.append(self.udp_glue.resume_reading)
            self._glue.append(self.udp_glue)
        # (per batch: kept) Each glue's command queue, and its flush that empties it; last the
        # TCP fast path's record of changed flows (the flushes change flows) and its refresh,
        # now rather than at the next guest batch, which then waits less for its write.
        jobs = [(glue.engine.commands, glue.flush) for glue in self._glue]
        if self.tcp_fast is not None:
            jobs.append((self.tcp_fast.changed, self.tcp_fast.refresh))
        self._glue_flushes = tuple(jobs)

    # ---- hooks for the layers above -------------------------------------------

    def add_device_started_hook(self, hook: Callable[[float], None]) -> None:
        """Call ``hook(now)`` whenever the device starts a ring (the guest runs here)."""
        self._device_started_hooks.append(hook)

    def add_close_hook(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` when the network closes, after its host sockets."""
        self._close_hooks.append(hook)

    def set_tx_sink(self, sink: TxSink | None) -> None:
        """Send guest TX batches to ``sink`` instead of the stack (None: the stack again).

        Frames handed to a sink are counted as ``guest.tx_to_sink``.
        """
        self._tx_sink = sink
        if self.udp_fast is not None:
            self.udp_fast.set_tx_sink(sink is not None)

    # ---- device side ---------------------------------------------------------

    def device_started(self, now: float) -> None:
        """The device started a ring: tell the hooks (a migration may be abandoned)."""
        for hook in self._device_started_hooks:
            hook(now)

    def receive_batch(self, batch: FrameBatch, count: int, now: float,
                      udp_taken: int | None = None) -> None:
        """Hand ``count`` guest frames of ``batch`` to the stack (or to the TX sink).
        ``udp_taken``: the UDP fast path already sent that many of them (a ``TxKick``).

        UDP datagrams of established outbound flows and in-order data of
        established TCP flows are sent by the C fast paths first (the TCP one
        brings the engine's flows up to date before it returns); the stack sees
        the rest, in their original order. Each of those is copied out of the batch:
        engines may keep payloads in their command queues, and the batch is
        reused by the next drain.
        """
        if self._tx_sink is not None:
            self._frames_to_sink += count
            self._tx_sink(batch, count, now)
            return
        udp_fast, tcp_fast = self.udp_fast, self.tcp_fast
        if udp_fast is None:
            left = None
        elif udp_taken is None:
            left = udp_fast.send_batch(batch, count, now)
        else:
            left = udp_fast.sent(udp_taken, count, now)
        if tcp_fast is not None and (left is None or len(left)):
            # (UDP took every frame: nothing for TCP's pass, nor its refresh, which the next
            # batch with TCP in it does.)
            left = tcp_fast.send_batch(batch, count, now, left)
        if left is not None and not len(left):
            return  # the fast paths took every frame
        receive = self.stack.receive_frame
        frame, vnet = batch.frame, batch.vnet
        for index in range(count) if left is None else left.tolist():
            receive(bytes(frame(index)), now, vnet(index))

    def tx_kick(self, fd: int, batch: FrameBatch, max_frames: int, **callbacks: Any
                ) -> TxKick | None:
        """The UDP fast path's C reader for a TX ring's kick eventfd (``UdpFastSender.tx_kick``),
        or None without that fast path."""
        if self.udp_fast is None:
            return None
        return self.udp_fast.tx_kick(fd, batch, max_frames, **callbacks)

    def flush(self) -> None:
        """Run the host-side commands the engines queued (a failing glue does not stop the others).
        Runs per guest batch and host event, mostly with nothing queued: that is found here
        without a call."""
        for pending, _job in self._glue_flushes:
            if pending:
                # One guarded pass over all of them (the fast path's refresh included).
                run_each_pending(self.errors, "glue_flush", log, self._glue_flushes)
                return

    def add_output_listener(self, listener: Callable[[], None]) -> None:
        self.frames_to_guest.listeners.append(listener)
        if self.frames_to_guest:
            listener()

    def remove_output_listener(self, listener: Callable[[], None]) -> None:
        try:
            self.frames_to_guest.listeners.remove(listener)
        except ValueError:
            pass

    def set_direct_rx(self, rx: DirectRx | None, owner: DirectRx | None = None) -> None:
        """Let the TCP and UDP fast paths write host data straight into ``rx``'s RX ring (None:
        stop; with ``owner``, only if ``owner`` is the one set, so a closing device does not
        undo its successor)."""
        if self.tcp_fast is not None and (owner is None or self.tcp_fast.rx is owner):
            self.tcp_fast.set_rx(rx)
        if self.udp_fast is not None and (owner is None or self.udp_fast.rx is owner):
            self.udp_fast.rx = rx

    def set_guest_offloads(self, csum: bool, tso4: bool, tso6: bool = False) -> None:
        """What the guest's driver takes on receive (GUEST_CSUM, GUEST_TSO4, GUEST_TSO6), from
        the device."""
        self.stack.guest_offloads = GuestOffloads(csum=csum, tso4=csum and tso4,
                                                  tso6=csum and tso6)
        if self.udp_fast is not None:
            self.udp_fast.set_data_valid(csum)

    def serve_port(self, mac: bytes) -> None:
        """Several guests: the switch port bound to ``mac`` is this router's (``GuestPort.bind``);
        DHCP and DHCPv6 lease for that MAC only."""
        self.stack.serve_port(mac)

    def learn_guest_mac(self, mac: bytes) -> None:
        """SEND_RARP after a migration: the guest is at ``mac`` (its address stays as learned)."""
        if len(mac) == 6 and not mac[0] & 1:
            self.stack.guest_mac = bytes(mac)

    # ---- forwarded ports ---------------------------------------------------------

    def forwards(self) -> list[ForwardState]:
        """Every forwarded port, TCP then UDP, by host port (``all``'s ports the host
        already used are left out: they were never bound)."""
        states = []
        for protocol, table in self._forwards.items():
            glue = self._forward_glue(protocol, required=False)
            for forward, source in sorted(table.values(), key=lambda e: e[0].host_port):
                listening = glue is not None and glue.is_listening(forward)
                if listening or not forward.optional:
                    states.append(ForwardState(protocol, forward, source, listening))  # type: ignore[arg-type]
        return states

    def add_forwards(self, protocol: ForwardProtocol, forwards: list[PortForward]) -> None:
        """Forward ``forwards`` from now on, all or none: ``ValueError`` (one sentence) for a
        port already forwarded or one that cannot be bound, and nothing changes."""
        glue = self._forward_glue(protocol)
        table = self._forwards[protocol]
        new = []
        for forward in forwards:
            if _bind_key(forward) not in table:
                new.append(forward)
            elif not forward.optional:
                raise ValueError(f"{protocol} port {forward.host_port} is already forwarded")
        if not new:
            raise ValueError("no port to add")
        try:
            glue.add_forwards(new)
        except OSError as error:
            raise ValueError(error.strerror or str(error)) from None
        for forward in new:
            if glue.is_listening(forward):
                table[_bind_key(forward)] = (forward, FROM_RUN_TIME)
                log.info("forwarding %s port %d to guest port %d", protocol, forward.host_port,
                         forward.guest_port)

    def remove_forwards(self, protocol: ForwardProtocol, forwards: list[PortForward]) -> None:
        """Stop forwarding ``forwards`` (matched by where they listen; the guest side of the
        spec is not compared): their listeners close, connections they brought stay.
        ``ValueError`` for a port not forwarded, and nothing changes."""
        glue = self._forward_glue(protocol)
        table = self._forwards[protocol]
        found = []
        for forward in forwards:
            entry = table.get(_bind_key(forward))
            if entry is not None:
                found.append(entry[0])
            elif not forward.optional:
                raise ValueError(f"{protocol} port {forward.host_port} is not forwarded")
        if not found:
            raise ValueError("no forwarded port to remove")
        glue.remove_forwards(found)
        for forward in found:
            del table[_bind_key(forward)]
            log.info("stopped forwarding %s port %d", protocol, forward.host_port)

    def _forward_glue(self, protocol: str, required: bool = True) -> ForwardGlue | None:
        glue = {"tcp": self.tcp_host, "udp": self.udp_glue}.get(protocol)
        if glue is None and required:
            if protocol not in self._forwards:
                raise ValueError(f"unknown protocol {protocol!r} (tcp or udp)")
            raise ValueError(f"{protocol.upper()} is off in this vhostnet")
        return glue

    # ---- timers ------------------------------------------------------------------

    def next_timer(self) -> float | None:
        """The earliest deadline of any engine, or None."""
        deadlines = [d for c in self._timer_clients if (d := c.next_timer()) is not None]
        return min(deadlines) if deadlines else None

    def poll_timers(self, now: float) -> None:
        """Run every engine's timers due at ``now`` (no flush: the caller's, or the loop's)."""
        for client in self._timer_clients:
            run_guarded(self.errors, "timer", log, client.poll_timers, now)

    def _schedule_timer(self) -> None:
        deadline = self.next_timer()
        delay = deadline - time.monotonic() if deadline is not None else MAX_TICK
        delay = max(MIN_TICK, min(MAX_TICK, delay))
        self._timer = self.loop.call_later(delay, self._on_timer)
        self._timer_at = time.monotonic() + delay

    def _wake_at(self, deadline: float) -> None:
        """An engine's timer became due at ``deadline``, before the armed timer: bring it
        forward (a delayed ACK must not wait for the next tick)."""
        if self._closed or self._timer is None or deadline >= self._timer_at:
            return
        self._timer.cancel()
        self._timer = self.loop.call_later(max(0.0, deadline - time.monotonic()), self._on_timer)
        self._timer_at = deadline

    def _on_timer(self) -> None:
        if self._closed:
            return
        # Whatever a client raises (a bug, fds exhausted), the timer comes back:
        # without it no flow expires and no DNS query ever times out.
        try:
            self.poll_timers(time.monotonic())
            self.flush()
            limiter.summarise()
        finally:
            self._schedule_timer()

    # ---- statistics and life cycle -------------------------------------------------

    def counters(self) -> dict[str, int]:
        """Every counter of the stack, its engines, the fast paths and the guest queue, with the
        current flow gauges (the one place they are merged; the server adds the device's)."""
        merged = dict(self.stack.counters())
        if self.udp_fast is not None:
            add_counts(merged, self.udp_fast.counters())  # names the stack counts too
        if self.tcp is not None:
            merged.update(self.tcp.counters())
        if self.tcp_fast is not None:
            merged.update(self.tcp_fast.counters())
        if self.tftp is not None:
            merged.update(self.tftp.counters())
        if self._own_leases and self.leases is not None:
            merged.update(self.leases.counters())
        merged["guest.rx_backlog_dropped"] = self.frames_to_guest.dropped
        merged["guest.rx_batches_allocated"] = self.guest_batches.allocated
        merged.update({f"errors.{reason}": count for reason, count in self.errors.items()})
        if self._tx_sink is not None:
            merged["guest.tx_to_sink"] = self._frames_to_sink
        return merged

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        for glue in self._glue:
            glue.close()
        self._glue.clear()
        for hook in self._close_hooks:
            hook()
        if self.tftp is not None:
            self.tftp.close()

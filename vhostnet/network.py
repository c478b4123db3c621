"""Network: the NAT stack, its protocol engines and their host-socket glue, wired together.

This is the one place that knows every engine. The sans-IO stack
(`stack.NetworkStack`) builds its own small engines (ARP, ICMP, DHCP, DNS,
UDP NAT); here we add TCP and TFTP, attach each engine's I/O glue from
`hostio/`, and drive the timers from the event loop.

The device sees only: ``receive_batch`` (frames from the guest),
``frames_to_guest`` (frames for the guest), ``flush`` (run queued host
commands), and output listeners (told when frames for the guest appear, from
whatever callback produced them, so RX is filled without polling).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from vhostnet.hostio.dns import DnsGlue
from vhostnet.hostio.icmp import IcmpGlue
from vhostnet.hostio.tftp_files import TftpRoot
from vhostnet.hostio.udp import UdpGlue
from vhostnet.hostio.udp_fast import UdpFastSender
from vhostnet.migration.tcp_migrate import TcpMigration
from vhostnet.stack.config import StackConfig
from vhostnet.stack.stack import NetworkStack
from vhostnet.stack.tftp import TftpServer
from vhostnet.tcp.engine import TcpEngine
from vhostnet.tcp.fast import TcpFastPath
from vhostnet.tcp.host import TcpHost
from vhostnet.vhost_user.ratelimit import limiter, run_guarded
from vhostnet.wire.checksum import PROTO_TCP
from vhostnet.wire.offload import GuestOffloads

if TYPE_CHECKING:
    from vhostnet.virtqueue import FrameBatch

log = logging.getLogger(__name__)

# Frames waiting for RX buffers. A guest that stops reading its RX ring must
# not make us grow without bound; beyond this the oldest are dropped (TCP
# retransmits, UDP is allowed to lose them).
MAX_PENDING_FRAMES = 8192

# Timer resolution bounds: fine enough for TCP's RTO and TFTP's retries,
# coarse enough that an idle vhostnet costs nothing measurable.
MIN_TICK = 0.01
MAX_TICK = 1.0


class GuestFrameQueue(deque):
    """Frames for the guest; tells its listeners when it goes from empty to non-empty.

    An entry is a frame (bytes), or ``(frame, vnet)`` for a frame with offload fields.

    Engines append to it from any callback (guest frame, host socket, timer);
    the device registers a listener and fills the RX ring on the next loop turn.
    """

    def __init__(self) -> None:
        super().__init__()
        self.listeners: list[Callable[[], None]] = []
        self.dropped = 0

    def append(self, frame: bytes) -> None:  # type: ignore[override]
        was_empty = not self
        if len(self) >= MAX_PENDING_FRAMES:
            self.popleft()
            self.dropped += 1
        super().append(frame)
        if was_empty:
            for listener in self.listeners:
                listener()


class Network:
    """The guest's network: stack + engines + host glue + timers, for one vhostnet process."""

    def __init__(self, config: StackConfig, loop: asyncio.AbstractEventLoop, *,
                 listen_retry: float = 0.0) -> None:
        self.config = config
        self.loop = loop
        # Seconds to keep retrying forwarded ports another process (a migration
        # source on this host) still holds; 0: fail at once.
        self.listen_retry = listen_retry
        self.stack = NetworkStack(config)
        self.frames_to_guest = GuestFrameQueue()
        self.stack.frames_to_guest = self.frames_to_guest
        self._timer_clients: list = [self.stack]
        # Exceptions timers and glue survived, by reason (``errors.*`` in stats).
        self.errors: Counter[str] = Counter()
        self._glue: list = []
        try:
            self._attach_engines()
        except BaseException:
            self.close()
            raise
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        # Its repair access (TCP_REPAIR directly or through the helper) is set by the CLI.
        self.tcp_migration = TcpMigration(self)
        # Hidden --discard-tx: the device drops guest frames instead of handing
        # them over, so `vhostnet bench ring` times the TX ring alone.
        self.discard_tx = False
        self._schedule_timer()

    def _attach_engines(self) -> None:
        stack, config, loop = self.stack, self.config, self.loop
        self.tcp: TcpEngine | None = None
        self.tcp_fast: TcpFastPath | None = None
        self.tcp_host: TcpHost | None = None
        if config.tcp:
            self.tcp = TcpEngine(config, stack)
            stack.set_protocol_handler(PROTO_TCP, self.tcp)
            self._timer_clients.append(self.tcp)
            # No after_event hook needed: frames the engine produces wake the
            # device through frames_to_guest (GuestFrameQueue) by themselves.
            self.tcp_host = TcpHost(self.tcp, loop, listen_retry=self.listen_retry)
            self._glue.append(self.tcp_host)
            self.tcp_fast = TcpFastPath(self.tcp, self.tcp_host, stack)
        self.tftp: TftpServer | None = None
        if config.tftp_root:
            self.tftp = TftpServer(config, stack, TftpRoot(config.tftp_root))
            stack.add_udp_service(self.tftp)
            self._timer_clients.append(self.tftp)
        if stack.icmp is not None:
            self._glue.append(IcmpGlue(stack.icmp, loop))
        if stack.dns is not None:
            self._glue.append(DnsGlue(stack.dns, loop))
        self.udp_fast: UdpFastSender | None = None
        if stack.udp_nat is not None:
            self.udp_fast = UdpFastSender(stack.udp_nat, stack)
            self._glue.append(UdpGlue(stack.udp_nat, loop, fast_path=self.udp_fast))

    # ---- device side ---------------------------------------------------------

    def receive_batch(self, batch: FrameBatch, count: int, now: float) -> None:
        """Hand ``count`` guest frames of ``batch`` to the stack.

        UDP datagrams of established outbound flows and in-order data of
        established TCP flows are sent by the C fast paths first (the TCP one
        brings the engine's flows up to date before it returns); the stack sees
        the rest, in their original order. Each of those is copied out of the batch:
        engines may keep payloads in their command queues, and the batch is
        reused by the next drain.
        """
        receive = self.stack.receive_frame
        frame, vnet = batch.frame, batch.vnet
        left = self.udp_fast.send_batch(batch, count, now) if self.udp_fast is not None else None
        if self.tcp_fast is not None:
            left = self.tcp_fast.send_batch(batch, count, now, left)
        for index in range(count) if left is None else left.tolist():
            receive(bytes(frame(index)), now, vnet(index))

    def flush(self) -> None:
        """Run the host-side commands the engines queued (a failing glue does not stop the others)."""
        for glue in self._glue:
            run_guarded(self.errors, "glue_flush", log, glue.flush)

    def add_output_listener(self, listener: Callable[[], None]) -> None:
        self.frames_to_guest.listeners.append(listener)
        if self.frames_to_guest:
            listener()

    def remove_output_listener(self, listener: Callable[[], None]) -> None:
        try:
            self.frames_to_guest.listeners.remove(listener)
        except ValueError:
            pass

    def set_guest_offloads(self, csum: bool, tso4: bool) -> None:
        """What the guest's driver takes on receive (GUEST_CSUM, GUEST_TSO4), from the device."""
        self.stack.guest_offloads = GuestOffloads(csum=csum, tso4=csum and tso4)

    def learn_guest_mac(self, mac: bytes) -> None:
        """SEND_RARP after a migration: the guest is at ``mac`` (its address stays as learned)."""
        if len(mac) == 6 and not mac[0] & 1:
            self.stack.guest_mac = bytes(mac)

    # ---- timers ------------------------------------------------------------------

    def _schedule_timer(self) -> None:
        now = time.monotonic()
        deadlines = [d for c in self._timer_clients if (d := c.next_timer()) is not None]
        delay = min(deadlines) - now if deadlines else MAX_TICK
        delay = max(MIN_TICK, min(MAX_TICK, delay))
        self._timer = self.loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        if self._closed:
            return
        # Whatever a client raises (a bug, fds exhausted), the timer comes back:
        # without it no flow expires and no DNS query ever times out.
        try:
            now = time.monotonic()
            for client in self._timer_clients:
                run_guarded(self.errors, "timer", log, client.poll_timers, now)
            self.flush()
            limiter.summarise()
        finally:
            self._schedule_timer()

    # ---- statistics and life cycle -------------------------------------------------

    def counters(self) -> dict[str, int]:
        merged = dict(self.stack.counters())
        if self.tcp is not None:
            merged.update(self.tcp.counters())
        if self.tcp_fast is not None:
            merged.update(self.tcp_fast.counters())
        if self.tftp is not None:
            merged.update(self.tftp.counters())
        merged["guest.rx_backlog_dropped"] = self.frames_to_guest.dropped
        merged.update({f"errors.{reason}": count for reason, count in self.errors.items()})
        return merged

    def close(self) -> None:
        self._closed = True
        timer = getattr(self, "_timer", None)
        if timer is not None:
            timer.cancel()
        for glue in self._glue:
            glue.close()
        self._glue.clear()
        if getattr(self, "tcp_migration", None) is not None:
            self.tcp_migration.close_catchers()
        if getattr(self, "tftp", None) is not None:
            self.tftp.close()

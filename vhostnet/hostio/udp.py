"""Host sockets for the UDP NAT engine (``vhostnet.stack.udp_nat.UdpNat``).

``UdpGlue(engine, loop)``:

- binds one listening socket per ``engine.config.udp_forwards`` entry at construction:
  a forward without a bind address (``dual_stack``) gets one dual-stack ``[::]`` socket
  (IPV6_V6ONLY off: IPv4 peers arrive as IPv4-mapped addresses), as does any IPv6 bind
  address (passt: "UDP forwards bound on IPv6 also take IPv4"); without IPv6 on the host
  the wildcard falls back to 0.0.0.0;
- ``flush()`` executes the engine's queued commands (``UdpOpen``: a connected
  non-blocking socket per outbound flow; ``UdpBindPeer``: an inbound flow answers
  through its forward's listening socket; ``UdpSend``; ``UdpClose``). The
  integrator calls it after every batch of guest frames and after ``poll_timers``;
- socket readiness (``loop.add_reader``) drains datagrams in bounded batches and
  reports them with ``engine.on_host_datagram`` / ``on_forward_datagram`` /
  ``on_host_error``;
- ``close()`` closes every socket.

With a fast path (``hostio.udp_fast``, attached to the guest's frame queue by the network),
datagrams of outbound flows and of known peers on forwarded ports are read and built into
frames in C; ``receive_batch``/``receive_batch_from`` read what is left to Python (no fast
path, no guest MAC yet).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from vhostnet.outbound import open_outbound
from vhostnet.stack.config import PortForward, listener_options
from vhostnet.stack.udp_nat import UdpBindPeer, UdpClose, UdpNat, UdpOpen, UdpSend

if TYPE_CHECKING:
    from vhostnet.hostio.udp_fast import UdpFastSender

log = logging.getLogger(__name__)

MAX_DATAGRAM = 65535
# Datagrams taken per readiness callback: enough to amortise the wakeup, small
# enough that one busy flow cannot starve the rest of the event loop.
BATCH_LIMIT = 64


def receive_batch(sock: socket.socket, limit: int = BATCH_LIMIT) -> tuple[list[bytes], int | None]:
    """Read up to ``limit`` datagrams until EAGAIN; returns (datagrams, errno or None)."""
    datagrams: list[bytes] = []
    for _ in range(limit):
        try:
            datagrams.append(sock.recv(MAX_DATAGRAM))
        except (BlockingIOError, InterruptedError):
            break
        except OSError as error:
            return datagrams, error.errno
    return datagrams, None


def receive_batch_from(sock: socket.socket, limit: int = BATCH_LIMIT
                       ) -> tuple[list[tuple[bytes, tuple]], int | None]:
    """Like ``receive_batch`` for unconnected sockets: (payload, peer address) pairs."""
    datagrams: list[tuple[bytes, tuple]] = []
    for _ in range(limit):
        try:
            datagrams.append(sock.recvfrom(MAX_DATAGRAM))
        except (BlockingIOError, InterruptedError):
            break
        except OSError as error:
            return datagrams, error.errno
    return datagrams, None


def family_of(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


class UdpGlue:
    """Executes ``UdpNat`` commands on real sockets; see the module docstring."""

    def __init__(self, engine: UdpNat, loop: asyncio.AbstractEventLoop,
                 clock: Callable[[], float] = time.monotonic,
                 fast_path: UdpFastSender | None = None,
                 guest_backlogged: Callable[[], bool] | None = None) -> None:
        self.engine = engine
        # True while the guest's queue holds too much: readers stop until resume_reading.
        self.guest_backlogged = guest_backlogged
        self._paused: dict[int, tuple[Callable[..., None], tuple]] = {}  # fd -> its reader
        # Outbound flows go to the C fast path once their socket is connected.
        self.fast_path = fast_path
        self.loop = loop
        self.clock = clock
        self._flow_sockets: dict[int, socket.socket] = {}
        # The loop's reader of each flow socket: the fast path's C reader for a registered
        # flow (straight into the RX ring, ``_on_flow_readable`` its fallback), else that.
        self._flow_readers: dict[int, Callable[[], None]] = {}
        self._peers: dict[int, tuple[socket.socket, tuple[str, int]]] = {}
        self._listeners: dict[PortForward, socket.socket] = {}
        for forward in engine.config.udp_forwards:
            self._listen(forward)

    # --- forwarded ports ----------------------------------------------------

    def _listen(self, forward: PortForward) -> None:
        """Bind ``forward`` at start: a failure is logged and that forward stays off."""
        try:
            self._open_listener(forward)
        except OSError as error:
            if not (forward.optional and error.errno == errno.EADDRINUSE):
                log.warning("%s; that forward stays off", error.strerror)
            # `all`: the ports the host already uses are not forwarded (passt)

    def _open_listener(self, forward: PortForward) -> None:
        """Bind and serve ``forward``; ``OSError`` with a sentence in ``strerror`` if it cannot."""
        address = "::" if forward.dual_stack else forward.host_addr
        try:
            sock = self._bind_listener(forward, address)
        except OSError as error:
            if address != "::" or error.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                raise _bind_error(forward, address, error) from None
            log.info("no IPv6 on the host (%s): UDP port %d forwarded on IPv4 only",
                     error.strerror, forward.host_port)
            try:
                sock = self._bind_listener(forward, forward.host_addr)
            except OSError as error4:
                raise _bind_error(forward, forward.host_addr, error4) from None
        self._listening(forward, sock)

    def _bind_listener(self, forward: PortForward, address: str) -> socket.socket:
        sock = socket.socket(family_of(address), socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if sock.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            for option in listener_options(forward, self.engine.config.freebind):
                sock.setsockopt(*option)
            sock.bind((address, forward.host_port))
        except OSError:
            sock.close()
            raise
        return sock

    def is_listening(self, forward: PortForward) -> bool:
        """Whether ``forward``'s socket is bound (not: skipped by ``all``, or failed at start)."""
        return forward in self._listeners

    def add_forwards(self, forwards: list[PortForward]) -> None:
        """Bind ``forwards`` now, all or none: on a bind error, the sockets this call opened
        close again and ``OSError`` (one sentence in ``strerror``) is raised. A forward from
        ``all`` whose port the host already uses is skipped, as at start."""
        opened: list[PortForward] = []
        try:
            for forward in forwards:
                try:
                    self._open_listener(forward)
                except OSError as error:
                    if not (forward.optional and error.errno == errno.EADDRINUSE):
                        raise
                    continue
                opened.append(forward)
        except OSError:
            self.remove_forwards(opened)
            raise

    def remove_forwards(self, forwards: list[PortForward]) -> None:
        """Close the sockets of ``forwards``. Inbound flows that answered through one lose
        their way back: their replies are dropped until the flow expires."""
        for forward in forwards:
            sock = self._listeners.pop(forward, None)
            if sock is None:
                continue
            for flow_id, (listener, _peer) in list(self._peers.items()):
                if listener is sock:
                    self._forget_peer(flow_id)
            self._stop_reading(sock)
            sock.close()

    def _listening(self, forward: PortForward, sock: socket.socket) -> None:
        self._listeners[forward] = sock
        self.loop.add_reader(sock.fileno(), self._on_listener_readable, forward, sock)

    def _on_listener_readable(self, forward: PortForward, sock: socket.socket) -> None:
        if self._paused_for_guest(sock, self._on_listener_readable, forward, sock):
            return
        now = self.clock()
        left = self.fast_path.receive_forwarded(sock, now) if self.fast_path is not None else None
        if left is None:
            datagrams, _error = receive_batch_from(sock)
            left = [(payload, peer[0], peer[1]) for payload, peer in datagrams]
        for payload, peer_addr, peer_port in left:
            self.engine.on_forward_datagram(forward, peer_addr, peer_port, payload, now)
        # Errors on an unconnected socket are stale ICMP for some peer: nothing to do.
        self.flush()

    # --- commands -------------------------------------------------------------

    def flush(self) -> None:
        """Execute every queued command of the engine."""
        commands = self.engine.commands
        while commands:
            command = commands.popleft()
            if isinstance(command, UdpSend):
                self._send(command)
            elif isinstance(command, UdpOpen):
                self._open(command)
            elif isinstance(command, UdpBindPeer):
                listener = self._listeners.get(command.forward)
                if listener is not None:
                    self._peers[command.flow_id] = (listener, (command.peer_addr, command.peer_port))
                    if self.fast_path is not None:
                        self.fast_path.register_peer(command.flow_id, listener,
                                                     command.peer_addr, command.peer_port)
            elif isinstance(command, UdpClose):
                self._close_flow(command.flow_id)

    def _open(self, command: UdpOpen) -> None:
        sock = None
        try:
            # socket() itself fails with EMFILE when fds run out: the flow fails, not the flush.
            # Bound to -o/--outbound-if4/6 there, as passt binds its outbound sockets.
            sock = open_outbound(self.engine.config, command.host_addr)
            sock.connect((command.host_addr, command.host_port))
        except OSError as error:
            if sock is not None:
                sock.close()
            self.engine.on_host_error(command.flow_id, error.errno or 0, self.clock())
            return
        self._flow_sockets[command.flow_id] = sock
        reader: Callable[[], None] = partial(self._on_flow_readable, command.flow_id, sock)
        if self.fast_path is not None and self.fast_path.register(command.flow_id, sock):
            reader = self.fast_path.flow_reader(command.flow_id, reader, self.clock) or reader
        self._flow_readers[command.flow_id] = reader
        self.loop.add_reader(sock.fileno(), reader)

    def _send(self, command: UdpSend) -> None:
        try:
            sock = self._flow_sockets.get(command.flow_id)
            if sock is not None:
                sock.send(command.payload)
                return
            peer = self._peers.get(command.flow_id)
            if peer is not None:
                peer[0].sendto(command.payload, peer[1])
        except (BlockingIOError, InterruptedError):
            self.engine.counters.inc("udp.drop.host_busy")  # UDP may lose; do not block
        except OSError as error:
            self.engine.on_host_error(command.flow_id, error.errno or 0, self.clock())

    def _on_flow_readable(self, flow_id: int, sock: socket.socket) -> None:
        backlogged = self.guest_backlogged  # (_paused_for_guest's test inline: once a reply)
        if backlogged is not None and backlogged():
            self._pause(sock, self._flow_readers.get(flow_id)
                        or partial(self._on_flow_readable, flow_id, sock))
            return
        now = self.clock()
        if self.fast_path is not None and self.fast_path.receive(flow_id, now):
            return
        datagrams, error = receive_batch(sock)
        for payload in datagrams:
            self.engine.on_host_datagram(flow_id, payload, now)
        if error is not None:
            self.engine.on_host_error(flow_id, error, now)

    def _forget_peer(self, flow_id: int) -> None:
        if self._peers.pop(flow_id, None) is not None and self.fast_path is not None:
            self.fast_path.unregister_peer(flow_id)  # before the socket's fd can be reused

    def _close_flow(self, flow_id: int) -> None:
        self._forget_peer(flow_id)
        self._flow_readers.pop(flow_id, None)
        sock = self._flow_sockets.pop(flow_id, None)
        if sock is not None:
            if self.fast_path is not None:
                self.fast_path.unregister(flow_id)  # before the fd number can be reused
            self._stop_reading(sock)
            sock.close()

    # --- backpressure: the guest's queue full, datagrams wait in the host's buffers ------

    def _paused_for_guest(self, sock: socket.socket, reader: Callable[..., None],
                          *args: object) -> bool:
        """Stop reading ``sock`` while the guest's queue is backlogged (True: stopped)."""
        if self.guest_backlogged is None or not self.guest_backlogged():
            return False
        self._pause(sock, reader, *args)
        return True

    def _pause(self, sock: socket.socket, reader: Callable[..., None], *args: object) -> None:
        """Stop reading ``sock`` until ``resume_reading`` (then ``reader(*args)`` again)."""
        fd = sock.fileno()
        self.loop.remove_reader(fd)
        self._paused[fd] = (reader, args)
        self.engine.counters.inc("udp.rx_paused")

    def resume_reading(self) -> None:
        """The guest's queue drained: read the stopped sockets again (what came meanwhile
        waited in their buffers, in order)."""
        paused, self._paused = self._paused, {}
        for fd, (reader, args) in paused.items():
            self.loop.add_reader(fd, reader, *args)

    @property
    def paused_sockets(self) -> int:
        return len(self._paused)

    def _stop_reading(self, sock: socket.socket) -> None:
        self._paused.pop(sock.fileno(), None)
        self.loop.remove_reader(sock.fileno())

    def close(self) -> None:
        """Close every socket this glue opened."""
        for flow_id in list(self._flow_sockets):
            self._close_flow(flow_id)
        self._peers.clear()
        self.remove_forwards(list(self._listeners))

    @property
    def open_sockets(self) -> int:
        return len(self._flow_sockets) + len(self._listeners)


def _bind_error(forward: PortForward, address: str, error: OSError) -> OSError:
    return OSError(error.errno, f"cannot listen on UDP {address} port {forward.host_port}: "
                                f"{error.strerror}")

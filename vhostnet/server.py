"""The event loop glue: the vhost-user listening socket and its connections.

One QEMU at a time is served (``--max-guests N``: up to N, each on its own
port of the switch, ``guests.py``). QEMU reconnects after either side restarts
(`reconnect=`/`reconnect-ms=` on its chardev), so the socket keeps listening
for the whole life of the process; while every port is taken, one more
front-end is refused with a log line (counted: ``server.refused_full``). The network (NAT state, host sockets, forwards)
belongs to the server and survives reconnects; everything tied to one
connection (memory mappings, rings, eventfds) lives in its NetDevice.

The same socket serves QEMU's ``-netdev stream`` (stream.py). An accepted
front-end is ``Undecided`` until its first 4 bytes arrive: a vhost-user
front-end speaks first, and its header read as a big-endian frame length is
impossible; anything else is a stream peer, which may stay silent until its
guest sends (frames for the guest wait in the network meanwhile, as they do
until the guest's MAC is known). ``vhost_user_only`` (``--vhost-user``) refuses
stream peers.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
from collections import Counter
from collections.abc import Callable

from vhostnet.capture import Capture
from vhostnet.device import DeviceStateHandler, NetDevice
from vhostnet.guests import GuestPort, Guests
from vhostnet.network import GuestSide, Network
from vhostnet.stack.counters import add_counts
from vhostnet.stream import LENGTH_BYTES, StreamDevice, looks_like_vhost_user
from vhostnet.vhost_user.backend import CLOSE, BackendHandler
from vhostnet.vhost_user.codec import CodecError, Framer
from vhostnet.vhost_user.connection import close_fds, read_available, send_message
from vhostnet.vhost_user.ratelimit import limiter

log = logging.getLogger(__name__)

MAX_READS_PER_WAKEUP = 64


class SocketPathError(Exception):
    """The socket path cannot be used; the message is one sentence for the user."""


def open_listening_socket(path: str) -> socket.socket:
    """Bind a UNIX stream socket at ``path``, replacing a stale socket file only.

    A live socket (something accepts on it) or any non-socket file at the path
    is an error, so that two vhostnet processes never steal each other's QEMU.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise SocketPathError(f"cannot use socket path {path}: {exc.strerror}") from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketPathError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: nobody listens on it any more
        else:
            raise SocketPathError(f"socket {path} is already in use by another process")
        finally:
            probe.close()
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise SocketPathError(f"directory {directory} for the socket does not exist")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.ENAMETOOLONG or "too long" in str(exc):
            raise SocketPathError(f"socket path {path} is too long for a UNIX socket") from None
        raise SocketPathError(f"cannot create socket {path}: {exc.strerror or exc}") from None
    sock.listen(4)
    sock.setblocking(False)
    return sock


class Connection:
    """One vhost-user front-end: bytes in, handler, replies out."""

    def __init__(self, server: Server, sock: socket.socket, first_bytes: bytes = b"",
                 first_fds: list[int] | None = None) -> None:
        self.server = server
        self.sock = sock
        self.framer = Framer()
        # What detection read (the start of the first header, with its fds).
        self.framer.feed(first_bytes, first_fds)
        self.port = port = server.open_port()
        side: GuestSide = server.network if port is None else port
        device_state = server.device_state(side) if server.device_state is not None else None
        self.device = NetDevice(server.loop, side, device_state,
                                queue_pairs=server.queue_pairs, switched=port)
        self.device.capture = server.capture
        self.handler = BackendHandler(self.device, offer_log=True,
                                      max_queue_pairs=server.queue_pairs)
        self.device.on_memory_fault = self._on_memory_fault
        self.closed = False
        server.loop.add_reader(sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        # Read at most what the framer wants, so that fds stay attached to the
        # message they came with; a bounded number of reads per wakeup keeps
        # one chatty front-end from starving the data path.
        for _ in range(MAX_READS_PER_WAKEUP):
            if self.closed:
                return
            try:
                data, fds = read_available(self.sock, self.framer.wanted())
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("vhost-user connection error: %s", exc)
                self.close()
                return
            if not data:
                log.info("front-end disconnected")
                self.close()
                return
            try:
                self.framer.feed(data, fds)
                for message in self.framer.messages():
                    replies = self.handler.handle(message)
                    if replies is CLOSE:
                        log.error("closing the vhost-user connection after a fatal protocol error")
                        self.close()
                        return
                    for reply in replies:
                        send_message(self.sock, reply)
            except CodecError as exc:
                log.error("malformed vhost-user stream (%s); closing the connection", exc)
                self.close()
                return
            except OSError as exc:
                log.warning("cannot reply to the front-end (%s); closing the connection", exc)
                self.close()
                return

    def _on_memory_fault(self) -> None:
        # The queue logged the one line saying why.
        self.close()

    def counters(self) -> dict[str, int]:
        """This connection's device, ring and vhost-user counts."""
        merged = self.device.all_counters()
        merged.update({f"vhost_user.{k}": v for k, v in self.handler.counters.items()})
        return merged

    def ring_positions(self) -> dict[str, int]:
        return self.device.ring_positions()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.server.loop.remove_reader(self.sock.fileno())
        self.handler.close()  # stops rings, unmaps regions, closes kick/call/err fds
        self.device.close()
        # The device's fault callback refers back to this connection: break the
        # cycle so its memory (frame batches, mappings) goes now, not at the next
        # full gc.
        self.device.on_memory_fault = None
        close_fds(self.framer.take_fds())
        self.sock.close()
        if self.port is not None:
            self.port.close()  # the switch forgets its MACs; its guest's Network stays
        self.server.connection_closed(self)


class StreamConnection:
    """One ``-netdev stream`` front-end: its StreamDevice and socket."""

    def __init__(self, server: Server, sock: socket.socket, first_bytes: bytes) -> None:
        self.server = server
        self.sock = sock
        self.closed = False
        self.port = port = server.open_port()
        self.device = StreamDevice(server.loop, server.network if port is None else port, sock,
                                   first_bytes, server.capture, switched=port)
        self.device.on_closed = self.close

    def counters(self) -> dict[str, int]:
        return self.device.all_counters()

    def ring_positions(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.device.on_closed = None  # no cycle left for the gc
        self.device.close()
        self.sock.close()
        if self.port is not None:
            self.port.close()
        self.server.connection_closed(self)


class Undecided:
    """An accepted front-end that has not sent its first 4 bytes yet (see the module doc)."""

    def __init__(self, server: Server, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.first = b""
        self.fds: list[int] = []  # SCM_RIGHTS fds that came with the first bytes (vhost-user)
        self.closed = False
        self.port: GuestPort | None = None  # none until the protocol is known
        server.loop.add_reader(sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        try:
            # recvmsg, so that fds sent with the first message are kept for it.
            data, fds = read_available(self.sock, LENGTH_BYTES - len(self.first))
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("front-end connection error: %s", exc)
            self.close()
            return
        self.fds += fds
        if not data:
            log.info("front-end disconnected before sending anything")
            self.close()
            return
        self.first += data
        if len(self.first) == LENGTH_BYTES:
            self._decide()

    def _decide(self) -> None:
        server, sock = self.server, self.sock
        server.loop.remove_reader(sock.fileno())
        self.closed = True  # this object is done; the socket goes to the real connection
        connection: Connection | StreamConnection
        if looks_like_vhost_user(self.first):
            log.info("vhost-user front-end")
            connection = Connection(server, sock, self.first, self.fds)
        else:
            close_fds(self.fds)
            if server.vhost_user_only:
                # QEMU reconnects every few seconds: one line per interval.
                limiter.log(log, logging.ERROR, "stream_refused", "refusing a stream front-end "
                            "(-netdev stream): --vhost-user allows vhost-user only")
                server.counts["refused_stream"] += 1
                sock.close()
                server.connection_closed(self)
                return
            log.info("stream front-end (-netdev stream)")
            connection = StreamConnection(server, sock, self.first)
        server.connection_decided(self, connection)

    def counters(self) -> dict[str, int]:
        return {}

    def ring_positions(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.server.loop.remove_reader(self.sock.fileno())
        close_fds(self.fds)
        self.sock.close()
        self.server.connection_closed(self)


FrontEnd = Connection | StreamConnection | Undecided


class Server:
    """Listens on the socket and serves up to ``max_guests`` front-ends, vhost-user or stream.

    ``listener`` None: no listening socket; ``serve_connected`` gives the one
    front-end (passt's --fd). ``one_off``: the server closes when its first
    front-end goes away (passt's --one-off; with several guests, when the last one
    connected goes away). ``queue_pairs``: the vhost-user device's queue pairs
    (--queues; the stream front-end has one). ``guests`` (``--max-guests`` above 1):
    each front-end gets a port of its switch instead of ``network`` itself.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, listener: socket.socket | None,
                 network: Network, *,
                 device_state: Callable[[GuestSide], DeviceStateHandler] | None = None,
                 one_off: bool = False, vhost_user_only: bool = False,
                 capture: Capture | None = None, queue_pairs: int = 1,
                 guests: Guests | None = None) -> None:
        self.loop = loop
        self.queue_pairs = queue_pairs
        self.listener = listener
        self.network = network
        self.guests = guests
        self.max_guests = 1 if guests is None else guests.max_guests
        self.one_off = one_off
        # Makes each connection's device-state handler for its network side (migration);
        # None: not offered.
        self.device_state = device_state
        self.vhost_user_only = vhost_user_only
        self.capture = capture  # -p/--pcap: every frame both ways, either mode
        self.counts: Counter[str] = Counter()
        self.front_ends: list[FrontEnd] = []
        # Device, ring and protocol counts of connections already closed: ``stats``
        # counts since vhostnet started, across guest reboots and QEMU restarts.
        self._closed_connection_counters: dict[str, int] = {}
        self.closed = asyncio.Event()
        if listener is not None:
            loop.add_reader(listener.fileno(), self._on_accept)

    @property
    def active(self) -> FrontEnd | None:
        """The front-end served (the first one with several guests), or None."""
        return self.front_ends[0] if self.front_ends else None

    def _on_accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("accept failed: %s", exc)
            return
        if len(self.front_ends) >= self.max_guests:
            self.counts["refused_full"] += 1
            if self.max_guests == 1:
                message = "refusing a second front-end: this socket already serves one guest"
            else:
                message = (f"refusing a front-end: all {self.max_guests} guest ports are in use "
                           "(--max-guests)")
            limiter.log(log, logging.WARNING, "front_end_refused", "%s", message)
            sock.close()
            return
        self.serve_connected(sock)

    def serve_connected(self, sock: socket.socket) -> None:
        """Serve a front-end on an already connected socket (accepted, or passt's --fd)."""
        sock.setblocking(False)
        log.info("front-end connected")
        self.front_ends.append(Undecided(self, sock))

    def open_port(self) -> GuestPort | None:
        """A switch port for a front-end whose protocol is now known (None: one guest)."""
        if self.guests is None:
            return None
        port = self.guests.open_port()
        if port is None:  # cannot happen: accept counts front-ends against the same limit
            raise RuntimeError("no free guest port")
        log.info("%s: front-end connected to the switch", port.label)
        return port

    def counters(self) -> dict[str, int]:
        """Every counter since vhostnet started; ``vqN.at.*``: positions of the running rings
        (with several guests: the networks' summed, per port ``guestK.``-prefixed, and
        ``guests.*``/``switch.*``)."""
        if self.guests is None:
            merged = self.network.counters()  # tcp.flows_open included
        else:
            merged = {}
            for network in self.guests.all_networks():
                add_counts(merged, network.counters())
            merged.update(self.guests.counters())
        add_counts(merged, self._closed_connection_counters)
        merged.update({f"server.{name}": count for name, count in self.counts.items()})
        if self.capture is not None:
            merged.update({f"capture.{name}": n for name, n in self.capture.counters.items()})
        for front_end in self.front_ends:
            add_counts(merged, self.port_counters(front_end))
            merged.update(_prefixed(front_end.port, front_end.ring_positions()))
        return merged

    def port_counters(self, front_end: FrontEnd) -> dict[str, int]:
        """A front-end's device counters, ``guestK.``-prefixed with several guests."""
        return _prefixed(front_end.port, front_end.counters())

    def front_end_of(self, port: GuestPort) -> FrontEnd | None:
        return next((f for f in self.front_ends if f.port is port), None)

    def connection_decided(self, undecided: Undecided, connection: Connection | StreamConnection,
                           ) -> None:
        """``undecided``'s first bytes chose its protocol: ``connection`` serves it now."""
        if undecided in self.front_ends:
            self.front_ends[self.front_ends.index(undecided)] = connection

    def connection_closed(self, connection: FrontEnd) -> None:
        add_counts(self._closed_connection_counters, self.port_counters(connection))
        if connection in self.front_ends:
            self.front_ends.remove(connection)
            if self.one_off and not self.front_ends:
                log.info("the front-end went away: stopping (--one-off)")
                self.loop.call_soon(self.close)

    def close(self) -> None:
        if self.closed.is_set():
            return
        for front_end in list(self.front_ends):
            front_end.close()
        if self.listener is not None:
            self.loop.remove_reader(self.listener.fileno())
            path = self.listener.getsockname()
            self.listener.close()
            if isinstance(path, str) and path:
                try:
                    os.unlink(path)
                except OSError:
                    pass
        if self.guests is not None:
            self.guests.close()  # every guest's Network, the first one included
        else:
            self.network.close()
        if self.capture is not None:
            self.capture.close()
        self.closed.set()


def _prefixed(port: GuestPort | None, counts: dict[str, int]) -> dict[str, int]:
    """Per-port names with several guests (``guest1.vq0...``); today's names with one."""
    if port is None:
        return counts
    return {f"{port.label}.{name}": value for name, value in counts.items()}

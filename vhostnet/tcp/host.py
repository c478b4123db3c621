"""Host-socket glue for the TCP translator: runs ``TcpEngine`` commands, reports socket events.

``TcpHost(engine, loop)`` owns one non-blocking socket per flow plus one
listening socket per forwarded port. ``flush()`` executes the engine's queued
commands; the integrator calls it after every batch of guest frames, and the
socket callbacks here call it themselves, then ``after_event`` (if given) so
the integrator can push the resulting frames to the guest.

Host -> guest data stays in the socket until the guest acknowledged it (see
``vhostnet.tcp.engine``): the ``Peek`` and ``Discard`` executors, the direct-peek hook and
the fast path's streaming rounds are the ``PeekGlue`` half (``host_peek.py``).

Readiness: the flow sockets wait in the glue's own epoll set (``readiness.py``: one
``epoll_ctl`` per change; reading alone level-triggered and kept armed across replies,
anything else one-shot). A socket whose queued bytes have all been
peeked is still "readable" in the level-triggered sense, so the reader is armed only
after a peek came back short, with SO_RCVLOWAT set one byte above what is already
queued: it fires when new data (or EOF) arrives, not because of old data. A peek that
fills the guest's window, EOF, or an event that led to no peek stops the reader until
the guest's ACK frees room; SO_RCVLOWAT is set only when its value changes. The
per-socket record and the small socket calls are in ``host_sockets.py``.

Every socket is closed exactly once: by a ``Close`` command or by ``close()``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Callable

from vhostnet.outbound import is_loopback, open_outbound
from vhostnet.stack.config import PortForward, listener_options
from vhostnet.tcp.engine import TcpEngine
from vhostnet.tcp.flow import Close, Connect, Discard, Peek, Send, ShutdownWrite
from vhostnet.tcp.host_peek import PeekGlue
from vhostnet.tcp.host_sockets import (
    HostSocket,
    abort_close,
    connected_already,
    send_space,
    set_lowat,
    tune,
)
from vhostnet.tcp.readiness import FAILED, PEER_FIN, READABLE, WRITABLE, Readiness

log = logging.getLogger("vhostnet.tcp.host")

MAX_COMMANDS_PER_FLUSH = 100_000
MAX_ACCEPTS_PER_EVENT = 64
LISTEN_BACKLOG = 128
# Below this much free send buffer, wait for the socket to drain and update the guest's window.
LOW_SEND_SPACE = 128 * 1024
# Above this much send space, small writes elsewhere need not measure it again.
ESTIMATE_SEND_SPACE = 2 * LOW_SEND_SPACE
LISTEN_RETRY_INTERVAL = 0.1


class TcpHost(PeekGlue):
    """The I/O side of ``TcpEngine``: sockets, readiness callbacks, command execution."""

    def __init__(
        self,
        engine: TcpEngine,
        loop: asyncio.AbstractEventLoop,
        *,
        clock: Callable[[], float] = time.monotonic,
        after_event: Callable[[], None] | None = None,
        listen_retry: float = 0.0,
    ) -> None:
        self.engine = engine
        self.loop = loop
        self.clock = clock
        self.after_event = after_event
        self._sockets: dict[int, HostSocket] = {}
        self._flow_by_fd: dict[int, int] = {}
        # flow id -> fd of each socket past connect() (read-only for others: the fast path
        # looks its flows' sockets up here, several times per request/response).
        self.connected_fds: dict[int, int] = {}
        self._readiness = Readiness(loop, self._on_socket_event)
        self._listeners: dict[PortForward, socket.socket] = {}
        self.peek_off: bool | None = None  # (PeekGlue's)
        self._closed = False
        self._before_close: Callable[[int], None] | None = None
        # Each command's executor, by the command's type (one dict look-up per command).
        self._handlers: dict[type, Callable] = {
            Peek: self._peek, Discard: self._discard, Send: self._send, Connect: self._connect,
            ShutdownWrite: self._shutdown_write, Close: self._close,
        }
        for forward in engine.config.tcp_forwards:
            if listen_retry > 0 and self._listen_or_wait(forward, self.clock() + listen_retry):
                continue
            self._listen(forward)

    # ---------------------------------------------------------------- public

    @property
    def open_sockets(self) -> int:
        return len(self._sockets)

    @property
    def watched_sockets(self) -> int:
        """Flow sockets in the epoll set (armed or not): never more than ``open_sockets``."""
        return self._readiness.watched

    def listening_addresses(self) -> list[tuple[str, int]]:
        return [sock.getsockname()[:2] for sock in self._listeners.values()]

    def is_listening(self, forward: PortForward) -> bool:
        """Whether ``forward``'s listener is bound (not: skipped by ``all``, or still waiting)."""
        return forward in self._listeners

    def add_forwards(self, forwards: list[PortForward]) -> None:
        """Listen on ``forwards`` now, all or none: on a bind error, the listeners this call
        opened close again and ``OSError`` (one sentence in ``strerror``) is raised.
        A forward from ``all`` whose port the host already uses is skipped, as at start."""
        opened: list[PortForward] = []
        try:
            for forward in forwards:
                self._listen(forward, close_on_error=False)
                if forward in self._listeners:
                    opened.append(forward)
        except OSError:
            self.remove_forwards(opened)
            raise

    def remove_forwards(self, forwards: list[PortForward]) -> None:
        """Stop listening on ``forwards``; connections they accepted stay as they are."""
        for forward in forwards:
            listener = self._listeners.pop(forward, None)
            if listener is not None:
                self.loop.remove_reader(listener.fileno())
                listener.close()

    def connected_fd(self, flow_id: int) -> int | None:
        """The flow's host socket once connected (for the fast path), else None."""
        return self.connected_fds.get(flow_id)

    def written_elsewhere(self, flow_id: int, host_full: bool, written: int = 0) -> int | None:
        """Someone else (the fast path) wrote ``written`` bytes to the flow's socket: the send
        space now, and the same watch for room as after ``Send`` when the socket is full or
        nearly so. Small writes into a roomy socket are not measured each time (two system
        calls): the space is then the last one measured minus what was written since, a lower
        bound (the peer only drains the queue), measured again once that adds up."""
        entry = self._sockets.get(flow_id)
        if entry is None:
            return None
        return self._space_after_write(flow_id, entry, host_full, written)

    def _space_after_write(self, flow_id: int, entry: HostSocket, host_full: bool,
                           written: int) -> int | None:
        """The send space after ``written`` bytes went to ``entry``'s socket (estimated while
        small writes go into a roomy socket, see ``written_elsewhere``), watching for room."""
        entry.unmeasured += written
        if not host_full and entry.space is not None:
            estimate = entry.space - entry.unmeasured
            if estimate >= ESTIMATE_SEND_SPACE and entry.unmeasured * 4 < entry.space:
                return estimate
        space = send_space(entry.sock)
        entry.space, entry.unmeasured = space, 0
        self._watch_for_room(flow_id, entry, host_full, space)
        return space

    def set_before_close(self, hook: Callable[[int], None] | None) -> None:
        """Call ``hook(flow_id)`` before a flow's socket closes or leaves this glue (the TCP
        fast path forgets the fd then, so it never writes to a reused one); None: no hook."""
        self._before_close = hook

    def flush(self) -> None:
        """Execute the engine's queued commands (including those they cause)."""
        commands = self.engine.commands
        handlers = self._handlers
        for _ in range(MAX_COMMANDS_PER_FLUSH):
            if not commands:
                return
            command = commands.popleft()
            try:
                handler = handlers[type(command)]  # (a subscript: no call, several per flow)
            except KeyError:
                log.error("unknown TCP command %r", command)
                continue
            handler(command)
        if commands:
            self.loop.call_soon(self._event_done)  # finish later, let other work in

    def close(self) -> None:
        """Close every socket this glue owns; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self.close_listeners()
        for flow_id in list(self._sockets):
            self._close_socket(flow_id, abort=True)
        self._readiness.close()

    # --------------------------------------- migration (vhostnet.migration)

    def detach(self, flow_id: int) -> socket.socket | None:
        """Take a flow's socket out of this glue without closing it (events stop)."""
        entry = self._sockets.pop(flow_id, None)
        if entry is None:
            return None
        self.connected_fds.pop(flow_id, None)
        if self._before_close is not None:
            self._before_close(flow_id)  # nothing else may write to it now (it may be frozen)
        entry.reading = entry.writing = False
        self._flow_by_fd.pop(entry.fd, None)
        self._readiness.forget(entry.fd)
        return entry.sock

    def adopt(self, flow_id: int, sock: socket.socket) -> None:
        """Serve an established socket (restored or given back) for ``flow_id``."""
        sock.setblocking(False)
        tune(sock)
        self._add_socket(flow_id, HostSocket(sock, lowat=0))
        self._arm_reader(flow_id, 0)

    def close_listeners(self) -> None:
        """Stop accepting on forwarded ports (a migration destination takes them over)."""
        self.remove_forwards(list(self._listeners))

    def _listen_or_wait(self, forward, deadline: float) -> bool:
        """Bind now, or keep retrying while the port is busy until ``deadline``.

        A migration destination on the same host starts while the source still
        listens on the forwarded ports; it takes them when the source lets go.
        False: not busy but failing, or out of time (the caller reports it).
        """
        if self._closed:
            return True
        try:
            self._listen(forward, close_on_error=False)
            return True
        except OSError as error:
            if error.errno != errno.EADDRINUSE or self.clock() >= deadline:
                return False
        self.loop.call_later(LISTEN_RETRY_INTERVAL, self._retry_listen, forward, deadline)
        return True

    def _retry_listen(self, forward, deadline: float) -> None:
        if not self._listen_or_wait(forward, deadline):
            log.error("cannot listen on %s port %d; that forward stays off",
                      forward.host_addr, forward.host_port)
        elif forward in self._listeners:
            log.info("listening on %s port %d now", forward.host_addr, forward.host_port)

    # ------------------------------------------------------------- listeners

    def _bind_address(self, forward) -> tuple[str, bool | None]:
        """Where a forward listens, and IPV6_V6ONLY for an IPv6 socket (None: IPv4 socket).

        No address in the spec (``dual_stack``): ``[::]`` taking IPv4 peers too (as
        v4-mapped addresses), as passt binds both families; only one family where the
        other is off (-4/-6) or the host has no IPv6. An IPv6 address: IPv6 peers only.
        """
        config = self.engine.config
        if forward.dual_stack and config.ipv6 and socket.has_ipv6:
            return "::", not config.ipv4
        if ":" in forward.host_addr:
            return forward.host_addr, True
        return forward.host_addr, None

    def _listen(self, forward, close_on_error: bool = True) -> None:
        address, v6only = self._bind_address(forward)
        family = socket.AF_INET if v6only is None else socket.AF_INET6
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if v6only is not None:
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
            for option in listener_options(forward, self.engine.config.freebind):
                listener.setsockopt(*option)
            listener.bind((address, forward.host_port))
            listener.listen(LISTEN_BACKLOG)
            listener.setblocking(False)
        except OSError as error:
            listener.close()
            if forward.optional and error.errno == errno.EADDRINUSE:
                return  # `all`: the ports the host already uses are not forwarded (passt)
            if close_on_error:
                self.close()
            raise OSError(
                error.errno,
                f"cannot listen on {address} port {forward.host_port}: {error.strerror}",
            ) from None
        self._listeners[forward] = listener
        self.loop.add_reader(listener.fileno(), self._on_accept_ready, listener, forward.guest_port)

    def _on_accept_ready(self, listener: socket.socket, guest_port: int) -> None:
        for _ in range(MAX_ACCEPTS_PER_EVENT):
            try:
                conn, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as error:  # EMFILE and friends: the peer waits in the backlog
                log.warning("accept on forwarded port failed: %s", error)
                break
            conn.setblocking(False)  # accept() leaves out the listener's O_NONBLOCK
            tune(conn)
            space = send_space(conn, nothing_sent=True)
            flow_id = self.engine.on_accepted(peer[0], peer[1], guest_port, self.clock(), space)
            if flow_id is None:
                abort_close(conn)
                continue
            self._add_socket(flow_id, HostSocket(conn, space=space))
            self._arm_reader(flow_id, 0)
        self._event_done()

    # -------------------------------------------------------------- commands

    def _close(self, command: Close) -> None:
        self._close_socket(command.flow_id, command.abort)

    def _connect(self, command: Connect) -> None:
        try:
            # Bound to -o/--outbound-if4/6 there, as passt binds its outbound sockets.
            sock = open_outbound(self.engine.config, command.host, socket.SOCK_STREAM)
        except OSError as error:
            self.engine.on_connect_failed(command.flow_id, error.errno or 0, self.clock())
            return
        tune(sock)
        entry = HostSocket(sock, connecting=True)
        self._add_socket(command.flow_id, entry)
        try:
            code = sock.connect_ex((command.host, command.port))
        except OSError as error:  # e.g. an address the family cannot take
            code = error.errno or errno.EINVAL
        if code not in (0, errno.EINPROGRESS):
            self.engine.on_connect_failed(command.flow_id, code, self.clock())
        elif code == 0 or (is_loopback(command.host) and connected_already(sock)):
            # The kernel ran the loopback handshake inside connect(): the guest gets its
            # SYN-ACK in this turn, without waiting for the socket to turn writable.
            self._connected(command.flow_id, entry, 0)
        else:
            entry.writing = True
            self._want(entry)

    def _on_connect_ready(self, flow_id: int, events: int) -> None:
        entry = self._sockets.get(flow_id)
        if entry is None:
            return
        self._stop_writing(entry)
        self._connected(flow_id, entry, events)
        self._event_done()

    def _connected(self, flow_id: int, entry: HostSocket, events: int) -> None:
        """connect() finished, well or not (``events``: what the epoll set reported)."""
        entry.connecting = False
        self.connected_fds[flow_id] = entry.fd
        # Writable without an error event means connected; SO_ERROR only to learn the error.
        code = entry.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if events & FAILED else 0
        now = self.clock()
        if code:
            self.engine.on_connect_failed(flow_id, code, now)
        else:
            # Measured: the first small writes elsewhere (a request) need not measure again.
            entry.space = send_space(entry.sock, nothing_sent=True)
            self.engine.on_connected(flow_id, now, entry.space)
            self._arm_reader(flow_id, 0)

    def _send(self, command: Send) -> None:
        entry = self._sockets.get(command.flow_id)
        if entry is None:
            return
        try:
            sent = entry.sock.send(command.data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as error:
            self.engine.on_host_error(command.flow_id, error.errno or 0, self.clock())
            return
        # (A connection's first request, written here, is not measured: two system calls.)
        space = self._space_after_write(command.flow_id, entry, sent < len(command.data), sent)
        self.engine.on_sent(command.flow_id, sent, self.clock(), space)

    def _watch_for_room(self, flow_id: int, entry: HostSocket, full: bool,
                        space: int | None) -> None:
        # The window we advertise is the send space. Once it is small the guest stops
        # sending (it will not send less than a segment), and nothing else would
        # tell it that the host peer has read: wait for room and send a window update.
        low = space is not None and space < LOW_SEND_SPACE
        if (full or low) and not entry.writing:
            entry.writing = True
            self._want(entry)

    def _on_writable(self, flow_id: int) -> None:
        entry = self._sockets.get(flow_id)
        if entry is None:
            return
        self._stop_writing(entry)
        self.engine.on_writable(flow_id, self.clock(), send_space(entry.sock))
        self._event_done()

    def _shutdown_write(self, command: ShutdownWrite) -> None:
        entry = self._sockets.get(command.flow_id)
        if entry is None:
            return
        try:
            entry.sock.shutdown(socket.SHUT_WR)
        except OSError as error:
            self.engine.on_host_error(command.flow_id, error.errno or 0, self.clock())

    def _close_socket(self, flow_id: int, abort: bool) -> None:
        entry = self._sockets.pop(flow_id, None)
        if entry is None:
            return
        self.connected_fds.pop(flow_id, None)
        if self._before_close is not None:
            self._before_close(flow_id)
        entry.reading = entry.writing = False
        self._flow_by_fd.pop(entry.fd, None)
        self._readiness.closing(entry.fd)  # close() takes it out of the epoll set
        if abort:
            abort_close(entry.sock)
        else:
            entry.sock.close()

    # ------------------------------------------------------------- readiness

    def _arm_reader(self, flow_id: int, already_peeked: int) -> None:
        self._arm_entry(self._sockets[flow_id], already_peeked)

    def _arm_entry(self, entry: HostSocket, already_peeked: int) -> None:
        """``entry``'s socket waits to read past the ``already_peeked`` bytes queued."""
        if already_peeked + 1 != entry.lowat:  # (``set_lowat``'s test: once a read)
            set_lowat(entry, already_peeked + 1)
        if not entry.reading:
            entry.reading = True
            self._readiness.want(entry.fd, True, entry.writing)

    def _on_readable(self, flow_id: int, entry: HostSocket) -> None:
        """``entry``, flow ``flow_id``'s socket, is readable. Runs per host read: the flush
        after the event (``_event_done``) is written out here."""
        # The reader stays: the peek this leads to keeps it (short) or removes it.
        entry.peek_awaited = True
        now = self.clock()
        # A streaming flow's round, peeked straight into the guest (``set_direct_read``), or
        # the engine's Peek.
        if self._direct_read is None or not self._direct_read(flow_id, now):
            self.engine.on_readable(flow_id, now)
        if self.engine.commands:
            self.flush()
        if self.after_event is not None:
            self.after_event()
        if entry.peek_awaited:  # no peek came of it (window closed, FIN sent): stop
            entry.peek_awaited = False
            self._stop_reading(entry)

    def _stop_reading(self, entry: HostSocket) -> None:
        if entry.reading:
            entry.reading = False
            self._want(entry)

    def _stop_writing(self, entry: HostSocket) -> None:
        if entry.writing:
            entry.writing = False
            self._want(entry)

    def _want(self, entry: HostSocket) -> None:
        self._readiness.want(entry.fd, entry.reading, entry.writing)

    def _add_socket(self, flow_id: int, entry: HostSocket) -> None:
        self._sockets[flow_id] = entry
        self._flow_by_fd[entry.fd] = flow_id
        if not entry.connecting:
            self.connected_fds[flow_id] = entry.fd

    def _on_socket_event(self, fd: int, events: int) -> None:
        """A flow socket is ready. Armed to read alone, it still is (the reader keeps or stops
        it); otherwise it waits for nothing now (one-shot) until armed again."""
        sockets = self._sockets
        flow_id = self._flow_by_fd.get(fd)
        if flow_id not in sockets:
            return
        entry = sockets[flow_id]
        read_fired = entry.reading and events & READABLE
        write_fired = entry.writing and events & WRITABLE
        if read_fired and events & PEER_FIN:
            entry.peer_fin = True  # (for good: what follows the FIN is nothing)
        if not entry.reading or entry.writing:  # (not ``Readiness.stays_armed``: per event)
            if read_fired:
                entry.reading = False
            if write_fired:
                entry.writing = False
            if entry.reading or entry.writing:
                self._want(entry)  # the direction that did not fire waits on
        if write_fired:
            if entry.connecting:
                self._on_connect_ready(flow_id, events)
            else:
                self._on_writable(flow_id)
        if read_fired and flow_id in sockets and sockets[flow_id] is entry:
            self._on_readable(flow_id, entry)

    def _event_done(self) -> None:
        self.flush()
        if self.after_event is not None:
            self.after_event()

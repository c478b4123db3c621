"""Host sockets for the DNS forwarder (``vhostnet.stack.dns.DnsForwarder``).

``DnsGlue(engine, loop)`` keeps one connected, non-blocking UDP socket per
upstream resolver, opened on first use. ``flush()`` sends the engine's queued
``DnsQuery`` commands (call it after guest frames and after ``poll_timers``);
answers are read in bounded batches and reported with ``on_upstream_reply``,
refusals with ``on_upstream_error``. ``close()`` closes every socket.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable

from vhostnet.hostio.udp import receive_batch
from vhostnet.outbound import open_outbound
from vhostnet.stack.dns import DnsForwarder, DnsQuery

log = logging.getLogger(__name__)


class DnsGlue:
    def __init__(self, engine: DnsForwarder, loop: asyncio.AbstractEventLoop,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.loop = loop
        self.clock = clock
        self._sockets: dict[int, socket.socket] = {}

    def flush(self) -> None:
        """Send every queued query."""
        while self.engine.commands:
            self._send(self.engine.commands.popleft())

    def _socket_for(self, command: DnsQuery) -> socket.socket:
        sock = self._sockets.get(command.upstream_index)
        if sock is None:
            # Bound to -o/--outbound-if4/6 as the guest's other UDP flows: passt forwards
            # DNS as one of them.
            sock = open_outbound(self.engine.config, command.host)
            try:
                sock.connect((command.host, command.port))
            except OSError:
                sock.close()
                raise
            self._sockets[command.upstream_index] = sock
            self.loop.add_reader(sock.fileno(), self._on_readable, command.upstream_index, sock)
        return sock

    def _send(self, command: DnsQuery) -> None:
        try:
            self._socket_for(command).send(command.data)
        except (BlockingIOError, InterruptedError):
            self.engine.counters.inc("dns.drop.host_busy")  # the retry timer covers it
        except OSError as error:
            self.engine.counters.log_once(f"dns.upstream.{command.upstream_index}",
                                          f"DNS upstream {command.host}:{command.port}: "
                                          f"{error.strerror}")
            self.engine.on_upstream_error(command.upstream_index, self.clock())

    def _on_readable(self, upstream_index: int, sock: socket.socket) -> None:
        answers, error = receive_batch(sock)
        now = self.clock()
        for answer in answers:
            self.engine.on_upstream_reply(upstream_index, answer, now)
        if error is not None:
            self.engine.on_upstream_error(upstream_index, now)
        # A refusal may have queued a retry toward the next upstream.
        self.flush()

    def close(self) -> None:
        for sock in self._sockets.values():
            self.loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets.clear()

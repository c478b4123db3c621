"""A minimal threaded vhost-user server, for tests and benchmarks of this library.

It listens on a UNIX socket, serves exactly one connection with a
``BackendHandler`` and waits on whatever fds the device asks it to watch
(kick eventfds). The real server (vhostnet/server.py) is an event loop; this
one is a bounded select loop in a thread, small enough to trust in tests.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Protocol

from vhostnet.vhost_user.backend import CLOSE, BackendHandler
from vhostnet.vhost_user.codec import CodecError, Framer
from vhostnet.vhost_user.connection import close_fds, read_available, send_message

log = logging.getLogger(__name__)


class WatchingDevice(Protocol):
    def watched_fds(self) -> dict[int, Callable[[], None]]: ...  # fd -> called when readable


class ThreadedBackend:
    """Serve one vhost-user connection in a background thread.

    ``error`` holds any exception the loop died of (tests assert it is None).
    The loop ends at EOF, on CLOSE, on ``stop()`` or after ``max_seconds``.
    """

    def __init__(
        self,
        socket_path: str,
        handler: BackendHandler,
        device: WatchingDevice,
        *,
        max_seconds: float = 60.0,
    ) -> None:
        self.socket_path = socket_path
        self.handler = handler
        self.device = device
        self.max_seconds = max_seconds
        self.error: BaseException | None = None
        self.closed_by_handler = False
        self.messages_handled = 0
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(socket_path)
        self._listener.listen(1)
        self._thread = threading.Thread(target=self._run, name="vhost-user-loopback", daemon=True)

    def __enter__(self) -> ThreadedBackend:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    def join(self, timeout: float) -> bool:
        """Wait for the loop to end by itself; True if it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        try:
            self._listener.settimeout(min(5.0, self.max_seconds))
            conn, _ = self._listener.accept()
        except OSError as error:
            self.error = error
            return
        try:
            self._serve(conn, deadline)
        except BaseException as error:  # reported to the test, not swallowed
            self.error = error
        finally:
            conn.close()
            self.handler.close()

    def _serve(self, conn: socket.socket, deadline: float) -> None:
        framer = Framer()
        conn.setblocking(False)
        while not self._stop.is_set() and time.monotonic() < deadline:
            watched = self.device.watched_fds()
            readable, _, _ = select.select([conn, *watched], [], [], 0.02)
            for fd in readable:
                if fd in watched:
                    watched[fd]()
            if conn not in readable:
                continue
            try:
                data, fds = read_available(conn, framer.wanted())
            except BlockingIOError:
                continue
            except CodecError as error:  # the buffered header is already bad
                log.warning("vhost-user framing error, closing: %s", error)
                close_fds(framer.take_fds())
                self.closed_by_handler = True
                return
            if not data:
                return  # EOF
            framer.feed(data, fds)
            try:
                for msg in framer.messages():
                    self.messages_handled += 1
                    replies = self.handler.handle(msg)
                    if replies is CLOSE:
                        self.closed_by_handler = True
                        close_fds(framer.take_fds())
                        return
                    conn.settimeout(5.0)
                    for answer in replies:
                        send_message(conn, answer)
                    conn.setblocking(False)
            except CodecError as error:
                log.warning("vhost-user framing error, closing: %s", error)
                close_fds(framer.take_fds())
                self.closed_by_handler = True
                return

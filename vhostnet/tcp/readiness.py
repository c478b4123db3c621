"""One epoll set for the TCP flow sockets, registered with the event loop once (as passt
keeps one epoll set).

Why not the loop's ``add_reader``/``add_writer``: uvloop (libuv) pays three to five
syscalls to start watching a socket (a probe ADD and DEL, FIONBIO, a DEL, the real ADD)
and three to stop, and a TCP flow starts and stops waiting about six times in its life
(connect, each read, EOF). Here changing what a socket waits for is one ``epoll_ctl``, and
``close()`` takes the socket out of the set by itself.

Two kinds of registration. A socket that waits to read and for nothing else (an
established flow between replies: the common case) is registered level-triggered and
stays armed after its event: the glue keeps SO_RCVLOWAT one byte above what it already
peeked, so bytes it has seen do not fire it again, and a request/response exchange costs
no ``epoll_ctl`` at all (re-arming a one-shot registration after every reply did). Every
other registration (writing, connecting, both directions) is EPOLLONESHOT: a socket whose
event fired waits for nothing until it is armed again, so stopping after an event costs
nothing.
"""

from __future__ import annotations

import asyncio
import select
from collections.abc import Callable

# Events that end any wait: the socket failed or both directions are closed.
FAILED = select.EPOLLERR | select.EPOLLHUP
READABLE = select.EPOLLIN | select.EPOLLRDHUP | FAILED
# With EPOLLIN: the peer's FIN had come when the event was taken (the reader asks for it).
PEER_FIN = select.EPOLLRDHUP
# What a socket armed to read alone waits for: level-triggered, it stays armed after firing.
READ_ALONE = select.EPOLLIN | PEER_FIN
WRITABLE = select.EPOLLOUT | FAILED
MAX_EVENTS = 256


class Readiness:
    """Which flow sockets wait to read or write; ``on_event(fd, events)`` when one is ready.

    Before ``on_event`` runs, a socket armed for anything but reading alone is disarmed (it
    waits for nothing) and the handler arms again what it still wants with ``want``; one
    armed to read alone stays armed (``stays_armed``), and the handler stops it with
    ``want`` if it no longer wants to read (else a socket left readable fires again).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 on_event: Callable[[int, int], None]) -> None:
        self._loop = loop
        self._on_event = on_event
        self._epoll = select.epoll()
        self._armed: dict[int, int] = {}  # fd -> events armed now (0: registered, waiting for nothing)
        self._gone: set[int] = set()  # fds closed while a batch of events is dispatched
        self._dispatching = False
        self.ctl_calls = 0  # epoll_ctl calls made (``want``, ``forget``): what this saves
        loop.add_reader(self._epoll.fileno(), self._dispatch)

    @property
    def watched(self) -> int:
        """Sockets in the set (armed or not)."""
        return len(self._armed)

    def want(self, fd: int, read: bool, write: bool) -> None:
        """Wait for ``fd`` to be readable and/or writable (both False: wait for nothing, out of
        the set until wanted again); a readable event says PEER_FIN too when the peer's FIN
        is in."""
        events = (READ_ALONE if read else 0) | (select.EPOLLOUT if write else 0)
        armed = self._armed.get(fd)
        if armed == events:
            return
        # Reading alone: level-triggered, armed until changed; anything else: one-shot.
        mask = events if events == READ_ALONE else events | select.EPOLLONESHOT
        if armed is None:
            if not events:
                return
            self._epoll.register(fd, mask)
        elif not events:
            # Out of the set rather than armed for nothing: epoll reports a hang-up or an
            # error whatever the mask, and a socket at EOF would wake the loop once for nothing
            # (the end of every short connection). The same one epoll_ctl.
            self.forget(fd)
            return
        else:
            try:
                self._epoll.modify(fd, mask)
            except FileNotFoundError:  # closed without ``closing`` and the number reused
                self._epoll.register(fd, mask)
        self.ctl_calls += 1
        self._armed[fd] = events

    @staticmethod
    def stays_armed(read: bool, write: bool) -> bool:
        """Whether a socket armed so waits on after its event fired (reading alone)."""
        return read and not write

    def closing(self, fd: int) -> None:
        """``fd`` is about to be closed (which takes it out of the set)."""
        if self._armed.pop(fd, None) is not None and self._dispatching:
            self._gone.add(fd)  # its number may be reused before the batch ends

    def forget(self, fd: int) -> None:
        """Take ``fd`` out of the set; the socket stays open (it leaves this glue)."""
        if self._armed.pop(fd, None) is not None:
            self.ctl_calls += 1
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass
            if self._dispatching:
                self._gone.add(fd)

    def close(self) -> None:
        if self._epoll.closed:
            return
        self._loop.remove_reader(self._epoll.fileno())
        self._epoll.close()
        self._armed.clear()

    def _dispatch(self) -> None:
        try:
            ready = self._epoll.poll(0, MAX_EVENTS)
        except InterruptedError:
            return
        self._dispatching = True
        try:
            armed = self._armed
            for fd, events in ready:
                if fd in self._gone:
                    continue  # closed (and maybe reused) earlier in this batch
                waiting = armed.get(fd)
                if waiting is None:
                    continue
                if waiting != READ_ALONE:
                    armed[fd] = 0  # one-shot: it fired, it waits for nothing now
                self._on_event(fd, events)
        finally:
            self._dispatching = False
            self._gone.clear()

"""Freezing a TCP connection for migration: after the dump, no byte of the peer gets in.

Repair mode alone does not stop the kernel from taking (and acknowledging) the
peer's segments, and bytes taken after the dump would be lost: the destination
restores the dumped sequence numbers and the peer never sends them again.
Three layers, none needing a capability once the helper switched repair mode
on (the one step that needs CAP_NET_ADMIN):

- **Minimum TTL 255** (``shut_out_peer``, IP_MINTTL, RFC 5082's TTL
  security): TCP discards a segment that arrives with a lower TTL right after
  the socket lookup, silently, before any state or ACK, so the peer keeps its
  bytes and retransmits them to whichever socket holds the 4-tuple next. Only
  a sender that sets TTL 255 itself passes. It works on a listener too, so a
  *catcher* (see ``tcp_migrate``) needs no socket filter.
- **Closed receive window** (``close_receive_window``, for senders with TTL
  255): ``TCP_REPAIR_WINDOW`` with ``rcv_wnd`` 0 at ``rcv_nxt``, and
  ``SO_RCVBUF`` at its minimum (the kernel raises 1 to 2304), both allowed by
  the repair flag alone. With the zero window alone the next ACK re-opens the
  window from the free buffer space (about 200 KB got in on loopback while the
  peer pushed 4 MB); with both, a non-empty queue takes nothing, but an empty
  one still takes a few KB (35 KB measured), since the kernel always offers
  some window to an empty queue: the window is the backstop, the TTL the
  freeze. The original window and buffer are kept: the dump records them
  (``dump_frozen``: the destination announces a normal window) and a thaw puts
  them back (``unfreeze_sockets``) before repair off.
- **Drop-all socket filter**, where the host lets us attach one (some reserve
  socket filters to CAP_NET_ADMIN): the same as the TTL, for every sender.

What is left: a sender with TTL 255 whose segment meets an empty receive queue
(local peers only set TTL 255 on purpose, e.g. for GTSM) where no filter can
be attached. IPv6 sockets get IPV6_MINHOPCOUNT 255 as well (IP_MINTTL stays for the
IPv4 peers of a dual-stack socket).
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import logging
import socket
import struct
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from vhostnet.migration.tcp_repair import (
    TCP_NO_QUEUE,
    TCP_QUEUE_SEQ,
    TCP_RECV_QUEUE,
    TCP_REPAIR_QUEUE,
    TCP_REPAIR_WINDOW,
    WINDOW,
    K,
    SocketDump,
    dump_socket,
)

log = logging.getLogger(__name__)

SO_ATTACH_FILTER = 26
SO_GET_FILTER = SO_ATTACH_FILTER
SO_DETACH_FILTER = 27
SO_RCVBUFFORCE = 33
SO_BUF_LOCK = 72  # Linux 5.14; lets us give autotuning back after SO_RCVBUF locked it
SMALLEST_RCVBUF = 1  # the kernel raises it to its minimum (SOCK_MIN_RCVBUF)
IP_MINTTL = 21
IPV6_MINHOPCOUNT = 73  # linux/in6.h
MAX_TTL = 255


# ---- the drop-all socket filter ---------------------------------------------------

# Classic BPF, one instruction: "ret #0" (BPF_RET | BPF_K, k = 0) accepts 0 bytes of
# every packet, i.e. drops it before TCP sees it.
_DROP_ALL = (ctypes.c_ubyte * 8).from_buffer_copy(struct.pack("=HBBI", 0x06, 0, 0, 0))


def attach_drop_filter(sock: socket.socket) -> None:
    program = struct.pack("=HxxxxxxQ", 1, ctypes.addressof(_DROP_ALL))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, program)


def detach_drop_filter(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
    except OSError as error:
        if error.errno != errno.ENOENT:  # no filter attached: nothing to undo
            raise


def has_drop_filter(sock: socket.socket) -> bool:
    """Whether a socket filter is attached (reading it needs no capability). The
    length asked for counts filter blocks; 64 leaves room for ours (one block)."""
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, SO_GET_FILTER, 64))
    except OSError:
        return False


_filter_refusal_logged = False


def attach_drop_filters(socks: Mapping[K, socket.socket]) -> dict[K, socket.socket]:
    """Attach the drop-all filter to each socket; those that took it. The first
    refusal in this process is logged with what follows from it."""
    global _filter_refusal_logged
    filtered: dict[K, socket.socket] = {}
    for key, sock in socks.items():
        try:
            attach_drop_filter(sock)
        except OSError as error:
            if not _filter_refusal_logged:
                _filter_refusal_logged = True
                log.warning(
                    "cannot attach a socket filter (%s; this host may reserve socket filters "
                    "to CAP_NET_ADMIN): TCP connections are frozen for migration, and "
                    "catchers swallow the peers' retransmissions, with a minimum TTL of 255 "
                    "and a closed receive window alone, which hold against every peer that "
                    "does not send with TTL 255 itself (logged once)",
                    error.strerror or error)
            continue
        filtered[key] = sock
    return filtered


def detach_drop_filters(socks: Iterable[socket.socket]) -> None:
    """Undo ``attach_drop_filters`` (before repair off: the peer's answer to the window
    probe sent then must get in). A socket that cannot is left as it is: it then fails
    its next step and is reset like any broken connection."""
    for sock in socks:
        try:
            detach_drop_filter(sock)
        except OSError:
            pass


# ---- minimum TTL and the closed receive window ----------------------------------------


@dataclass(frozen=True)
class ReceiveBefore:
    """What ``shut_out_peer`` and ``close_receive_window`` changed, to give it back."""

    min_ttl: int
    min_hops: int | None = None  # IPV6_MINHOPCOUNT of an IPv6 socket; None: IPv4 socket
    rcv_wnd: int | None = None  # None: the window was not closed (not connected yet)
    rcv_wup: int = 0
    rcvbuf: int = 0  # as SO_RCVBUF reads it (the kernel's doubled figure)
    buffer_locks: int | None = None  # SO_BUF_LOCK bits; None: no SO_BUF_LOCK here


# Keyed by the socket object: a socket that is closed and forgotten drops out.
_changed: weakref.WeakKeyDictionary[socket.socket, ReceiveBefore] = weakref.WeakKeyDictionary()


def shut_out_peer(sock: socket.socket) -> None:
    """Drop every segment of the peer before TCP sees it, silently, needing no
    capability: IP_MINTTL 255 (RFC 5082's TTL security; IPV6_MINHOPCOUNT too on an IPv6
    socket), which only a sender that sets TTL 255 passes. Works on listeners too (catchers). ``OSError`` if refused."""
    if sock in _changed:
        return
    min_hops = None
    if sock.family == socket.AF_INET6:
        # IPv6 peers: the hop-limit twin (RFC 5082 for IPv6); IP_MINTTL still covers
        # IPv4 peers of a dual-stack socket (v4-mapped).
        min_hops = sock.getsockopt(socket.IPPROTO_IPV6, IPV6_MINHOPCOUNT)
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MINHOPCOUNT, MAX_TTL)
    before = ReceiveBefore(min_ttl=sock.getsockopt(socket.IPPROTO_IP, IP_MINTTL),
                           min_hops=min_hops)
    sock.setsockopt(socket.IPPROTO_IP, IP_MINTTL, MAX_TTL)
    _changed[sock] = before


def read_window(sock: socket.socket) -> tuple[int, int, int, int, int]:
    """TCP_REPAIR_WINDOW (repair mode only): snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup."""
    return WINDOW.unpack(sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, WINDOW.size))


def _write_receive_window(sock: socket.socket, rcv_wnd: int, rcv_wup: int) -> None:
    # The send side as it is now: the peer's ACKs may have moved it meanwhile.
    snd_wl1, snd_wnd, max_window, _, _ = read_window(sock)
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW,
                    WINDOW.pack(snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup))


def _rcv_nxt(sock: socket.socket) -> int:
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ) & 0xFFFFFFFF
    finally:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)


def close_receive_window(sock: socket.socket) -> None:
    """Freeze a connected ``sock`` in repair mode without a capability (see the module
    docstring): ``shut_out_peer``, the buffer to its minimum, a zero window at
    ``rcv_nxt``. ``OSError`` if the kernel refused a step; what changed is undone."""
    if sock in _changed and _changed[sock].rcv_wnd is not None:
        return
    shut_out_peer(sock)
    try:
        _, _, _, rcv_wnd, rcv_wup = read_window(sock)
        try:
            locks: int | None = sock.getsockopt(socket.SOL_SOCKET, SO_BUF_LOCK)
        except OSError:
            locks = None
        rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        _changed[sock] = dataclasses.replace(_changed[sock], rcv_wnd=rcv_wnd, rcv_wup=rcv_wup,
                                             rcvbuf=rcvbuf, buffer_locks=locks)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALLEST_RCVBUF)
        _write_receive_window(sock, 0, _rcv_nxt(sock))
    except OSError:
        reopen_receive(sock)
        raise


def _give_rcvbuf_back(sock: socket.socket, before: ReceiveBefore) -> None:
    # The kernel doubles what it is given (an odd size comes back one byte larger).
    # SO_RCVBUFFORCE passes net.core.rmem_max but needs CAP_NET_ADMIN; without it an
    # autotuned buffer may come back smaller, and autotuning (given back below) grows
    # it again.
    half = (before.rcvbuf + 1) // 2
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, half)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, half)
    if before.buffer_locks is not None:
        sock.setsockopt(socket.SOL_SOCKET, SO_BUF_LOCK, before.buffer_locks)


def reopen_receive(sock: socket.socket) -> None:
    """Undo ``shut_out_peer`` and ``close_receive_window`` (repair mode still on);
    nothing if neither was done. Every step is tried; ``OSError`` of the first that
    failed."""
    before = _changed.pop(sock, None)
    if before is None:
        return
    steps = [lambda: sock.setsockopt(socket.IPPROTO_IP, IP_MINTTL, before.min_ttl)]
    if before.min_hops is not None:
        steps.append(lambda: sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MINHOPCOUNT,
                                             before.min_hops))
    if before.rcv_wnd is not None:
        rcv_wnd = before.rcv_wnd
        steps += [lambda: _write_receive_window(sock, rcv_wnd, before.rcv_wup),
                  lambda: _give_rcvbuf_back(sock, before)]
    failure: OSError | None = None
    for step in steps:
        try:
            step()
        except OSError as error:
            failure = failure or error
    if failure is not None:
        raise failure


def dump_frozen(sock: socket.socket) -> SocketDump:
    """``dump_socket`` of a frozen socket, with the receive window it had before the
    freeze: the destination must announce that one, not the closed one."""
    dump = dump_socket(sock)
    before = _changed.get(sock)
    if before is None or before.rcv_wnd is None:
        return dump
    return dataclasses.replace(dump, window=(*dump.window[:3], before.rcv_wnd, before.rcv_wup))


def unfreeze_sockets(socks: Iterable[socket.socket]) -> None:
    """Undo the freeze, repair mode still on: filter off, minimum TTL, receive window and
    buffer back. Before repair off: the answer to the window probe sent then must get
    in. A socket that refuses is left as it is and logged (it may then stall and be
    reset like any broken connection)."""
    socks = list(socks)
    detach_drop_filters(socks)
    for sock in socks:
        try:
            reopen_receive(sock)
        except OSError as error:
            log.warning("cannot give a TCP socket its receive settings back after a freeze "
                        "(%s)", error.strerror or error)

"""One host TCP socket frozen, dumped and re-created with TCP_REPAIR (Linux).

Facts this relies on (linux/tcp.h and the kernel's TCP code):

- ``TCP_REPAIR`` needs CAP_NET_ADMIN; every other repair option only needs
  the socket to be in repair mode, so a helper process may switch the mode
  on our file descriptor (see ``repair_helper``) and we do the rest here.
- In repair mode ``recv(MSG_PEEK)`` reads the queue chosen with
  ``TCP_REPAIR_QUEUE`` (the send queue too), ``TCP_QUEUE_SEQ`` reads the
  sequence number at the *end* of that queue, ``connect()`` sends no SYN,
  ``send()`` appends to the chosen queue without transmitting, and ``close()``
  sends neither FIN nor RST. Repair mode does *not* stop the kernel from
  accepting (and acknowledging) segments from the peer: freezing, which does,
  is ``tcp_freeze``'s.
- A repair-mode socket may ``bind()`` an address in use (a listener, or the
  frozen original); ``connect()`` refuses (EADDRNOTAVAIL) while the original
  4-tuple still exists, which is why the source must release first.

Both families: a dump's addresses say which (an IPv4 peer of a dual-stack socket is
dumped with its v4-mapped address and restored on an IPv6 socket, as it was).

Half-closed sockets move too. TCP_REPAIR restores ESTABLISHED only, so, as CRIU
does: a socket that sent its FIN (FIN_WAIT1/2) is dumped without the FIN's
sequence number and restored established, then ``shutdown(SHUT_WR)`` in repair
mode with the send queue selected puts the FIN back as sent (in flight until the
peer acknowledges it again). A socket that received the peer's FIN (CLOSE_WAIT)
is restored established at the FIN's sequence number: the peer's FIN is not
replayed (CRIU forges one with a raw socket), so the restored socket never
reports EOF; the engine knows it already (``host_eof`` in its record) and never
asks. Both FINs (CLOSING, LAST_ACK, TIME_WAIT) are not dumped: reset.

Sans-IO it is not: these are syscalls. The record format (``SocketDump``)
is validated field by field in ``SocketDump.from_record``.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import ipaddress
import logging
import socket
import struct
import termios
import time
from dataclasses import dataclass
from typing import TypeVar

from vhostnet.migration.state import checked_int
from vhostnet.tcp.host_sockets import SO_PEEK_OFF

log = logging.getLogger(__name__)
K = TypeVar("K")

TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_TIMESTAMP = 24
TCP_REPAIR_WINDOW = 29

REPAIR_ON = 1
REPAIR_OFF = 0
REPAIR_OFF_NO_WINDOW_PROBE = -1

TCP_NO_QUEUE, TCP_RECV_QUEUE, TCP_SEND_QUEUE = 0, 1, 2

TCPOPT_MAXSEG = 2
TCPOPT_WINDOW = 3
TCPOPT_SACK_PERMITTED = 4
TCPOPT_TIMESTAMP = 8

TCPI_OPT_TIMESTAMPS = 1
TCPI_OPT_SACK = 2
TCPI_OPT_WSCALE = 4

TCP_ESTABLISHED = 1
TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_CLOSE_WAIT = 4, 5, 8
# The states a dump takes, and which FIN each has seen: (we sent ours, the peer sent its).
DUMPABLE_STATES = {TCP_ESTABLISHED: (False, False), TCP_FIN_WAIT1: (True, False),
                   TCP_FIN_WAIT2: (True, False), TCP_CLOSE_WAIT: (False, True)}
TCP_MAX_WSCALE = 14

SIOCINQ = termios.FIONREAD
SIOCOUTQ = termios.TIOCOUTQ
SIOCOUTQNSD = 0x894B

SO_SNDBUFFORCE = 32

# Larger queues than this are not migrated (the connection is reset instead):
# a blob must stay well inside state.MAX_BLOB_BYTES.
MAX_QUEUE_BYTES = 8 * 1024 * 1024
RESTORE_CHUNK = 256 * 1024
MIN_RESTORE_CHUNK = 4096

WINDOW = struct.Struct("=5I")
_INT = struct.Struct("=i")


class RepairError(OSError):
    """A repair step failed for one socket; the message names the step."""


def _step(what: str, error: OSError) -> RepairError:
    return RepairError(error.errno or errno.EIO, f"{what}: {error.strerror or error}")


# ---- repair mode --------------------------------------------------------------


def set_repair_direct(sock: socket.socket, mode: int) -> None:
    """TCP_REPAIR on/off ourselves (needs CAP_NET_ADMIN)."""
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, mode)


def in_repair(sock: socket.socket) -> bool:
    """Whether ``sock`` is in repair mode (reading it needs no capability)."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR) != 0
    except OSError:
        return False


def can_repair_directly() -> bool:
    """Try TCP_REPAIR on a throwaway socket: True if this process may use it."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            set_repair_direct(probe, REPAIR_ON)
    except OSError:
        return False
    return True


# ---- the dump ------------------------------------------------------------------


def _u32(value: object, what: str) -> int:
    return checked_int(value, what, 0, 0xFFFFFFFF)


def _small(value: object, what: str, limit: int) -> int:
    return checked_int(value, what, 0, limit)


def _endpoint(value: object, what: str) -> tuple[str, int]:
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError(f"{what} is not [address, port]")
    address = str(ipaddress.ip_address(str(value[0])))
    return address, checked_int(value[1], f"{what} port", 1, 65535)


def _queue(value: object, what: str) -> bytes:
    if not isinstance(value, str) or len(value) > (MAX_QUEUE_BYTES * 4) // 3 + 4:
        raise ValueError(f"{what} is not a base64 string of at most {MAX_QUEUE_BYTES} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise ValueError(f"{what} is not valid base64") from None


@dataclass(frozen=True)
class SocketDump:
    """What re-creates one established host socket, sequence numbers as on the wire."""

    local: tuple[str, int]
    peer: tuple[str, int]
    send_seq: int  # sequence number of the first byte of ``send_queue`` (snd_una)
    recv_seq: int  # sequence number of the first byte of ``recv_queue``
    send_queue: bytes  # written by us, not yet acknowledged by the peer
    unsent: int  # how many bytes at the end of ``send_queue`` never left (see send_unsent)
    recv_queue: bytes  # received, not yet consumed by us
    mss: int
    snd_wscale: int
    rcv_wscale: int
    options: int  # tcpi_options: TCPI_OPT_TIMESTAMPS / SACK / WSCALE
    timestamp: int
    window: tuple[int, int, int, int, int]  # snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup
    fin_sent: bool = False  # we had shut down writing (FIN_WAIT1/2): restored with our FIN
    fin_received: bool = False  # the peer had sent its FIN (CLOSE_WAIT)

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.local[0] else socket.AF_INET

    @property
    def queued_bytes(self) -> int:
        return len(self.send_queue) + len(self.recv_queue)

    def to_record(self) -> dict[str, object]:
        return {
            "local": list(self.local), "peer": list(self.peer),
            "send_seq": self.send_seq, "recv_seq": self.recv_seq,
            "send_queue": base64.b64encode(self.send_queue).decode(), "unsent": self.unsent,
            "recv_queue": base64.b64encode(self.recv_queue).decode(),
            "mss": self.mss, "snd_wscale": self.snd_wscale, "rcv_wscale": self.rcv_wscale,
            "options": self.options, "timestamp": self.timestamp, "window": list(self.window),
            "fin_sent": self.fin_sent, "fin_received": self.fin_received,
        }

    @classmethod
    def from_record(cls, record: object) -> SocketDump:
        """Check every field; ``ValueError``/``KeyError``/``TypeError`` on anything wrong."""
        if not isinstance(record, dict):
            raise ValueError("host socket record is not an object")
        send_queue = _queue(record["send_queue"], "send queue")
        window = record["window"]
        if not isinstance(window, list) or len(window) != 5:
            raise ValueError("window is not five numbers")
        dump = cls(
            local=_endpoint(record["local"], "local address"),
            peer=_endpoint(record["peer"], "peer address"),
            send_seq=_u32(record["send_seq"], "send sequence"),
            recv_seq=_u32(record["recv_seq"], "receive sequence"),
            send_queue=send_queue,
            unsent=_small(record["unsent"], "unsent bytes", len(send_queue)),
            recv_queue=_queue(record["recv_queue"], "receive queue"),
            mss=_small(record["mss"], "MSS", 65535),
            snd_wscale=_small(record["snd_wscale"], "send window scale", TCP_MAX_WSCALE),
            rcv_wscale=_small(record["rcv_wscale"], "receive window scale", TCP_MAX_WSCALE),
            options=_small(record["options"], "TCP options", 0xFF),
            timestamp=_u32(record["timestamp"], "timestamp"),
            window=tuple(_u32(v, "window value") for v in window),  # type: ignore[arg-type]
            fin_sent=record.get("fin_sent", False) is True,
            fin_received=record.get("fin_received", False) is True,
        )
        if (":" in dump.local[0]) != (":" in dump.peer[0]):
            raise ValueError("local and peer addresses are of different families")
        if dump.mss < 64:
            raise ValueError(f"MSS {dump.mss} is too small")
        if len(dump.send_queue) > MAX_QUEUE_BYTES or len(dump.recv_queue) > MAX_QUEUE_BYTES:
            raise ValueError("a socket queue is larger than the migration limit")
        return dump


def _ioctl_int(sock: socket.socket, request: int) -> int:
    return _INT.unpack(fcntl.ioctl(sock.fileno(), request, b"\0" * 4))[0]


def _select_queue(sock: socket.socket, queue: int) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, queue)


def _peek_queue(sock: socket.socket, length: int) -> bytes:
    if length == 0:
        return b""
    # Python waits for POLLIN before reading a socket that has a timeout, and
    # POLLIN follows the receive queue even while the send queue is selected.
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        data = sock.recv(length, socket.MSG_PEEK)
    except BlockingIOError:
        data = b""
    finally:
        sock.settimeout(timeout)
    if len(data) != length:
        raise RepairError(errno.ENXIO, f"queue read {len(data)} of {length} bytes")
    return data


def dump_socket(sock: socket.socket) -> SocketDump:
    """Everything needed to re-create ``sock``, which must be frozen and in repair mode."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    except OSError as error:
        raise _step("reading TCP_INFO", error) from None
    state, options, scales = info[0], info[5], info[6]
    if state not in DUMPABLE_STATES:
        raise RepairError(errno.EINVAL, f"socket is in TCP state {state}, which cannot move")
    fin_sent, fin_received = DUMPABLE_STATES[state]
    local, peer = sock.getsockname()[:2], sock.getpeername()[:2]
    try:
        mss = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
        timestamp = 0
        if options & TCPI_OPT_TIMESTAMPS:
            timestamp = sock.getsockopt(socket.IPPROTO_TCP, TCP_TIMESTAMP) & 0xFFFFFFFF
        window = WINDOW.unpack(sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, WINDOW.size))
        # A peek offset would shift the dump: read the queues from their heads.
        sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, -1)
        _select_queue(sock, TCP_SEND_QUEUE)
        # Our FIN counts one in the queue's sequence space while unacknowledged (FIN_WAIT1)
        # and in its end sequence always: neither is a byte.
        fin_queued = int(state == TCP_FIN_WAIT1)
        send_length = _ioctl_int(sock, SIOCOUTQ) - fin_queued
        unsent = max(0, _ioctl_int(sock, SIOCOUTQNSD) - fin_queued)
        if send_length > MAX_QUEUE_BYTES or not 0 <= unsent <= send_length:
            raise RepairError(errno.ENOBUFS, f"send queue of {send_length} bytes not migratable")
        send_queue = _peek_queue(sock, send_length)
        send_end = (sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ) - fin_sent) & 0xFFFFFFFF
        _select_queue(sock, TCP_RECV_QUEUE)
        recv_length = _ioctl_int(sock, SIOCINQ)
        if recv_length > MAX_QUEUE_BYTES:
            raise RepairError(errno.ENOBUFS, f"receive queue of {recv_length} bytes not migratable")
        recv_queue = _peek_queue(sock, recv_length)
        # The peer's FIN took a sequence number after the queue's last byte.
        recv_end = (sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ) - fin_received) & 0xFFFFFFFF
        _select_queue(sock, TCP_NO_QUEUE)
    except RepairError:
        raise
    except OSError as error:
        raise _step("dumping the socket", error) from None
    return SocketDump(
        local=(local[0], local[1]), peer=(peer[0], peer[1]),
        send_seq=(send_end - send_length) & 0xFFFFFFFF,
        recv_seq=(recv_end - recv_length) & 0xFFFFFFFF,
        send_queue=send_queue, unsent=unsent, recv_queue=recv_queue, mss=mss,
        snd_wscale=scales & 0x0F, rcv_wscale=scales >> 4, options=options,
        timestamp=timestamp, window=window, fin_sent=fin_sent, fin_received=fin_received,
    )


# ---- the restore ---------------------------------------------------------------


def new_restore_socket(family: socket.AddressFamily = socket.AF_INET) -> socket.socket:
    """A fresh non-blocking socket of ``family`` (the dump's) for ``restore_in_repair``; the
    caller switches repair on."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setblocking(False)
    return sock


def _write_queue(sock: socket.socket, data: bytes) -> None:
    view, chunk = memoryview(data), RESTORE_CHUNK
    # Bounded: every round writes something or halves the chunk.
    for _ in range(len(data) // MIN_RESTORE_CHUNK + 64):
        if not view:
            return
        try:
            view = view[sock.send(view[:chunk]):]
        except BlockingIOError:
            break  # the send buffer is full (see _make_room_for_send_queue)
        except OSError as error:
            if error.errno in (errno.ENOBUFS, errno.ENOMEM) and chunk > MIN_RESTORE_CHUNK:
                chunk //= 2
                continue
            raise
    if view:
        raise RepairError(errno.ENOBUFS, f"{len(view)} bytes of a queue could not be written")


def _make_room_for_send_queue(sock: socket.socket, length: int) -> None:
    """A new socket's send buffer is small and repair-mode writes wait for room like any
    other: size it for the queue (SO_SNDBUFFORCE needs CAP_NET_ADMIN; SO_SNDBUF is capped
    by net.core.wmem_max, which may be too little for a large queue: then the write fails)."""
    wanted = 2 * length + 65536  # the kernel doubles it again for bookkeeping overhead
    if length == 0 or sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= 2 * wanted:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, wanted)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, wanted)


def restore_in_repair(sock: socket.socket, dump: SocketDump, *, wait_for_tuple: float = 0.0) -> None:
    """Re-create the connection of ``dump`` on ``sock`` (in repair mode, from ``new_restore_socket``).

    ``wait_for_tuple``: how long to retry ``connect`` while the 4-tuple is
    still taken (the source has not released its socket yet).
    """
    step = "binding the local address"
    try:
        sock.bind(dump.local)
        if dump.options & TCPI_OPT_TIMESTAMPS:
            step = "restoring the timestamp"
            sock.setsockopt(socket.IPPROTO_TCP, TCP_TIMESTAMP, struct.pack("=I", dump.timestamp))
        step = "setting the queue sequence numbers"
        _select_queue(sock, TCP_SEND_QUEUE)
        sock.setsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ, struct.pack("=I", dump.send_seq))
        _select_queue(sock, TCP_RECV_QUEUE)
        sock.setsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ, struct.pack("=I", dump.recv_seq))
        step = "connecting (repair mode, no SYN)"
        _connect_when_free(sock, dump.peer, wait_for_tuple)
        step = "writing the receive queue"
        _write_queue(sock, dump.recv_queue)
        # Only the bytes that were sent go back in repair mode: they count as in
        # flight, and the peer's answer to the window probe (or the retransmission
        # timer) settles them. The never-sent tail must not join them, or it too
        # would wait for the retransmission timer (one to several seconds with
        # backoff) instead of leaving as soon as the window allows: ``send_unsent``
        # writes it normally once repair mode is off. The buffer is sized for both.
        step = "writing the send queue"
        _make_room_for_send_queue(sock, len(dump.send_queue))
        _select_queue(sock, TCP_SEND_QUEUE)
        _write_queue(sock, dump.send_queue[:len(dump.send_queue) - dump.unsent])
        _select_queue(sock, TCP_NO_QUEUE)
        step = "setting the repair options"
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_OPTIONS, _repair_options(dump))
        step = "setting the window"
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, WINDOW.pack(*dump.window))
        if dump.fin_sent:
            # In repair mode with the send queue selected, the FIN joins it as sent
            # (CRIU's restore_fin_in_snd_queue): FIN_WAIT1 until the peer acknowledges it.
            step = "restoring our FIN"
            _select_queue(sock, TCP_SEND_QUEUE)
            sock.shutdown(socket.SHUT_WR)
            _select_queue(sock, TCP_NO_QUEUE)
    except RepairError:
        raise
    except OSError as error:
        raise _step(step, error) from None


def send_unsent(sock: socket.socket, dump: SocketDump) -> None:
    """Queue the never-sent tail of ``dump``'s send queue on ``sock``, restored by
    ``restore_in_repair`` and out of repair mode; ``RepairError`` if it does not all fit
    (the buffer was sized for the whole queue, so it does unless memory ran out)."""
    try:
        _write_queue(sock, dump.send_queue[len(dump.send_queue) - dump.unsent:])
    except RepairError:
        raise
    except OSError as error:
        raise _step("writing the unsent bytes", error) from None


def _connect_when_free(sock: socket.socket, peer: tuple[str, int], wait: float) -> None:
    deadline = time.monotonic() + wait
    for _ in range(100_000):  # bounded by the deadline well before the count
        try:
            sock.connect(peer)
            return
        except OSError as error:
            if error.errno not in (errno.EADDRNOTAVAIL, errno.EADDRINUSE) or time.monotonic() >= deadline:
                raise
        time.sleep(0.005)


def _repair_options(dump: SocketDump) -> bytes:
    options = [(TCPOPT_MAXSEG, dump.mss)]
    if dump.options & TCPI_OPT_WSCALE:
        options.append((TCPOPT_WINDOW, dump.snd_wscale | dump.rcv_wscale << 16))
    if dump.options & TCPI_OPT_SACK:
        options.append((TCPOPT_SACK_PERMITTED, 0))
    if dump.options & TCPI_OPT_TIMESTAMPS:
        options.append((TCPOPT_TIMESTAMP, 0))
    return b"".join(struct.pack("=II", code, value) for code, value in options)

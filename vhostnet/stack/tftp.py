"""Read-only TFTP server for network boot (RFC 1350 with RFC 2347/2348/2349/7440 options).

Sans-IO: the server never touches a socket or a clock. The stack hands it the
UDP datagrams the guest sends to the gateway, on either family (``accepts`` /
``handle_udp``: ``gateway`` for IPv4, ``gateway6`` for IPv6, the address a DHCPv6
Boot File URL names), it answers through ``output.send_udp`` or ``send_udp6`` from
the same address, and timers run when the caller passes
``now`` to ``poll_timers``. File access goes through the injected ``files``
object (``hostio.tftp_files.TftpRoot`` in production), which also enforces
the rules about what may be read.

How a transfer runs:

1. The guest sends RRQ to gateway:69. The server opens the file, picks a
   fresh gateway port (the transfer ID, "TID") and answers from that port.
2. If the guest asked for options the server accepts, it answers OACK and
   waits for ACK 0 (or ERROR 8: the guest declines, the transfer ends).
   Otherwise it sends DATA 1 at once.
3. DATA goes out a window at a time (``windowsize``, 1 unless negotiated).
   An ACK for a block inside the window moves the window to the block after
   it. A duplicate ACK is ignored: answering it would double every later
   packet (the "sorcerer's apprentice" bug). Only a timeout resends.
4. The last block is shorter than ``blksize`` (empty if the size is a
   multiple). When it is acknowledged the transfer is complete. Block numbers
   are 16 bits on the wire and wrap from 65535 to 0, as most clients expect.
5. After ``max_retransmits`` timeouts without progress the transfer is
   dropped: a guest that vanished frees its port and file.

Errors: WRQ gets code 2 (this server never writes); netascii and mail modes
code 0 (only octet is served: boot files are binary); an unknown mode or an
unparsable request code 4; file-access refusals carry the code from
``files.open``. A packet to a transfer port from anyone but its client gets
code 5 and leaves the transfer alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from vhostnet.stack.counters import Counters
from vhostnet.wire import ipv4, ipv6, udp
from vhostnet.wire.errors import MalformedPacket
from vhostnet.wire.tftp import (
    DATA_HEADER_LEN,
    DEFAULT_BLOCK_SIZE,
    TFTP_PORT,
    Data,
    Error,
    ErrorCode,
    Opcode,
    OptionAck,
    Request,
    TftpError,
    TftpView,
)

__all__ = ["ErrorCode", "TftpError", "TftpFiles", "TftpServer", "UdpOutput", "negotiate"]

log = logging.getLogger("vhostnet.tftp")

MIN_BLOCK_SIZE = 8  # RFC 2348
MAX_BLOCK_SIZE = 65464  # RFC 2348
MIN_TIMEOUT = 1  # RFC 2349, seconds
MAX_TIMEOUT = 255
MIN_WINDOW = 1  # RFC 7440
MAX_WINDOW = 65535

DEFAULT_PORT_RANGE = (49152, 65535)
DEFAULT_TIMEOUT = 1.0
DEFAULT_MAX_RETRANSMITS = 5
DEFAULT_MAX_TRANSFERS = 64
# More than this many blocks in flight buys nothing on a local link and makes
# each timeout resend a burst; RFC 7440 lets the server answer a smaller value.
DEFAULT_WINDOW_LIMIT = 64
# A finished transfer's port stays reserved this long, so a late duplicate of
# the final ACK is swallowed here instead of leaking to the host as a new flow.
LINGER_SECONDS = 5.0


class UdpOutput(Protocol):
    """Where the server's datagrams go (the NetworkStack in production)."""

    def send_udp(self, src: bytes, sport: int, dst: bytes, dport: int, payload: bytes) -> None: ...
    def send_udp6(self, src: bytes, sport: int, dst: bytes, dport: int, payload: bytes) -> None: ...


class TftpFiles(Protocol):
    """The file side; ``open`` raises ``TftpError`` with the code to send back."""

    def open(self, name: str) -> Any: ...
    def size(self, handle: Any) -> int: ...
    def read(self, handle: Any, offset: int, length: int) -> bytes: ...
    def close(self, handle: Any) -> None: ...


class TftpConfig(Protocol):
    """The fields of ``StackConfig`` the server reads."""

    gateway: bytes
    gateway6: bytes
    mtu: int


@dataclass
class Negotiated:
    """Transfer parameters after option negotiation, and the OACK to send (empty: none)."""

    block_size: int
    window_size: int
    timeout: float
    acknowledged: dict[str, str]


def negotiate(options: dict[str, str], file_size: int, mtu: int, window_limit: int,
              default_timeout: float, ip_header_len: int = ipv4.MIN_HEADER_LEN) -> Negotiated:
    """Decide blksize, windowsize, timeout and the OACK contents from a request's options.

    Only options the client asked for appear in the OACK, in the client's order.
    A value that is not a number or lies below the option's minimum makes the
    server ignore that option (the transfer then uses the default); a value
    above what the server can do is lowered (RFC 2348 and 7440 allow that;
    RFC 2349 does not for timeout, so an out-of-range timeout is ignored).
    """
    # A DATA packet must fit one IP datagram on the guest link: no fragments.
    # (``ip_header_len``: the client's family, 20 for IPv4, 40 for IPv6.)
    largest_fitting_block = mtu - ip_header_len - udp.HEADER_LEN - DATA_HEADER_LEN
    result = Negotiated(DEFAULT_BLOCK_SIZE, 1, default_timeout, {})
    for name, text in options.items():
        value = int(text) if text.isdigit() else None
        if value is None:
            continue
        if name == "blksize" and value >= MIN_BLOCK_SIZE:
            result.block_size = min(value, MAX_BLOCK_SIZE, largest_fitting_block)
            result.acknowledged[name] = str(result.block_size)
        elif name == "tsize":
            # RFC 2349: in a read request the client sends 0 and learns the size.
            result.acknowledged[name] = str(file_size)
        elif name == "timeout" and MIN_TIMEOUT <= value <= MAX_TIMEOUT:
            result.timeout = float(value)
            result.acknowledged[name] = str(value)
        elif name == "windowsize" and value >= MIN_WINDOW:
            result.window_size = min(value, MAX_WINDOW, window_limit)
            result.acknowledged[name] = str(result.window_size)
    return result


@dataclass
class _Transfer:
    """One read transfer. Block numbers here are absolute (1, 2, ... past 65535)."""

    client_ip: bytes
    client_port: int
    port: int
    filename: str
    handle: Any
    size: int
    params: Negotiated
    last_block: int  # the final, short (possibly empty) block
    waiting_for_oack_ack: bool
    acked: int = 0  # highest block the client confirmed; 0 = none (or the OACK)
    highest_sent: int = 0
    deadline: float = 0.0
    retransmits: int = 0  # consecutive timeouts without progress


class TftpServer:
    """The TFTP engine: a UDP service on gateway:69 and on the ports of its transfers."""

    def __init__(
        self,
        config: TftpConfig,
        output: UdpOutput,
        files: TftpFiles,
        *,
        port_range: tuple[int, int] = DEFAULT_PORT_RANGE,
        max_transfers: int = DEFAULT_MAX_TRANSFERS,
        max_retransmits: int = DEFAULT_MAX_RETRANSMITS,
        default_timeout: float = DEFAULT_TIMEOUT,
        window_limit: int = DEFAULT_WINDOW_LIMIT,
        counters: Counters | None = None,
    ) -> None:
        """``counters`` may be the stack's shared ``Counters``; by default the server has its own."""
        first, last = port_range
        if not 0 < first <= last <= 65535 or first <= TFTP_PORT <= last:
            raise ValueError(f"bad TFTP port range {port_range}")
        self._gateway = bytes(config.gateway)
        self._gateway6 = bytes(config.gateway6)
        self._mtu = config.mtu
        self._output = output
        self._files = files
        self._first_port, self._last_port = first, last
        self._next_port = first
        self._max_transfers = max_transfers
        self._max_retransmits = max_retransmits
        self._default_timeout = default_timeout
        self._window_limit = window_limit
        self._transfers: dict[int, _Transfer] = {}
        self._lingering: dict[int, float] = {}  # port -> when it is released
        self._counters = counters if counters is not None else Counters(log)

    # -- UDP service interface ------------------------------------------------

    def accepts(self, dst_ip: bytes, dst_port: int) -> bool:
        if dst_ip != self._gateway and dst_ip != self._gateway6:
            return False
        return dst_port == TFTP_PORT or dst_port in self._transfers or dst_port in self._lingering

    def handle_udp(self, src_ip: bytes, src_port: int, dst_ip: bytes, dst_port: int,
                   payload: bytes | memoryview, now: float) -> None:
        src_ip = bytes(src_ip)
        if dst_port == TFTP_PORT:
            self._handle_request_port(src_ip, src_port, payload, now)
        elif dst_port in self._transfers:
            self._handle_transfer_port(self._transfers[dst_port], src_ip, src_port, payload, now)
        else:
            self._counters.inc("tftp.late_packets")

    def poll_timers(self, now: float) -> None:
        for port, release in list(self._lingering.items()):
            if release <= now:
                del self._lingering[port]
        for transfer in [t for t in self._transfers.values() if t.deadline <= now]:
            self._on_timeout(transfer, now)

    def next_timer(self) -> float | None:
        deadlines = [t.deadline for t in self._transfers.values()]
        deadlines.extend(self._lingering.values())
        return min(deadlines, default=None)

    def counters(self) -> dict[str, int]:
        """The "tftp.*" counters (only those, even when the ``Counters`` object is shared)."""
        self._counters.set("tftp.transfers_active", len(self._transfers))
        return {k: v for k, v in self._counters.snapshot().items() if k.startswith("tftp.")}

    def close(self) -> None:
        """Drop every transfer and close its file (the stack is shutting down)."""
        for transfer in list(self._transfers.values()):
            self._end(transfer, None, None)

    # -- port 69: new requests -------------------------------------------------

    def _handle_request_port(self, client_ip: bytes, client_port: int,
                             payload: bytes | memoryview, now: float) -> None:
        try:
            view = TftpView(payload)
            if view.opcode == Opcode.ERROR:
                self._counters.inc("tftp.ignored.error_to_port_69")
                return  # never answer an error with an error
            if view.opcode not in (Opcode.RRQ, Opcode.WRQ):
                raise MalformedPacket("tftp_not_request", f"{view.opcode.name} sent to port 69")
            request = Request.from_view(view)
        except MalformedPacket as exc:
            self._counters.drop(f"tftp.malformed.{exc.reason}", f"TFTP: malformed request: {exc}")
            self._send_error(self._spare_port(), client_ip, client_port,
                             ErrorCode.ILLEGAL_OPERATION, "malformed request")
            return
        self._counters.inc("tftp.requests")
        try:
            self._start_transfer(client_ip, client_port, request, now)
        except TftpError as exc:
            self._counters.inc(f"tftp.refused.{exc.code.name.lower()}")
            self._send_error(self._spare_port(), client_ip, client_port, exc.code, exc.message)

    def _check_request(self, request: Request) -> None:
        if request.opcode == Opcode.WRQ:
            raise TftpError(ErrorCode.ACCESS_VIOLATION, "write requests are not supported")
        if request.mode == "netascii":
            raise TftpError(ErrorCode.NOT_DEFINED, "netascii mode is not supported, use octet")
        if request.mode == "mail":
            raise TftpError(ErrorCode.NOT_DEFINED, "mail mode is not supported, use octet")
        if request.mode != "octet":
            raise TftpError(ErrorCode.ILLEGAL_OPERATION, f"unknown transfer mode {request.mode!r}")

    def _start_transfer(self, client_ip: bytes, client_port: int, request: Request,
                        now: float) -> None:
        self._check_request(request)
        if self._is_retransmitted_request(client_ip, client_port, request):
            # The client resent its RRQ before our first answer reached it; the
            # transfer already running will resend on its own timer.
            self._counters.inc("tftp.duplicate_requests")
            return
        if len(self._transfers) >= self._max_transfers:
            raise TftpError(ErrorCode.NOT_DEFINED, "too many transfers, try again later")
        port = self._allocate_port()
        if port is None:
            raise TftpError(ErrorCode.NOT_DEFINED, "no free transfer port, try again later")
        handle = self._files.open(request.filename)  # raises TftpError when refused
        size = self._files.size(handle)
        header_len = ipv6.HEADER_LEN if len(client_ip) == 16 else ipv4.MIN_HEADER_LEN
        params = negotiate(request.options, size, self._mtu, self._window_limit,
                           self._default_timeout, header_len)
        transfer = _Transfer(
            client_ip=client_ip,
            client_port=client_port,
            port=port,
            filename=request.filename,
            handle=handle,
            size=size,
            params=params,
            last_block=size // params.block_size + 1,
            waiting_for_oack_ack=bool(params.acknowledged),
        )
        self._transfers[port] = transfer
        self._counters.inc("tftp.transfers_started")
        log.debug("TFTP: sending %r (%d bytes) to port %d, options %s",
                  request.filename, size, client_port, params.acknowledged or "none")
        self._transmit(transfer, now)

    def _is_retransmitted_request(self, client_ip: bytes, client_port: int,
                                  request: Request) -> bool:
        return any(
            t.client_ip == client_ip and t.client_port == client_port
            and t.filename == request.filename and t.acked == 0
            for t in self._transfers.values()
        )

    def _port_in_use(self, port: int) -> bool:
        return port in self._transfers or port in self._lingering

    def _port_cycle(self) -> Iterator[int]:
        """Every port of the range once, starting after the last one handed out."""
        count = self._last_port - self._first_port + 1
        for step in range(count):
            yield self._first_port + (self._next_port - self._first_port + step) % count

    def _allocate_port(self) -> int | None:
        # Round-robin, so a port just released is the last to be reused: a
        # stray packet for an old transfer is unlikely to hit a new one.
        for port in self._port_cycle():
            if not self._port_in_use(port):
                self._next_port = port + 1 if port < self._last_port else self._first_port
                return port
        return None

    def _spare_port(self) -> int:
        """A source port for a one-off error reply to a request (not reserved).

        RFC 1350 servers answer every request, errors included, from a new TID.
        """
        for port in self._port_cycle():
            if not self._port_in_use(port):
                return port
        return TFTP_PORT

    # -- transfer ports ---------------------------------------------------------

    def _handle_transfer_port(self, transfer: _Transfer, src_ip: bytes, src_port: int,
                              payload: bytes | memoryview, now: float) -> None:
        try:
            view = TftpView(payload)
        except MalformedPacket as exc:
            # Dropped without an answer: an error would end the transfer, and a
            # lost ACK costs only a timeout.
            self._counters.drop(f"tftp.malformed.{exc.reason}",
                                f"TFTP: malformed packet in a transfer: {exc}")
            return
        if (src_ip, src_port) != (transfer.client_ip, transfer.client_port):
            self._counters.inc("tftp.unknown_tid")
            if view.opcode != Opcode.ERROR:
                self._send_error(transfer.port, src_ip, src_port,
                                 ErrorCode.UNKNOWN_TRANSFER_ID, "unknown transfer ID")
            return
        if view.opcode == Opcode.ACK:
            self._on_ack(transfer, view.number, now)
        elif view.opcode == Opcode.ERROR:
            error = Error.parse(view.data)
            reason = ("options_declined" if error.code == ErrorCode.OPTION_REFUSED
                      else "client_error")
            log.debug("TFTP: client ended transfer of %r: error %d %r",
                      transfer.filename, error.code, error.message)
            self._end(transfer, reason, now)
        else:
            self._counters.log_once(
                f"tftp.illegal.{view.opcode.name}",
                f"TFTP: client sent {view.opcode.name} inside a read transfer",
            )
            self._send_error(transfer.port, src_ip, src_port, ErrorCode.ILLEGAL_OPERATION,
                             f"unexpected {view.opcode.name} in a read transfer")
            self._end(transfer, "illegal_operation", now)

    def _on_ack(self, transfer: _Transfer, wire_block: int, now: float) -> None:
        if transfer.waiting_for_oack_ack:
            if wire_block != 0:
                self._counters.inc("tftp.stale_acks")
                return
            transfer.waiting_for_oack_ack = False
            self._progress(transfer, now)
            return
        # Map the 16-bit number onto the window in flight: (acked, highest_sent].
        # The window is far smaller than 65536 blocks, so the match is unique.
        ahead = (wire_block - transfer.acked) & 0xFFFF
        if ahead == 0:
            self._counters.inc("tftp.duplicate_acks")
            return
        if ahead > transfer.highest_sent - transfer.acked:
            self._counters.inc("tftp.stale_acks")
            return
        transfer.acked += ahead
        if transfer.acked == transfer.last_block:
            self._counters.inc("tftp.transfers_completed")
            self._end(transfer, None, now)
            return
        self._progress(transfer, now)

    def _progress(self, transfer: _Transfer, now: float) -> None:
        """The client moved on: a fresh window and a fresh set of retries."""
        transfer.retransmits = 0
        self._transmit(transfer, now)

    def _on_timeout(self, transfer: _Transfer, now: float) -> None:
        if transfer.retransmits >= self._max_retransmits:
            log.debug("TFTP: transfer of %r to port %d timed out",
                      transfer.filename, transfer.client_port)
            self._send_error(transfer.port, transfer.client_ip, transfer.client_port,
                             ErrorCode.NOT_DEFINED, "timed out")
            self._end(transfer, "timeout", now)
            return
        transfer.retransmits += 1
        self._counters.inc("tftp.retransmits")
        self._transmit(transfer, now)

    def _transmit(self, transfer: _Transfer, now: float) -> None:
        """(Re)send what the transfer is waiting on: the OACK, or the window after ``acked``."""
        transfer.deadline = now + transfer.params.timeout
        if transfer.waiting_for_oack_ack:
            self._send(transfer, OptionAck(transfer.params.acknowledged).emit())
            return
        first = transfer.acked + 1
        last = min(transfer.acked + transfer.params.window_size, transfer.last_block)
        block_size = transfer.params.block_size
        for block in range(first, last + 1):
            offset = (block - 1) * block_size
            expected = max(0, min(block_size, transfer.size - offset))
            try:
                chunk = self._files.read(transfer.handle, offset, expected)
            except TftpError as exc:
                self._fail_read(transfer, exc.message, now)
                return
            if len(chunk) != expected:
                self._fail_read(transfer, "file changed while being sent", now)
                return
            self._send(transfer, Data(block, chunk).emit())
            self._counters.inc("tftp.bytes_sent", len(chunk))
        transfer.highest_sent = max(transfer.highest_sent, last)

    def _fail_read(self, transfer: _Transfer, message: str, now: float) -> None:
        self._counters.log_once("tftp.read_error", f"TFTP: reading {transfer.filename!r}: {message}")
        self._send_error(transfer.port, transfer.client_ip, transfer.client_port,
                         ErrorCode.NOT_DEFINED, message)
        self._end(transfer, "read_error", now)

    def _end(self, transfer: _Transfer, failure: str | None, now: float | None) -> None:
        """Forget the transfer and close its file.

        ``failure`` names the reason (None: completed or shut down); ``now`` is
        None only at shutdown, when the port need not linger.
        """
        if failure is not None:
            self._counters.inc(f"tftp.transfers_failed.{failure}")
        del self._transfers[transfer.port]
        if now is not None:
            self._lingering[transfer.port] = now + LINGER_SECONDS
        self._files.close(transfer.handle)

    # -- output -----------------------------------------------------------------

    def _send(self, transfer: _Transfer, payload: bytes) -> None:
        self._send_to(transfer.client_ip, transfer.port, transfer.client_port, payload)

    def _send_error(self, port: int, client_ip: bytes, client_port: int, code: ErrorCode,
                    message: str) -> None:
        self._counters.inc("tftp.errors_sent")
        self._send_to(client_ip, port, client_port, Error(code, message).emit())

    def _send_to(self, client_ip: bytes, port: int, client_port: int, payload: bytes) -> None:
        """From the gateway address of the client's family (the one it sent to)."""
        if len(client_ip) == 16:
            self._output.send_udp6(self._gateway6, port, client_ip, client_port, payload)
        else:
            self._output.send_udp(self._gateway, port, client_ip, client_port, payload)

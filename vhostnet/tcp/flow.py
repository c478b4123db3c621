"""Per-flow state of the TCP translator, the host-side commands, and timer settings.

Sequence numbers inside a ``Flow`` are *relative*, unbounded integers: our SYN
is 0 on the sending side (so the first data byte is 1) and the guest's SYN is 0
on the receiving side. Only ``send_seq``/``recv_seq`` turn them into 32-bit
wire values, and ``rel_from_wire`` turns a wire value back, relative to a
nearby known point. That keeps every comparison in the engine a plain ``<``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

SEQ_MOD = 1 << 32
HALF_SEQ = 1 << 31


def seq_diff(a: int, b: int) -> int:
    """Signed distance ``a - b`` between two 32-bit sequence numbers (RFC 1982 style)."""
    return ((a - b + HALF_SEQ) % SEQ_MOD) - HALF_SEQ


class SegmentOptions(Protocol):
    """The SYN options the engine acts on (``tcp_wire.TcpOptions``)."""

    mss: int | None
    wscale: int | None


class Segment(Protocol):
    """What the engine reads from a guest segment: ``tcp_wire.TcpSegmentView`` (the stack's
    path) or the fast path's ``ParsedSegment`` (ext/tcp_fast_parse.pxi), both checked alike."""

    src_port: int
    dst_port: int
    seq: int
    ack: int
    flags: int
    window: int

    @property
    def options(self) -> SegmentOptions: ...

    @property
    def payload(self) -> bytes | memoryview: ...

    @property
    def segment_len(self) -> int: ...


class Phase(enum.Enum):
    """Where the guest-side handshake stands; half-closes are tracked by flags on ``Flow``."""

    CONNECTING = "connecting"  # guest SYN seen, host connect() in progress, guest not answered
    SYN_RCVD = "syn_rcvd"  # host connected, our SYN-ACK sent to the guest
    SYN_SENT = "syn_sent"  # inbound forward: our SYN sent to the guest
    ESTABLISHED = "established"  # data may flow (including half-closed states)


@dataclass(frozen=True)
class TcpTimeouts:
    """Timer settings in seconds; the defaults follow passt and common TCP practice."""

    syn: float = 10.0  # host connect() plus guest handshake must finish within this
    idle: float = 7200.0  # no segment and no host event for this long: reset the flow
    fin: float = 60.0  # after a FIN, the close must complete within this
    rto_initial: float = 1.0  # RFC 6298 initial retransmission timeout
    rto_max: float = 60.0
    max_retries: int = 8  # consecutive timeouts before the flow is reset
    # Delayed ACK of guest data on a request/response flow: the reply normally carries it
    # (passt's ACK_INTERVAL; well under the guest's 200 ms minimum RTO). 0: ACK at once.
    ack_delay: float = 0.010


# --- host-side commands (the engine queues them, the glue executes them) ---


@dataclass(frozen=True)
class Connect:
    flow_id: int
    host: str
    port: int


@dataclass(frozen=True)
class Send:
    """Write ``data`` to the host socket and report ``on_sent(flow_id, n, now)``.

    ``data`` is the flow's own pending buffer: the engine may append to it
    until the glue executes the command, so the glue sends what it holds then.
    """

    flow_id: int
    data: bytearray


@dataclass(frozen=True)
class Peek:
    """Read without consuming: ``length`` bytes starting ``offset`` bytes into the receive queue."""

    flow_id: int
    offset: int
    length: int


@dataclass(frozen=True)
class Discard:
    """Consume ``length`` bytes from the head of the receive queue (the guest acknowledged them)."""

    flow_id: int
    length: int


@dataclass(frozen=True)
class ShutdownWrite:
    flow_id: int


@dataclass(frozen=True)
class Close:
    """Close the host socket; ``abort`` means reset it (SO_LINGER 0) instead of a clean close."""

    flow_id: int
    abort: bool


TcpCommand = Connect | Send | Peek | Discard | ShutdownWrite | Close


@dataclass(eq=False)
class Flow:
    """One translated connection: the guest side's TCP state plus what we know of the host socket."""

    flow_id: int
    guest_ip: bytes
    guest_port: int
    remote_ip: bytes  # the address the guest sees as its peer
    remote_port: int
    inbound: bool
    phase: Phase

    # Our side towards the guest (relative sequence numbers, see module docstring).
    iss: int = 0
    snd_una: int = 0
    snd_nxt: int = 0
    snd_max: int = 0  # highest sequence number ever sent (snd_nxt can be rewound below it)
    snd_wnd: int = 0  # the guest's receive window in bytes (already scaled)
    snd_wscale: int = 0  # shift applied to windows the guest advertises
    rcv_wscale: int = 0  # shift applied to windows we advertise
    mss: int = 536  # largest payload we put in one segment to the guest

    # The guest's side (relative to its ISN).
    irs: int = 0
    rcv_nxt: int = 0  # acknowledged to the guest: the host socket accepted everything before it
    rcv_queued: int = 0  # everything before it is in ``to_host`` or already sent
    rcv_acked: int = 0  # the rcv_nxt our last ACK (pure or on data) told the guest
    data_in_at: float = -1.0  # when guest data last reached the host socket
    # Replies have followed the guest's data within the ACK delay: its ACKs are delayed
    # (they ride on the reply) until the delay once runs out without one.
    interactive: bool = False
    ack_owed_at: float | None = None  # an ACK of guest data is owed, due then

    # Guest -> host.
    to_host: bytearray = field(default_factory=bytearray)
    send_queued: bool = False
    host_space: int = 65535  # bytes the host socket can take, as last reported
    guest_fin: bool = False  # guest's FIN received (all data before it queued)
    host_shut: bool = False  # shutdown(SHUT_WR) issued, guest's FIN acknowledged

    # Host -> guest.
    host_readable: bool = False  # the host socket may hold data we have not peeked yet
    peek_pending: bool = False
    peek_seq: int = -1  # snd_nxt when the pending peek was issued (-1: result is stale)
    peek_len: int = 0
    host_eof: bool = False
    fin_sent: bool = False
    fin_acked: bool = False
    dup_acks: int = 0

    # Timers (absolute times, None = not armed).
    rto: float = 1.0
    retries: int = 0
    rto_at: float | None = None
    syn_at: float | None = None
    fin_at: float | None = None
    idle_at: float | None = None
    scheduled_at: float | None = None  # the deadline currently in the engine's timer heap

    @property
    def key(self) -> tuple[bytes, int, bytes, int]:
        return (self.guest_ip, self.guest_port, self.remote_ip, self.remote_port)

    def send_seq(self, rel: int) -> int:
        return (self.iss + rel) % SEQ_MOD

    def recv_seq(self, rel: int) -> int:
        return (self.irs + rel) % SEQ_MOD

    def send_rel(self, wire: int) -> int:
        """Relative send-side number of a wire ACK value, taken near snd_una."""
        # seq_diff(wire, send_seq(snd_una)) written out: every guest ACK comes here.
        return self.snd_una + ((wire - self.iss - self.snd_una + HALF_SEQ) % SEQ_MOD) - HALF_SEQ

    def recv_rel(self, wire: int) -> int:
        """Relative receive-side number of a wire sequence value, taken near rcv_nxt."""
        return self.rcv_nxt + ((wire - self.irs - self.rcv_nxt + HALF_SEQ) % SEQ_MOD) - HALF_SEQ

    @property
    def open_both_ways(self) -> bool:
        """Established, and no FIN seen or sent, nor the host side shut or at EOF."""
        return (self.phase is Phase.ESTABLISHED and not self.guest_fin and not self.host_shut
                and not self.host_eof and not self.fin_sent)

    @property
    def state_name(self) -> str:
        """The RFC 9293 state name this flow corresponds to (for logs and tests)."""
        if self.phase is not Phase.ESTABLISHED:
            return self.phase.value
        if self.fin_sent and self.guest_fin:
            return "closed" if self.fin_acked and self.host_shut else "last_ack"
        if self.fin_sent:
            return "fin_wait_2" if self.fin_acked else "fin_wait_1"
        if self.guest_fin:
            return "close_wait"
        return "established"

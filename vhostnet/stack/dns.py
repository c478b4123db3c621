"""DNS forwarding (sans-IO): guest queries to the DNS address, port 53, go to the host's resolvers.

Each guest query gets a fresh random 16-bit id for the upstream (so two guest
queries with the same id cannot be confused, and off-path answers are hard to
forge); the answer goes back to the guest from ``config.dns:53`` with the
guest's own id. An upstream that stays silent for ``ATTEMPT_TIMEOUT`` seconds
(or refuses) is replaced by the next one in ``config.dns_upstream``; when none
is left, or ``OVERALL_TIMEOUT`` has passed, the guest gets a SERVFAIL built
from its query. At most ``MAX_PENDING`` queries are outstanding.

Commands (``DnsForwarder.commands``, executed by ``hostio.dns.DnsGlue.flush``):
``DnsQuery(upstream_index, host, port, data)``: send ``data`` to upstream ``upstream_index``.
Events: ``on_upstream_reply(upstream_index, data, now)``, ``on_upstream_error(upstream_index, now)``.
The header flags and the SERVFAIL builder are in ``vhostnet.wire.dns``.

With a lease pool (``leases``), a query for a name under our domain (``NAME.<domain>``,
``host.<domain>``, A and AAAA) is answered here from ``LeasePool.resolve``: the
addresses, none (NOERROR), or NXDOMAIN for a name no guest holds
(``dns.local.answer``, ``dns.local.nxdomain``); only other names go upstream.

The same forwarder serves ``config.dns6`` port 53 over IPv6 (registered as an IPv6 UDP
service too): a query's family is its guest address's length, the answer leaves from
the DNS address of that family. Upstreams of either family serve both.
"""

from __future__ import annotations

import secrets
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from vhostnet.stack.config import DNS_PORT, StackConfig
from vhostnet.stack.counters import Counters
from vhostnet.stack.leases import LeasePool, NxDomain
from vhostnet.wire.dns import (
    CLASS_IN,
    FLAG_QR,
    HEADER_LEN,
    OPCODE_MASK,
    RCODE_NOERROR,
    RCODE_NXDOMAIN,
    read_question,
    reply_to,
    servfail_for,
)

ATTEMPT_TIMEOUT = 2.0
OVERALL_TIMEOUT = 5.0
MAX_PENDING = 256
# Seconds a guest may cache a local answer: short, since leases and names change.
LOCAL_TTL = 10

SendUdp = Callable[..., None]


@dataclass(frozen=True)
class DnsQuery:
    upstream_index: int
    host: str
    port: int
    data: bytes


@dataclass
class _PendingQuery:
    upstream_id: int
    guest_ip: bytes
    guest_port: int
    query: bytes  # as the guest sent it (guest id included)
    upstream_index: int
    attempt_deadline: float
    overall_deadline: float


class DnsForwarder:
    """UDP service for ``config.dns:53`` that relays to the upstream resolvers."""

    def __init__(self, config: StackConfig, counters: Counters, send_udp: SendUdp,
                 send_udp6: SendUdp | None = None, leases: LeasePool | None = None) -> None:
        self.config = config
        self.counters = counters
        self._send_udp = send_udp
        self._send_udp6 = send_udp6
        self._leases = leases
        self.commands: deque[DnsQuery] = deque()
        self._pending: dict[int, _PendingQuery] = {}

    def accepts(self, dst_ip: bytes, dst_port: int) -> bool:
        return dst_port == DNS_PORT and (dst_ip == self.config.dns or (
            dst_ip == self.config.dns6 and self._send_udp6 is not None))

    def handle_udp(self, src_ip: bytes, src_port: int, dst_ip: bytes, dst_port: int,
                   payload: memoryview, now: float) -> None:
        if len(payload) < HEADER_LEN:
            self.counters.drop("dns.drop.short", "DNS query shorter than its header dropped")
            return
        query = bytes(payload)
        if struct.unpack_from("!H", query, 2)[0] & FLAG_QR:
            self.counters.drop("dns.drop.not_query", "DNS response sent by the guest dropped")
            return
        if self._leases is not None and self._answer_locally(src_ip, src_port, query):
            return
        if len(self._pending) >= MAX_PENDING:
            self.counters.drop("dns.drop.too_many_pending", "too many DNS queries outstanding")
            return
        self.counters.inc("dns.query")
        pending = _PendingQuery(self._new_upstream_id(), src_ip, src_port, query, -1, now,
                                now + OVERALL_TIMEOUT)
        self._pending[pending.upstream_id] = pending
        self._try_next_upstream(pending, now)

    def _answer_locally(self, guest_ip: bytes, guest_port: int, query: bytes) -> bool:
        """Answer a standard query for a name of our domain from the lease pool; False for
        any other query (it goes upstream)."""
        assert self._leases is not None
        question = read_question(query)
        if question is None or question[2] != CLASS_IN or struct.unpack_from(
                "!H", query, 2)[0] & OPCODE_MASK:
            return False
        addresses = self._leases.resolve(question[0], question[1])
        if addresses is None:
            return False
        missing = isinstance(addresses, NxDomain)
        self.counters.inc("dns.local.nxdomain" if missing else "dns.local.answer")
        self._send_to_guest(guest_ip, guest_port, reply_to(
            query, RCODE_NXDOMAIN if missing else RCODE_NOERROR, addresses, LOCAL_TTL,
            authoritative=True))
        return True

    def _new_upstream_id(self) -> int:
        # Random ids; with at most MAX_PENDING of 65536 taken a few draws always suffice,
        # the scan below only guards the bound on the loop.
        for _ in range(32):
            candidate = secrets.randbelow(0x10000)
            if candidate not in self._pending:
                return candidate
        return next(i for i in range(0x10000) if i not in self._pending)

    def _try_next_upstream(self, pending: _PendingQuery, now: float) -> None:
        pending.upstream_index += 1
        if pending.upstream_index >= len(self.config.dns_upstream) or now >= pending.overall_deadline:
            self._fail(pending)
            return
        host, port = self.config.dns_upstream[pending.upstream_index]
        pending.attempt_deadline = min(now + ATTEMPT_TIMEOUT, pending.overall_deadline)
        data = struct.pack("!H", pending.upstream_id) + pending.query[2:]
        self.commands.append(DnsQuery(pending.upstream_index, host, port, data))

    def _fail(self, pending: _PendingQuery) -> None:
        del self._pending[pending.upstream_id]
        self.counters.inc("dns.servfail")
        self._answer(pending, servfail_for(pending.query))

    def _answer(self, pending: _PendingQuery, message: bytes) -> None:
        self._send_to_guest(pending.guest_ip, pending.guest_port, message)

    def _send_to_guest(self, guest_ip: bytes, guest_port: int, message: bytes) -> None:
        if len(guest_ip) == 16 and self._send_udp6 is not None:
            self._send_udp6(self.config.dns6, DNS_PORT, guest_ip, guest_port, message)
        else:
            self._send_udp(self.config.dns, DNS_PORT, guest_ip, guest_port, message)

    # --- host side (called by the glue) -----------------------------------

    def on_upstream_reply(self, upstream_index: int, data: bytes, now: float) -> None:
        if len(data) < HEADER_LEN or not struct.unpack_from("!H", data, 2)[0] & FLAG_QR:
            self.counters.drop("dns.drop.bad_reply", "malformed answer from a DNS upstream")
            return
        pending = self._pending.get(struct.unpack_from("!H", data, 0)[0])
        if pending is None or pending.upstream_index != upstream_index:
            self.counters.inc("dns.drop.unexpected_reply")  # late, duplicate or forged
            return
        del self._pending[pending.upstream_id]
        self.counters.inc("dns.answer")
        self._answer(pending, pending.query[:2] + data[2:])

    def on_upstream_error(self, upstream_index: int, now: float) -> None:
        """The upstream refused (ICMP unreachable): move its queries on at once."""
        self.counters.inc("dns.upstream_error")
        for pending in list(self._pending.values()):
            if pending.upstream_index == upstream_index:
                self._try_next_upstream(pending, now)

    # --- timers -----------------------------------------------------------

    def poll_timers(self, now: float) -> None:
        for pending in list(self._pending.values()):
            if now >= pending.overall_deadline:
                self._fail(pending)
            elif now >= pending.attempt_deadline:
                self.counters.inc("dns.upstream_timeout")
                self._try_next_upstream(pending, now)

    def next_timer(self) -> float | None:
        if not self._pending:
            return None
        return min(p.attempt_deadline for p in self._pending.values())

    @property
    def pending_count(self) -> int:
        return len(self._pending)

"""Reassembly of the guest's IPv4 and IPv6 fragments (RFC 791, RFC 815, RFC 8200, RFC 5722).

Theory of operation
-------------------
The stack hands every fragment it receives from the guest to ``Reassembler.add_ipv4``
or ``add_ipv6``. A datagram in progress is keyed as the RFCs say: IPv4 by (source,
destination, protocol, identification), IPv6 by (source, destination, identification).
It keeps its pieces as a sorted list of non-overlapping byte ranges of the original
payload (a new piece is checked against its two neighbours only), the number of bytes
received, and the total length once the last fragment (MF/M clear) has said it. It is
complete when the bytes received equal that total: non-overlapping pieces inside
``[0, total)`` that add up to ``total`` leave no hole. The completed datagram is rebuilt
as one whole packet, header from the first fragment, and returned: the stack parses it
with the ordinary checked view and dispatches it as if it had arrived in one frame.

Hostile or broken input costs one counter each (``frag.drop.<reason>``), never an
exception, and the whole datagram goes when its fragments contradict each other:

- overlap: any piece overlapping another drops the whole datagram, IPv4 as Linux does,
  IPv6 as RFC 5722 requires; an exact duplicate (same range) drops only itself
  (``duplicate``), as Linux does for both families;
- ``inconsistent``: two different ends, or a piece beyond the end;
- ``too_big``: the rebuilt packet would pass 65535 bytes (IPv4 total length, IPv6 payload
  length without jumbograms);
- ``bad_length``: a fragment with more to follow whose length is not a multiple of 8;
  ``empty``: a fragment with no data;
- ``tiny_first``: a first fragment too short for its upper-layer header (RFC 1858 for
  IPv4, RFC 7112 for IPv6: the header chain must be in the first fragment);
- ``too_many``: more than ``max_fragments`` pieces for one datagram;
- ``memory``: the oldest datagram in progress evicted so a newer one fits the limits on
  datagrams in progress and on bytes buffered (each piece is charged its length plus
  ``FRAGMENT_OVERHEAD``, so floods of tiny fragments are bounded too); new fragments
  are never refused, since the guest is the only sender and a stuck old datagram is the
  likelier garbage (Linux evicts the same way);
- ``timeout``: not completed within 30 s (IPv4, Linux's default) or 60 s (IPv6, RFC 8200)
  of its first fragment. No ICMP time-exceeded goes back: the sender is the guest, whose
  kernel times out on its own.

An IPv6 "atomic fragment" (offset 0, M clear, RFC 6946) is returned at once, its fragment
header removed, without touching the table.

Sans-IO: ``now`` is passed in; ``next_timer``/``poll_timers`` run on the network's one
timer list.
"""

from __future__ import annotations

import bisect
import struct
from collections import OrderedDict
from dataclasses import dataclass

from vhostnet.stack.counters import Counters
from vhostnet.wire import ipv6
from vhostnet.wire.checksum import PROTO_ICMP, PROTO_TCP, PROTO_UDP, internet_checksum
from vhostnet.wire.ipv4 import IPv4Packet
from vhostnet.wire.ipv6 import IPv6Packet

# Bytes charged per buffered fragment on top of its data (list entry, tuple, bytes object).
FRAGMENT_OVERHEAD = 64
MAX_IPV4_TOTAL = 0xFFFF

# The shortest first fragment that holds the whole upper-layer header.
_UPPER_HEADER_MIN = {PROTO_TCP: 20, PROTO_UDP: 8, PROTO_ICMP: 8, ipv6.NEXT_HEADER_ICMPV6: 4}

Key = tuple


@dataclass(frozen=True)
class FragmentLimits:
    """Bounds on reassembly; the byte and datagram limits hold for both families together."""

    max_fragments: int = 64  # pieces of one datagram
    max_datagrams: int = 64  # datagrams in progress
    max_bytes: int = 1 << 20  # bytes charged for everything buffered
    ipv4_timeout: float = 30.0
    ipv6_timeout: float = 60.0


class _Datagram:
    """One datagram in progress: sorted, non-overlapping pieces ``(start, end, data)``."""

    __slots__ = ("created", "deadline", "starts", "pieces", "received", "total", "head",
                 "charged")

    def __init__(self, created: float, deadline: float) -> None:
        self.created = created
        self.deadline = deadline
        self.starts: list[int] = []
        self.pieces: list[tuple[int, int, bytes]] = []
        self.received = 0
        self.total: int | None = None
        # The rebuilt packet's header (IPv4: the first fragment's, options included;
        # IPv6: fixed header + unfragmentable extension headers); None until offset 0 came.
        self.head: bytes | None = None
        self.charged = 0


class Reassembler:
    """Fragments in, whole packets out (see the module docstring)."""

    def __init__(self, counters: Counters, limits: FragmentLimits | None = None) -> None:
        self.counters = counters
        self.limits = limits or FragmentLimits()
        # One table per family, each in order of first arrival (= order of deadlines).
        self._tables: dict[int, OrderedDict[Key, _Datagram]] = {4: OrderedDict(),
                                                                6: OrderedDict()}
        self.buffered_bytes = 0  # charged bytes, never above limits.max_bytes

    # --- guest side ----------------------------------------------------------

    def add_ipv4(self, packet: IPv4Packet, now: float) -> bytes | None:
        """Take one IPv4 fragment (a view made with ``allow_fragments``); the whole packet
        (header + payload, no fragment fields) once its last piece is in, else None."""
        self.counters.inc("frag.rx")
        start, data = packet.fragment_offset, packet.payload
        key = (4, packet.src, packet.dst, packet.proto, packet.ident)
        if packet.header_len + start + len(data) > MAX_IPV4_TOTAL:
            self._discard(4, key, "too_big")
            return None
        head = packet.header if start == 0 else None
        if head is not None and len(data) < _UPPER_HEADER_MIN.get(packet.proto, 0):
            self._discard(4, key, "tiny_first")
            return None
        return self._add(4, key, start, data, packet.more_fragments, head, now)

    def add_ipv6(self, packet: IPv6Packet, now: float) -> bytes | None:
        """Take one IPv6 fragment (``packet.fragment`` set); the whole packet without its
        fragment header (parse it with ``IPv6Packet`` for ``upper_protocol`` and
        ``upper_payload``) once its last piece is in, else None."""
        fragment = packet.fragment
        if fragment is None:
            raise ValueError("add_ipv6 takes fragments only")
        self.counters.inc("frag.rx")
        index = next(i for i, (kind, _, _) in enumerate(packet.extensions)
                     if kind == ipv6.NEXT_HEADER_FRAGMENT)
        header_at = packet.extensions[index][1]  # offset of the fragment header in the payload
        data = packet.payload[header_at + ipv6.FRAGMENT_HEADER_LEN :]
        key = (6, packet.src, packet.dst, fragment.ident)
        if header_at + fragment.offset + len(data) > ipv6.MAX_PAYLOAD:
            self._discard(6, key, "too_big")
            return None
        head = None
        if fragment.offset == 0:
            head = _ipv6_head(packet, index, header_at)
            if not fragment.more:  # atomic fragment (RFC 6946): nothing to wait for
                self.counters.inc("frag.atomic")
                return _finish_ipv6(head, bytes(data))
            if len(packet.upper_payload) < _UPPER_HEADER_MIN.get(packet.upper_protocol, 0):
                self._discard(6, key, "tiny_first")
                return None
        return self._add(6, key, fragment.offset, data, fragment.more, head, now)

    # --- timers ------------------------------------------------------------------

    def next_timer(self) -> float | None:
        deadlines = [next(iter(table.values())).deadline for table in self._tables.values()
                     if table]
        return min(deadlines) if deadlines else None

    def poll_timers(self, now: float) -> None:
        for family, table in self._tables.items():
            while table:
                key, datagram = next(iter(table.items()))
                if datagram.deadline > now:
                    break
                self._discard(family, key, "timeout")

    def in_progress(self) -> int:
        """Datagrams waiting for more fragments, both families."""
        return sum(len(table) for table in self._tables.values())

    # --- the table -------------------------------------------------------------

    def _add(self, family: int, key: Key, start: int, data: memoryview, more: bool,
             head: bytes | None, now: float) -> bytes | None:
        end = start + len(data)
        if not data:
            self._drop_fragment("empty")
            return None
        if more and len(data) % 8:
            self._drop_fragment("bad_length")
            return None
        table = self._tables[family]
        datagram = table.get(key)
        if datagram is None:
            datagram = self._new_datagram(family, key, now)
        if datagram.total is not None and (end > datagram.total
                                           or (not more and end != datagram.total)):
            self._discard(family, key, "inconsistent")
            return None
        if not more and datagram.pieces and datagram.pieces[-1][1] > end:
            self._discard(family, key, "inconsistent")
            return None
        index = bisect.bisect_left(datagram.starts, start)
        pieces = datagram.pieces
        if index < len(pieces) and pieces[index][0] == start and pieces[index][1] == end:
            self._drop_fragment("duplicate")
            return None
        if (index > 0 and pieces[index - 1][1] > start) or (index < len(pieces)
                                                            and pieces[index][0] < end):
            self._discard(family, key, "overlap")
            return None
        if len(pieces) >= self.limits.max_fragments:
            self._discard(family, key, "too_many")
            return None
        charge = len(data) + FRAGMENT_OVERHEAD
        if not self._make_room(charge, keep=datagram):
            self._discard(family, key, "memory")
            return None
        datagram.starts.insert(index, start)
        pieces.insert(index, (start, end, bytes(data)))
        datagram.received += len(data)
        datagram.charged += charge
        self.buffered_bytes += charge
        if not more:
            datagram.total = end
        if head is not None:
            datagram.head = head
        if datagram.received != datagram.total or datagram.head is None:
            return None
        # Each fragment was checked against its own header's length; the rebuilt packet
        # carries the first fragment's (IPv4 options, IPv6 extension headers).
        limit = MAX_IPV4_TOTAL if family == 4 else ipv6.HEADER_LEN + ipv6.MAX_PAYLOAD
        if len(datagram.head) + datagram.total > limit:
            self._discard(family, key, "too_big")
            return None
        self._remove(family, key)
        self.counters.inc("frag.reassembled")
        payload = b"".join(piece for _, _, piece in pieces)
        return _finish_ipv4(datagram.head, payload) if family == 4 else _finish_ipv6(
            datagram.head, payload)

    def _new_datagram(self, family: int, key: Key, now: float) -> _Datagram:
        while self.in_progress() >= self.limits.max_datagrams:
            self._evict_oldest(keep=None)
        timeout = self.limits.ipv4_timeout if family == 4 else self.limits.ipv6_timeout
        datagram = _Datagram(now, now + timeout)
        self._tables[family][key] = datagram
        return datagram

    def _make_room(self, charge: int, keep: _Datagram) -> bool:
        """Evict the oldest other datagrams until ``charge`` more bytes fit; False if even
        ``keep`` alone leaves no room."""
        while self.buffered_bytes + charge > self.limits.max_bytes:
            if not self._evict_oldest(keep):
                return False
        return True

    def _evict_oldest(self, keep: _Datagram | None) -> bool:
        oldest: tuple[float, int, Key] | None = None
        for family, table in self._tables.items():
            for key, datagram in table.items():
                if datagram is keep:
                    continue
                if oldest is None or datagram.created < oldest[0]:
                    oldest = (datagram.created, family, key)
                break  # the first other one is this table's oldest
        if oldest is None:
            return False
        self._discard(oldest[1], oldest[2], "memory")
        return True

    def _discard(self, family: int, key: Key, reason: str) -> None:
        """Drop the datagram ``key`` (if in progress) and the fragment that condemned it."""
        self._remove(family, key)
        self._drop_fragment(reason)

    def _drop_fragment(self, reason: str) -> None:
        self.counters.drop(f"frag.drop.{reason}", f"IP fragment dropped: {reason}")

    def _remove(self, family: int, key: Key) -> None:
        datagram = self._tables[family].pop(key, None)
        if datagram is not None:
            self.buffered_bytes -= datagram.charged


def _finish_ipv4(head: bytes, payload: bytes) -> bytes:
    header = bytearray(head)
    struct.pack_into("!HHH", header, 2, len(header) + len(payload),
                     struct.unpack_from("!H", header, 4)[0], 0)  # no fragment fields
    struct.pack_into("!H", header, 10, 0)
    struct.pack_into("!H", header, 10, internet_checksum(header))
    return bytes(header) + payload


def _ipv6_head(packet: IPv6Packet, index: int, header_at: int) -> bytes:
    """Fixed header + the extension headers before the fragment header, whose next-header
    chain now skips the fragment header (its payload length is set when complete)."""
    upper = packet.payload[header_at]  # the fragment header's next header
    next_header = upper if index == 0 else packet.next_header
    head = bytearray(ipv6.emit_ipv6_header(packet.src, packet.dst, next_header, 0,
                                           packet.hop_limit, packet.traffic_class,
                                           packet.flow_label) + packet.payload[:header_at])
    if index > 0:
        head[ipv6.HEADER_LEN + packet.extensions[index - 1][1]] = upper
    return bytes(head)


def _finish_ipv6(head: bytes, payload: bytes) -> bytes:
    header = bytearray(head)
    struct.pack_into("!H", header, 4, len(header) - ipv6.HEADER_LEN + len(payload))
    return bytes(header) + payload

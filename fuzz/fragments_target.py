"""Fuzz target for the reassembler (``vhostnet.stack.fragments``): a stream of fragments.

The input is a sequence of records ``family (1 byte), length (2 bytes), packet``. Each
packet goes through the family's checked view (fragments allowed) and, when it is a
fragment, into one ``Reassembler`` that lives as long as the input, with the clock moving
a little per record so timeouts fire too. The contract: nothing but ``MalformedPacket``
escapes, the buffered bytes never exceed the cap, and a rebuilt datagram parses again
with the checked view of its family.
"""

from __future__ import annotations

import struct

from vhostnet.stack.counters import Counters
from vhostnet.stack.fragments import Reassembler
from vhostnet.wire.errors import MalformedPacket
from vhostnet.wire.ipv4 import IPv4Packet
from vhostnet.wire.ipv6 import IPv6Packet

_RECORD = struct.Struct("!BH")
MAX_RECORDS = 256


def fuzz_fragments(data: bytes) -> None:
    reassembler = Reassembler(Counters())
    view = memoryview(data)
    now = 0.0
    for _ in range(MAX_RECORDS):
        if len(view) < _RECORD.size:
            break
        family, length = _RECORD.unpack_from(view)
        packet = bytes(view[_RECORD.size:_RECORD.size + length])
        view = view[_RECORD.size + length:]
        now += (family >> 1) * 0.5  # high bits of the family byte move the clock
        reassembler.poll_timers(now)
        try:
            if family & 1 == 0:
                parsed4 = IPv4Packet(packet, allow_fragments=True)
                whole = reassembler.add_ipv4(parsed4, now) if parsed4.is_fragment else None
                if whole is not None:
                    IPv4Packet(whole)
            else:
                parsed6 = IPv6Packet(packet)
                whole = (reassembler.add_ipv6(parsed6, now)
                         if parsed6.fragment is not None else None)
                if whole is not None:
                    IPv6Packet(whole)
        except MalformedPacket:
            pass
        assert reassembler.buffered_bytes <= reassembler.limits.max_bytes, "over the byte cap"

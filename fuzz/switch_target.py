"""Fuzz target for the switch between guests (``virtqueue.Switch``: ``_virtq.SwitchKernel``,
ext/virtq_switch.pxi and ext/virtq_segment.pxi) through its public face.

Four ports, each with a guest MAC and a route (IPv4 and IPv6 address). Per case the fuzz
bytes choose the sending port, every port's receive offloads (GUEST_CSUM, GUEST_TSO4,
GUEST_TSO6), the clock step (MAC entries age out), whether a port goes away and comes
back, whether frames are left waiting, and a batch of frames with their vnet words:

- raw (byte 0 bit 0 clear): frames and vnet words as the fuzz bytes say, with the
  Ethernet addresses and the checksum position optionally set to something the switch
  acts on (a port's MAC, the gateway, a group address; the L4 checksum field);
- well-formed (bit 0 set): TCP or UDP over IPv4 (with options) or IPv6, built here with
  correct lengths and checksums, a partial checksum (NEEDS_CSUM) or a complete one, and
  super-frames (GSO TCPv4/TCPv6, ECN, any gso_size; UDP GSO too, to be refused).

The contract, checked on every case: nothing raises; the counters only grow; the
sender's batch is compacted, in order and unchanged, to frames for its router (the
gateway MAC, a group address); no port gets an offload it did not negotiate (no
NEEDS_CSUM or DATA_VALID without GUEST_CSUM, no super-frame without the family's TSO or
with ECN); and for well-formed input every frame a port gets whose checksums are not
left to it has a valid IPv4 header checksum, IP lengths that match the frame, a valid
TCP/UDP checksum, and segments of at most gso_size payload bytes.
"""

from __future__ import annotations

import struct

from vhostnet.virtqueue import FrameBatch, Switch
from vhostnet.wire.checksum import (
    PROTO_TCP,
    PROTO_UDP,
    internet_checksum,
    l4_checksum_ok,
    pseudo_header_sum,
    pseudo_header_sum_ipv6,
)
from vhostnet.wire.ethernet import ETHERTYPE_IPV4, ETHERTYPE_IPV6
from vhostnet.wire.ethernet import HEADER_LEN as ETH_LEN
from vhostnet.wire.offload import (
    DATA_VALID,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    NEEDS_CSUM,
    TCP_CHECKSUM_OFFSET,
    UDP_CHECKSUM_OFFSET,
    vnet_fields,
    vnet_word,
)

PORTS = 4
GATEWAY_MAC = bytes.fromhex("525600000002")
PORT_MACS = [bytes.fromhex(f"5254000000{k + 1:02x}") for k in range(PORTS)]
PORT_IPV4 = [bytes([10, 0, 2, 15 + k]) for k in range(PORTS)]
PORT_IPV6 = [bytes.fromhex(f"fec0000000000000000000000000{0x100 + k:04x}") for k in range(PORTS)]
OUTSIDE_IPV4 = bytes([93, 184, 216, 34])
OUTSIDE_IPV6 = bytes.fromhex("20010db8000000000000000000000001")
BROADCAST = b"\xff" * 6
MULTICAST = bytes.fromhex("333300000001")
# Destinations a frame's first byte chooses among (index 7: keep what the bytes say).
DESTINATIONS = [*PORT_MACS, GATEWAY_MAC, BROADCAST, MULTICAST]
GSO_UDP = 3
GSO_ECN = 0x80
AGEING_SECONDS = 8.0
OUTGOING_FRAMES = 64
OUTGOING_BYTES = 1 << 20
BATCH_FRAMES = 32
MAX_PAYLOAD = 0xFFFF - 60 - 60
PATTERN = bytes(range(256)) * 257

# Byte 0 of a case.
WELL_FORMED = 0x01
KEEP_WAITING = 0x02  # ports take half their waiting frames only (batches fill, then drop)
RECONNECT = 0x04     # the port after the sender goes away and comes back first
_CASE = struct.Struct("<BBH")  # gates and clock step, sender, offloads (3 bits per port)
_RAW = struct.Struct("<BBHQ")  # choices, more choices, frame length, vnet word
_SHAPED = struct.Struct("<BBBBHHB")  # kind, header sizes, tcp flags, ttl, payload, gso, seed


def _mac_choice(choice: int, given: bytes) -> bytes:
    return given if choice % 8 == 7 else DESTINATIONS[choice % 8 % len(DESTINATIONS)]


def _l4_position(frame: bytes) -> tuple[int, int] | None:
    """(L4 start, protocol) of an IPv4 or IPv6 frame, or None."""
    if len(frame) < ETH_LEN + 20:
        return None
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    if ethertype == ETHERTYPE_IPV4:
        return ETH_LEN + (frame[ETH_LEN] & 0x0F) * 4, frame[ETH_LEN + 9]
    if ethertype == ETHERTYPE_IPV6 and len(frame) >= ETH_LEN + 40:
        return ETH_LEN + 40, frame[ETH_LEN + 6]
    return None


def raw_frame(record: bytes, sender: int) -> tuple[bytes, int, int] | None:
    """One frame as the fuzz bytes say (addresses and checksum position optionally fixed):
    (frame, vnet word, bytes used), None when the record is short."""
    if len(record) < _RAW.size:
        return None
    choices, more, length, vnet = _RAW.unpack_from(record)
    body = record[_RAW.size:_RAW.size + length % 2048]
    used = _RAW.size + len(body)
    frame = bytearray(body)
    if len(frame) >= 12:
        frame[0:6] = _mac_choice(choices, bytes(frame[0:6]))
        if choices & 0x08:
            frame[6:12] = PORT_MACS[sender]
    if more & 0x01:
        position = _l4_position(bytes(frame))
        if position is not None:
            start, proto = position
            offset = TCP_CHECKSUM_OFFSET if proto == PROTO_TCP else UDP_CHECKSUM_OFFSET
            fields = vnet_fields(vnet)
            vnet = vnet_word(fields.flags | NEEDS_CSUM, fields.gso_type, fields.gso_size,
                             start, offset)
    return bytes(frame), vnet, used


def shaped_frame(record: bytes, sender: int) -> tuple[bytes, int, int] | None:
    """One well-formed TCP or UDP frame over IPv4 or IPv6 and its vnet word, as a guest's
    driver hands them over: (frame, vnet word, bytes used), None when the record is short."""
    if len(record) < _SHAPED.size:
        return None
    kind, sizes, tcp_flags, ttl, payload_len, gso_size, seed = _SHAPED.unpack_from(record)
    ipv6, udp, gso, partial = kind & 1, kind & 2, kind & 4, kind & 8
    destination = DESTINATIONS[(kind >> 4) % len(DESTINATIONS)]
    to_guest = seed % PORTS  # whose address the IP destination is (unless outside)
    outside = kind & 0x80
    payload_len %= MAX_PAYLOAD if gso else 1400
    payload = PATTERN[seed:seed + payload_len]
    if udp:
        l4_header = struct.pack("!HHHH", 40000, 5201, 8 + payload_len, 0)
        proto, csum_at = PROTO_UDP, UDP_CHECKSUM_OFFSET
    else:
        options = b"\x01" * (4 * ((sizes >> 4) % 11))
        l4_header = struct.pack("!HHIIBBHHH", 40000, 5201, 1000, 77, (5 + len(options) // 4) << 4,
                                tcp_flags, 500, 0, 0) + options
        proto, csum_at = PROTO_TCP, TCP_CHECKSUM_OFFSET
    l4_len = len(l4_header) + payload_len
    src = PORT_IPV6[sender] if ipv6 else PORT_IPV4[sender]
    if ipv6:
        dst = OUTSIDE_IPV6 if outside else PORT_IPV6[to_guest]
        ip = struct.pack("!IHBB16s16s", 6 << 28, l4_len, proto, ttl, src, dst)
        pseudo = pseudo_header_sum_ipv6(src, dst, proto, l4_len)
        ethertype, gso_type = ETHERTYPE_IPV6, GSO_TCPV6
    else:
        dst = OUTSIDE_IPV4 if outside else PORT_IPV4[to_guest]
        options = b"\x01" * (4 * (sizes % 11))
        ip = struct.pack("!BBHHHBBH4s4s", 0x40 | (5 + len(options) // 4), 0,
                         len(options) + 20 + l4_len, 0x1000 + seed, 0x4000, ttl, proto, 0,
                         src, dst) + options
        ip = ip[:10] + struct.pack("!H", internet_checksum(ip)) + ip[12:]
        pseudo = pseudo_header_sum(src, dst, proto, l4_len)
        ethertype, gso_type = ETHERTYPE_IPV4, GSO_TCPV4
    start = ETH_LEN + len(ip)
    segment = bytearray(l4_header + payload)
    if partial or gso:
        # NEEDS_CSUM: the field holds the pseudo-header sum (virtio 5.1.6.2).
        struct.pack_into("!H", segment, csum_at, pseudo)
        flags = NEEDS_CSUM
    else:
        struct.pack_into("!H", segment, csum_at, internet_checksum(segment, pseudo) or 0xFFFF)
        flags = DATA_VALID if sizes & 0x80 else 0
    if gso:
        gso_type = GSO_UDP if udp else gso_type | (GSO_ECN if tcp_flags & 0x40 else 0)
        vnet = vnet_word(flags, gso_type, gso_size % 2000, start, csum_at)
    else:
        vnet = vnet_word(flags, GSO_NONE, 0, start if flags == NEEDS_CSUM else 0,
                         csum_at if flags == NEEDS_CSUM else 0)
    frame = destination + PORT_MACS[sender] + struct.pack("!H", ethertype) + ip + bytes(segment)
    return frame, vnet, _SHAPED.size


def check_offloads(frame: bytes, vnet: int, offloads: tuple[bool, bool, bool]) -> None:
    """What a port gets never needs an offload it did not negotiate."""
    csum, tso4, tso6 = offloads
    fields = vnet_fields(vnet)
    if not csum:
        assert not fields.flags & (NEEDS_CSUM | DATA_VALID), "checksum offload to a port without"
    if fields.gso_type != GSO_NONE:
        assert csum and not fields.gso_type & GSO_ECN, "super-frame to a port without TSO"
        assert ((fields.gso_type == GSO_TCPV4 and tso4)
                or (fields.gso_type == GSO_TCPV6 and tso6)), "super-frame without the TSO"


def check_well_formed(frame: bytes, vnet: int, max_payload: int) -> None:
    """A frame built by ``shaped_frame`` as a port gets it, its checksums complete (any
    left to the port are not checked): lengths and checksums right, segments small."""
    fields = vnet_fields(vnet)
    if fields.flags & NEEDS_CSUM or fields.gso_type != GSO_NONE:
        return
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    if ethertype == ETHERTYPE_IPV4:
        header_len = (frame[ETH_LEN] & 0x0F) * 4
        ip = frame[ETH_LEN:ETH_LEN + header_len]
        assert internet_checksum(ip) == 0, "IPv4 header checksum wrong"
        assert struct.unpack_from("!H", ip, 2)[0] == len(frame) - ETH_LEN, "IPv4 length wrong"
        src, dst, proto = ip[12:16], ip[16:20], ip[9]
    else:
        assert ethertype == ETHERTYPE_IPV6, "not a frame the harness built"
        header_len = 40
        ip = frame[ETH_LEN:ETH_LEN + 40]
        assert struct.unpack_from("!H", ip, 4)[0] == len(frame) - ETH_LEN - 40, "IPv6 length wrong"
        src, dst, proto = ip[8:24], ip[24:40], ip[6]
    segment = frame[ETH_LEN + header_len:]
    assert l4_checksum_ok(src, dst, proto, segment), "L4 checksum wrong"
    if proto == PROTO_TCP:
        assert len(segment) - (segment[12] >> 4) * 4 <= max_payload, "segment over gso_size"


def follow(counter: str) -> None:
    """One branch per thing the C kernel did (a counter that moved). Coverage cannot see
    inside the kernel; with this module instrumented too (``fuzz.run``), a case that makes
    the kernel do something new is new coverage, and libFuzzer keeps it to mutate."""
    match counter.removeprefix("switch."):
        case "forwarded":
            pass
        case "flooded":
            pass
        case "to_router":
            pass
        case "learned":
            pass
        case "moved":
            pass
        case "aged":
            pass
        case "evicted":
            pass
        case "checksums_completed":
            pass
        case "segmented":
            pass
        case "segments":
            pass
        case "routed":
            pass
        case "dropped.short":
            pass
        case "dropped.bad_offset":
            pass
        case "dropped.bad_source":
            pass
        case "dropped.same_port":
            pass
        case "dropped.outgoing_full":
            pass
        case "dropped.bad_offload":
            pass
        case "dropped.gso_unsupported":
            pass


class SwitchTarget:
    def __init__(self) -> None:
        self.switch = Switch(PORTS, GATEWAY_MAC, AGEING_SECONDS,
                             outgoing_frames=OUTGOING_FRAMES, outgoing_bytes=OUTGOING_BYTES)
        for port in range(PORTS):
            assert self.switch.add_port() == port
            self._route(port)
        self.offloads = [(False, False, False)] * PORTS
        self.batch = FrameBatch(BATCH_FRAMES, BATCH_FRAMES * 0x10000)
        self.now = 0.0
        self.counters = self.switch.counters()

    def _route(self, port: int) -> None:
        self.switch.set_port_route(port, PORT_MACS[port], PORT_IPV4[port], [PORT_IPV6[port]])

    def __call__(self, data: bytes) -> None:
        if len(data) < _CASE.size:
            return
        gates, sender, offload_bits = _CASE.unpack_from(data)
        sender %= PORTS
        well_formed = bool(gates & WELL_FORMED)
        self.now += (gates >> 3) * 0.5
        switch = self.switch
        self._take(half=not well_formed and bool(gates & KEEP_WAITING))
        if gates & RECONNECT:
            other = (sender + 1) % PORTS
            switch.remove_port(other)
            assert switch.add_port() == other
            self._route(other)
        for port in range(PORTS):
            bits = offload_bits >> (3 * port)
            self.offloads[port] = (bool(bits & 1), bool(bits & 2), bool(bits & 4))
            switch.set_port_offloads(port, csum=self.offloads[port][0],
                                     tso4=self.offloads[port][1], tso6=self.offloads[port][2])
        sent, largest_gso = self._fill(data[_CASE.size:], sender, well_formed)
        waiting = [self._waiting(port) for port in range(PORTS)]
        kept = switch.switch_batch(sender, self.batch, len(sent), self.now)
        assert 0 <= kept <= len(sent) and len(self.batch) == kept
        self._check_kept(sent, kept)
        for port in range(PORTS):
            out = switch.outgoing(port)
            if out is None:
                continue
            # Frames queued by earlier cases met the offloads of their time.
            for i in range(waiting[port], len(out)):
                frame, vnet = bytes(out.frame(i)), out.vnet(i)
                assert len(frame) >= ETH_LEN
                check_offloads(frame, vnet, self.offloads[port])
                if well_formed:
                    check_well_formed(frame, vnet, largest_gso)
        counters = switch.counters()
        for name, value in self.counters.items():
            assert counters.get(name, 0) >= value, f"counter {name} went down"
            if counters[name] > value:
                follow(name)
        self.counters = counters

    def _fill(self, records: bytes, sender: int, well_formed: bool
              ) -> tuple[list[tuple[bytes, int]], int]:
        """The batch from the fuzz bytes: the (frame, vnet word) pairs appended, and the
        largest gso_size among them (or the largest frame: the bound on a segment's data)."""
        self.batch.clear()
        sent: list[tuple[bytes, int]] = []
        largest = 0
        make = shaped_frame if well_formed else raw_frame
        while records and len(sent) < BATCH_FRAMES:
            made = make(records, sender)
            if made is None:
                break
            frame, vnet, used = made
            records = records[used:]
            if not self.batch.append(frame, vnet):
                break
            sent.append((frame, vnet))
            fields = vnet_fields(vnet)
            largest = max(largest, fields.gso_size if fields.gso_type else len(frame))
        return sent, largest

    def _check_kept(self, sent: list[tuple[bytes, int]], kept: int) -> None:
        """The batch now holds, in order and unchanged, the frames for the sender's router."""
        at = 0
        for i in range(kept):
            frame, vnet = bytes(self.batch.frame(i)), self.batch.vnet(i)
            assert frame[:6] == GATEWAY_MAC or frame[0] & 1, "kept a frame for another guest"
            while at < len(sent) and sent[at] != (frame, vnet):
                at += 1
            assert at < len(sent), "kept frame changed or out of order"
            at += 1

    def _waiting(self, port: int) -> int:
        out = self.switch.outgoing(port)
        return 0 if out is None else len(out)

    def _take(self, half: bool) -> None:
        """The ports' devices take their waiting frames: all, or the first half."""
        for port in range(PORTS):
            waiting = self._waiting(port)
            if waiting:
                self.switch.taken(port, waiting // 2 if half else waiting)

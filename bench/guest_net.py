"""The guest's side of the network for benchmarks: frames in and out, ARP, and a bulk-capable TCP.

Just enough of an IPv4 host to drive vhostnet's NAT from the benchmark
front-end: the guest resolves the gateway by ARP, answers ARP requests, and
runs TCP connections that send or receive in bulk, with cumulative ACKs,
go-back-N after a stall, and FIN in both directions. Segments are written
straight into the TX ring's buffers, and a bulk sender whose payloads repeat
reuses the payload's checksum sum, so the guest costs little per segment.
"""

from __future__ import annotations

import random
import struct
import time

import numpy as np

from bench.rings import VIRTIO_NET_HDR_LEN, GuestRings
from vhostnet.wire.checksum import ones_complement_sum

GUEST_MAC = bytes.fromhex("525400123456")
GUEST_IP = bytes((10, 0, 2, 15))
GATEWAY_IP = bytes((10, 0, 2, 2))
ETH_IPV4, ETH_ARP = 0x0800, 0x0806
PROTO_ICMP, PROTO_TCP, PROTO_UDP = 1, 6, 17
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
WSCALE = 7
RCV_WINDOW = 8 << 20
# Go back N when no ACK moved for this long. Linux's 200 ms RTO_MIN is its last resort: a
# tail loss probe (about 2 SRTT, at least 10 ms) and RACK find a loss much sooner. passt
# drops what its socket does not take (a full ring of 64 KiB segments overruns it), so a
# 200 ms stall per loss measured the guest, not passt.
STALL_RETRANSMIT = 0.01
HEADERS_LEN = 14 + 20 + 20  # Ethernet + IPv4 + TCP without options
# With segmentation offload: TCP payload per segment, a whole number of MSS within one IPv4 packet.
MAX_TSO_PAYLOAD = 0xFFFF - 40
VIRTIO_NEEDS_CSUM, VIRTIO_GSO_TCPV4 = 1, 1
_VNET = struct.Struct("<BBHHHHH")

_ETH = struct.Struct("!6s6sH")
_IP = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBBHHH")


def bulk_block(seed: int, length: int) -> bytes:
    """The block a bulk stream repeats: ``length`` pseudo-random bytes from ``seed``."""
    return np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8).tobytes()


def unwrap(seq: int, near: int) -> int:
    """The stream offset whose low 32 bits are ``seq`` closest to ``near`` (a round past 4 GiB
    is a few seconds here)."""
    return near + ((seq - near + 0x80000000) & 0xFFFFFFFF) - 0x80000000


def fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


class GuestNet:
    """Frames between the guest's TCP connections and the rings."""

    def __init__(self, rings: GuestRings) -> None:
        self.rings = rings
        self.gateway_mac = b""
        self.connections: dict[int, GuestTcp] = {}  # local port -> connection
        self.listening: dict[int, Listener] = {}
        self.pending = 0  # frames written to TX but not yet published
        self.ip_id = 0
        self.udp_received = 0  # datagrams to the guest (the soak's UDP flows count replies)

    # ---- output ----------------------------------------------------------------

    def _tx_slot(self, deadline: float) -> np.ndarray:
        tx = self.rings.tx
        while tx.free - self.pending <= 0:
            self.flush()
            self.rings.reclaim_tx()
            if tx.free > 0:
                break
            if time.monotonic() > deadline:
                raise TimeoutError("TX ring stayed full")
            tx.wait_for_room(0.02)
        return tx.buffers[tx.slot(tx.avail_idx + self.pending)]

    def tx_room(self) -> int:
        self.rings.reclaim_tx()
        return self.rings.tx.free - self.pending

    def flush(self) -> None:
        self.rings.tx.expose(self.pending)
        self.pending = 0

    def _commit(self, length: int) -> None:
        tx = self.rings.tx
        tx.set_buffer_length(tx.slot(tx.avail_idx + self.pending), VIRTIO_NET_HDR_LEN + length)
        self.pending += 1

    def send_frame(self, frame: bytes) -> None:
        buf = self._tx_slot(time.monotonic() + 5.0)
        buf[:VIRTIO_NET_HDR_LEN] = 0
        buf[VIRTIO_NET_HDR_LEN : VIRTIO_NET_HDR_LEN + len(frame)] = np.frombuffer(frame, np.uint8)
        self._commit(len(frame))

    def send_tcp(self, dst_ip: bytes, sport: int, dport: int, seq: int, ack: int, flags: int,
                 window: int, payload: np.ndarray | None = None, payload_sum: int | None = None,
                 options: bytes = b"", mss: int = 1460) -> None:
        """Write one TCP segment into the next TX buffer (published by ``flush``)."""
        plen = 0 if payload is None else len(payload)
        tcp_len = 20 + len(options) + plen
        self.ip_id = (self.ip_id + 1) & 0xFFFF
        ip = bytearray(_IP.pack(0x45, 0, 20 + tcp_len, self.ip_id, 0x4000, 64, PROTO_TCP, 0,
                                GUEST_IP, dst_ip))
        struct.pack_into("!H", ip, 10, ~fold(sum(struct.unpack("!10H", ip))) & 0xFFFF)
        header = bytearray(_TCP.pack(sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                                     (20 + len(options)) // 4 << 4, flags, min(window, 0xFFFF), 0, 0))
        header += options
        pseudo = sum(struct.unpack("!4H", GUEST_IP + dst_ip)) + PROTO_TCP + tcp_len
        offload = self.rings.tx_tso and plen > 0
        if offload:
            # What Linux does with checksum offload: only the pseudo-header sum, the "device"
            # completes it; beyond one MSS the segment goes as TSO.
            struct.pack_into("!H", header, 16, fold(pseudo))
            vnet = _VNET.pack(VIRTIO_NEEDS_CSUM, VIRTIO_GSO_TCPV4 if plen > mss else 0,
                              HEADERS_LEN, mss if plen > mss else 0, 34, 16, 0)
        else:
            if plen and payload_sum is None:
                payload_sum = ones_complement_sum(payload.data)
            total = sum(struct.unpack(f"!{len(header) // 2}H", header)) + (payload_sum or 0) + pseudo
            struct.pack_into("!H", header, 16, ~fold(total) & 0xFFFF)
            vnet = bytes(VIRTIO_NET_HDR_LEN)
        buf = self._tx_slot(time.monotonic() + 5.0)
        head = _ETH.pack(self.gateway_mac, GUEST_MAC, ETH_IPV4) + bytes(ip) + bytes(header)
        start = VIRTIO_NET_HDR_LEN
        buf[:start] = np.frombuffer(vnet, np.uint8)
        buf[start : start + len(head)] = np.frombuffer(head, np.uint8)
        if plen:
            buf[start + len(head) : start + len(head) + plen] = payload
        self._commit(len(head) + plen)

    def udp_frame(self, dst_ip: bytes, sport: int, dport: int, payload: bytes) -> bytes:
        """A UDP datagram from the guest, as one Ethernet frame."""
        from vhostnet.wire.udp import emit_udp

        return self._ipv4_frame(dst_ip, PROTO_UDP, emit_udp(GUEST_IP, sport, dst_ip, dport,
                                                            payload))

    def _ipv4_frame(self, dst_ip: bytes, proto: int, payload: bytes) -> bytes:
        from vhostnet.wire.ipv4 import emit_ipv4_header

        return (_ETH.pack(self.gateway_mac, GUEST_MAC, ETH_IPV4)
                + emit_ipv4_header(GUEST_IP, dst_ip, proto, len(payload)) + payload)

    def announce(self) -> None:
        """One ICMP echo request to the gateway, the guest's first IPv4 packet (no answer
        awaited).

        passt learns the guest's IPv4 address from its IPv4 packets only (tap.c), not from
        ARP; until then it sends inbound connections to the address it would hand out by
        DHCP (169.254.2.1 in local mode). A Linux guest's DHCP teaches it; this guest's
        address is static, and a tcp-rx round on a fresh back-end sent no IPv4 before.
        """
        from vhostnet.wire.icmp import TYPE_ECHO_REQUEST, emit_echo

        self.send_frame(self._ipv4_frame(GATEWAY_IP, PROTO_ICMP,
                                         emit_echo(TYPE_ECHO_REQUEST, 0x6265, 1, b"bench")))
        self.flush()

    # ---- input -----------------------------------------------------------------

    def resolve_gateway(self, timeout: float = 2.0) -> None:
        """ARP for the gateway; this also teaches vhostnet the guest's MAC."""
        request = (_ETH.pack(b"\xff" * 6, GUEST_MAC, ETH_ARP)
                   + struct.pack("!HHBBH6s4s6s4s", 1, ETH_IPV4, 6, 4, 1, GUEST_MAC, GUEST_IP,
                                 bytes(6), GATEWAY_IP))
        deadline = time.monotonic() + timeout
        while not self.gateway_mac:
            self.send_frame(request)
            self.flush()
            self.poll(0.1)
            if time.monotonic() > deadline:
                raise TimeoutError("no ARP reply from the gateway")

    def poll(self, timeout: float = 0.0) -> int:
        """Handle received frames; wait up to ``timeout`` for the first. Returns frames handled."""
        rx = self.rings.rx
        if timeout > 0 and rx.used_idx() == rx.used_seen:
            rx.wait(timeout)
        frames = self.rings.receive_frames()
        for frame in frames:
            self._handle(frame)
        for conn in list(self.connections.values()):
            conn.after_input()
        self.flush()
        return len(frames)

    def _handle(self, frame: bytes) -> None:
        if len(frame) < 14:
            return
        _dst, src_mac, ethertype = _ETH.unpack_from(frame)
        if ethertype == ETH_ARP and len(frame) >= 42:
            op, sha, spa, _tha, tpa = struct.unpack_from("!6xH6s4s6s4s", frame, 14)
            if op == 2 and spa == GATEWAY_IP:
                self.gateway_mac = sha
            elif op == 1 and tpa == GUEST_IP:
                self.send_frame(_ETH.pack(src_mac, GUEST_MAC, ETH_ARP)
                                + struct.pack("!HHBBH6s4s6s4s", 1, ETH_IPV4, 6, 4, 2,
                                              GUEST_MAC, GUEST_IP, sha, spa))
            return
        if ethertype == ETH_IPV4 and len(frame) >= 42 and frame[23] == PROTO_UDP:
            self.udp_received += 1
            return
        if ethertype != ETH_IPV4 or len(frame) < 34 or frame[23] != PROTO_TCP:
            return
        ihl = (frame[14] & 0x0F) * 4
        total = struct.unpack_from("!H", frame, 16)[0]
        src_ip = frame[26:30]
        t = 14 + ihl
        sport, dport, seq, ack, off, flags, window, _csum, _urg = _TCP.unpack_from(frame, t)
        data_start = t + (off >> 4) * 4
        payload = memoryview(frame)[data_start : 14 + total]
        conn = self.connections.get(dport)
        if conn is None and flags & SYN and not flags & ACK and dport in self.listening:
            conn = self.listening[dport].accept(src_ip, sport, seq, _wscale(frame, t + 20, data_start))
        if conn is not None:
            conn.segment(seq, ack, flags, window, payload, frame, t + 20, data_start)


def _wscale(frame: bytes, start: int, end: int) -> int:
    """The window-scale option of a SYN (0 when absent)."""
    i = start
    while i < end:
        kind = frame[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= end:
            break
        if kind == 3 and frame[i + 1] == 3:
            return frame[i + 2]
        i += max(frame[i + 1], 2)
    return 0


class Listener:
    """A listening port: the first SYN creates a connection (that checks what it receives
    against ``expected`` repeated, when given: ``GuestTcp.expect_repeated``)."""

    def __init__(self, net: GuestNet, port: int, mss: int, expected: bytes | None = None) -> None:
        self.net, self.port, self.mss = net, port, mss
        self.expected = expected
        net.listening[port] = self

    def accept(self, src_ip: bytes, sport: int, seq: int, wscale: int) -> GuestTcp:
        conn = GuestTcp(self.net, self.port, src_ip, sport, self.mss)
        if self.expected is not None:
            conn.expect_repeated(self.expected)
        conn.accept(seq, wscale)
        return conn


class GuestTcp:
    """One connection. Sequence numbers are kept relative to ISS/IRS (data starts at 1)."""

    def __init__(self, net: GuestNet, local_port: int, remote_ip: bytes, remote_port: int,
                 mss: int) -> None:
        self.net = net
        self.local_port, self.remote_ip, self.remote_port = local_port, remote_ip, remote_port
        self.mss = mss
        self.iss = random.getrandbits(32)
        self.irs = 0
        self.snd_una = self.snd_nxt = 0
        self.snd_max = 0  # the highest snd_nxt before going back N
        self.fin_seq: int | None = None  # where the FIN went, once sent
        self.snd_wnd = 0
        self.peer_wscale = 0
        self.rcv_nxt = 0
        self.established = False
        self.peer_fin = False
        self.fin_sent = False
        self.reset = False
        self.ack_due = False
        self.dup_acks = 0
        self.received = 0
        # What the received stream must be: ``expected`` repeated (long enough that any
        # segment is one slice of it), ``expected_period`` bytes per repetition. None: unchecked.
        self.expected: bytes | None = None
        self.expected_period = 0
        self.intact = True  # every byte received so far was the expected one
        self.first_data_at = 0.0
        self.last_data_at = 0.0
        self.last_progress = time.monotonic()
        # Bulk source: the stream is `block` repeated; `limit` bytes in all (None = unbounded).
        self.block: np.ndarray | None = None
        self.block_sum = 0
        self.period = 0
        self.send_limit: int | None = 0
        self.close_after_send = False
        net.connections[local_port] = self

    # ---- actions ---------------------------------------------------------------

    def _options(self) -> bytes:
        return struct.pack("!BBHBBBB", 2, 4, self.mss, 1, 3, 3, WSCALE)

    def connect(self) -> None:
        self.snd_nxt = 1
        self._emit(SYN, 0, self.iss, options=self._options())

    def accept(self, seq: int, wscale: int) -> None:
        self.irs, self.rcv_nxt, self.peer_wscale = seq, 1, wscale
        self.snd_nxt = 1
        self._emit(SYN | ACK, 0, options=self._options())

    def expect_repeated(self, block: bytes) -> None:
        """Check every byte received against ``block`` repeated (``intact`` says the outcome).
        A comparison of bytes runs at memory speed; a hash of the stream cost the benchmark
        guest more than the back-end spends on the data, so it measured the guest."""
        self.expected = block * (2 + 0xFFFF // len(block))
        self.expected_period = len(block)

    def set_bulk(self, block: bytes, limit: int | None, close: bool) -> None:
        """Send ``block`` repeated (``limit`` bytes, None: until ``stop_bulk``), then FIN if ``close``."""
        # Long enough that any segment (up to a TSO segment) is one slice of it.
        repeats = 2 + MAX_TSO_PAYLOAD // len(block) if self.net.rings.tx_tso else 2
        self.block = np.frombuffer(block * repeats, dtype=np.uint8)
        self.period = len(block)
        self.block_sum = ones_complement_sum(block)
        self.send_limit = limit
        self.close_after_send = close

    def stop_bulk(self) -> None:
        """End the stream at the next segment boundary already sent, and close."""
        self.send_limit = self.sent_end - 1
        self.close_after_send = True

    def send_bytes(self, data: bytes) -> None:
        """A small write (request/response): one segment, sent now."""
        payload = np.frombuffer(data, dtype=np.uint8)
        self._emit(ACK | PSH, self.snd_nxt, payload=payload)
        self.snd_nxt += len(data)
        self.last_progress = time.monotonic()

    def close(self) -> None:
        if not self.fin_sent:
            self._emit(ACK | FIN, self.snd_nxt)
            self.fin_seq = self.snd_nxt
            self.snd_nxt += 1
            self.fin_sent = True

    @property
    def acked_bytes(self) -> int:
        return max(0, self.snd_una - 1 - (1 if self.fin_sent and self.snd_una == self.snd_nxt else 0))

    @property
    def sent_end(self) -> int:
        """The end of what was ever sent (snd_nxt goes back on a loss; this does not)."""
        return max(self.snd_max, self.snd_nxt)

    def _go_back(self) -> None:
        """Send again from the first unacknowledged byte (the FIN too, after the data)."""
        self.snd_max = self.sent_end
        self.snd_nxt = self.snd_una
        self.fin_sent = False

    @property
    def done(self) -> bool:
        return self.reset or (self.peer_fin and self.fin_sent and self.snd_una == self.snd_nxt)

    # ---- input -----------------------------------------------------------------

    def segment(self, seq: int, ack: int, flags: int, window: int, payload: memoryview,
                frame: bytes, opt_start: int, opt_end: int) -> None:
        if flags & RST:
            self.reset = True
            return
        if flags & SYN:
            if not flags & ACK or self.established:
                return
            self.irs, self.rcv_nxt = seq, 1
            self.peer_wscale = _wscale(frame, opt_start, opt_end)
            self.snd_una = 1
            self.snd_wnd = window
            self.established = True
            self.ack_due = True
            return
        self.established = True
        rel_ack = unwrap(ack - self.iss, self.snd_una)
        if self.snd_una < rel_ack <= self.sent_end:
            self.snd_una = rel_ack
            if self.snd_nxt < rel_ack:  # what went out before going back arrived after all
                self.snd_nxt = rel_ack
                self.fin_sent = self.fin_seq is not None and rel_ack > self.fin_seq
            self.last_progress = time.monotonic()
            self.dup_acks = 0
        elif rel_ack == self.snd_una < self.snd_nxt and not len(payload) and not flags & FIN:
            # Fast retransmit (RFC 5681): a peer that dropped a segment repeats its ACK.
            self.dup_acks += 1
            if self.dup_acks == 3:
                self._go_back()
        self.snd_wnd = window << self.peer_wscale
        rel_seq = unwrap(seq - self.irs, self.rcv_nxt)
        if len(payload) or flags & FIN:
            if rel_seq == self.rcv_nxt:
                if len(payload):
                    now = time.monotonic()
                    if not self.received:
                        self.first_data_at = now
                    self.last_data_at = now
                    if self.expected is not None:
                        start = self.received % self.expected_period
                        if bytes(payload) != self.expected[start:start + len(payload)]:
                            self.intact = False
                    self.received += len(payload)
                    self.rcv_nxt += len(payload)
                if flags & FIN:
                    self.peer_fin = True
                    self.rcv_nxt += 1
            self.ack_due = True

    def after_input(self) -> None:
        """After a batch of frames: send what the window allows, then one cumulative ACK."""
        self.pump()
        if self.ack_due:
            self._emit(ACK, self.snd_nxt)

    def pump(self) -> None:
        if not self.established or self.block is None:
            return
        now = time.monotonic()
        if self.snd_una < self.snd_nxt and now - self.last_progress > STALL_RETRANSMIT:
            self._go_back()
            self.last_progress = now
        mss = self.mss
        period = self.period
        # With TSO, a segment is as many whole MSS as the window allows, up to 64 KiB.
        largest = MAX_TSO_PAYLOAD // mss * mss if self.net.rings.tx_tso else mss
        limit = self.snd_una + self.snd_wnd
        room = self.net.tx_room()
        while room > 1:
            end = self.send_limit + 1 if self.send_limit is not None else None
            size = largest if end is None else min(largest, end - self.snd_nxt)
            if size > mss:
                size = max(mss, min(size, (limit - self.snd_nxt) // mss * mss))
            if size <= 0 or self.snd_nxt + size > limit:
                break
            offset = (self.snd_nxt - 1) % period
            payload = self.block[offset : offset + size]
            aligned = offset == 0 and size == period
            self._emit(ACK, self.snd_nxt, payload=payload, payload_sum=self.block_sum if aligned else None)
            self.snd_nxt += size
            room -= 1
        # The FIN once every byte is acknowledged: passt takes a FIN without payload at
        # once, whatever its sequence number (tcp.c, tcp_data_from_tap), so a FIN sent
        # behind data it dropped closed the host socket short of that data.
        if (self.close_after_send and not self.fin_sent and self.send_limit is not None
                and self.snd_una == self.snd_nxt == self.send_limit + 1):
            self.close()

    def _emit(self, flags: int, seq: int, iss: int | None = None, payload: np.ndarray | None = None,
              payload_sum: int | None = None, options: bytes = b"") -> None:
        ack = (self.irs + self.rcv_nxt) & 0xFFFFFFFF if self.rcv_nxt else 0
        if self.rcv_nxt:
            flags |= ACK
        self.net.send_tcp(self.remote_ip, self.local_port, self.remote_port,
                          (self.iss + seq) & 0xFFFFFFFF, ack, flags, RCV_WINDOW >> WSCALE,
                          payload, payload_sum, options, self.mss)
        self.ack_due = False

    def forget(self) -> None:
        self.net.connections.pop(self.local_port, None)

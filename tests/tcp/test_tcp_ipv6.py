"""TCP over IPv6: the same engine, output and C frames as IPv4, with 16-byte addresses."""

from __future__ import annotations

import random

import pytest

from tests.support.tcp import (
    GATEWAY6,
    GUEST_IP,
    GUEST_IP6,
    REMOTE_IP6,
    guest_segment,
    make_engine,
)
from vhostnet.stack.config import StackConfig
from vhostnet.tcp.engine import TcpEngine
from vhostnet.tcp.flow import Connect, Peek, Send
from vhostnet.tcp.output import GuestOutput
from vhostnet.tcp.sender import HEADERS6_LEN, GuestSender, L4Checksum, data_frames
from vhostnet.wire.checksum import PROTO_TCP, l4_checksum_ok
from vhostnet.wire.ethernet import ETHERTYPE_IPV6, emit_ethernet
from vhostnet.wire.ipv6 import IPv6Packet, emit_ipv6_header
from vhostnet.wire.offload import (
    DATA_VALID_WORD,
    GSO_TCPV6,
    GuestOffloads,
    tcp_data_word,
    vnet_fields,
)
from vhostnet.wire.tcp import ACK, FIN, SYN, segment_payload

GPORT, RPORT = 40000, 8080
GUEST_ISN, OUR_ISN = 1000, 5000
GUEST_MAC = bytes.fromhex("525400123456")
GATEWAY_MAC = bytes.fromhex("525600000002")


def seg(engine: TcpEngine, dst: bytes = GATEWAY6, **kwargs) -> None:
    guest_segment(engine, 0.0, src_port=GPORT, dst_port=RPORT, src=GUEST_IP6, dst=dst, **kwargs)


def test_handshake_data_and_close_over_ipv6() -> None:
    engine, output = make_engine()
    seg(engine, flags=SYN, seq=GUEST_ISN, mss=1440, wscale=7, window=64000)
    (connect,) = engine.commands
    engine.commands.clear()
    # The mapped gateway fec0::2 is the host's ::1.
    assert connect == Connect(connect.flow_id, "::1", RPORT)
    engine.on_connected(connect.flow_id, 0.0, send_space=100_000)
    ((src, dst, syn_ack),) = output.sent
    output.sent.clear()
    assert (src, dst) == (GATEWAY6, GUEST_IP6)
    assert syn_ack.flags == SYN | ACK and syn_ack.mss == 1500 - 60
    seg(engine, seq=GUEST_ISN + 1, ack=OUR_ISN + 1, payload=b"GET /", window=500)
    assert [type(c) for c in engine.commands] == [Send]
    send = engine.commands.popleft()
    engine.on_sent(send.flow_id, 5, 0.0)
    assert output.take() == []  # the request's ACK waits for the reply
    engine.on_readable(send.flow_id, 0.0)
    (peek,) = engine.commands
    engine.commands.clear()
    assert peek == Peek(send.flow_id, 0, peek.length)
    engine.on_peeked(send.flow_id, 0, b"hello", 0.0)
    (data,) = output.take()
    assert data.payload == b"hello" and data.seq == OUR_ISN + 1 and data.ack == GUEST_ISN + 6
    seg(engine, seq=GUEST_ISN + 6, ack=OUR_ISN + 6, flags=FIN | ACK)
    assert engine.flows_by_id[send.flow_id].guest_fin


def test_ipv6_destinations_that_never_leave_get_a_reset() -> None:
    engine, output = make_engine()
    link_local = bytes.fromhex("fe800000000000000000000000000001")
    seg(engine, dst=link_local, flags=SYN, seq=GUEST_ISN)
    assert not engine.commands
    (rst,) = output.take()
    assert rst.flags & 0x04 and engine.counters()["tcp.unreachable"] == 1
    seg(engine, dst=REMOTE_IP6, flags=SYN, seq=GUEST_ISN)
    assert engine.commands[0] == Connect(engine.commands[0].flow_id, "2001:db8::22", RPORT)


def test_bad_ipv6_checksum_is_dropped() -> None:
    engine, output = make_engine()
    seg(engine, flags=SYN, seq=GUEST_ISN, corrupt=True)
    assert not engine.commands and engine.counters()["tcp.drop.bad_checksum"] == 1


@pytest.mark.parametrize("peer, remote, guest", [
    ("::1", GATEWAY6, GUEST_IP6),                         # loopback: the mapped gateway
    ("2001:db8::9", bytes.fromhex("20010db8000000000000000000000009"), GUEST_IP6),
    ("::ffff:192.0.2.7", bytes([192, 0, 2, 7]), GUEST_IP),   # v4-mapped: an IPv4 flow
    ("::ffff:127.0.0.1", bytes([10, 0, 2, 2]), GUEST_IP),
])
def test_forwarded_peer_family_picks_the_guest_address(peer: str, remote: bytes,
                                                       guest: bytes) -> None:
    engine, output = make_engine()
    engine.config.guest_ipv6 = GUEST_IP6
    flow_id = engine.on_accepted(peer, 1234, 22, 0.0)
    flow = engine.flows_by_id[flow_id]
    assert (flow.guest_ip, flow.remote_ip) == (guest, remote)
    ((src, dst, syn),) = output.sent
    assert (src, dst) == (remote, guest) and syn.flags == SYN
    assert syn.mss == 1500 - (60 if len(guest) == 16 else 40)


def test_forward_over_ipv6_needs_a_guest_ipv6_address() -> None:
    engine, output = make_engine()
    assert engine.on_accepted("::1", 1234, 22, 0.0) is None
    assert engine.counters()["tcp.drop.forward_no_guest_address"] == 1
    output.guest_ipv6 = GUEST_IP6  # learned by the stack from the guest's packets
    assert engine.on_accepted("::1", 1234, 22, 0.0) is not None


# --- whole IPv6 data frames in C -----------------------------------------------------


def build6(data: bytes, seg_size: int, checksum: L4Checksum, mss: int = 1440) -> list:
    return data_frames(dst_mac=GUEST_MAC, src_mac=GATEWAY_MAC, src_ip=GATEWAY6, dst_ip=GUEST_IP6,
                       src_port=RPORT, dst_port=GPORT, seq=0xFFFFFF00, ack=5, window=70000,
                       data=data, seg_size=seg_size, checksum=checksum, mss=mss)


@pytest.mark.parametrize("checksum", list(L4Checksum))
@pytest.mark.parametrize("length, seg_size", [(1, 1440), (2999, 1001), (64001, 63000)])
def test_ipv6_frames_equal_the_python_builder(checksum: L4Checksum, length: int,
                                              seg_size: int) -> None:
    data = random.Random(length).randbytes(length)
    entries = build6(data, seg_size, checksum)
    frames = [entry[0] if isinstance(entry, tuple) else entry for entry in entries]
    # The Python builder makes full checksums; compare the rest with the field cleared.
    segments = segment_payload(GATEWAY6, GUEST_IP6, RPORT, GPORT, 0xFFFFFF00, 5, 0xFFFF, data,
                               seg_size)
    expected = [emit_ethernet(GUEST_MAC, GATEWAY_MAC, ETHERTYPE_IPV6,
                              emit_ipv6_header(GATEWAY6, GUEST_IP6, PROTO_TCP, len(s)) + s)
                for s in segments]
    assert len(frames) == len(expected)
    for frame, want in zip(frames, expected, strict=True):
        packet = IPv6Packet(frame[14:])
        if checksum is L4Checksum.FULL:
            assert frame == want
            assert l4_checksum_ok(packet.src, packet.dst, PROTO_TCP, packet.payload)
        else:
            cut = HEADERS6_LEN - 4  # the TCP checksum field
            assert frame[:cut] == want[:cut] and frame[cut + 2:] == want[cut + 2:]


def test_ipv6_gso_words_say_tcpv6_at_the_ipv6_header() -> None:
    entries = build6(bytes(10_000), 8640, L4Checksum.PARTIAL)
    fields = [vnet_fields(word) for _, word in entries]
    assert [f.gso_type for f in fields] == [GSO_TCPV6, 0]
    assert fields[0].gso_size == 1440 and fields[0].csum_start == 14 + 40
    assert tcp_data_word(100, 1440, ipv6=True) == tcp_data_word(100, 1440) + (20 << 32)
    assert [word for _, word in build6(b"x", 1440, L4Checksum.NONE)] == [DATA_VALID_WORD]


class FramesLink:
    """A GuestLink with the guest's MAC known: IPv6 data goes as whole frames."""

    guest_mac = GUEST_MAC
    gateway_mac = GATEWAY_MAC
    guest_ipv6 = None

    def __init__(self, offloads: GuestOffloads) -> None:
        self.guest_offloads = offloads
        self.v4: list = []
        self.v6: list = []

    def send_ipv4_frames(self, frames: list) -> None:
        self.v4 += frames

    def send_ipv6_frames(self, frames: list) -> None:
        self.v6 += frames


@pytest.mark.parametrize("offloads, gso", [(GuestOffloads(True, True, True), GSO_TCPV6),
                                           (GuestOffloads(True, True, False), None)])
def test_output_uses_tso6_only_when_the_guest_took_it(offloads: GuestOffloads, gso) -> None:
    engine, _ = make_engine()
    link = FramesLink(offloads)
    sender = GuestSender(GuestOutput(link, engine.stats, 1500), engine.stats, engine.timeouts,
                         engine.commands)
    seg(engine, flags=SYN, seq=GUEST_ISN, mss=1440)
    flow = next(iter(engine.flows.values()))
    flow.snd_nxt = flow.snd_una = 1
    sender.data(flow, bytes(20_000))
    assert not link.v4 and link.v6
    words = [entry[1] for entry in link.v6]
    if gso is None:
        assert len(link.v6) == 14 and set(words) == {DATA_VALID_WORD}
    else:
        assert len(link.v6) == 1 and vnet_fields(words[0]).gso_type == gso


def test_config_maps_ipv6_loopback_peers_to_the_gateway() -> None:
    assert StackConfig().loopback_peer_address6 == GATEWAY6
    assert StackConfig(map_host_loopback6="fec0::9").loopback_peer_address6 == bytes.fromhex(
        "fec00000000000000000000000000009")


def test_an_ipv6_half_closed_flow_is_recorded_and_restored() -> None:
    from vhostnet.migration.tcp_state import export_connections, migratable, parse_records
    from vhostnet.tcp.handover import restore_flow

    engine, output = make_engine()
    seg(engine, flags=SYN, seq=GUEST_ISN, mss=1440)
    (connect,) = engine.commands
    engine.commands.clear()
    engine.on_connected(connect.flow_id, 0.0, send_space=100_000)
    seg(engine, seq=GUEST_ISN + 1, ack=OUR_ISN + 1)
    seg(engine, seq=GUEST_ISN + 1, ack=OUR_ISN + 1, flags=FIN | ACK)  # the guest shuts writing
    flow = engine.flows_by_id[connect.flow_id]
    assert flow.guest_fin and flow.host_shut and migratable(flow)
    (record,) = export_connections(engine, {flow.flow_id: None})
    assert record["guest_ip"] == "fec0::5054:ff:fe12:3456" and record["half_close"]["guest_fin"]
    (parsed,) = parse_records([record])
    assert parsed.key == flow.key
    other, _ = make_engine()
    moved = restore_flow(other, parsed.key, inbound=False, snd_una=OUR_ISN + 1,
                         snd_max=OUR_ISN + 1, rcv_nxt=GUEST_ISN + 2, snd_wnd=65535, snd_wscale=0,
                         rcv_wscale=0, mss=1440, to_host=b"", host_space=None, now=0.0,
                         half_close={"guest_fin": True, "host_shut": True})
    assert moved.guest_fin and moved.host_shut and not moved.host_eof and moved.fin_at is not None
    flow.host_eof = True  # closed both ways on the host: waits only for final ACKs
    assert not migratable(flow)

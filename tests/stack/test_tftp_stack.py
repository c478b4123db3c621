"""TftpServer plugged into the real NetworkStack: guest frames in, guest frames out."""

from __future__ import annotations

from pathlib import Path

from vhostnet.hostio.tftp_files import TftpRoot
from vhostnet.network import build_stack
from vhostnet.stack.config import StackConfig
from vhostnet.stack.stack import NetworkStack
from vhostnet.stack.tftp import TftpServer
from vhostnet.wire.checksum import PROTO_UDP
from vhostnet.wire.ethernet import ETHERTYPE_IPV4, EthernetFrame, emit_ethernet
from vhostnet.wire.ipv4 import IPv4Packet, emit_ipv4_header
from vhostnet.wire.tftp import Ack, Data, Opcode, OptionAck, Request
from vhostnet.wire.udp import UdpDatagram, emit_udp

GUEST_MAC = bytes.fromhex("525400123456")
GUEST_PORT = 1024


def guest_frame(config: StackConfig, dst_port: int, payload: bytes) -> bytes:
    segment = emit_udp(config.guest_ipv4, GUEST_PORT, config.gateway, dst_port, payload)
    header = emit_ipv4_header(config.guest_ipv4, config.gateway, PROTO_UDP, len(segment))
    return emit_ethernet(config.gateway_mac, GUEST_MAC, ETHERTYPE_IPV4, header + segment)


def datagrams_to_guest(stack: NetworkStack) -> list[tuple[int, bytes]]:
    """(source port, payload) of every UDP datagram queued for the guest, checked on the way."""
    found = []
    while stack.frames_to_guest:
        frame = EthernetFrame(stack.frames_to_guest.popleft())
        assert frame.dst == GUEST_MAC
        packet = IPv4Packet(frame.payload)
        assert (packet.src, packet.dst, packet.proto) == (
            stack.config.gateway, stack.config.guest_ipv4, PROTO_UDP)
        datagram = UdpDatagram(packet.src, packet.dst, packet.payload)
        assert datagram.dst_port == GUEST_PORT
        found.append((datagram.src_port, bytes(datagram.payload)))
    return found


def test_transfer_through_the_stack(tmp_path: Path) -> None:
    content = bytes(range(256)) * 12  # 3072 bytes: 3 blocks of 1024, then an empty one
    (tmp_path / "pxelinux.0").write_bytes(content)
    config = StackConfig(tftp_root=str(tmp_path))
    stack = build_stack(config)
    server = TftpServer(config, stack, TftpRoot(tmp_path))
    stack.add_udp_service(server)

    request = Request(Opcode.RRQ, "pxelinux.0", "octet", {"blksize": "1024", "tsize": "0"})
    stack.receive_frame(guest_frame(config, 69, request.emit()), now=0.0)
    [(port, oack)] = datagrams_to_guest(stack)
    assert OptionAck.parse(oack).options == {"blksize": "1024", "tsize": "3072"}

    received = bytearray()
    block = 0
    for _ in range(10):
        stack.receive_frame(guest_frame(config, port, Ack(block).emit()), now=0.1)
        replies = datagrams_to_guest(stack)
        if not replies:
            break
        [(source_port, payload)] = replies
        assert source_port == port
        data = Data.parse(payload)
        block = data.block
        received += data.payload
    assert bytes(received) == content
    assert block == 4
    assert server.counters()["tftp.transfers_completed"] == 1
    assert "stack.drop.internal_error" not in stack.counters()

"""TftpServer plugged into the real NetworkStack: guest frames in, guest frames out."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from tests.support.frames import GUEST_IP6, guest_udp6_frame, parse_udp6_frame
from vhostnet.hostio.tftp_files import TftpRoot
from vhostnet.network import Network, build_stack
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


def lockstep_fetch(send_ack: Callable[[int], None],
                   replies: Callable[[], list[tuple[int, bytes]]], port: int,
                   limit: int) -> tuple[bytes, int]:
    """ACK block 0, then each DATA block as it comes from the transfer's ``port`` (at most
    ``limit``): the file received and the last block number."""
    received = bytearray()
    block = 0
    for _ in range(limit):
        send_ack(block)
        answers = replies()
        if not answers:
            break
        [(source_port, payload)] = answers
        assert source_port == port
        data = Data.parse(payload)
        block = data.block
        received += data.payload
    return bytes(received), block


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

    def send_ack(block: int) -> None:
        stack.receive_frame(guest_frame(config, port, Ack(block).emit()), now=0.1)

    received, block = lockstep_fetch(send_ack, lambda: datagrams_to_guest(stack), port, 10)
    assert received == content
    assert block == 4
    assert server.counters()["tftp.transfers_completed"] == 1
    assert "stack.drop.internal_error" not in stack.counters()


def test_transfer_over_ipv6_from_the_gateways_ipv6_address(tmp_path: Path) -> None:
    """The guest fetches over IPv6 from gateway6 (the Boot File URL's host): the answers come
    from that address, and the largest block fits an IPv6 packet (40-byte header) whole."""
    content = bytes(range(256)) * 8  # 2048 bytes: one block of 1448 and one of 600
    (tmp_path / "boot.efi").write_bytes(content)
    config = StackConfig(tftp_root=str(tmp_path))
    loop = asyncio.new_event_loop()
    network = Network(config, loop)
    stack = network.stack
    gateway6 = bytes(config.gateway6)
    try:
        request = Request(Opcode.RRQ, "boot.efi", "octet", {"blksize": "9000"})
        stack.receive_frame(guest_udp6_frame(GUEST_PORT, gateway6, 69, request.emit()), 0.0)
        [oack] = datagrams6_to_guest(stack, gateway6)
        port, payload = oack
        assert OptionAck.parse(payload).options == {"blksize": "1448"}  # 1500 - 40 - 8 - 4

        def send_ack(block: int) -> None:
            ack = Ack(block).emit()
            stack.receive_frame(guest_udp6_frame(GUEST_PORT, gateway6, port, ack), 0.1)

        received, block = lockstep_fetch(
            send_ack, lambda: datagrams6_to_guest(stack, gateway6), port, 5)
        assert received == content and block == 2
        assert network.tftp.counters()["tftp.transfers_completed"] == 1
    finally:
        network.close()
        loop.close()


def datagrams6_to_guest(stack: NetworkStack, gateway6: bytes) -> list[tuple[int, bytes]]:
    """(source port, payload) of every UDP-over-IPv6 datagram queued for the guest."""
    found = []
    while stack.frames_to_guest:
        src, sport, dst, dport, payload = parse_udp6_frame(bytes(stack.frames_to_guest.popleft()))
        assert (src, dst, dport) == (gateway6, GUEST_IP6, GUEST_PORT)
        found.append((sport, payload))
    return found

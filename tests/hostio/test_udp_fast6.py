"""The UDP fast path over IPv6 (ext/udp_fast.pyx, FlowIndex.find6) through
Network.receive_batch, with real sockets on ::1.

As for IPv4: a flow's first datagram goes through the Python stack, later ones by sendmmsg;
frames the fast path must not take (a bad checksum, the zero checksum IPv6 forbids, an
extension header, an unknown flow) reach the stack, which counts them. IPv4 and IPv6 flows
with the same ports live side by side in one table.
"""

from __future__ import annotations

import asyncio
import socket
import struct

from tests.support.frames import (
    GATEWAY_IP,
    GATEWAY_MAC,
    GUEST_IP6,
    GUEST_MAC,
    eth,
    guest_udp6_frame,
    guest_udp_frame,
)
from tests.support.loop import run
from tests.support.udp_fast import batch_of, receive_all
from vhostnet.network import Network
from vhostnet.stack.config import StackConfig, ip6
from vhostnet.wire.offload import NEEDS_CSUM, vnet_word

GATEWAY6 = ip6("fec0::2")


def with_hop_by_hop(frame: bytes) -> bytes:
    """The same datagram behind an empty hop-by-hop options header (8 bytes of padding)."""
    header = bytearray(frame[14:54])
    udp = frame[54:]
    header[6] = 0  # next header: hop-by-hop
    struct.pack_into("!H", header, 4, len(udp) + 8)
    return eth(GATEWAY_MAC, GUEST_MAC, 0x86DD,
               bytes(header) + bytes([17, 0, 1, 4, 0, 0, 0, 0]) + udp)


def test_established_ipv6_flow_goes_fast_and_odd_frames_go_to_the_stack() -> None:
    async def scenario(loop) -> None:
        server6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        server6.bind(("::1", 0))
        server6.setblocking(False)
        port = server6.getsockname()[1]
        server4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        server4.bind(("127.0.0.1", port))
        server4.setblocking(False)
        network = Network(StackConfig(), loop)
        try:
            first = batch_of([(guest_udp6_frame(4000, GATEWAY6, port, b"first"), 0),
                              (guest_udp_frame(4000, GATEWAY_IP, port, b"first4"), 0)])
            network.receive_batch(first, 2, 0.0)
            network.flush()  # opens the host sockets: both flows enter the fast path
            assert network.udp_fast.flows == 2
            good = [guest_udp6_frame(4000, GATEWAY6, port, b"fast %d" % i) for i in range(5)]
            partial = bytearray(guest_udp6_frame(4000, GATEWAY6, port, b"partial"))
            struct.pack_into("!H", partial, 14 + 40 + 6, 0x4242)  # what a driver leaves partial
            corrupt = bytearray(guest_udp6_frame(4000, GATEWAY6, port, b"corrupt"))
            corrupt[-1] ^= 0xFF
            zero = bytearray(guest_udp6_frame(4000, GATEWAY6, port, b"zero"))
            struct.pack_into("!H", zero, 14 + 40 + 6, 0)
            extension = with_hop_by_hop(guest_udp6_frame(4000, GATEWAY6, port, b"extension"))
            other = guest_udp6_frame(4001, GATEWAY6, port, b"new flow")
            ipv4 = guest_udp_frame(4000, GATEWAY_IP, port, b"fast4")
            batch = batch_of([(f, 0) for f in good]
                             + [(bytes(partial), vnet_word(NEEDS_CSUM, 0, 0, 54, 6)),
                                (bytes(corrupt), 0), (bytes(zero), 0), (extension, 0),
                                (other, 0), (ipv4, 0)])
            before = network.counters()
            network.receive_batch(batch, batch.count, 1.0)
            network.flush()
            await asyncio.sleep(0.05)
            after = network.counters()
            got = receive_all(server6)
            assert got[:1] == [b"first"]
            assert set(got[1:]) == ({b"fast %d" % i for i in range(5)}
                                    | {b"partial", b"new flow", b"extension"})
            assert receive_all(server4) == [b"first4", b"fast4"]

            def delta(name: str) -> int:
                return after.get(name, 0) - before.get(name, 0)

            assert delta("udp.fast_path") == 7  # 5 good, the partial one, the IPv4 one
            assert delta("ipv6.rx") == 10 and delta("ipv4.rx") == 1
            assert delta("udp6.rx") == 8 and delta("udp.rx") == 1
            assert delta("udp6.drop.bad_checksum") == 2  # the corrupt one and the zero one
            assert network.udp_fast.flows == 3
        finally:
            network.close()
            server6.close()
            server4.close()

    run(scenario)


def test_guest_address_on_the_same_fold_is_not_taken_for_the_flow() -> None:
    async def scenario(loop) -> None:
        server = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        server.bind(("::1", 0))
        server.setblocking(False)
        port = server.getsockname()[1]
        network = Network(StackConfig(), loop)
        try:
            network.receive_batch(batch_of([(guest_udp6_frame(4000, GATEWAY6, port, b"a"), 0)]),
                                  1, 0.0)
            network.flush()
            # Two words swapped: the XOR fold (and so the hash) is the same, the address not.
            twin = GUEST_IP6[8:16] + GUEST_IP6[:8]
            frame = guest_udp6_frame(4000, GATEWAY6, port, b"twin", src=twin)
            before = network.counters().get("udp.fast_path", 0)
            network.receive_batch(batch_of([(frame, 0)]), 1, 1.0)
            network.flush()
            assert network.counters().get("udp.fast_path", 0) == before
            assert network.stack.udp_nat.flow_count() == 2  # the stack made it a flow of its own
        finally:
            network.close()
            server.close()

    run(scenario)

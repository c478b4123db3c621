"""The UDP fast path (ext/udp_fast.pyx) through Network.receive_batch, with real sockets on 127.0.0.1.

A flow's first datagram goes through the Python stack (which opens the host
socket); later ones are sent by sendmmsg from the batch. Frames the fast path
must not take (bad checksums, fragments, IP options, unknown flows) reach the
stack, which counts them as before; a refused port still becomes an ICMP
port unreachable for the guest.
"""

from __future__ import annotations

import asyncio
import socket
import struct

from tests.support.frames import GATEWAY_IP, GUEST_IP, GUEST_MAC, eth, guest_udp_frame, ipv4, udp
from tests.support.hostio import free_udp_port
from tests.support.loop import run
from tests.support.udp_fast import batch_of, open_udp_flow, receive_all
from vhostnet.network import Network
from vhostnet.stack.config import StackConfig
from vhostnet.wire.offload import NEEDS_CSUM, vnet_word


def test_established_flow_goes_fast_and_odd_frames_go_to_the_stack() -> None:
    async def scenario(loop) -> None:
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        server.bind(("127.0.0.1", 0))
        server.setblocking(False)
        port = server.getsockname()[1]
        network = Network(StackConfig(), loop)
        try:
            first = batch_of([(guest_udp_frame(4000, GATEWAY_IP, port, b"first"), 0)])
            network.receive_batch(first, 1, 0.0)
            network.flush()  # opens the host socket: the flow enters the fast path
            assert network.udp_fast.flows == 1
            good = [guest_udp_frame(4000, GATEWAY_IP, port, b"fast %d" % i) for i in range(5)]
            partial = bytearray(guest_udp_frame(4000, GATEWAY_IP, port, b"partial"))
            struct.pack_into("!H", partial, 14 + 20 + 6, 0x4242)  # what a driver leaves partial
            corrupt = bytearray(guest_udp_frame(4000, GATEWAY_IP, port, b"corrupt"))
            corrupt[-1] ^= 0xFF
            options = eth(network.config.gateway_mac, GUEST_MAC, 0x0800,
                          ipv4(GUEST_IP, GATEWAY_IP, 17, udp(GUEST_IP, 4000, GATEWAY_IP, port,
                                                             b"options"), ihl=6,
                               options=b"\x01\x01\x01\x00"))
            other = guest_udp_frame(4001, GATEWAY_IP, port, b"new flow")
            batch = batch_of([(f, 0) for f in good]
                             + [(bytes(partial), vnet_word(NEEDS_CSUM, 0, 0, 34, 6)),
                                (bytes(corrupt), 0), (options, 0), (other, 0)])
            before = network.counters()
            network.receive_batch(batch, batch.count, 1.0)
            network.flush()
            await asyncio.sleep(0.05)
            after = network.counters()
            got = receive_all(server)
            assert got[:1] == [b"first"]
            # IP options are the stack's business, but the datagram is fine: it arrives too.
            assert set(got[1:]) == ({b"fast %d" % i for i in range(5)}
                                    | {b"partial", b"new flow", b"options"})
            assert after["udp.fast_path"] - before.get("udp.fast_path", 0) == 6
            assert after["udp.rx"] - before["udp.rx"] == 8  # fast ones counted as well
            assert after["udp.drop.bad_checksum"] - before.get("udp.drop.bad_checksum", 0) == 1
            assert network.udp_fast.flows == 2  # the new flow joined after its first datagram
        finally:
            network.close()
            server.close()

    run(scenario)


def test_refused_port_on_the_fast_path_becomes_port_unreachable() -> None:
    async def scenario(loop) -> None:
        port = free_udp_port()  # nobody listens: the host answers ICMP, connect()ed send fails
        network = Network(StackConfig(), loop)
        try:
            open_udp_flow(network, port)
            await asyncio.sleep(0.05)  # the refusal arrives on the socket
            network.frames_to_guest.clear()
            later = batch_of([(guest_udp_frame(4000, GATEWAY_IP, port, b"b"), 0)] * 3)
            network.receive_batch(later, later.count, 1.0)
            await asyncio.sleep(0.05)
            unreachable = [f for f in network.frames_to_guest
                           if isinstance(f, bytes) and f[23] == 1 and f[34] == 3 and f[35] == 3]
            assert unreachable, "no ICMP port unreachable reached the guest"
        finally:
            network.close()

    run(scenario)


def test_expired_flow_leaves_the_fast_path() -> None:
    async def scenario(loop) -> None:
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        network = Network(StackConfig(), loop)
        try:
            open_udp_flow(network, port)
            assert network.udp_fast.flows == 1
            network.poll_timers(10_000.0)
            network.flush()
            assert network.udp_fast.flows == 0
        finally:
            network.close()
            server.close()

    run(scenario)

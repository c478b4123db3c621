"""Multiqueue (--queues N): the offer, the rings of every pair, and RX steered per flow.

The steering table is tested directly (sans-IO, frames in, pair numbers out); the rest
drives a real vhostnet process with the project's front-end playing QEMU's ``queues=2``.
"""

from __future__ import annotations

import socket
import struct

import pytest

from testkit.frontend import Frontend, ProtocolError
from tests.support.daemon import VhostnetProcess, echo_request, gateway_mac, run_cli
from tests.support.frames import (
    GATEWAY_IP,
    GATEWAY_MAC,
    GUEST_IP,
    GUEST_MAC,
    eth,
    guest_udp_frame,
    ipv4,
    parse_udp_frame,
    udp6,
)
from vhostnet.vhost_user.protocol import ProtocolFeature, VirtioFeature
from vhostnet.virtqueue import FlowSteering, FrameBatch

TWO_PAIRS = pytest.mark.parametrize("server", [("--queues", "2")], indirect=True)
REMOTE = bytes([192, 0, 2, 7])


def _to_guest_udp(sport: int, dport: int, src: bytes = REMOTE) -> bytes:
    return eth(GUEST_MAC, GATEWAY_MAC, 0x0800,
               ipv4(src, GUEST_IP, 17, struct.pack("!HHHH", sport, dport, 8, 0)))


def _learned(steering: FlowSteering, pair: int, *frames: bytes) -> None:
    batch = FrameBatch(8, 1 << 16)
    for frame in frames:
        assert batch.append(frame)
    steering.learn(batch, len(frames), pair)


# ---- the steering table --------------------------------------------------------------

def test_a_flow_comes_back_on_the_pair_it_was_sent_on() -> None:
    steering = FlowSteering()
    _learned(steering, 1, guest_udp_frame(40000, REMOTE, 53, b"q"))
    assert steering.pair_of(_to_guest_udp(53, 40000)) == 1
    # Another flow (another port, another peer) was never seen: pair 0.
    assert steering.pair_of(_to_guest_udp(53, 40002)) == 0
    assert steering.pair_of(_to_guest_udp(53, 40000, src=bytes([192, 0, 2, 8]))) == 0
    # The guest moved the flow (its sending CPU changed): the answer follows.
    _learned(steering, 0, guest_udp_frame(40000, REMOTE, 53, b"q"))
    assert steering.pair_of(_to_guest_udp(53, 40000)) == 0


def test_ipv6_flows_are_steered_and_non_ip_frames_go_to_pair_0() -> None:
    steering = FlowSteering()
    guest, remote = bytes.fromhex("fd00" + "00" * 13 + "0f"), bytes.fromhex("20010db8" + "00" * 11 + "07")
    out = eth(GATEWAY_MAC, GUEST_MAC, 0x86DD,
              struct.pack("!IHBB16s16s", 6 << 28, 9, 17, 64, guest, remote)
              + udp6(guest, 5000, remote, 6000, b"x"))
    back = eth(GUEST_MAC, GATEWAY_MAC, 0x86DD,
               struct.pack("!IHBB16s16s", 6 << 28, 9, 17, 64, remote, guest)
               + udp6(remote, 6000, guest, 5000, b"y"))
    _learned(steering, 3, out, b"\xff" * 6 + GUEST_MAC + b"\x08\x06" + bytes(28), b"short")
    assert steering.pair_of(back) == 3
    assert steering.pair_of(b"\xff" * 6 + GATEWAY_MAC + b"\x08\x06" + bytes(28)) == 0
    assert steering.pair_of(b"") == 0 and steering.pair_of(b"\x00" * 13) == 0
    steering.clear()
    assert steering.pair_of(back) == 0


def test_later_fragments_follow_the_addresses_alone() -> None:
    # Fragments after the first carry no ports: they are steered by the address pair,
    # which is consistent from one fragment to the next (the guest reassembles anyway).
    steering = FlowSteering()
    fragment = eth(GATEWAY_MAC, GUEST_MAC, 0x0800,
                   ipv4(GUEST_IP, REMOTE, 17, bytes(16), flags_fragment=0x0002))
    _learned(steering, 1, fragment)
    back = eth(GUEST_MAC, GATEWAY_MAC, 0x0800,
               ipv4(REMOTE, GUEST_IP, 17, bytes(16), flags_fragment=0x0002))
    assert steering.pair_of(back) == 1
    with pytest.raises(ValueError):
        _learned(steering, 256, fragment)


def test_a_flow_named_by_its_fields_finds_the_pair_its_frames_taught() -> None:
    """``pair_of_flow`` (host TCP data written into the ring before any frame exists) agrees
    with ``pair_of`` for both families, whichever way round the flow is named."""
    steering = FlowSteering()
    guest6 = bytes.fromhex("fd00" + "00" * 13 + "0f")
    remote6 = bytes.fromhex("20010db8" + "00" * 11 + "07")
    tcp4 = eth(GATEWAY_MAC, GUEST_MAC, 0x0800,
               ipv4(GUEST_IP, REMOTE, 6, struct.pack("!HH", 40123, 443) + bytes(16)))
    tcp6 = eth(GATEWAY_MAC, GUEST_MAC, 0x86DD,
               struct.pack("!IHBB16s16s", 6 << 28, 20, 6, 64, guest6, remote6)
               + struct.pack("!HH", 50001, 8080) + bytes(16))
    _learned(steering, 1, tcp4)
    _learned(steering, 2, tcp6)
    assert steering.pair_of_flow(REMOTE, GUEST_IP, 6, 443, 40123) == 1
    assert steering.pair_of_flow(GUEST_IP, REMOTE, 6, 40123, 443) == 1
    assert steering.pair_of_flow(remote6, guest6, 6, 8080, 50001) == 2
    assert steering.pair_of_flow(REMOTE, GUEST_IP, 6, 443, 40124) == 0  # never sent
    assert steering.pair_of_flow(REMOTE, guest6, 6, 443, 40123) == 0  # mixed families


# ---- the offer --------------------------------------------------------------------------

def test_one_pair_by_default_and_no_mq_feature(server: VhostnetProcess) -> None:
    with Frontend(server.socket_path) as frontend:
        frontend.connect()
        assert frontend.queue_pairs == 1
        assert not frontend.offered_features & VirtioFeature.NET_F_MQ
    with Frontend(server.socket_path, queues=2) as frontend, pytest.raises(ProtocolError):
        frontend.connect()  # QEMU with queues=2 refuses a one-pair back-end just so


@TWO_PAIRS
def test_queues_2_offers_mq_and_answers_two_pairs(server: VhostnetProcess) -> None:
    with Frontend(server.socket_path, queues=2) as frontend:
        frontend.connect()
        assert frontend.protocol_features & ProtocolFeature.MQ
        assert frontend.queue_pairs == 2
        assert frontend.offered_features & VirtioFeature.NET_F_MQ
        frontend.start()
        assert frontend.acked_features & VirtioFeature.NET_F_MQ
        running = server.stats()
        assert {f"vq{index}.at.last_avail" for index in range(4)} <= set(running)


@pytest.mark.parametrize("value", ["0", "-1", "100000", "two"])
def test_queues_outside_the_cpus_is_one_sentence(value: str, tmp_path) -> None:
    result = run_cli("-f", "-s", str(tmp_path / "s"), f"--queues={value}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "--queues" in result.stderr.strip().splitlines()[-1]


# ---- frames on every pair ----------------------------------------------------------------

@TWO_PAIRS
def test_each_pair_carries_its_own_flows_both_ways(server: VhostnetProcess) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as echo, \
            Frontend(server.socket_path, queues=2) as frontend:
        echo.bind(("127.0.0.1", 0))
        echo.settimeout(5)
        port = echo.getsockname()[1]
        frontend.connect()
        frontend.start()
        gateway_mac(frontend)  # ARP on pair 0
        for round_ in range(20):
            for pair, sport in ((0, 41000), (1, 41001)):
                frontend.send_frame(guest_udp_frame(sport, GATEWAY_IP, port, b"%d" % round_),
                                    pair=pair)
                data, peer = echo.recvfrom(100)
                echo.sendto(b"echo " + data, peer)
                replies = frontend.receive_frames(timeout=5, pair=pair)
                assert len(replies) == 1, (pair, replies)
                src, reply_sport, _dst, dport, payload = parse_udp_frame(replies[0])
                assert (reply_sport, dport, payload) == (port, sport, b"echo %d" % round_)
        # Nothing crossed over to the other pair's RX ring.
        assert frontend.receive_frames(timeout=0.2, pair=0) == []
        assert frontend.receive_frames(timeout=0.2, pair=1) == []
        stats = server.stats()
        assert stats["vq1.tx_frames"] == 21 and stats["vq3.tx_frames"] == 20
        assert stats["vq0.rx_frames"] == 21 and stats["vq2.rx_frames"] == 20
        # The echoes went straight from the host socket into their pair's RX ring.
        assert stats["udp.rx_direct"] == 40


@TWO_PAIRS
def test_a_pair_out_of_rx_buffers_holds_its_frames_in_order_and_blocks_no_other(
        server: VhostnetProcess) -> None:
    with Frontend(server.socket_path, queues=2) as frontend:
        frontend.connect()
        frontend.start()
        mac = gateway_mac(frontend)
        rx1 = frontend.rings[2]
        count = rx1.in_flight + 40  # more echoes than pair 1 has RX buffers
        for seq in range(1, count + 1):
            frontend.send_frame(echo_request(mac, b"p", seq), pair=1)
        # Pair 0 still answers while pair 1's replies wait for buffers.
        gateway_mac(frontend)
        seqs: list[int] = []
        for _ in range(50):
            seqs += [struct.unpack_from("!H", reply, 40)[0]
                     for reply in frontend.receive_frames(timeout=2, pair=1)]
            if len(seqs) >= count:
                break
        assert seqs == list(range(1, count + 1))
        assert frontend.receive_frames(timeout=0.2, pair=0) == []

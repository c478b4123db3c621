"""The virtio-net header's offload fields in the ring kernel: TX headers checked, RX headers written.

TX: a header asking for an offload that was not negotiated, a checksum position
outside the frame, or a GSO type without a segment size or partial checksum is
refused and counted; a good one reaches the FrameBatch as its vnet word. RX: a
frame's vnet word becomes the guest's header, unless the guest did not
negotiate it (then the frame is dropped and counted).
"""

from __future__ import annotations

import struct

import pytest

from tests.support.guest_ram import DESC_F_WRITE, HDR_LEN, Driver, GuestRam, ethernet_frame
from vhostnet.vhost_user.protocol import VirtioFeature as F
from vhostnet.virtqueue import FrameBatch, Virtqueue
from vhostnet.wire.offload import (
    DATA_VALID,
    GSO_TCPV4,
    NEEDS_CSUM,
    tcp_data_word,
    vnet_fields,
    vnet_word,
)

ALL_OFFLOADS = (F.NET_F_CSUM | F.NET_F_GUEST_CSUM | F.NET_F_HOST_TSO4 | F.NET_F_HOST_TSO6
                | F.NET_F_GUEST_TSO4 | F.NET_F_GUEST_TSO6)


@pytest.fixture
def ram():
    guest = GuestRam()
    yield guest
    guest.close()


def header(flags=0, gso_type=0, hdr_len=0, gso_size=0, csum_start=0, csum_offset=0) -> bytes:
    return struct.pack("<BBHHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, 0)


def send(ram, features: int, frames_with_headers: list[tuple[bytes, bytes]]):
    driver = Driver(ram)
    queue = Virtqueue(ram.memory, driver.size, *driver.ring_uvas, features=features)
    for hdr, frame in frames_with_headers:
        data = hdr + frame
        driver.publish(driver.add_chain([(driver.alloc(len(data), data), len(data), 0)]))
    batch = FrameBatch(16, 1 << 20)
    count = queue.tx_drain(batch, 16)
    return queue, batch, count


def test_tx_partial_checksum_and_gso_reach_the_batch(ram):
    frame = ethernet_frame(3000)
    tso = header(NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16)
    plain = header()
    queue, batch, count = send(ram, ALL_OFFLOADS, [(tso, frame), (plain, frame)])
    assert count == 2
    assert vnet_fields(batch.vnet(0)) == (NEEDS_CSUM, GSO_TCPV4, 1448, 34, 16)
    assert batch.vnet(1) == 0
    assert bytes(batch.frame(0)) == frame
    assert queue.counters()["tx_gso_frames"] == 1


@pytest.mark.parametrize("hdr, features, reason", [
    (header(NEEDS_CSUM, 0, 0, 0, 34, 16), 0, "tx_offload_not_negotiated"),
    (header(NEEDS_CSUM, GSO_TCPV4, 0, 1448, 34, 16), F.NET_F_CSUM, "tx_offload_not_negotiated"),
    (header(NEEDS_CSUM, 3, 0, 1448, 34, 6), ALL_OFFLOADS, "tx_offload_not_negotiated"),  # UFO
    (header(NEEDS_CSUM, GSO_TCPV4 | 0x80, 0, 1448, 34, 16), ALL_OFFLOADS,
     "tx_offload_not_negotiated"),  # ECN without HOST_ECN
    (header(NEEDS_CSUM, 0, 0, 0, 190, 16), ALL_OFFLOADS, "tx_bad_csum_offset"),  # past the end
    (header(NEEDS_CSUM, 0, 0, 0, 34, 0xFFFF), ALL_OFFLOADS, "tx_bad_csum_offset"),
    (header(NEEDS_CSUM, 0, 0, 0, 4, 2), ALL_OFFLOADS, "tx_bad_csum_offset"),  # inside Ethernet
    (header(NEEDS_CSUM, GSO_TCPV4, 0, 0, 34, 16), ALL_OFFLOADS, "tx_bad_gso"),  # no size
    (header(0, GSO_TCPV4, 0, 1448, 0, 0), ALL_OFFLOADS, "tx_bad_gso"),  # no partial checksum
])
def test_tx_bad_offload_headers_are_refused_and_counted(ram, hdr, features, reason):
    good = ethernet_frame(200, seed=2)
    queue, batch, count = send(ram, features, [(hdr, ethernet_frame(200)), (header(), good)])
    assert count == 1 and bytes(batch.frame(0)) == good  # the next frame is unaffected
    assert queue.counters()[reason] == 1
    assert queue.last_avail_idx == 2


BUFFER = 16384


def rx_one(ram, features: int, frame: bytes, vnet: int) -> tuple[int, bytes, Virtqueue]:
    driver = Driver(ram)
    queue = Virtqueue(ram.memory, driver.size, *driver.ring_uvas, mrg_rxbuf=True,
                      features=features)
    buffers = [driver.alloc(BUFFER) for _ in range(8)]
    driver.publish(*(driver.add_chain([(gpa, BUFFER, DESC_F_WRITE)]) for gpa in buffers))
    batch = FrameBatch(4, 1 << 20)
    batch.append(frame, vnet)
    consumed = queue.rx_push(batch)
    used = driver.take_used()
    data = ram.read(buffers[0], HDR_LEN) if used else b""
    return consumed, data, queue


def tcp_frame(payload_len: int) -> bytes:
    eth = b"\x52\x54\x00\x12\x34\x56" + b"\x52\x55\x0a\x00\x02\x02" + b"\x08\x00"
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + payload_len, 0, 0x4000, 64, 6, 0,
                     bytes((10, 0, 2, 2)), bytes((10, 0, 2, 15)))
    tcp = struct.pack("!HHIIBBHHH", 80, 40000, 1, 1, 5 << 4, 0x10, 1000, 0, 0)
    return eth + ip + tcp + bytes(payload_len)


def test_rx_gso_header_written(ram):
    frame = tcp_frame(60000)
    consumed, data, queue = rx_one(ram, ALL_OFFLOADS, frame, tcp_data_word(60000, 1460))
    assert consumed == 1
    flags, gso_type, hdr_len, gso_size, start, offset, num_buffers = struct.unpack("<BBHHHHH", data)
    assert (flags, gso_type, hdr_len, gso_size, start, offset) == (NEEDS_CSUM, GSO_TCPV4, 54, 1460,
                                                                   34, 16)
    assert num_buffers == (HDR_LEN + len(frame) + BUFFER - 1) // BUFFER
    assert queue.counters()["rx_gso_frames"] == 1


def test_rx_data_valid_header_written(ram):
    consumed, data, _ = rx_one(ram, F.NET_F_GUEST_CSUM, tcp_frame(100), vnet_word(DATA_VALID))
    assert consumed == 1 and data[:10] == bytes((DATA_VALID,)) + bytes(9)


@pytest.mark.parametrize("features, vnet", [
    (0, vnet_word(DATA_VALID)),
    (F.NET_F_GUEST_CSUM, tcp_data_word(3000, 1460)),  # GSO without GUEST_TSO4
    (ALL_OFFLOADS, vnet_word(NEEDS_CSUM, GSO_TCPV4, 0, 34, 16)),  # no segment size
    (ALL_OFFLOADS, vnet_word(NEEDS_CSUM, 0, 0, 3040, 16)),  # checksum beyond the frame
])
def test_rx_offload_the_guest_cannot_take_is_dropped(ram, features, vnet):
    consumed, data, queue = rx_one(ram, features, tcp_frame(3000), vnet)
    assert consumed == 1 and data == b""  # consumed, but no buffer used
    assert queue.counters()["rx_offload_not_negotiated"] == 1

"""The fast paths' shared flow table (ext/flow_table.pyx), driven through the UDP kernel.

The table is open addressing with tombstones, capped at half its slots; the
activity report remembers up to 4096 active slots and scans every flow beyond
that. These are the edges a unit test can reach and an e2e run never does.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest

from tests.support.frames import GATEWAY_IP, GATEWAY_MAC, GUEST_IP, GUEST_MAC, guest_udp_frame
from vhostnet.hostio.udp_fast import UdpFastPath  # the C kernel itself
from vhostnet.virtqueue import FrameBatch

TABLE_FLOWS = 65536  # half of the table's slots
REPORT_SLOTS = 4096  # active slots remembered between two reports


def fast_path() -> UdpFastPath:
    kernel = UdpFastPath()
    kernel.set_macs(GATEWAY_MAC, GUEST_MAC)
    return kernel


def send(kernel: UdpFastPath, frames: list[bytes]) -> np.ndarray:
    """Offer ``frames`` to the kernel as one TX batch; which of them it took (1) or left (0)."""
    batch = FrameBatch(len(frames), 1 << 22)
    for frame in frames:
        assert batch.append(frame, 0)
    storage, offsets, lengths, vnets = batch.arrays()
    handled = np.zeros(len(frames), dtype=np.uint8)
    taken = kernel.send_batch(storage, offsets, lengths, vnets, handled, len(frames))
    assert taken == int(handled.sum())
    return handled


def test_the_table_takes_half_its_slots_and_reuses_removed_ones() -> None:
    kernel = fast_path()
    for n in range(TABLE_FLOWS):
        assert kernel.add(n + 1, GUEST_IP, 1024 + n % 60000, GATEWAY_IP, 53 + n // 60000, 3)
    assert kernel.flows == TABLE_FLOWS
    assert not kernel.add(TABLE_FLOWS + 1, GUEST_IP, 9, GATEWAY_IP, 9, 3), "the table is full"
    assert kernel.remove(7) == (0, 0)
    assert kernel.remove(7) == (0, 0), "removing twice is harmless"
    assert kernel.flows == TABLE_FLOWS - 1
    assert kernel.add(TABLE_FLOWS + 1, GUEST_IP, 9, GATEWAY_IP, 9, 3), "a removed flow frees room"
    assert not kernel.add(TABLE_FLOWS + 1, GUEST_IP, 9, GATEWAY_IP, 9, 3), "already registered"
    with pytest.raises(ValueError):
        kernel.add(0, GUEST_IP, 9, GATEWAY_IP, 9, 3)
    with pytest.raises(ValueError):
        kernel.add(TABLE_FLOWS + 2, b"\x0a\x00\x02", 9, GATEWAY_IP, 9, 3)


def test_a_flow_behind_a_removed_slot_is_still_found() -> None:
    """Removal leaves a tombstone: flows whose probe path crossed the slot stay reachable."""
    near, far = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        kernel = fast_path()
        count = 60000  # the table is nearly half full: probe paths cross all the time
        for n in range(count):
            assert kernel.add(n + 1, GUEST_IP, 1024 + n, GATEWAY_IP, 53, near.fileno())
        for n in range(0, count, 2):
            kernel.remove(n + 1)
        assert kernel.flows == count // 2
        for start in range(0, count, 1000):
            frames = [guest_udp_frame(1024 + n, GATEWAY_IP, 53, b"x") for n in range(start, start + 1000)]
            handled = send(kernel, frames)
            # Taken (sent, or dropped once the unread pair is full): exactly the registered half.
            assert [int(h) for h in handled] == [n % 2 for n in range(start, start + 1000)]
    finally:
        near.close()
        far.close()


def test_activity_beyond_the_report_slots_is_found_by_a_full_scan() -> None:
    # One AF_UNIX datagram pair carries every flow: the kernel only needs a socket that sends.
    near, far = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    far.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
    try:
        kernel = fast_path()
        flows = REPORT_SLOTS + 100
        for n in range(flows):
            assert kernel.add(n + 1, GUEST_IP, 1024 + n, GATEWAY_IP, 53, near.fileno())
        taken = 0
        received = 0
        for start in range(0, flows, 500):  # in rounds the socket pair can hold
            chunk = range(start, min(start + 500, flows))
            taken += int(send(kernel, [guest_udp_frame(1024 + n, GATEWAY_IP, 53, b"x") for n in chunk]).sum())
            for _ in chunk:
                received += len(far.recv(16))
        assert taken == flows and received == flows
        active = kernel.take_activity()
        assert sorted(flow_id for flow_id, _, _ in active) == list(range(1, flows + 1))
        assert all(datagrams == 1 and size == 1 for _, datagrams, size in active)
        assert kernel.take_activity() == []
    finally:
        near.close()
        far.close()


def test_both_fast_paths_use_the_one_compiled_flow_table() -> None:
    import sys

    import vhostnet.hostio.udp_fast
    import vhostnet.tcp.fast  # noqa: F401

    # The kernels cimport FlowIndex: importing them loads its one module.
    assert "vhostnet.wire._flow_table" in sys.modules

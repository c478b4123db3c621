"""Rows of the ``switch`` case with real front-ends: two guests' rings through ``--max-guests 2``.

Two test front-ends (``bench.rings.GuestRings``, playing QEMU over vhost-user) connect
to one real ``python -m vhostnet --max-guests 2`` process. Each announces itself with a
broadcast ARP request for the gateway (its port binds to its lease, the switch learns
its MAC, the other guest gets the flooded copy) and learns the other's MAC from the
broadcast it receives. Then front-end 1 keeps its TX ring full of UDP/IPv4 frames of
one size to front-end 2's MAC while front-end 2 drains its RX ring: vhostnet's device
takes them off ring 1, its switch (C) copies them to port 2, its device pushes them into
ring 2. Both front-ends live in this process and take turns (no Python thread per ring);
vhostnet is measured from outside, its CPU from /proc.

Rows ``switch-frontends-<size>B``: Gbit/s of frames (Ethernet header included) front-end
2 received, against host loopback TCP from the same run; extras: Mpps, vhostnet's CPU
per frame, frames sent, received and dropped by the switch. No assertion on speed.
"""

from __future__ import annotations

import time

import numpy as np

from bench.output import Row
from bench.rings import GuestRings
from bench.runner import Backend, BenchError, vhostnet_template
from vhostnet.wire.arp import OP_REQUEST, emit_arp
from vhostnet.wire.checksum import PROTO_UDP
from vhostnet.wire.ethernet import ETHERTYPE_ARP, ETHERTYPE_IPV4, emit_ethernet
from vhostnet.wire.ipv4 import emit_ipv4_header
from vhostnet.wire.udp import emit_udp

FRONTEND_SIZES = (1500, 64)  # Ethernet frame lengths, as the testpmd case's
BROADCAST = b"\xff" * 6
MAC_1 = bytes.fromhex("525400000101")
MAC_2 = bytes.fromhex("525400000202")
IP_1, IP_2 = bytes([10, 0, 2, 15]), bytes([10, 0, 2, 16])  # the pool's first two leases
GATEWAY_IP = bytes([10, 0, 2, 2])
HEADERS = 14 + 20 + 8
LEARN_TIMEOUT = 5.0
DRAIN_SECONDS = 0.5  # after the stream, for frames still in the switch or ring 2
IDLE_WAIT = 0.002  # a turn where neither ring moved: sleep on ring 2's call fd this long


def udp_frame(size: int) -> bytes:
    """A UDP/IPv4 frame of ``size`` bytes from guest 1 to guest 2 (at least the headers)."""
    payload = bytes(i & 0xFF for i in range(max(size - HEADERS, 0)))
    datagram = emit_udp(IP_1, 40000, IP_2, 5201, payload)
    return emit_ethernet(MAC_2, MAC_1, ETHERTYPE_IPV4,
                         emit_ipv4_header(IP_1, IP_2, PROTO_UDP, len(datagram)) + datagram)


def announce(rings: GuestRings, mac: bytes, ip: bytes) -> None:
    """A broadcast ARP request for the gateway from ``mac``: binds the port, teaches the switch."""
    rings.send_frames([emit_ethernet(BROADCAST, mac, ETHERTYPE_ARP,
                                     emit_arp(OP_REQUEST, mac, ip, bytes(6), GATEWAY_IP))])


def learn_peer(rings: GuestRings, own: bytes, timeout: float = LEARN_TIMEOUT) -> bytes:
    """The source MAC of the first broadcast on ``rings``' RX that is not ``own``'s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for frame in rings.receive_frames():
            if frame[:6] == BROADCAST and frame[6:12] != own:
                return frame[6:12]
        rings.rx.wait(0.05)
    raise BenchError("a front-end never saw the other guest's broadcast through the switch")


def stream(sender: GuestRings, receiver: GuestRings, frame: bytes, duration: float
           ) -> tuple[int, int, int, float]:
    """``sender`` keeps its TX ring full of ``frame`` for ``duration`` s while ``receiver``
    drains RX; (frames sent, frames received, bytes received, seconds)."""
    tx = sender.tx
    sender.reclaim_tx()
    sender.fill_tx_all(frame)
    sent = received = nbytes = 0
    start = time.perf_counter()
    stop = start + duration
    while time.perf_counter() < stop:
        done = tx.consume_used()[1]
        sent += done
        if tx.free:
            tx.expose(tx.free)
        count, size = receiver.receive_counts()
        received += count
        nbytes += size
        if not done and not count:
            receiver.rx.wait(IDLE_WAIT)
    elapsed = time.perf_counter() - start
    deadline = time.monotonic() + DRAIN_SECONDS
    while time.monotonic() < deadline and (tx.in_flight or received < sent):
        sent += tx.consume_used()[1]
        count, size = receiver.receive_counts()
        received += count
        nbytes += size
        if not count:
            receiver.rx.wait(0.01)
    return sent, received, nbytes, elapsed


def frontend_rows(rounds: int, duration: float, base: list[float],
                  progress=None) -> list[Row]:  # progress: bench.output.Progress
    """``rounds`` rounds of each frame size in FRONTEND_SIZES on one vhostnet."""
    backend = Backend(vhostnet_template() + " --max-guests 2", 1500, "vhostnet")
    try:
        with GuestRings(backend.socket) as one, GuestRings(backend.socket) as two:
            announce(two, MAC_2, IP_2)
            announce(one, MAC_1, IP_1)
            if learn_peer(one, MAC_1) != MAC_2 or learn_peer(two, MAC_2) != MAC_1:
                raise BenchError("the front-ends learned the wrong MACs from each other")
            return [_size_row(backend, one, two, size, rounds, duration, base, progress)
                    for size in FRONTEND_SIZES]
    finally:
        backend.close()


def _size_row(backend: Backend, one: GuestRings, two: GuestRings, size: int, rounds: int,
              duration: float, base: list[float], progress) -> Row:
    row = Row(f"switch-frontends-{size}B", "Gbit/s", [], base, "loopback Gbit/s")
    frame = udp_frame(size)
    mpps, cpu_ns, sent_all, received_all, dropped_all = [], [], 0, 0, 0
    for i in range(rounds):
        if progress is not None:
            progress.update(f"switch-frontends {size}B round {i + 1}/{rounds}")
        before, usage = backend.counters(), backend.usage()
        sent, received, nbytes, seconds = stream(one, two, frame, duration)
        after, used = backend.counters(), backend.usage()
        row.rounds.append(nbytes * 8 / seconds / 1e9)
        mpps.append(received / seconds / 1e6)
        if usage is not None and used is not None and received:
            cpu_ns.append(1e9 * (used.cpu_s - usage.cpu_s) / received)
        dropped_all += sum(after.get(key, 0) - before.get(key, 0) for key in after
                           if key.startswith("switch.dropped."))
        sent_all += sent
        received_all += received
    row.extra.update(mpps=float(np.median(mpps)), frames_sent=sent_all,
                     frames_received=received_all, switch_dropped=dropped_all,
                     driver="two vhost-user front-ends on one vhostnet --max-guests 2")
    if cpu_ns:
        row.extra["cpu_ns_per_frame"] = float(np.median(cpu_ns))
    return row

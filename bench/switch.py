"""The ``switch`` case: guest-to-guest throughput through the switch kernel, VM-less.

The switch kernel (``vhostnet.virtqueue.Switch``) is driven directly, in this process,
with the batches a device would hand it: guest A's TX batch of TCP/IPv4 frames to guest
B, ``switch_batch`` from A's port, then B's outgoing batch taken whole (as after an RX
push). No rings and no front-ends: the figure is the switch's own cost per byte (learning,
lookup, copy and the offload work), to set against host loopback TCP measured in the same
run. Three kinds of traffic, as Linux guests send it:

- ``switch-tso``: 64 KiB TCP super-frames to a port with TSO (copied as they are);
- ``switch-mtu1500``: 1514-byte frames with partial checksums to a port with checksum
  offload (copied as they are);
- ``switch-segment``: the same super-frames to a port without offloads: cut into 1448-byte
  segments with every header and checksum written in C.

Each row is TCP payload in Gbit/s; no assertion on speed. The same case then measures
the whole path with two real front-ends on one ``vhostnet --max-guests 2`` process
(``bench.switch_frontends``: rows ``switch-frontends-1500B`` and ``-64B``).
"""

from __future__ import annotations

import time

from bench.cases import Baselines, Settings, loopback_tcp
from bench.hostside import TcpSink
from bench.output import Row
from bench.runner import BenchError
from bench.switch_frontends import frontend_rows
from vhostnet.virtqueue import FrameBatch, Switch
from vhostnet.wire.ethernet import ETHERTYPE_IPV4, emit_ethernet
from vhostnet.wire.ipv4 import emit_ipv4_header
from vhostnet.wire.offload import GSO_TCPV4, NEEDS_CSUM, vnet_word
from vhostnet.wire.tcp import CSUM_PARTIAL, emit_segment

SWITCH_CASE = "switch"
GATEWAY_MAC = bytes.fromhex("525600000002")
MAC_A = bytes.fromhex("525400000001")
MAC_B = bytes.fromhex("525400000002")
IP_A = bytes([10, 0, 2, 15])
IP_B = bytes([10, 0, 2, 16])
MSS = 1448
BATCH_BYTES = 4 << 20  # a TX batch of at most this many frame bytes
PROTO_TCP = 6
ACK_PSH = 0x18
# (row, TCP payload per frame, frames per batch, B's offloads)
KINDS = (
    ("switch-tso", 45 * MSS, 32, True),
    ("switch-mtu1500", MSS, 256, True),
    ("switch-segment", 45 * MSS, 32, False),
)


def tcp_frame(payload_len: int, seq: int) -> tuple[bytes, int]:
    """A TCP/IPv4 frame from A to B as A's driver leaves it (partial checksum), and its vnet
    word (GSO when the payload is over one MSS)."""
    segment = emit_segment(IP_A, IP_B, 40000, 5201, seq, 1, ACK_PSH, 0xFFFF,
                           bytes(i & 0xFF for i in range(payload_len)), checksum=CSUM_PARTIAL)
    frame = emit_ethernet(MAC_B, MAC_A, ETHERTYPE_IPV4,
                          emit_ipv4_header(IP_A, IP_B, PROTO_TCP, len(segment)) + segment)
    gso = GSO_TCPV4 if payload_len > MSS else 0
    return frame, vnet_word(NEEDS_CSUM, gso, MSS if gso else 0, 34, 16)


def switch_gbits(payload_len: int, frames: int, offloads: bool, duration: float) -> tuple[float, dict]:
    """Payload Gbit/s from A's port to B's over ``duration`` seconds, and the counters."""
    switch = Switch(2, GATEWAY_MAC, outgoing_frames=frames * (payload_len // MSS + 1),
                    outgoing_bytes=2 * BATCH_BYTES)
    a, b = switch.add_port(), switch.add_port()
    switch.set_port_offloads(b, csum=offloads, tso4=offloads, tso6=offloads)
    batch = FrameBatch(frames, BATCH_BYTES)
    seq = 1
    for _ in range(frames):
        frame, vnet = tcp_frame(payload_len, seq)
        if not batch.append(frame, vnet):
            raise BenchError("the switch case's TX batch is too small")
        seq += payload_len
    # B speaks first, so A's frames go to B's port alone instead of being flooded.
    hello = FrameBatch(1, 64)
    hello.append(emit_ethernet(GATEWAY_MAC, MAC_B, ETHERTYPE_IPV4, bytes(46)))
    switch.switch_batch(b, hello, 1, time.monotonic())
    batches = 0
    start = time.perf_counter()
    stop = start + duration
    while True:
        batch.take_written(frames)  # switch_batch left none for A's router
        switch.switch_batch(a, batch, frames, time.monotonic())
        out = switch.outgoing(b)
        if out is not None:
            switch.taken(b, len(out))
        batches += 1
        if time.perf_counter() >= stop:
            break
    elapsed = time.perf_counter() - start
    counters = switch.counters()
    drops = sum(v for k, v in counters.items() if k.startswith("switch.dropped."))
    if drops or counters["switch.forwarded"] != batches * frames:
        raise BenchError(f"the switch dropped or flooded frames: {counters}")
    return batches * frames * payload_len * 8 / elapsed / 1e9, counters


def switch_rows(s: Settings, baselines: Baselines) -> list[Row]:
    """The three kinds of traffic, ``s.rounds`` rounds each, then the front-end rows, against
    loopback TCP."""
    rows = []
    sink = TcpSink()
    sink.start()
    try:
        base = loopback_tcp(baselines, sink)
    finally:
        sink.stop()
    for case, payload_len, frames, offloads in KINDS:
        row = Row(case, "Gbit/s", [], base, "loopback Gbit/s")
        for i in range(s.rounds):
            s.progress.update(f"{case} round {i + 1}/{s.rounds}")
            gbits, counters = switch_gbits(payload_len, frames, offloads, s.duration)
            row.rounds.append(gbits)
        row.extra["segments_per_frame"] = (counters["switch.segments"]
                                           / max(counters["switch.forwarded"], 1))
        row.extra["driver"] = "switch kernel driven directly (no rings, no front-ends)"
        rows.append(row)
    return rows + frontend_rows(s.rounds, s.duration, base, s.progress)

"""Fuzz target for the whole guest receive path: one frame into ``Network.receive_batch``.

That is what the device does with a drained TX ring: the C fast paths (UDP, TCP) first,
then ``NetworkStack.receive_frame``, which reaches every engine (ARP, ICMP, DHCP, DNS,
UDP NAT, TCP, TFTP, NDP). The contract: nothing raises, and neither the stack's
``stack.drop.internal_error`` nor the network's ``errors.*`` counters move (both count
an exception a bug raised and the code swallowed).

The engines open host sockets, so this target runs only in a private network
namespace with nothing but loopback (``python -m tools.netns``; ``make fuzz`` does that).
"""

from __future__ import annotations

import asyncio
import os
import struct
import tempfile

from fuzz.wire_targets import with_ipv4_checksum
from vhostnet.network import Network
from vhostnet.stack.config import StackConfig
from vhostnet.virtqueue import FrameBatch
from vhostnet.wire.checksum import PROTO_TCP, PROTO_UDP, internet_checksum, l4_checksum
from vhostnet.wire.ethernet import ETHERTYPE_IPV4
from vhostnet.wire.ethernet import HEADER_LEN as ETH_LEN
from vhostnet.wire.offload import NEEDS_CSUM, TCP_CHECKSUM_OFFSET, UDP_CHECKSUM_OFFSET, vnet_word

PROTO_ICMP = 1
# A fresh network now and then: flows and host sockets must not pile up over a campaign.
CASES_PER_NETWORK = 2000
MAX_OPEN_FDS = 512
_L4_CHECKSUM_AT = {PROTO_TCP: TCP_CHECKSUM_OFFSET, PROTO_UDP: UDP_CHECKSUM_OFFSET, PROTO_ICMP: 2}

# Fuzz byte 0: which gates to open for the rest of the frame.
FIX_IPV4_HEADER = 1
FIX_L4_CHECKSUM = 2
PARTIAL_L4_CHECKSUM = 4  # the vnet word says NEEDS_CSUM at the L4 checksum field


def require_private_netns() -> None:
    """Refuse to open host sockets anywhere but a namespace with only loopback."""
    with open("/proc/self/net/dev", encoding="ascii") as dev:
        names = [line.split(":", 1)[0].strip() for line in dev.read().splitlines()[2:]]
    if names != ["lo"]:
        raise RuntimeError("this fuzz target opens host sockets: run it under "
                           "`python -m tools.netns --` (only loopback)")


def _l4_offsets(frame: bytes) -> tuple[int, int, int] | None:
    """(L4 start, L4 end, protocol) of an IPv4 frame, or None."""
    if len(frame) < ETH_LEN + 20 or struct.unpack_from("!H", frame, 12)[0] != ETHERTYPE_IPV4:
        return None
    header_len = (frame[ETH_LEN] & 0x0F) * 4
    total = struct.unpack_from("!H", frame, ETH_LEN + 2)[0]
    start, end = ETH_LEN + header_len, min(ETH_LEN + total, len(frame))
    if header_len < 20 or start > end:
        return None
    return start, end, frame[ETH_LEN + 9]


def prepare(data: bytes) -> tuple[bytes, int, float]:
    """(frame, vnet word, seconds to advance) from the fuzz bytes."""
    if len(data) < 2:
        return data, 0, 0.0
    gates, step, frame = data[0], data[1] * 0.25, data[2:]
    if gates & FIX_IPV4_HEADER and len(frame) > ETH_LEN:
        frame = frame[:ETH_LEN] + with_ipv4_checksum(frame[ETH_LEN:])
    vnet = 0
    l4 = _l4_offsets(frame)
    if l4 is not None and l4[2] in _L4_CHECKSUM_AT:
        start, end, proto = l4
        at = start + _L4_CHECKSUM_AT[proto]
        if gates & PARTIAL_L4_CHECKSUM and proto != PROTO_ICMP:
            vnet = vnet_word(NEEDS_CSUM, csum_start=start, csum_offset=at - start)
        elif gates & FIX_L4_CHECKSUM and at + 2 <= end:
            segment = bytearray(frame[start:end])
            segment[at - start: at - start + 2] = b"\0\0"
            if proto == PROTO_ICMP:
                value = internet_checksum(segment)
            else:
                value = l4_checksum(frame[ETH_LEN + 12:ETH_LEN + 16], frame[ETH_LEN + 16:ETH_LEN + 20],
                                    proto, segment)
            frame = frame[:at] + struct.pack("!H", value) + frame[at + 2:]
    return frame, vnet, step


class StackTarget:
    """One ``Network`` (rebuilt every ``CASES_PER_NETWORK`` cases) fed one frame per case."""

    def __init__(self) -> None:
        require_private_netns()
        self.loop = asyncio.new_event_loop()
        self.tftp_root = tempfile.TemporaryDirectory(prefix="vhostnet-fuzz-tftp-")
        with open(os.path.join(self.tftp_root.name, "boot.bin"), "wb") as file:
            file.write(bytes(range(256)) * 8)
        self.batch = FrameBatch(1, 1 << 17)
        self.network: Network | None = None
        self.cases = 0
        self.now = 0.0

    def _fresh_network(self) -> Network:
        if self.network is not None:
            self.network.close()
            self._tick()
        self.network = Network(StackConfig(tftp_root=self.tftp_root.name), self.loop)
        self.cases = 0
        return self.network

    def _tick(self) -> None:
        self.loop.run_until_complete(asyncio.sleep(0))

    def __call__(self, data: bytes) -> None:
        network = self.network
        if (network is None or self.cases >= CASES_PER_NETWORK
                or len(os.listdir("/proc/self/fd")) > MAX_OPEN_FDS):
            network = self._fresh_network()
        self.cases += 1
        frame, vnet, step = prepare(data)
        before = _failures(network)
        self.batch.clear()
        if self.batch.append(frame, vnet):
            self.now += step
            network.receive_batch(self.batch, 1, self.now)
            network.poll_timers(self.now)
            network.flush()
            self._tick()
        network.frames_to_guest.clear()
        after = _failures(network)
        assert after == before, f"an exception was swallowed: {before} -> {after}"


def _failures(network: Network) -> dict[str, int]:
    return {name: value for name, value in network.counters().items()
            if name.startswith("errors.") or name.endswith("internal_error")}

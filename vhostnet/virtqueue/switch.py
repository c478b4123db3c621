"""The Ethernet switch between guest ports (several guests on one vhostnet, issue 16).

Each guest front-end is a port. A port's TX batch passes ``switch_batch`` once: the C
kernel (``_virtq.SwitchKernel``, ext/virtq_switch.pxi) learns the source MACs, copies the
frames for other guests into their outgoing FrameBatches and compacts the batch to the
frames for the port's own router (the gateway MAC, broadcast, multicast), with the GIL
released and no Python per frame. Unicast goes to the port its MAC was learned on (learnt
entries age out after ``ageing_seconds``), broadcast, multicast and unknown unicast to
every other port; a frame never goes back to the port it came from. The gateway MAC is
not a port: a guest sending from it, or from a group address, is dropped and counted.

Offloads: frames keep their vnet word to a port that negotiated the offload; to one that
did not, partial checksums are completed and TCP super-frames (GSO, IPv4 and IPv6) cut
into ``gso_size`` segments in C (ext/virtq_segment.pxi).

Routing through the gateway MAC: ``set_port_route`` gives a port's guest MAC and
addresses; a frame another guest sends to the gateway MAC for one of them goes to that
guest (MACs rewritten, TTL / hop limit decremented, IPv4 header checksum updated, in C)
instead of to the sender's router (``switch.routed``).

A full outgoing batch drops the frame (counted) rather than blocking the sender; the
device pushes ``outgoing(port)`` into the guest's RX ring with ``Virtqueue.rx_push`` and
reports how many it took with ``taken``.
"""

from __future__ import annotations

import logging

from vhostnet.virtqueue import _virtq
from vhostnet.virtqueue._virtq import FrameBatch

__all__ = ["ROUTE6_SLOTS", "Switch"]

ROUTE6_SLOTS = _virtq.SWITCH_ROUTE6_SLOTS  # IPv6 addresses a port's route holds

log = logging.getLogger(__name__)

# What one port's outgoing batch holds: a whole TX batch of 64 KiB super-frames (256 of
# them, 16 MiB) for a port with TSO, or 8192 segments for one without. The storage is
# allocated untouched; frames are written from its start again once the port took them
# all, so only as much of it becomes resident as the port lets wait.
OUTGOING_FRAMES = 8192
OUTGOING_BYTES = 24 << 20


class Switch:
    """The switch: ports, the MAC table and its counters.

    ``outgoing_frames``/``outgoing_bytes`` size each port's outgoing batch (beyond the
    design's interface: tests use small ones).
    """

    def __init__(self, max_ports: int, gateway_mac: bytes, ageing_seconds: float = 300.0, *,
                 outgoing_frames: int = OUTGOING_FRAMES,
                 outgoing_bytes: int = OUTGOING_BYTES) -> None:
        self._kernel = _virtq.SwitchKernel(max_ports, bytes(gateway_mac), ageing_seconds)
        self._outgoing_frames = outgoing_frames
        self._outgoing_bytes = outgoing_bytes

    @property
    def max_ports(self) -> int:
        return self._kernel.max_ports

    def add_port(self) -> int:
        """A free port's id (the lowest); RuntimeError when all ``max_ports`` are in use."""
        return self._kernel.add_port(FrameBatch(self._outgoing_frames, self._outgoing_bytes))

    def remove_port(self, port: int) -> None:
        """Free ``port``: its learnt MACs are forgotten, frames waiting for it dropped."""
        self._kernel.remove_port(port)

    def set_port_offloads(self, port: int, *, csum: bool, tso4: bool, tso6: bool) -> None:
        """What ``port``'s guest takes on RX (GUEST_CSUM, GUEST_TSO4, GUEST_TSO6); all off
        until set, so frames to it get their checksums completed and super-frames cut.
        Frames waiting for it when they change (a driver reset) are dropped, counted."""
        self._kernel.set_port_offloads(port, csum, tso4, tso6)
        self._log_new_drops()

    def set_port_route(self, port: int, mac: bytes | None, ipv4: bytes | None = None,
                       ipv6: list[bytes] = ()) -> None:
        """Frames to the gateway MAC whose destination is ``ipv4`` or one of ``ipv6`` (at
        most ROUTE6_SLOTS) are routed to ``port``'s guest at ``mac``; None: no route to it
        (also what ``remove_port`` leaves)."""
        self._kernel.set_port_route(port, mac, ipv4, ipv6)

    def switch_batch(self, port: int, batch: FrameBatch, count: int, now: float) -> int:
        """Switch the first ``count`` frames of ``batch``, which came from ``port``, at ``now``
        (monotonic seconds). Frames for other ports are copied into their outgoing batches;
        ``batch`` is compacted in place, in order, to the frames for ``port``'s own router
        (gateway MAC, broadcast, multicast), and their number (0..count) is returned.
        ValueError for a port not in use or a negative count."""
        kept = self._kernel.switch_batch(port, batch, count, now)
        self._log_new_drops()
        return kept

    def _log_new_drops(self) -> None:
        if self._kernel.has_new_drops:
            for reason in self._kernel.take_new_drops():
                # Once per reason for the switch's life; the counters tell how many.
                log.warning("switch: frames for or from guest ports dropped: %s (counted as "
                            "switch.%s)", reason.replace("dropped.", "").replace("_", " "),
                            reason)

    def outgoing(self, port: int) -> FrameBatch | None:
        """The frames waiting for ``port`` (push them from index 0), or None."""
        return self._kernel.outgoing(port)

    def taken(self, port: int, count: int) -> None:
        """``count`` frames of ``outgoing(port)`` went into its ring; the rest stay, in order."""
        self._kernel.taken(port, count)

    def macs(self) -> list[tuple[bytes, int, float]]:
        """(MAC, port, last seen) of the MAC table, entries aged out by the latest ``now``
        passed to ``switch_batch`` left out."""
        return sorted(self._kernel.macs(), key=lambda entry: (entry[1], entry[0]))

    def counters(self) -> dict[str, int]:
        """``switch.forwarded``, ``.flooded``, ``.to_router``, ``.learned``, ``.moved``,
        ``.aged``, ``.evicted``, ``.checksums_completed``, ``.segmented``, ``.segments`` and
        ``switch.dropped.<reason>``."""
        return {f"switch.{name}": value for name, value in self._kernel.counters().items()}

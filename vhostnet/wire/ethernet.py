"""Ethernet II frames: a checked view and an emitter.

The view validates the length once in its constructor; after that every field
read is safe. VLAN tags are not understood: a tagged frame shows ethertype
0x8100 and is dropped by the dispatcher as an unknown type.
"""

from __future__ import annotations

import struct

from vhostnet.wire.errors import MalformedPacket

HEADER_LEN = 14
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
ETHERTYPE_RARP = 0x8035
ETHERTYPE_IPV6 = 0x86DD
BROADCAST_MAC = b"\xff" * 6


class EthernetFrame:
    """Checked view of an Ethernet II frame (no FCS, as virtio delivers them)."""

    __slots__ = ("dst", "src", "ethertype", "payload")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        if len(view) < HEADER_LEN:
            raise MalformedPacket("short", f"{len(view)} bytes is shorter than an Ethernet header")
        self.dst = bytes(view[0:6])
        self.src = bytes(view[6:12])
        self.ethertype: int = struct.unpack_from("!H", view, 12)[0]
        self.payload = view[HEADER_LEN:]


def emit_ethernet(dst: bytes, src: bytes, ethertype: int, payload: bytes | bytearray) -> bytes:
    """A complete frame: header followed by ``payload`` (no padding: virtio needs none)."""
    return dst + src + struct.pack("!H", ethertype) + bytes(payload)


def is_multicast(mac: bytes) -> bool:
    """True for group addresses (broadcast included): the I/G bit of the first octet."""
    return bool(mac[0] & 1)


def mac_bytes(text: str) -> bytes:
    """"52:56:00:00:00:02" -> 6 bytes; ``ValueError`` for anything else."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"not a MAC address: {text!r}")
    return bytes(int(p, 16) for p in parts)


def mac_str(mac: bytes) -> str:
    """6 bytes -> "52:56:00:00:00:02"."""
    return ":".join(f"{b:02x}" for b in mac)

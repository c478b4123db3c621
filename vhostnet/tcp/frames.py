"""TCP data for the guest as whole Ethernet frames, built in one C pass (``ext/tcp_frames.pyx``).

``data_frames`` is the face of that kernel: named addresses, ports and sequence
numbers in, the queue entries ``NetworkStack.send_ipv4_frames`` takes out (a
frame, or ``(frame, vnet word)`` when the guest is to complete or trust the L4
checksum; ``vhostnet.wire.offload`` says what the words mean).
"""

from __future__ import annotations

from enum import IntEnum

from vhostnet.tcp import _frames
from vhostnet.wire.offload import DATA_VALID_WORD, tcp_data_word

# Ethernet, IP and TCP headers of every frame ``data_frames`` builds (no options), by family.
HEADERS_LEN: int = _frames.HEADERS_LEN
HEADERS6_LEN: int = _frames.HEADERS6_LEN


class L4Checksum(IntEnum):
    """How a segment's TCP checksum is left (the kernel's values, equal to ``vhostnet.wire.tcp``'s
    CSUM_* that the Python segment builder takes)."""

    FULL = _frames.CHECKSUM_FULL  # computed
    PARTIAL = _frames.CHECKSUM_PARTIAL  # the pseudo-header sum only: the guest completes it
    NONE = _frames.CHECKSUM_NONE  # zero: the guest was told the data is valid (DATA_VALID)


def data_frames(*, dst_mac: bytes, src_mac: bytes, src_ip: bytes, dst_ip: bytes, src_port: int,
                dst_port: int, seq: int, ack: int, window: int,
                data: bytes | bytearray | memoryview, seg_size: int, checksum: L4Checksum,
                mss: int) -> list[bytes | tuple[bytes, int]]:
    """``data`` as ACK segments of at most ``seg_size`` bytes (PSH on the last), the first at ``seq``.

    ``window`` is the raw window field (clamped to 0xFFFF); ``seq`` and ``ack`` are taken
    modulo 2**32. 4-byte addresses make IPv4 frames, 16-byte ones IPv6 frames. With
    ``L4Checksum.PARTIAL``, ``seg_size`` may reach 64 KiB: segments longer than ``mss`` (the
    guest's) carry a TCPv4 (TCPv6) GSO word, for the guest to cut.
    """
    checksum = L4Checksum(checksum)
    view = memoryview(data)
    if view.format != "B" or not view.c_contiguous:
        view = memoryview(bytes(view))
    frames = _frames.data_frames(dst_mac, src_mac, src_ip, dst_ip, src_port, dst_port,
                                 seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, window, view, seg_size,
                                 int(checksum))
    if checksum is L4Checksum.PARTIAL:
        ipv6 = len(src_ip) == 16
        headers = HEADERS6_LEN if ipv6 else HEADERS_LEN
        return [(frame, tcp_data_word(len(frame) - headers, mss, ipv6)) for frame in frames]
    if checksum is L4Checksum.NONE:
        return [(frame, DATA_VALID_WORD) for frame in frames]
    return frames

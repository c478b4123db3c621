"""Cutting a datagram's payload into fragments: the part IPv4 and IPv6 share.

Each fragment but the last carries a multiple of 8 bytes (offsets count 8-byte units in
both families); the family's emitter adds its own header to each piece.
"""

from __future__ import annotations

from collections.abc import Iterator


def fragment_pieces(payload: bytes | bytearray | memoryview, room: int, mtu: int
                    ) -> Iterator[tuple[int, memoryview, bool]]:
    """``(offset, piece, more)`` for each fragment of ``payload``, where ``room`` bytes of
    the ``mtu`` are left for data after the headers; ``more`` is False on the last."""
    step = room & ~7
    if step <= 0:
        raise ValueError(f"an MTU of {mtu} bytes holds no fragment")
    view = memoryview(payload)
    for start in range(0, len(view), step):
        yield start, view[start : start + step], start + step < len(view)

"""A plain one's-complement sum, written apart from the code under test."""

from __future__ import annotations


def reference_sum(data: bytes, initial: int = 0) -> int:
    padded = data + b"\x00" if len(data) % 2 else data
    total = initial
    for i in range(0, len(padded), 2):
        total += padded[i] << 8 | padded[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return total

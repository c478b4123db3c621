"""TCP data frames built in C (``vhostnet.tcp.sender``) against the Python segment builder."""

from __future__ import annotations

import random

import pytest

from tests.support.checksum import reference_sum
from vhostnet.tcp.sender import HEADERS_LEN, L4Checksum, data_frames
from vhostnet.wire.checksum import PROTO_TCP, ones_complement_sum, pseudo_header_sum
from vhostnet.wire.ethernet import ETHERTYPE_IPV4, emit_ethernet
from vhostnet.wire.ipv4 import emit_ipv4_header
from vhostnet.wire.offload import DATA_VALID_WORD, tcp_data_word
from vhostnet.wire.tcp import CSUM_FULL, CSUM_NONE, CSUM_PARTIAL, segment_payload

GUEST_MAC = bytes.fromhex("525400123456")
GATEWAY_MAC = bytes.fromhex("525600000002")
REMOTE_IP = bytes([10, 0, 2, 2])
GUEST_IP = bytes([10, 0, 2, 15])


def build(data: bytes, seg_size: int, checksum: L4Checksum, *, seq: int = 1000, ack: int = 77,
          window: int = 29200, mss: int = 1460) -> list:
    return data_frames(dst_mac=GUEST_MAC, src_mac=GATEWAY_MAC, src_ip=REMOTE_IP, dst_ip=GUEST_IP,
                       src_port=8080, dst_port=40000, seq=seq, ack=ack, window=window, data=data,
                       seg_size=seg_size, checksum=checksum, mss=mss)


def python_frames(data: bytes, seg_size: int, checksum: int, *, seq: int, ack: int,
                  window: int) -> list[bytes]:
    segments = segment_payload(REMOTE_IP, GUEST_IP, 8080, 40000, seq, ack, window, data, seg_size,
                               checksum)
    return [emit_ethernet(GUEST_MAC, GATEWAY_MAC, ETHERTYPE_IPV4,
                          emit_ipv4_header(REMOTE_IP, GUEST_IP, PROTO_TCP, len(segment)) + segment)
            for segment in segments]


def test_checksum_modes_name_the_kernel_and_wire_values() -> None:
    assert (L4Checksum.FULL, L4Checksum.PARTIAL, L4Checksum.NONE) == (CSUM_FULL, CSUM_PARTIAL,
                                                                      CSUM_NONE)
    assert HEADERS_LEN == 14 + 20 + 20


@pytest.mark.parametrize("checksum", list(L4Checksum))
@pytest.mark.parametrize("length, seg_size", [(1, 1460), (1460, 1460), (2999, 1001), (5000, 1460),
                                              (64001, 63000)])
def test_frames_equal_the_python_builder(checksum: L4Checksum, length: int, seg_size: int) -> None:
    data = random.Random(length).randbytes(length)
    entries = build(data, seg_size, checksum, seq=0xFFFFFF00, ack=0x1_0000_0005, window=70000)
    frames = [entry[0] if isinstance(entry, tuple) else entry for entry in entries]
    # seq/ack modulo 2**32 and the window clamped, as the Python path does.
    assert frames == python_frames(data, seg_size, checksum, seq=0xFFFFFF00, ack=5, window=0xFFFF)


def test_full_checksums_verify_with_a_plain_reference_sum() -> None:
    rng = random.Random(7)
    for _ in range(50):
        data = rng.randbytes(rng.randrange(1, 4000))
        for frame in build(data, rng.randrange(1, 1461), L4Checksum.FULL):
            ip, tcp = frame[14:34], frame[34:]
            assert reference_sum(ip) == 0xFFFF
            start = pseudo_header_sum(REMOTE_IP, GUEST_IP, PROTO_TCP, len(tcp))
            assert reference_sum(tcp, start) == 0xFFFF
            assert ones_complement_sum(tcp, start) == 0xFFFF


def test_offload_modes_carry_their_vnet_words() -> None:
    data = bytes(5000)
    partial = build(data, 4380, L4Checksum.PARTIAL, mss=1460)
    assert [word for _frame, word in partial] == [tcp_data_word(4380, 1460), tcp_data_word(620, 1460)]
    frame = partial[0][0]
    assert int.from_bytes(frame[50:52], "big") == pseudo_header_sum(REMOTE_IP, GUEST_IP, PROTO_TCP,
                                                                    20 + 4380)
    valid = build(data, 1460, L4Checksum.NONE)
    assert all(word == DATA_VALID_WORD and frame[50:52] == b"\0\0" for frame, word in valid)
    assert all(isinstance(frame, bytes) for frame in build(data, 1460, L4Checksum.FULL))


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        build(b"x", 0, L4Checksum.FULL)
    with pytest.raises(ValueError):
        build(b"x", 0xFFFF, L4Checksum.FULL)
    with pytest.raises(ValueError):
        build(b"x", 100, 7)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        data_frames(dst_mac=b"short", src_mac=GATEWAY_MAC, src_ip=REMOTE_IP, dst_ip=GUEST_IP,
                    src_port=1, dst_port=2, seq=0, ack=0, window=0, data=b"x", seg_size=10,
                    checksum=L4Checksum.FULL, mss=10)
    assert build(b"", 100, L4Checksum.FULL) == []

"""Codec: every payload structure round-trips and rejects bad lengths; the Framer."""

import os
import struct

import pytest

from vhostnet.vhost_user.codec import (
    U64,
    CodecError,
    Config,
    DeviceStateParams,
    Framer,
    Header,
    Inflight,
    IotlbMsg,
    LogParams,
    MemoryRegion,
    MemoryTable,
    Message,
    SingleMemoryRegion,
    VringAddr,
    VringArea,
    VringState,
    reply,
)
from vhostnet.vhost_user.protocol import (
    NEED_REPLY,
    PAYLOAD_MAX_SIZE,
    ProtocolFeature,
    Request,
)

REGION_A = MemoryRegion(0x0, 0xA0000, 0x7F0000000000, 0x0)
REGION_B = MemoryRegion(0xC0000, 0xFF40000, 0x7F00000C0000, 0xC0000)

# (instance, expected encoded size)
SAMPLES = [
    (U64(0x1_7000_8000), 8),
    (VringState(1, 256), 8),
    (VringAddr(1, 1, 0x1000, 0x3000, 0x2000, 0xC3000), 40),
    (MemoryTable(()), 8),
    (MemoryTable((REGION_A, REGION_B)), 72),
    (SingleMemoryRegion(REGION_B), 40),
    (LogParams(0x2000, 0), 16),
    (IotlbMsg(0x1000, 0x2000, 0x7F0000001000, 3, 2), 32),
    (Config(0, 0, bytes(range(16))), 28),
    (VringArea(0x101, 4096, 0), 24),
    (Inflight(0, 0, 2, 256), 20),
    (DeviceStateParams(0, 0), 8),
]


@pytest.mark.parametrize(("value", "size"), SAMPLES, ids=lambda v: type(v).__name__)
def test_payload_round_trip(value, size):
    data = value.emit()
    assert len(data) == size
    assert type(value).parse(data) == value


@pytest.mark.parametrize(("value", "size"), SAMPLES, ids=lambda v: type(v).__name__)
def test_payload_wrong_length_rejected(value, size):
    data = value.emit()
    with pytest.raises(CodecError):
        type(value).parse(data[:-1] if data else b"\0")
    with pytest.raises(CodecError):
        type(value).parse(data + b"\0" * 1)


def test_field_layout_is_little_endian():
    assert VringState(2, 0x80008000).emit() == struct.pack("<II", 2, 0x80008000)
    addr = VringAddr(3, 1, 10, 20, 30, 40).emit()
    assert struct.unpack("<IIQQQQ", addr) == (3, 1, 10, 20, 30, 40)
    table = MemoryTable((REGION_B,)).emit()
    assert struct.unpack_from("<II", table) == (1, 0)
    assert struct.unpack_from("<QQQQ", table, 8) == (0xC0000, 0xFF40000, 0x7F00000C0000, 0xC0000)


def test_memory_table_rejects_inconsistent_count():
    two = MemoryTable((REGION_A, REGION_B)).emit()
    # nregions says 3 but only 2 regions follow.
    with pytest.raises(CodecError):
        MemoryTable.parse(struct.pack("<II", 3, 0) + two[8:])
    # More than 8 regions.
    with pytest.raises(CodecError):
        MemoryTable.parse(struct.pack("<II", 9, 0) + two[8:40] * 9)
    with pytest.raises(CodecError):
        MemoryTable.parse(b"\0" * 4)


def test_memory_table_accepts_full_eight_slot_struct():
    full = MemoryTable((REGION_A,)).emit() + bytes(7 * 32)
    assert MemoryTable.parse(full).regions == (REGION_A,)


def test_memory_region_rejects_zero_size_and_wraparound():
    with pytest.raises(CodecError):
        MemoryRegion.parse(struct.pack("<QQQQ", 0, 0, 0, 0))
    with pytest.raises(CodecError):
        MemoryRegion.parse(struct.pack("<QQQQ", 2**64 - 4096, 8192, 0, 0))
    with pytest.raises(CodecError):
        MemoryRegion.parse(struct.pack("<QQQQ", 0, 8192, 2**64 - 4096, 0))


def test_config_size_must_match_and_be_bounded():
    with pytest.raises(CodecError):
        Config.parse(struct.pack("<III", 0, 300, 0) + bytes(300))
    with pytest.raises(CodecError):
        Config.parse(struct.pack("<III", 0, 4, 0) + bytes(3))


def test_inflight_accepts_padded_c_struct():
    padded = Inflight(4096, 0, 2, 256).emit() + bytes(4)
    assert Inflight.parse(padded) == Inflight(4096, 0, 2, 256)


def test_u64_vring_index_and_nofd():
    assert U64(0x102).vring_index == 2
    assert U64(0x102).vring_nofd
    assert not U64(0x5).vring_nofd


def test_reply_flags_are_exactly_0x5():
    msg = Message(Request.GET_FEATURES, 0x1 | NEED_REPLY)
    answer = reply(msg, U64(7).emit())
    assert answer.flags == 0x5
    assert answer.request == Request.GET_FEATURES
    assert Header.parse(answer.emit()[:12]) == Header(Request.GET_FEATURES, 0x5, 8)


def test_protocol_feature_bits():
    assert ProtocolFeature.MQ == 1
    assert ProtocolFeature.INBAND_NOTIFICATIONS == 1 << 14
    assert ProtocolFeature.XEN_MMAP == 1 << 17
    assert ProtocolFeature.DEVICE_STATE == 1 << 19


# --- Framer -----------------------------------------------------------------


def _msg(req, payload=b"", flags=1):
    return Message(req, flags, payload).emit()


def test_framer_byte_by_byte():
    stream = _msg(Request.SET_FEATURES, U64(5).emit()) + _msg(Request.SET_OWNER)
    framer = Framer()
    got = []
    for i in range(len(stream)):
        framer.feed(stream[i : i + 1])
        got.extend(framer.messages())
    assert [(m.request, m.payload) for m in got] == [
        (Request.SET_FEATURES, U64(5).emit()),
        (Request.SET_OWNER, b""),
    ]
    assert framer.buffered == 0


def test_framer_attaches_fds_to_their_message():
    first = _msg(Request.SET_VRING_KICK, U64(0).emit())
    second = _msg(Request.SET_VRING_CALL, U64(1).emit())
    third = _msg(Request.SET_OWNER)
    framer = Framer()
    # fds 100 come with the first message, in a split read; 200 with the second.
    framer.feed(first[:5], [100])
    assert list(framer.messages()) == []
    framer.feed(first[5:])
    framer.feed(second, [200, 201])
    framer.feed(third)
    msgs = list(framer)
    assert [m.fds for m in msgs] == [[100], [200, 201], []]


def test_framer_two_messages_in_one_chunk_fds_go_to_first():
    framer = Framer()
    framer.feed(_msg(Request.SET_VRING_KICK, U64(0).emit()) + _msg(Request.SET_OWNER), [7])
    msgs = list(framer)
    assert [m.fds for m in msgs] == [[7], []]


def test_framer_rejects_oversized_payload():
    framer = Framer()
    framer.feed(Header(Request.SET_CONFIG, 1, PAYLOAD_MAX_SIZE + 1).emit(), [9])
    with pytest.raises(CodecError):
        list(framer.messages())
    assert framer.take_fds() == [9]


def test_framer_rejects_bad_version():
    framer = Framer()
    framer.feed(Header(Request.SET_OWNER, 2, 0).emit())
    with pytest.raises(CodecError):
        list(framer.messages())


def test_framer_take_fds_of_incomplete_message():
    framer = Framer()
    r, w = os.pipe()
    framer.feed(_msg(Request.SET_VRING_KICK, U64(0).emit())[:14], [r])
    assert list(framer) == []
    assert framer.take_fds() == [r]
    os.close(r)
    os.close(w)


def test_framer_wanted_stays_inside_one_message():
    framer = Framer()
    stream = _msg(Request.SET_FEATURES, U64(5).emit()) + _msg(Request.SET_OWNER)
    reads = []
    position = 0
    while position < len(stream):
        size = framer.wanted()
        reads.append(size)
        framer.feed(stream[position : position + size])
        position += size
        list(framer.messages())
    # header, payload, header (SET_OWNER has no payload)
    assert reads == [12, 8, 12]

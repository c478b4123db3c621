"""DNS and DHCP wire formats: SERVFAIL building, names in wire form, DHCP parse/emit."""

from __future__ import annotations

import struct

import pytest

from tests.support.dns import QUESTION, query
from vhostnet.wire import dhcp
from vhostnet.wire.dns import (
    encode_dns_name,
    question_section,
    read_question,
    reply_to,
    servfail_for,
)
from vhostnet.wire.errors import MalformedPacket


def test_servfail_without_parseable_question() -> None:
    broken = struct.pack("!HHHHHH", 9, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c"
    reply = servfail_for(broken)
    # QR, RD copied, RA, SERVFAIL; no question since it could not be parsed.
    assert reply == struct.pack("!HHHHHH", 9, 0x8182, 0, 0, 0, 0)


def test_servfail_echoes_a_plain_question() -> None:
    assert question_section(query(7)) == QUESTION
    assert servfail_for(query(7)) == struct.pack("!HHHHHH", 7, 0x8182, 1, 0, 0, 0) + QUESTION
    assert question_section(query(7)[:-1]) is None  # QCLASS cut short


def test_read_question_of_a_plain_query_only() -> None:
    assert read_question(query()) == ("example.test", 1, 1)
    assert read_question(query()[:-1]) is None  # truncated
    assert read_question(query()[:4] + b"\x00\x02" + query()[6:]) is None  # two questions
    assert read_question(b"\x00" * 5) is None


def test_reply_to_carries_a_and_aaaa_records_for_the_question() -> None:
    answer = reply_to(query(0x0102), 0, [bytes([192, 0, 2, 1]), bytes(range(16))], ttl=10,
                      authoritative=True)
    query_id, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", answer)
    assert (query_id, flags, qd, an, ns, ar) == (0x0102, 0x8580, 1, 2, 0, 0)
    records = answer[12 + len(QUESTION):]
    assert records == (struct.pack("!HHHIH", 0xC00C, 1, 1, 10, 4) + bytes([192, 0, 2, 1])
                       + struct.pack("!HHHIH", 0xC00C, 28, 1, 10, 16) + bytes(range(16)))
    nxdomain = reply_to(query(), 3, [bytes(4)])
    assert struct.unpack_from("!HH", nxdomain, 2) == (0x8183, 1)
    assert reply_to(b"\x00\x01\x01\x00" + bytes(8), 3, [bytes(4)])[6:8] == b"\x00\x00"


def test_encode_dns_name() -> None:
    assert encode_dns_name("example.test.") == b"\x07example\x04test\x00"
    with pytest.raises(ValueError):
        encode_dns_name("a..b")
    with pytest.raises(ValueError):
        encode_dns_name("x" * 64)


def test_dhcp_message_emit_then_parse_round_trip() -> None:
    mac = bytes.fromhex("525400123456")
    message = dhcp.DhcpMessage(dhcp.OP_REQUEST, 0xCAFE, dhcp.FLAG_BROADCAST, bytes(4), bytes(4),
                               bytes(4), bytes(4), mac, file=b"boot.ipxe")
    message.options = {dhcp.OPT_MESSAGE_TYPE: bytes((dhcp.DISCOVER,)), dhcp.OPT_HOSTNAME: b"h" * 300}
    data = message.emit()
    assert len(data) >= dhcp.MIN_REPLY_LEN
    parsed = dhcp.DhcpMessage.parse(data)
    assert (parsed.op, parsed.xid, parsed.flags, parsed.chaddr) == (1, 0xCAFE, 0x8000, mac)
    assert parsed.file.rstrip(b"\0") == b"boot.ipxe"
    assert parsed.message_type == dhcp.DISCOVER
    assert parsed.options[dhcp.OPT_HOSTNAME] == b"h" * 300  # split in two options, joined again


def test_dhcp_option_helpers() -> None:
    assert dhcp.encode_option(80, b"") == b"\x50\x00"
    assert dhcp.parse_options(memoryview(b"\x00\x0c\x01a\x0c\x01b\xff\x0c")) == {12: b"ab"}
    assert dhcp.classless_route(bytes((10, 1, 0, 0)), 16, bytes((10, 1, 0, 1))) == bytes(
        (16, 10, 1, 10, 1, 0, 1))


@pytest.mark.parametrize(("data", "expected"), [
    (bytes(200), "short"),
    (struct.pack("!BBB", 1, 6, 6) + bytes(233), "bad_hardware"),
])
def test_dhcp_malformed_fixed_part(data: bytes, expected: str) -> None:
    with pytest.raises(MalformedPacket) as info:
        dhcp.DhcpMessage.parse(data)
    assert info.value.reason == expected


@pytest.mark.parametrize(("options", "expected"), [
    (b"\x0c\x05ab", "truncated_option"),
    (b"\x0c", "truncated_option"),
    (b"\x35\x02\x01\x01", "bad_option_length"),
])
def test_dhcp_malformed_options(options: bytes, expected: str) -> None:
    with pytest.raises(MalformedPacket) as info:
        dhcp.parse_options(memoryview(options))
    assert info.value.reason == expected

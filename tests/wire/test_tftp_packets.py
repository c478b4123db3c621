"""TFTP wire format: exact bytes out, checked parsing in."""

from __future__ import annotations

import pytest

from vhostnet.wire.errors import MalformedPacket
from vhostnet.wire.tftp import (
    Ack,
    Data,
    Error,
    ErrorCode,
    Opcode,
    OptionAck,
    Request,
    TftpView,
)


def test_read_request_with_options_parses_and_lowercases() -> None:
    raw = b"\x00\x01pxelinux.0\x00OCTET\x00BLKSIZE\x001468\x00tsize\x000\x00"
    request = Request.parse(raw)
    assert request.opcode == Opcode.RRQ
    assert request.filename == "pxelinux.0"
    assert request.mode == "octet"
    assert request.options == {"blksize": "1468", "tsize": "0"}
    assert list(request.options) == ["blksize", "tsize"]  # client order is kept


def test_request_emit_is_exact() -> None:
    request = Request(Opcode.RRQ, "a/b", "octet", {"windowsize": "8"})
    assert request.emit() == b"\x00\x01a/b\x00octet\x00windowsize\x008\x00"
    assert Request.parse(request.emit()) == request


def test_write_request_parses() -> None:
    assert Request.parse(b"\x00\x02up\x00octet\x00").opcode == Opcode.WRQ


def test_request_padding_and_unpaired_option_are_ignored() -> None:
    # A trailing option name without a value, and NUL padding, carry no option.
    assert Request.parse(b"\x00\x01f\x00octet\x00tsize\x00").options == {}
    assert Request.parse(b"\x00\x01f\x00octet\x00\x00\x00").options == {}


def test_duplicate_option_keeps_the_first() -> None:
    raw = b"\x00\x01f\x00octet\x00blksize\x001024\x00blksize\x0064\x00"
    assert Request.parse(raw).options == {"blksize": "1024"}


def test_non_utf8_file_name_round_trips() -> None:
    raw = b"\x00\x01caf\xe9\x00octet\x00"
    request = Request.parse(raw)
    assert request.emit() == raw


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "tftp_short"),
        (b"\x00", "tftp_short"),
        (b"\x00\x09abc\x00", "tftp_bad_opcode"),
        (b"\x00\x00", "tftp_bad_opcode"),
        (b"\x00\x01file", "tftp_unterminated"),
        (b"\x00\x01file\x00octet", "tftp_unterminated"),
        (b"\x00\x01file\x00", "tftp_no_mode"),
        (b"\x00\x01\x00octet\x00", "tftp_empty_filename"),
        (b"\x00\x01f\x00oct\xffet\x00", "tftp_not_ascii"),
        (b"\x00\x04\x00", "tftp_short"),
        (b"\x00\x03\x00", "tftp_short"),
    ],
)
def test_malformed_requests_raise_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(MalformedPacket) as caught:
        Request.parse(raw)
    assert caught.value.reason == reason


def test_data_emit_and_parse() -> None:
    assert Data(1, b"hello").emit() == b"\x00\x03\x00\x01hello"
    assert Data(65536, b"").emit() == b"\x00\x03\x00\x00"  # 16-bit wrap on the wire
    assert Data.parse(b"\x00\x03\xff\xffxy") == Data(65535, b"xy")


def test_ack_emit_and_parse() -> None:
    assert Ack(258).emit() == b"\x00\x04\x01\x02"
    assert Ack.parse(b"\x00\x04\x01\x02") == Ack(258)
    with pytest.raises(MalformedPacket):
        Ack.parse(b"\x00\x03\x01\x02")


def test_error_emit_and_tolerant_parse() -> None:
    assert Error(ErrorCode.FILE_NOT_FOUND, "file not found").emit() == (
        b"\x00\x05\x00\x01file not found\x00"
    )
    assert Error.parse(b"\x00\x05\x00\x08no") == Error(8, "no")  # missing NUL tolerated


def test_oack_emit_and_parse() -> None:
    oack = OptionAck({"blksize": "1024", "tsize": "3000"})
    assert oack.emit() == b"\x00\x06blksize\x001024\x00tsize\x003000\x00"
    assert OptionAck.parse(oack.emit()) == oack


def test_view_exposes_number_and_body() -> None:
    view = TftpView(memoryview(b"\x00\x03\x00\x07abc"))
    assert (view.opcode, view.number, view.body) == (Opcode.DATA, 7, b"abc")


def test_an_option_that_is_not_ascii_is_ignored_and_the_request_emits_again() -> None:
    # Found by fuzzing (fuzz/regressions/tftp/): the option name came back with U+FFFD,
    # which emit() could not encode.
    raw = b"\x00\x01boot.bin\x00octet\x00blks\x99ze\x001024\x00tsize\x000\x00"
    request = Request.parse(raw)
    assert request.options == {"tsize": "0"}
    assert Request.parse(request.emit()) == request

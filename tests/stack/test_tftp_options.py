"""TFTP options: negotiation (RFC 2347/2348/2349/7440), OACK and ACK 0, windows, roll-over."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.support.tftp import (
    GATEWAY,
    ack,
    fetch,
    make_server,
    request,
    rrq,
    send,
)
from vhostnet.stack.tftp import negotiate
from vhostnet.wire.tftp import Data, OptionAck

CONTENT = bytes(range(256)) * 5 + b"tail"  # 1284 bytes


# -- negotiate(): the rules, one value at a time ------------------------------------


def accepted(options: dict[str, str], mtu: int = 1500, size: int = 1000) -> dict[str, str]:
    return negotiate(options, size, mtu, window_limit=64, default_timeout=1.0).acknowledged


@pytest.mark.parametrize(
    ("value", "mtu", "expected"),
    [
        ("1024", 1500, "1024"),
        ("1468", 1500, "1468"),  # exactly one Ethernet frame: 1500 - 20 - 8 - 4
        ("1469", 1500, "1468"),
        ("65464", 1500, "1468"),
        ("65464", 9000, "8968"),
        ("65535", 65520, "65464"),  # above the RFC 2348 maximum: lowered to it
        ("8", 1500, "8"),
        ("7", 1500, None),  # below the minimum: option ignored
        ("0", 1500, None),
        ("abc", 1500, None),
        ("-5", 1500, None),
        ("", 1500, None),
    ],
)
def test_blksize(value: str, mtu: int, expected: str | None) -> None:
    assert accepted({"blksize": value}, mtu).get("blksize") == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", "1"), ("3", "3"), ("255", "255"), ("0", None), ("256", None), ("1.5", None)],
)
def test_timeout(value: str, expected: str | None) -> None:
    assert accepted({"timeout": value}).get("timeout") == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", "1"), ("16", "16"), ("64", "64"), ("65", "64"), ("65535", "64"), ("0", None)],
)
def test_windowsize(value: str, expected: str | None) -> None:
    assert accepted({"windowsize": value}).get("windowsize") == expected


def test_tsize_reports_the_file_size_whatever_the_client_sent() -> None:
    assert accepted({"tsize": "0"}, size=31337) == {"tsize": "31337"}
    assert accepted({"tsize": "12"}, size=31337) == {"tsize": "31337"}


def test_unknown_options_are_not_acknowledged() -> None:
    assert accepted({"multicast": "", "utimeout": "5000", "blksize": "1024"}) == {
        "blksize": "1024"
    }


def test_negotiated_parameters() -> None:
    result = negotiate({"blksize": "1432", "windowsize": "8", "timeout": "3"}, 0, 1500, 64, 1.0)
    assert (result.block_size, result.window_size, result.timeout) == (1432, 8, 3.0)
    defaults = negotiate({}, 0, 1500, 64, 2.0)
    assert (defaults.block_size, defaults.window_size, defaults.timeout) == (512, 1, 2.0)
    assert defaults.acknowledged == {}


# -- OACK on the wire -----------------------------------------------------------------


def test_oack_exact_then_ack0_starts_data(tmp_path: Path) -> None:
    server, output, _ = make_server(tmp_path, {"f": CONTENT})
    [oack] = request(server, output, rrq("f", blksize=1024, tsize=0))
    assert oack.payload == b"\x00\x06blksize\x001024\x00tsize\x001284\x00"
    [first] = send(server, output, oack.sport, ack(0))
    assert first.payload == b"\x00\x03\x00\x01" + CONTENT[:1024]
    [last] = send(server, output, oack.sport, ack(1))
    assert last.payload == b"\x00\x03\x00\x02" + CONTENT[1024:]
    assert send(server, output, oack.sport, ack(2)) == []
    assert server.counters()["tftp.transfers_completed"] == 1


def test_oack_keeps_client_order_and_drops_refused_options(tmp_path: Path) -> None:
    server, output, _ = make_server(tmp_path, {"f": CONTENT})
    [oack] = request(server, output, rrq("f", tsize=0, multicast="", blksize=4, windowsize=2))
    assert oack.payload == b"\x00\x06tsize\x001284\x00windowsize\x002\x00"


def test_only_unaccepted_options_means_no_oack(tmp_path: Path) -> None:
    server, output, _ = make_server(tmp_path, {"f": CONTENT})
    [sent] = request(server, output, rrq("f", blksize=1, foo="bar"))
    assert sent.payload == b"\x00\x03\x00\x01" + CONTENT[:512]


def test_oack_is_retransmitted_at_the_negotiated_timeout(tmp_path: Path) -> None:
    server, output, _ = make_server(tmp_path, {"f": CONTENT})
    [oack] = request(server, output, rrq("f", timeout=3), now=100.0)
    assert OptionAck.parse(oack.payload).options == {"timeout": "3"}
    assert server.next_timer() == pytest.approx(103.0)
    server.poll_timers(102.0)
    assert output.take() == []
    server.poll_timers(103.0)
    [again] = output.take()
    assert again.payload == oack.payload
    # Anything but ACK 0 while waiting for it is ignored.
    assert send(server, output, oack.sport, ack(1), now=103.5) == []
    [first] = send(server, output, oack.sport, ack(0), now=104.0)
    assert Data.parse(first.payload).block == 1
    assert server.next_timer() == pytest.approx(107.0)


def test_error_8_declines_the_options(tmp_path: Path) -> None:
    server, output, files = make_server(tmp_path, {"f": CONTENT})
    [oack] = request(server, output, rrq("f", blksize=1024))
    assert send(server, output, oack.sport, b"\x00\x05\x00\x08no thanks\x00") == []
    assert server.counters()["tftp.transfers_failed.options_declined"] == 1
    assert files.open_handles == 0
    server.poll_timers(50.0)
    assert output.take() == []
    # The client typically asks again without options (a PXE ROM probing tsize does).
    assert fetch(server, output, "f", now=51.0) == CONTENT


def test_fetch_with_every_option(tmp_path: Path) -> None:
    content = bytes(range(251)) * 40  # 10040 bytes, not a multiple of the block
    server, output, files = make_server(tmp_path, {"f": content})
    assert fetch(server, output, "f", blksize=1432, tsize=0, timeout=2, windowsize=4) == content
    assert files.open_handles == 0


def test_blksize_is_clamped_to_the_mtu_on_the_wire(tmp_path: Path) -> None:
    content = b"z" * 3000
    server, output, _ = make_server(tmp_path, {"f": content}, mtu=1000)
    [oack] = request(server, output, rrq("f", blksize=65464))
    assert OptionAck.parse(oack.payload).options == {"blksize": "968"}
    [first] = send(server, output, oack.sport, ack(0))
    assert len(first.payload) == 968 + 4
    assert 20 + 8 + len(first.payload) == 1000


# -- windows (RFC 7440) ------------------------------------------------------------------

WINDOWED = bytes(range(200)) * 25  # 5000 bytes: blocks 1..10, the last 392 bytes


def blocks_of(sent: list) -> list[int]:
    return [Data.parse(s.payload).block for s in sent]


def test_window_is_sent_whole_and_advanced_by_its_last_ack(tmp_path: Path) -> None:
    server, output, _ = make_server(tmp_path, {"f": WINDOWED})
    [oack] = request(server, output, rrq("f", windowsize=4))
    port = oack.sport
    window = send(server, output, port, ack(0))
    assert blocks_of(window) == [1, 2, 3, 4]
    assert [Data.parse(s.payload).payload for s in window] == [
        WINDOWED[i * 512 : (i + 1) * 512] for i in range(4)
    ]
    assert blocks_of(send(server, output, port, ack(4))) == [5, 6, 7, 8]
    assert blocks_of(send(server, output, port, ack(8))) == [9, 10]
    assert send(server, output, port, ack(10)) == []
    assert server.counters()["tftp.transfers_completed"] == 1


def test_ack_inside_the_window_restarts_after_it(tmp_path: Path) -> None:
    # The client lost block 3: it acknowledges 2, the next window starts at 3.
    server, output, _ = make_server(tmp_path, {"f": WINDOWED})
    [oack] = request(server, output, rrq("f", windowsize=4))
    send(server, output, oack.sport, ack(0))
    assert blocks_of(send(server, output, oack.sport, ack(2))) == [3, 4, 5, 6]
    # Acknowledging 2 again is a duplicate: nothing is sent.
    assert send(server, output, oack.sport, ack(2)) == []


def test_window_timeout_resends_the_window(tmp_path: Path) -> None:
    server, output, _ = make_server(tmp_path, {"f": WINDOWED})
    [oack] = request(server, output, rrq("f", windowsize=3))
    first = send(server, output, oack.sport, ack(0))
    server.poll_timers(1.0)
    assert output.take() == first
    assert server.counters()["tftp.retransmits"] == 1


def test_window_limit_is_configurable(tmp_path: Path) -> None:
    server, output, _ = make_server(tmp_path, {"f": WINDOWED}, window_limit=2)
    [oack] = request(server, output, rrq("f", windowsize=8))
    assert OptionAck.parse(oack.payload).options == {"windowsize": "2"}
    assert blocks_of(send(server, output, oack.sport, ack(0))) == [1, 2]


# -- block number roll-over ------------------------------------------------------------------

ROLLOVER_BLOCKS = 65537  # full 512-byte blocks: the numbers wrap once, past 0 to 1
ROLLOVER_SIZE = ROLLOVER_BLOCKS * 512 + 100


@pytest.fixture(scope="module")
def big_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A ~33.5 MB file whose every 4 bytes hold their own index: each block is unique."""
    root = tmp_path_factory.mktemp("tftp_big")
    content = np.arange(ROLLOVER_SIZE // 4, dtype="<u4").tobytes()
    (root / "big.img").write_bytes(content)
    return root, content


def test_block_numbers_wrap_to_zero(big_root: tuple[Path, bytes]) -> None:
    root, content = big_root
    server, output, files = make_server(root, {})
    [sent] = request(server, output, rrq("big.img"))
    port = sent.sport
    wire_blocks_near_wrap = []
    received = 1
    for _ in range(ROLLOVER_BLOCKS + 1):
        data = Data.parse(sent.payload)
        if 65533 <= received <= 65538:
            wire_blocks_near_wrap.append(data.block)
            offset = (received - 1) * 512
            assert data.payload == content[offset : offset + 512]
        replies = send(server, output, port, ack(data.block))
        if not replies:
            break
        [sent] = replies
        received += 1
    assert wire_blocks_near_wrap == [65533, 65534, 65535, 0, 1, 2]
    assert received == ROLLOVER_BLOCKS + 1
    assert len(data.payload) == 100 and data.block == (ROLLOVER_BLOCKS + 1) & 0xFFFF
    counters = server.counters()
    assert counters["tftp.transfers_completed"] == 1
    assert counters["tftp.bytes_sent"] == ROLLOVER_SIZE
    assert files.open_handles == 0
    server.poll_timers(1000.0)
    assert not server.accepts(GATEWAY, port)


def test_windowed_transfer_across_the_wrap(big_root: tuple[Path, bytes]) -> None:
    # With 64 blocks in flight, the ACK numbers must still map onto the right
    # window when the 16-bit counter wraps in the middle of one.
    root, content = big_root
    server, output, _ = make_server(root, {})
    assert fetch(server, output, "big.img", windowsize=64) == content
    assert server.counters()["tftp.transfers_completed"] == 1


def test_empty_file_with_options(tmp_path: Path) -> None:
    server, output, _ = make_server(tmp_path, {"empty": b""})
    [oack] = request(server, output, rrq("empty", tsize=0, blksize=1024))
    assert oack.payload == b"\x00\x06tsize\x000\x00blksize\x001024\x00"
    [only] = send(server, output, oack.sport, ack(0))
    assert only.payload == b"\x00\x03\x00\x01"
    assert send(server, output, oack.sport, ack(1)) == []
    assert server.counters()["tftp.transfers_completed"] == 1

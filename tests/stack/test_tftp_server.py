"""TftpServer without options: requests, errors, transfer IDs, timeouts, concurrency."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.tftp import (
    CLIENT_PORT,
    GATEWAY,
    GATEWAY6,
    GUEST,
    ack,
    error_of,
    fetch,
    make_server,
    request,
    rrq,
    send,
)
from vhostnet.stack.tftp import LINGER_SECONDS
from vhostnet.wire.tftp import Data, ErrorCode, Opcode, Request, TftpView

CONTENT = bytes(range(256)) * 5 + b"tail"  # 1284 bytes: blocks of 512, 512, 260


def test_first_data_block_is_exact(tmp_path: Path) -> None:
    server, output, _ = make_server(tmp_path, {"boot.bin": CONTENT})
    [sent] = request(server, output, rrq("boot.bin"))
    assert (sent.src, sent.dst, sent.dport) == (GATEWAY, GUEST, CLIENT_PORT)
    assert 49152 <= sent.sport <= 65535
    assert sent.payload == b"\x00\x03\x00\x01" + CONTENT[:512]


def test_whole_transfer_then_port_closes(tmp_path: Path) -> None:
    server, output, files = make_server(tmp_path, {"boot.bin": CONTENT})
    [first] = request(server, output, rrq("boot.bin"))
    port = first.sport
    [second] = send(server, output, port, ack(1))
    assert second.payload == b"\x00\x03\x00\x02" + CONTENT[512:1024]
    [last] = send(server, output, port, ack(2))
    assert last.payload == b"\x00\x03\x00\x03" + CONTENT[1024:]
    assert send(server, output, port, ack(3)) == []
    counters = server.counters()
    assert counters["tftp.transfers_started"] == 1
    assert counters["tftp.transfers_completed"] == 1
    assert counters["tftp.bytes_sent"] == len(CONTENT)
    assert counters["tftp.transfers_active"] == 0
    assert files.open_handles == 0
    # A late duplicate of the final ACK is swallowed while the port lingers...
    assert send(server, output, port, ack(3), now=1.0) == []
    assert server.counters()["tftp.late_packets"] == 1
    # ...and then the port is released.
    assert server.next_timer() == pytest.approx(LINGER_SECONDS)
    server.poll_timers(LINGER_SECONDS)
    assert not server.accepts(GATEWAY, port)
    assert server.next_timer() is None


def test_size_multiple_of_block_ends_with_empty_block(tmp_path: Path) -> None:
    content = b"x" * 1024
    server, output, _ = make_server(tmp_path, {"even.bin": content})
    [first] = request(server, output, rrq("even.bin"))
    send(server, output, first.sport, ack(1))
    [final] = send(server, output, first.sport, ack(2))
    assert final.payload == b"\x00\x03\x00\x03"
    assert send(server, output, first.sport, ack(3)) == []
    assert server.counters()["tftp.transfers_completed"] == 1


def test_empty_file_is_one_empty_block(tmp_path: Path) -> None:
    server, output, _ = make_server(tmp_path, {"empty": b""})
    assert fetch(server, output, "empty") == b""


def test_leading_slash_and_upper_case_mode(tmp_path: Path) -> None:
    server, output, _ = make_server(tmp_path, {"pxelinux.0": CONTENT})
    assert fetch(server, output, "/pxelinux.0") == CONTENT
    [sent] = request(server, output, rrq("pxelinux.0", mode="OcTeT"))
    assert Data.parse(sent.payload).block == 1


def test_accepts_only_gateway_port_69_and_live_transfers(tmp_path: Path) -> None:
    server, output, _ = make_server(tmp_path, {"f": CONTENT})
    assert server.accepts(GATEWAY, 69)
    assert not server.accepts(bytes([10, 0, 2, 3]), 69)
    assert not server.accepts(GATEWAY, 49152)
    [sent] = request(server, output, rrq("f"))
    assert server.accepts(GATEWAY, sent.sport)
    assert not server.accepts(bytes([10, 0, 2, 3]), sent.sport)


def test_an_ipv6_client_is_answered_from_the_gateways_ipv6_address(tmp_path: Path) -> None:
    server, output, _ = make_server(tmp_path, {"f": CONTENT})
    guest6 = bytes.fromhex("fec0000000000000505400fffe123456")
    assert server.accepts(GATEWAY6, 69)
    assert not server.accepts(bytes(15) + b"\x01", 69)
    server.handle_udp(guest6, CLIENT_PORT, GATEWAY6, 69, rrq("missing"), 0.0)
    [refusal] = output.take()
    assert (refusal.src, refusal.dst, refusal.dport) == (GATEWAY6, guest6, CLIENT_PORT)
    server.handle_udp(guest6, CLIENT_PORT, GATEWAY6, 69, rrq("f"), 0.0)
    [data] = output.take()
    assert (data.src, data.dst) == (GATEWAY6, guest6) and data.payload[4:] == CONTENT[:512]
    assert server.accepts(GATEWAY6, data.sport)


# -- refused requests: every error code the server sends --------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (rrq("missing.bin"), b"\x00\x05\x00\x01file not found\x00"),
        (rrq("../../etc/passwd"), b"\x00\x05\x00\x02access violation\x00"),
        (rrq("escape"), b"\x00\x05\x00\x02access violation\x00"),
        (rrq("sub"), b"\x00\x05\x00\x01is a directory\x00"),
        (
            Request(Opcode.WRQ, "f", "octet").emit(),
            b"\x00\x05\x00\x02write requests are not supported\x00",
        ),
        (rrq("f", mode="netascii"), b"\x00\x05\x00\x00netascii mode is not supported, use octet\x00"),
        (rrq("f", mode="mail"), b"\x00\x05\x00\x00mail mode is not supported, use octet\x00"),
        (rrq("f", mode="binary"), b"\x00\x05\x00\x04unknown transfer mode 'binary'\x00"),
        (b"\x00\x01f\x00octet", b"\x00\x05\x00\x04malformed request\x00"),  # no final NUL
        (b"\x00\x01f", b"\x00\x05\x00\x04malformed request\x00"),
        (b"\x00", b"\x00\x05\x00\x04malformed request\x00"),
        (b"", b"\x00\x05\x00\x04malformed request\x00"),
        (b"\x00\x07abc\x00", b"\x00\x05\x00\x04malformed request\x00"),  # unknown opcode
        (ack(1), b"\x00\x05\x00\x04malformed request\x00"),  # not a request
    ],
)
def test_refused_requests_get_exact_error(tmp_path: Path, payload: bytes, expected: bytes) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "secret").write_bytes(b"secret")
    (root / "escape").symlink_to(tmp_path / "secret")
    server, output, files = make_server(root, {"f": CONTENT})
    [sent] = request(server, output, payload)
    assert sent.payload == expected
    assert (sent.dst, sent.dport) == (GUEST, CLIENT_PORT)
    assert sent.sport != 69  # answered from a fresh transfer ID, like any reply
    assert not server.accepts(GATEWAY, sent.sport)  # but nothing stays open
    assert files.open_handles == 0
    assert server.counters()["tftp.errors_sent"] == 1
    assert server.next_timer() is None


def test_refusals_are_counted_by_kind(tmp_path: Path) -> None:
    server, output, _ = make_server(tmp_path, {"f": CONTENT})
    request(server, output, rrq("missing"))
    request(server, output, rrq("../x"))
    request(server, output, b"\x00")
    request(server, output, b"\x00\x01f")
    counters = server.counters()
    assert counters["tftp.refused.file_not_found"] == 1
    assert counters["tftp.refused.access_violation"] == 1
    assert counters["tftp.malformed.tftp_short"] == 1
    assert counters["tftp.malformed.tftp_unterminated"] == 1


def test_error_sent_to_port_69_is_not_answered(tmp_path: Path) -> None:
    server, output, _ = make_server(tmp_path, {})
    assert request(server, output, b"\x00\x05\x00\x00oops\x00") == []


# -- transfer IDs -----------------------------------------------------------------


def test_unknown_transfer_id_gets_error_5_and_transfer_continues(tmp_path: Path) -> None:
    server, output, _ = make_server(tmp_path, {"f": CONTENT})
    [first] = request(server, output, rrq("f"))
    port = first.sport
    [stray] = send(server, output, port, ack(1), port=CLIENT_PORT + 1)
    assert stray.payload == b"\x00\x05\x00\x05unknown transfer ID\x00"
    assert (stray.sport, stray.dport) == (port, CLIENT_PORT + 1)
    [stray_ip] = send(server, output, port, ack(1), src_ip=bytes([10, 0, 2, 99]))
    assert error_of(stray_ip).code == ErrorCode.UNKNOWN_TRANSFER_ID
    assert stray_ip.dst == bytes([10, 0, 2, 99])
    # An ERROR from a stranger is not answered (no error ping-pong).
    assert send(server, output, port, b"\x00\x05\x00\x05x\x00", port=CLIENT_PORT + 1) == []
    [second] = send(server, output, port, ack(1))
    assert Data.parse(second.payload).block == 2
    assert server.counters()["tftp.unknown_tid"] == 3


def test_ports_are_distinct_and_not_reused_while_live(tmp_path: Path) -> None:
    server, output, _ = make_server(tmp_path, {"f": CONTENT}, port_range=(50000, 50002))
    ports = [request(server, output, rrq("f"), port=1000 + i)[0].sport for i in range(3)]
    assert sorted(ports) == [50000, 50001, 50002]
    [busy] = request(server, output, rrq("f"), port=2000)
    assert error_of(busy).code == ErrorCode.NOT_DEFINED
    assert "no free transfer port" in error_of(busy).message
    assert busy.sport == 69  # no spare port left to answer from


def test_transfer_limit(tmp_path: Path) -> None:
    server, output, files = make_server(tmp_path, {"f": CONTENT}, max_transfers=2)
    request(server, output, rrq("f"), port=1000)
    request(server, output, rrq("f"), port=1001)
    [refused] = request(server, output, rrq("f"), port=1002)
    assert error_of(refused).message == "too many transfers, try again later"
    assert files.open_handles == 2


def test_retransmitted_request_does_not_start_a_second_transfer(tmp_path: Path) -> None:
    server, output, files = make_server(tmp_path, {"f": CONTENT})
    request(server, output, rrq("f"))
    assert request(server, output, rrq("f"), now=0.5) == []
    assert server.counters()["tftp.transfers_started"] == 1
    assert server.counters()["tftp.duplicate_requests"] == 1
    assert files.open_handles == 1


# -- timeouts, duplicates, client errors ------------------------------------------------


def test_duplicate_ack_does_not_resend(tmp_path: Path) -> None:
    server, output, _ = make_server(tmp_path, {"f": CONTENT})
    [first] = request(server, output, rrq("f"))
    [second] = send(server, output, first.sport, ack(1))
    assert send(server, output, first.sport, ack(1)) == []  # sorcerer's apprentice guard
    assert send(server, output, first.sport, ack(0)) == []  # stale
    assert send(server, output, first.sport, ack(7)) == []  # from the future
    counters = server.counters()
    assert counters["tftp.duplicate_acks"] == 1
    assert counters["tftp.stale_acks"] == 2
    # Only the timer resends, the same block.
    server.poll_timers(0.99)
    assert output.take() == []
    server.poll_timers(1.0)
    [again] = output.take()
    assert again.payload == second.payload


def test_vanished_client_is_dropped_after_bounded_retries(tmp_path: Path) -> None:
    server, output, files = make_server(tmp_path, {"f": CONTENT}, max_retransmits=3)
    [first] = request(server, output, rrq("f"), now=10.0)
    resent = []
    for _ in range(10):  # more rounds than needed: the server must stop by itself
        deadline = server.next_timer()
        if deadline is None:
            break
        server.poll_timers(deadline)
        resent.extend(output.take())
    assert [s.payload for s in resent[:3]] == [first.payload] * 3
    assert error_of(resent[3]).message == "timed out"
    assert len(resent) == 4
    counters = server.counters()
    assert counters["tftp.retransmits"] == 3
    assert counters["tftp.transfers_failed.timeout"] == 1
    assert counters["tftp.transfers_active"] == 0
    assert files.open_handles == 0
    assert not server.accepts(GATEWAY, first.sport)


def test_progress_resets_the_retry_budget(tmp_path: Path) -> None:
    server, output, _ = make_server(tmp_path, {"f": CONTENT}, max_retransmits=1)
    [first] = request(server, output, rrq("f"), now=0.0)
    server.poll_timers(1.0)  # one retransmission used
    assert len(output.take()) == 1
    send(server, output, first.sport, ack(1), now=1.5)
    server.poll_timers(2.5)  # a fresh budget: block 2 is resent, not given up
    [again] = output.take()
    assert Data.parse(again.payload).block == 2


def test_client_error_ends_the_transfer(tmp_path: Path) -> None:
    server, output, files = make_server(tmp_path, {"f": CONTENT})
    [first] = request(server, output, rrq("f"))
    assert send(server, output, first.sport, b"\x00\x05\x00\x03disk full\x00") == []
    assert server.counters()["tftp.transfers_failed.client_error"] == 1
    assert files.open_handles == 0
    server.poll_timers(100.0)
    assert output.take() == []


def test_illegal_opcode_in_transfer_gets_error_4(tmp_path: Path) -> None:
    server, output, files = make_server(tmp_path, {"f": CONTENT})
    [first] = request(server, output, rrq("f"))
    [reply] = send(server, output, first.sport, b"\x00\x03\x00\x01data")
    assert reply.payload == b"\x00\x05\x00\x04unexpected DATA in a read transfer\x00"
    assert server.counters()["tftp.transfers_failed.illegal_operation"] == 1
    assert files.open_handles == 0


def test_malformed_packet_in_transfer_is_dropped_and_transfer_survives(tmp_path: Path) -> None:
    server, output, _ = make_server(tmp_path, {"f": CONTENT})
    [first] = request(server, output, rrq("f"))
    for junk in (b"", b"\x00", b"\x00\x04\x00", b"\xff\xff\x00\x01"):
        assert send(server, output, first.sport, junk) == []
    [second] = send(server, output, first.sport, ack(1))
    assert Data.parse(second.payload).block == 2
    counters = server.counters()
    assert counters["tftp.malformed.tftp_short"] == 3
    assert counters["tftp.malformed.tftp_bad_opcode"] == 1


def test_file_that_shrinks_mid_transfer_fails_cleanly(tmp_path: Path) -> None:
    server, output, files = make_server(tmp_path, {"f": CONTENT})
    [first] = request(server, output, rrq("f"))
    (tmp_path / "f").write_bytes(b"short")
    [reply] = send(server, output, first.sport, ack(1))
    assert reply.payload == b"\x00\x05\x00\x00file changed while being sent\x00"
    assert server.counters()["tftp.transfers_failed.read_error"] == 1
    assert files.open_handles == 0


# -- several at once ----------------------------------------------------------------------


def test_concurrent_transfers_interleaved(tmp_path: Path) -> None:
    contents = {f"file{i}": bytes([i]) * (700 + 300 * i) for i in range(4)}
    server, output, files = make_server(tmp_path, contents)
    ports = {}
    received: dict[str, bytearray] = {name: bytearray() for name in contents}
    for i, name in enumerate(contents):
        [sent] = request(server, output, rrq(name), port=3000 + i)
        ports[name] = sent.sport
        received[name] += Data.parse(sent.payload).payload
    assert len(set(ports.values())) == 4
    assert server.counters()["tftp.transfers_active"] == 4
    blocks = dict.fromkeys(contents, 1)
    for _ in range(10):  # each file needs at most 5 blocks
        for i, name in enumerate(contents):
            if server.accepts(GATEWAY, ports[name]) and len(received[name]) < len(contents[name]):
                [sent] = send(server, output, ports[name], ack(blocks[name]), port=3000 + i)
                assert sent.dport == 3000 + i
                blocks[name] += 1
                received[name] += Data.parse(sent.payload).payload
            elif blocks[name]:
                assert send(server, output, ports[name], ack(blocks[name]), port=3000 + i) == []
                blocks[name] = 0
    assert {name: bytes(data) for name, data in received.items()} == contents
    assert server.counters()["tftp.transfers_completed"] == 4
    assert files.open_handles == 0


def test_close_drops_everything(tmp_path: Path) -> None:
    server, output, files = make_server(tmp_path, {"f": CONTENT})
    request(server, output, rrq("f"), port=1)
    request(server, output, rrq("f"), port=2)
    server.close()
    assert files.open_handles == 0
    assert server.next_timer() is None


def test_random_garbage_never_raises(tmp_path: Path) -> None:
    # Seeded, bounded fuzzing of both kinds of port: whatever arrives, the
    # server answers with well-formed packets or not at all.
    import random

    rng = random.Random(1350)
    server, output, files = make_server(tmp_path, {"f": CONTENT})
    [first] = request(server, output, rrq("f"))
    for i in range(3000):
        length = rng.randrange(0, 40)
        junk = bytes([0, rng.randrange(0, 8)]) + rng.randbytes(length)
        if i % 3 == 0:
            junk = rng.randbytes(length)
        target = 69 if i % 2 else first.sport
        if server.accepts(GATEWAY, target):
            server.handle_udp(GUEST, CLIENT_PORT + i % 5, GATEWAY, target, memoryview(junk), i * 0.01)
        server.poll_timers(i * 0.01)
    answers = output.take()
    assert answers  # errors for the junk, and the transfer's own retransmissions
    for sent in answers:
        assert TftpView(sent.payload).opcode in (Opcode.DATA, Opcode.ERROR)
    server.close()
    assert files.open_handles == 0


def test_a_finished_transfer_port_is_not_handed_out_next(tmp_path: Path) -> None:
    server, output, _ = make_server(tmp_path, {"e": b""}, port_range=(50000, 50003))

    def one_transfer(now: float, client_port: int) -> int:
        [sent] = request(server, output, rrq("e"), now=now, port=client_port)
        assert send(server, output, sent.sport, ack(1), now=now, port=client_port) == []
        return sent.sport

    # Round-robin: a port just freed goes to the back of the line.
    assert [one_transfer(float(i), 1000 + i) for i in range(4)] == [50000, 50001, 50002, 50003]
    # All four linger now, so there is nothing to hand out...
    [busy] = request(server, output, rrq("e"), now=4.0, port=2000)
    assert "no free transfer port" in error_of(busy).message
    # ...until the first one's linger ends (it finished at t=0).
    server.poll_timers(LINGER_SECONDS)
    assert one_transfer(LINGER_SECONDS, 2001) == 50000

"""The migration state blob (format checks) and its transfer over vhost-user DEVICE_STATE."""

from __future__ import annotations

import base64
import socket
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.frontend import Frontend
from tests.support.daemon import VhostnetProcess, gateway_mac
from tests.support.frames import GATEWAY_IP, GUEST_IP, GUEST_MAC
from tests.support.migration import check, load_over_pipe, save_over_pipe
from vhostnet.control import control_request
from vhostnet.migration.state import MAGIC, StateError, decode_state, encode_state
from vhostnet.wire.checksum import internet_checksum

SECTIONS = {"guest": {"mac": "52:54:00:12:34:56", "ipv4": "10.0.2.15"}, "udp": [], "counters": {"a": 1}}


# ---- format ------------------------------------------------------------------


def test_blob_round_trips() -> None:
    assert decode_state(encode_state(SECTIONS)) == SECTIONS


@pytest.mark.parametrize("position", [0, 9, 20, -30, -1])
def test_any_flipped_byte_is_refused(position: int) -> None:
    blob = bytearray(encode_state(SECTIONS))
    blob[position] ^= 0x40
    with pytest.raises(StateError):
        decode_state(bytes(blob))


def test_truncated_blob_is_refused_at_every_length() -> None:
    blob = encode_state(SECTIONS)
    for length in range(len(blob)):
        with pytest.raises(StateError):
            decode_state(blob[:length])


def with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def test_foreign_and_future_blobs_are_refused_with_a_reason() -> None:
    with pytest.raises(StateError, match="magic"):
        decode_state(with_crc(struct.pack("<8sHHI", b"QEVMSTAT", 1, 0, 0)))
    with pytest.raises(StateError, match="version 3"):
        decode_state(with_crc(struct.pack("<8sHHI", MAGIC, 3, 0, 0)))
    # Checksum right, but a section length pointing past the end.
    section = b"\x01g" + struct.pack("<I", 100) + b"{}"
    with pytest.raises(StateError, match="past the end"):
        decode_state(with_crc(struct.pack("<8sHHI", MAGIC, 1, 1, len(section)) + section))
    section = b"\x01g" + struct.pack("<I", 2) + b"{x"
    with pytest.raises(StateError, match="JSON"):
        decode_state(with_crc(struct.pack("<8sHHI", MAGIC, 1, 1, len(section)) + section))


# ---- transfer through real vhostnet processes -----------------------------------


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[VhostnetProcess, VhostnetProcess]]:
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    source, destination = VhostnetProcess(tmp_path / "src"), VhostnetProcess(tmp_path / "dst")
    try:
        yield source, destination
    finally:
        for process in (source, destination):
            alive = process.process.poll() is None
            process.stop()
            assert alive, process.log_path.read_text()


def udp_frame(dst_mac: bytes, dport: int, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", 40000, dport, 8 + len(payload), 0) + payload
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0x4000, 64, 17,
                                   0, GUEST_IP, GATEWAY_IP))
    header[10:12] = internet_checksum(header).to_bytes(2, "big")
    return dst_mac + GUEST_MAC + b"\x08\x00" + bytes(header) + udp


def test_state_moves_from_source_to_destination(pair) -> None:
    source, destination = pair
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    try:
        with Frontend(source.socket_path) as frontend:
            frontend.connect()
            frontend.start()
            mac = gateway_mac(frontend)
            frontend.send_frame(udp_frame(mac, port, b"before migration"))
            listener.settimeout(5)
            assert listener.recv(100) == b"before migration"
            frontend.stop()
            blob = save_over_pipe(frontend)
            assert check(frontend) == 0
        sections = decode_state(blob)
        assert sections["guest"] == {"mac": GUEST_MAC.hex(":"), "ipv4": "10.0.2.15",
                                      "ipv6": []}
        assert len(sections["udp"]) == 1

        with Frontend(destination.socket_path) as frontend:
            frontend.connect()
            assert load_over_pipe(frontend, blob) == 0
            stats = destination.stats()
            assert stats["udp.flows"] == 1, "the UDP flow was not re-created"
            assert stats["udp.flows_created"] >= 2, "counters did not carry over"
            frontend.start()
            # The flow's new socket reaches the same host port; no ARP needed:
            # the destination already knows the guest.
            frontend.send_frame(udp_frame(mac, port, b"after migration"))
            assert listener.recv(100) == b"after migration"
    finally:
        listener.close()


def test_corrupt_state_fails_the_check_and_destination_stays_usable(pair) -> None:
    _, destination = pair
    blob = bytearray(encode_state(SECTIONS))
    blob[len(blob) // 2] ^= 0xFF
    with Frontend(destination.socket_path) as frontend:
        frontend.connect()
        assert load_over_pipe(frontend, bytes(blob)) != 0
        frontend.start()
        gateway_mac(frontend)  # the data path still works
    assert "device state from the migration source refused" in destination.log_path.read_text()


def test_control_socket_save_and_load(pair, tmp_path: Path) -> None:
    source, destination = pair
    with Frontend(source.socket_path) as frontend:
        frontend.connect()
        frontend.start()
        gateway_mac(frontend)
    refused = control_request(source.control_path, "release")
    assert not refused["ok"] and "nothing to release" in refused["error"]
    # vhostnet runs as nobody under a filter that lets it create no file (tests/test_sandbox.py):
    # the state travels inline, base64 in the JSON line.
    saved = control_request(source.control_path, "save-state")
    assert saved["ok"] and saved["bytes"] == len(base64.b64decode(saved["state"]))
    assert control_request(source.control_path, "resume") == {"ok": True, "resumed": 0}
    assert control_request(destination.control_path, "load-state", state=saved["state"])["ok"]
    refused = control_request(destination.control_path, "load-state",
                              state=base64.b64encode(b"not a state").decode())
    assert not refused["ok"] and "state refused" in refused["error"]
    refused = control_request(source.control_path, "save-state", file=str(tmp_path / "state"))
    assert not refused["ok"] and not (tmp_path / "state").exists()
    assert destination.process.poll() is None

"""The real vhostnet process, driven by the project's front-end (QEMU's role, no VM).

These tests start ``python -m vhostnet`` as QEMU would find it and talk to it
over its socket: negotiation, the data path through the Cython rings and the
stack, ring stop/restart positions, a second front-end refused, garbage on
the socket, and the command line's one-sentence errors.
"""

from __future__ import annotations

import os
import select
import socket
import struct
from pathlib import Path

import pytest

from testkit.frontend import Frontend
from tests.support.daemon import VhostnetProcess, echo_request, gateway_mac, run_cli
from vhostnet.vhost_user.codec import U64, Message
from vhostnet.vhost_user.protocol import ProtocolFeature, Request, VirtioFeature


def test_negotiation_offers_what_the_foundation_promises(server: VhostnetProcess) -> None:
    with Frontend(server.socket_path) as frontend:
        frontend.connect()
        offered = frontend.offered_features
        for bit in (VirtioFeature.VERSION_1, VirtioFeature.NET_F_MRG_RXBUF,
                    VirtioFeature.RING_F_EVENT_IDX, VirtioFeature.RING_F_INDIRECT_DESC,
                    VirtioFeature.F_PROTOCOL_FEATURES):
            assert offered & bit, hex(bit)
        for bit in (ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK,
                    ProtocolFeature.CONFIGURE_MEM_SLOTS, ProtocolFeature.RESET_DEVICE):
            assert frontend.protocol_features & bit, bit
        assert not frontend.protocol_features & (ProtocolFeature.INBAND_NOTIFICATIONS
                                                 | ProtocolFeature.XEN_MMAP)


def test_frames_cross_the_rings_and_the_stack(server: VhostnetProcess) -> None:
    with Frontend(server.socket_path) as frontend:
        frontend.connect()
        frontend.start()
        mac = gateway_mac(frontend)
        # Large echoes exercise merged RX buffers; many exercise ring wrap-around.
        sizes = [8, 1000, 1472] * 100
        answered = 0
        for seq, size in enumerate(sizes, start=1):
            payload = bytes((seq + i) & 0xFF for i in range(size))
            frontend.send_frame(echo_request(mac, payload, seq))
            replies = frontend.receive_frames(timeout=5)
            assert len(replies) == 1
            reply = replies[0]
            assert reply[23] == 1 and reply[34] == 0  # ICMP, echo reply
            assert reply[42:] == payload
            answered += 1
        assert answered == len(sizes)
        stats = server.stats()
        assert stats["device.tx.frames"] == len(sizes) + 1
        assert stats["device.rx.frames"] == len(sizes) + 1
        bases = frontend.stop()
        # Every frame was completed: the ring positions are exactly what was sent.
        assert bases[1] == (len(sizes) + 1) & 0xFFFF


def test_rings_resume_from_returned_bases_after_reconnect(server: VhostnetProcess) -> None:
    with Frontend(server.socket_path) as frontend:
        frontend.connect()
        frontend.start()
        gateway_mac(frontend)
        bases = frontend.stop()
        # A stopped ring's counts stay: a guest that just powered off still shows its traffic.
        stopped = server.stats()
        assert stopped["vq1.tx_frames"] == 1 and stopped["vq0.rx_frames"] == 1
        assert not any(".at." in name for name in stopped), "positions are for running rings only"
    assert bases == [1, 1] or bases[1] == 1
    with Frontend(server.socket_path) as frontend:
        frontend.connect()
        frontend.start(bases=(bases[0], bases[1]))
        mac = gateway_mac(frontend)
        frontend.send_frame(echo_request(mac, b"again", 7))
        assert frontend.receive_frames(timeout=5)[0][42:] == b"again"
        running = server.stats()
        assert running["vq1.tx_frames"] == 3 and running["device.tx.frames"] == 3
        assert running["vq1.at.last_avail"] == bases[1] + 2
        assert frontend.stop()[1] == bases[1] + 2
    # Both connections are closed: the counts are since vhostnet started.
    closed = server.stats()
    assert closed["vq1.tx_frames"] == 3 and closed["vq0.rx_frames"] == 3
    assert closed["device.tx.frames"] == 3 and closed["device.rx.frames"] == 3


def test_frames_queued_before_the_kick_fd_go_out_without_a_kick(server: VhostnetProcess) -> None:
    """After a migration the guest's last TX kick went to the source's back-end; with
    EVENT_IDX it will not kick again for the frames already queued."""
    with Frontend(server.socket_path) as frontend:
        frontend.connect()
        frontend.start()
        mac = gateway_mac(frontend)
        bases = frontend.stop()
    with Frontend(server.socket_path) as frontend:
        frontend.connect()
        frontend.start(bases=(bases[0], bases[1]),
                       unkicked_tx=(echo_request(mac, b"queued before the kick fd", 3),))
        replies = frontend.receive_frames(timeout=5)
        assert replies and replies[0][42:] == b"queued before the kick fd"


def test_call_fd_replaced_on_a_running_ring_gets_one_interrupt(server: VhostnetProcess) -> None:
    """QEMU swaps its masked notifier for the guest's while starting; a ring may already run."""
    with Frontend(server.socket_path) as frontend:
        frontend.connect()
        frontend.start()
        gateway_mac(frontend)  # both rings run now
        fresh = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            frontend.request(Request.SET_VRING_CALL, U64(0).emit(), [fresh])
            ready, _, _ = select.select([fresh], [], [], 5)
            assert ready, "no interrupt on the new call fd"
            assert os.eventfd_read(fresh) == 1
        finally:
            os.close(fresh)


def test_second_front_end_is_refused_and_first_keeps_working(server: VhostnetProcess) -> None:
    with Frontend(server.socket_path) as first:
        first.connect()
        first.start()
        mac = gateway_mac(first)
        second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        second.settimeout(5)
        second.connect(server.socket_path)
        try:
            # vhostnet may already have closed it: then the write fails instead.
            second.sendall(struct.pack("<III", Request.GET_FEATURES, 1, 0))
            answer = second.recv(64)
        except (BrokenPipeError, ConnectionResetError):
            answer = b""
        assert answer == b"", "a second front-end must be disconnected, not answered"
        second.close()
        first.send_frame(echo_request(mac, b"still here", 1))
        assert first.receive_frames(timeout=5)[0][42:] == b"still here"
    assert "refusing a second front-end" in server.log_path.read_text()


def test_garbage_on_the_socket_closes_only_that_connection(server: VhostnetProcess) -> None:
    bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bad.settimeout(5)
    bad.connect(server.socket_path)
    # Version 3 and a 1 GiB payload: framing is lost, the connection must go.
    bad.sendall(struct.pack("<III", 1, 3, 1 << 30))
    assert bad.recv(64) == b""
    bad.close()
    with Frontend(server.socket_path) as frontend:
        frontend.connect()
        # An unknown request with NEED_REPLY gets a failure, not a hang or a crash.
        frontend.send(Message(200, 1 | 0x8, b"", []))
        answer = frontend.recv()
        assert answer.flags == 0x5 and U64.parse(answer.payload).value != 0
        frontend.start()
        gateway_mac(frontend)



@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--socket", "/nonexistent-dir/x.sock"), "does not exist"),
        (("--socket", "/tmp/x.sock", "--mtu", "99"), "MTU 99"),
        (("--socket", "/tmp/x.sock", "-t", "99999"), "out of range"),
        (("--socket", "/tmp/x.sock", "--address", "10.0.2.999"), "not an IPv4 or IPv6 address"),
        (("--socket", "/tmp/x.sock", "--bootfile", "pxelinux.0"), "needs --tftp"),
        (("--socket", "/tmp/x.sock", "--dns-upstream", "nonsense:53"), "DNS upstream"),
        (("--socket", "/tmp/x.sock", "--map-host-loopback", "10.0.2.15"), "loopback address must differ"),
        (("--socket", "/tmp/x.sock", "--lease-time", "5"), "--lease-time 5"),
    ],
)
def test_command_line_mistakes_get_one_sentence(args: tuple[str, ...], message: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_socket_in_use_and_non_socket_paths_are_refused(server: VhostnetProcess, tmp_path: Path) -> None:
    result = run_cli("--socket", server.socket_path)
    assert result.returncode == 2 and "already in use" in result.stderr
    plain = tmp_path / "plain-file"
    plain.write_text("keep me")
    result = run_cli("--socket", str(plain))
    assert result.returncode == 2 and "not a socket" in result.stderr
    assert plain.read_text() == "keep me"

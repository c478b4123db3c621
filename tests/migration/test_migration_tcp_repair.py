"""TCP_REPAIR on real loopback connections: freeze, dump, silent close, restore, continue.

Runs inside the private network namespace (``make test``); needs TCP_REPAIR,
i.e. CAP_NET_ADMIN in that namespace (root, or the namespace's mapped root).
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.support.daemon import REPO as REPO_ROOT
from tests.support.tcp_repair import (
    IO_SECONDS,
    TCP_STATE_ESTABLISHED,
    assert_same_stream,
    connected_pair,
    freeze,
    not_yet_sent_bytes,
    open_pair,
    recv_exactly,
    send_what_fits,
    settled_unacked_bytes,
    tcp_state,
    thaw,
    unacked_bytes,
)
from vhostnet.migration import tcp_repair
from vhostnet.migration.tcp_freeze import (
    IP_MINTTL,
    SO_BUF_LOCK,
    attach_drop_filter,
    close_receive_window,
    dump_frozen,
    has_drop_filter,
    read_window,
    shut_out_peer,
    unfreeze_sockets,
)
from vhostnet.migration.tcp_repair import (
    REPAIR_OFF,
    REPAIR_ON,
    SocketDump,
    dump_socket,
    new_restore_socket,
    restore_in_repair,
    send_unsent,
    set_repair_direct,
)


def test_connection_moves_to_a_new_socket_with_data_in_flight_both_ways() -> None:
    rng = random.Random(7)
    to_peer = rng.randbytes(3 * 1024 * 1024)
    to_us = rng.randbytes(12 * 1024 * 1024)
    with connected_pair(peer_rcvbuf=4096) as (listener, peer, ours):
        # Both ways more than the other side takes: our receive queue fills up
        # unread, our send queue holds unacknowledged and never-sent bytes.
        from_peer = send_what_fits(peer, to_us)
        sent = send_what_fits(ours, to_peer)
        assert sent < len(to_peer) and from_peer < len(to_us)
        time.sleep(0.2)

        freeze(ours)
        # Sent while frozen: must stay unacknowledged in the peer, not vanish in our kernel.
        in_peer_before = settled_unacked_bytes(peer)
        extra = send_what_fits(peer, to_us[from_peer:from_peer + 10_000])
        time.sleep(0.2)
        assert unacked_bytes(peer) == in_peer_before + extra
        dump = dump_socket(ours)
        queued_in_us = from_peer - in_peer_before
        assert len(dump.recv_queue) == queued_in_us > 0
        assert dump.recv_queue == to_us[:queued_in_us]
        assert 0 < len(dump.send_queue) and dump.send_queue == to_peer[sent - len(dump.send_queue):sent]
        record = dump.to_record()
        assert SocketDump.from_record(record) == dump
        local = ours.getsockname()
        # As the product does between release and restore: a catcher on the local
        # address swallows the peer's retransmissions of what it sent while we were
        # frozen. Without it a retransmission that comes after the close (the peer's
        # timer runs on a loaded machine too) meets no socket and is answered with RST.
        catcher = socket.socket()
        attach_drop_filter(catcher)
        set_repair_direct(catcher, REPAIR_ON)
        catcher.bind(local)
        catcher.listen(1)
        ours.close()  # in repair mode: nothing goes out
        time.sleep(0.1)
        assert tcp_state(peer) == TCP_STATE_ESTABLISHED, "the peer saw FIN or RST"

        restored = new_restore_socket()
        set_repair_direct(restored, REPAIR_ON)
        restore_in_repair(restored, dump, wait_for_tuple=1.0)
        catcher.close()
        set_repair_direct(restored, REPAIR_OFF)
        send_unsent(restored, dump)
        assert restored.getsockname() == local
        # The never-sent tail waits for the peer's window, not for a retransmission
        # timeout: the kernel counts it as not sent (it would count as in flight if it
        # had gone back in repair mode). The peer reads nothing yet, so its window is
        # closed and the tail stays where it is.
        assert dump.unsent > 0 and not_yet_sent_bytes(restored) == dump.unsent
        restored.settimeout(IO_SECONDS)

        # Both byte streams continue exactly where they were.
        writers = [threading.Thread(target=restored.sendall, args=(to_peer[sent:],), daemon=True),
                   threading.Thread(target=peer.sendall, args=(to_us[from_peer + extra:],),
                                    daemon=True)]
        for writer in writers:
            writer.start()
        received_by_us: list[bytes] = []
        reader = threading.Thread(target=lambda: received_by_us.append(
            recv_exactly(restored, len(to_us))), daemon=True)
        reader.start()
        assert_same_stream(recv_exactly(peer, len(to_peer)), to_peer, "the peer")
        reader.join(IO_SECONDS)
        for writer in writers:
            writer.join(IO_SECONDS)
        assert len(received_by_us) == 1
        assert_same_stream(received_by_us[0], to_us, "the restored socket")
        assert tcp_state(peer) == TCP_STATE_ESTABLISHED
        restored.close()


def test_thawed_socket_carries_on_as_before() -> None:
    with connected_pair() as (listener, peer, ours):
        peer.sendall(b"before")
        time.sleep(0.1)
        freeze(ours)
        peer.sendall(b" during")
        dump_socket(ours)
        thaw(ours)
        # The segment dropped while frozen comes again with the peer's retransmission.
        assert recv_exactly(ours, len(b"before during")) == b"before during"
        ours.sendall(b"reply")
        assert recv_exactly(peer, 5) == b"reply"


def test_restore_waits_for_the_tuple_then_gives_up() -> None:
    with connected_pair() as (listener, peer, ours):
        freeze(ours)
        dump = dump_socket(ours)
        clone = new_restore_socket()
        set_repair_direct(clone, REPAIR_ON)
        started = time.monotonic()
        with pytest.raises(tcp_repair.RepairError, match="connecting"):
            restore_in_repair(clone, dump, wait_for_tuple=0.2)  # the original still holds it
        assert time.monotonic() - started >= 0.2
        clone.close()


@pytest.mark.parametrize("change", [
    {"send_seq": -1}, {"send_seq": 1 << 32}, {"unsent": 10**9}, {"mss": 0},
    {"snd_wscale": 15}, {"local": ["10.0.2.2", 0]}, {"peer": ["not an address", 1]},
    {"recv_queue": "%%%"}, {"window": [1, 2, 3]}, {"timestamp": "1"}, {"options": True},
])
def test_bad_socket_records_are_refused(change: dict) -> None:
    good = SocketDump(("127.0.0.1", 1000), ("127.0.0.1", 2000), 5, 6, b"abc", 1, b"de", 1460,
                      7, 7, 7, 0, (1, 2, 3, 4, 5)).to_record()
    assert SocketDump.from_record(good).send_queue == b"abc"
    with pytest.raises((ValueError, KeyError, TypeError)):
        SocketDump.from_record({**good, **change})
    missing = dict(good)
    del missing["recv_seq"]
    with pytest.raises(KeyError):
        SocketDump.from_record(missing)


def test_repair_probe_tells_whether_the_capability_is_there() -> None:
    # make test runs as (namespace) root: CAP_NET_ADMIN, so TCP_REPAIR works here ...
    assert tcp_repair.can_repair_directly()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        reason = "setpriv (util-linux) is needed to probe without CAP_NET_ADMIN"
        print(reason)
        pytest.skip(reason)
    # ... and not in a process that lost it.
    probe = subprocess.run(
        [setpriv, "--bounding-set=-net_admin", "--inh-caps=-net_admin", "--", sys.executable,
         "-c", "from vhostnet.migration.tcp_repair import can_repair_directly as c; print(c())"],
        capture_output=True, text=True, timeout=60, check=True, cwd=REPO_ROOT)
    assert probe.stdout.strip() == "False"


def shut_out_by_ttl(sock: socket.socket) -> None:
    """A catcher as vhostnet makes one where no filter can be attached."""
    set_repair_direct(sock, REPAIR_ON)
    shut_out_peer(sock)


@pytest.mark.parametrize("by_filter", [True, False], ids=["filter", "minimum TTL"])
def test_a_catcher_swallows_retransmissions_between_release_and_restore(by_filter: bool) -> None:
    """Without a socket for its 4-tuple, the peer's retransmission would be answered with RST."""
    data = random.Random(3).randbytes(6 * 1024 * 1024)
    listener, peer, ours = sockets = open_pair()
    errors: list[OSError] = []

    def paced_sender() -> None:
        try:
            for offset in range(0, len(data), 65536):
                peer.sendall(data[offset:offset + 65536])
                time.sleep(0.01)
            peer.shutdown(socket.SHUT_WR)
        except OSError as error:
            errors.append(error)

    sender = threading.Thread(target=paced_sender, daemon=True)
    sender.start()
    try:
        received = bytearray(recv_exactly(ours, 1024 * 1024))
        if by_filter:
            freeze(ours)
        else:
            freeze_without_filter(ours)
        dump = dump_frozen(ours)
        catcher = socket.socket()
        (freeze if by_filter else shut_out_by_ttl)(catcher)  # repair mode binds a used address
        catcher.bind(dump.local)
        catcher.listen(1)
        ours.close()
        time.sleep(1.0)  # the peer keeps sending and retransmitting meanwhile
        restored = new_restore_socket()
        (freeze if by_filter else shut_out_by_ttl)(restored)
        restore_in_repair(restored, dump, wait_for_tuple=1.0)
        unfreeze_sockets([restored])
        set_repair_direct(restored, REPAIR_OFF)
        send_unsent(restored, dump)
        catcher.close()
        restored.settimeout(IO_SECONDS)
        received += recv_exactly(restored, len(data) - len(received))
        sender.join(IO_SECONDS)
        assert not errors, f"the peer saw {errors}"
        assert_same_stream(bytes(received), data, "the restored socket")
        restored.close()
    finally:
        for sock in sockets:
            sock.close()


# ---- the freeze without a socket filter (passt-repair where filters need CAP_NET_ADMIN) --


def freeze_without_filter(sock: socket.socket) -> None:
    """What vhostnet does where it may not attach a filter and the helper does not
    (passt-repair): repair mode (the helper's step; here our own, as root), then the
    closed receive window, which needs no capability."""
    set_repair_direct(sock, REPAIR_ON)
    close_receive_window(sock)
    assert not has_drop_filter(sock)


def rcv_nxt(sock: socket.socket) -> int:
    sock.setsockopt(socket.IPPROTO_TCP, tcp_repair.TCP_REPAIR_QUEUE, tcp_repair.TCP_RECV_QUEUE)
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, tcp_repair.TCP_QUEUE_SEQ) & 0xFFFFFFFF
    finally:
        sock.setsockopt(socket.IPPROTO_TCP, tcp_repair.TCP_REPAIR_QUEUE, tcp_repair.TCP_NO_QUEUE)


def test_a_socket_frozen_without_a_filter_takes_no_byte_and_moves_intact() -> None:
    """Our queue is empty at the freeze: there the kernel always offers some window, so
    the zero window and minimal buffer let 2 KB in; the minimum TTL must hold."""
    rng = random.Random(11)
    to_peer = rng.randbytes(2 * 1024 * 1024)
    to_us = rng.randbytes(6 * 1024 * 1024)
    greeting = 1000
    with connected_pair() as (listener, peer, ours):
        peer.sendall(to_us[:greeting])
        assert recv_exactly(ours, greeting) == to_us[:greeting]  # our queue is empty now
        ours.sendall(to_peer[:greeting])
        assert recv_exactly(peer, greeting) == to_peer[:greeting]

        freeze_without_filter(ours)
        dump = dump_frozen(ours)
        frozen_at = rcv_nxt(ours)
        assert dump.recv_seq == frozen_at and not dump.recv_queue
        assert dump.window[3] > 0, "the dump must keep the window from before the freeze"
        # The peer keeps sending for 2 s: every byte must stay unacknowledged in the peer.
        pushed = greeting
        deadline = time.monotonic() + 2.0
        for _ in range(200):
            if time.monotonic() >= deadline:
                break
            pushed += send_what_fits(peer, to_us[pushed:pushed + 256 * 1024])
            time.sleep(0.01)
        assert pushed - greeting > 64 * 1024, "the peer could not even fill its own buffer"
        moved = (rcv_nxt(ours) - frozen_at) % (1 << 32)
        assert moved == 0, f"the frozen socket took {moved} bytes from the peer"
        assert unacked_bytes(peer) == pushed - greeting

        # Released (closed in repair mode: nothing goes out) and restored at once: no
        # catcher without a filter, so this must stay within the peer's retransmission
        # timeout, as in the product.
        restored = new_restore_socket()
        set_repair_direct(restored, REPAIR_ON)
        ours.close()
        restore_in_repair(restored, dump, wait_for_tuple=1.0)
        set_repair_direct(restored, REPAIR_OFF)
        send_unsent(restored, dump)
        restored.settimeout(IO_SECONDS)

        writers = [threading.Thread(target=restored.sendall, args=(to_peer[greeting:],), daemon=True),
                   threading.Thread(target=peer.sendall, args=(to_us[pushed:],), daemon=True)]
        for writer in writers:
            writer.start()
        received_by_us: list[bytes] = []
        reader = threading.Thread(target=lambda: received_by_us.append(
            recv_exactly(restored, len(to_us) - greeting)), daemon=True)
        reader.start()
        assert_same_stream(recv_exactly(peer, len(to_peer) - greeting), to_peer[greeting:],
                           "the peer")
        reader.join(IO_SECONDS)
        for writer in writers:
            writer.join(IO_SECONDS)
        assert len(received_by_us) == 1
        assert_same_stream(received_by_us[0], to_us[greeting:], "the restored socket")
        assert tcp_state(peer) == TCP_STATE_ESTABLISHED
        restored.close()


def test_the_closed_window_holds_against_a_peer_that_sends_with_ttl_255() -> None:
    """Such a peer passes the minimum TTL: the zero window and the minimal buffer must
    hold on their own, for a non-empty queue (see tcp_freeze). Without both, 28 KB got
    in here; on loopback either one alone holds (the tiny buffer drops for lack of
    memory, the zero window stays shut for a 64 KB MSS), so this proves the pair."""
    with connected_pair() as (listener, peer, ours):
        peer.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 255)
        peer.sendall(b"q" * 100_000)  # left unread: the queue is not empty
        time.sleep(0.2)
        freeze_without_filter(ours)
        frozen_at = rcv_nxt(ours)
        pushed = 0
        deadline = time.monotonic() + 2.0
        for _ in range(200):
            if time.monotonic() >= deadline:
                break
            pushed += send_what_fits(peer, b"r" * 256 * 1024)
            time.sleep(0.01)
        moved = (rcv_nxt(ours) - frozen_at) % (1 << 32)
        assert moved == 0, f"the frozen socket took {moved} of {pushed} bytes from the peer"


def test_a_thawed_socket_gets_its_receive_window_and_buffer_back() -> None:
    with connected_pair() as (listener, peer, ours):
        peer.sendall(b"w" * 300_000)  # some traffic, so the buffer has autotuned a bit
        assert recv_exactly(ours, 300_000) == b"w" * 300_000
        set_repair_direct(ours, REPAIR_ON)
        window = read_window(ours)
        rcvbuf = ours.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        locks = ours.getsockopt(socket.SOL_SOCKET, SO_BUF_LOCK)
        close_receive_window(ours)
        assert read_window(ours)[3] == 0
        assert ours.getsockopt(socket.IPPROTO_IP, IP_MINTTL) == 255
        assert ours.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < min(rcvbuf, 4096)
        peer.sendall(b"during the freeze")
        time.sleep(0.2)
        unfreeze_sockets([ours])
        assert read_window(ours)[3:] == window[3:]
        # The kernel keeps buffer sizes even: an odd autotuned one comes back a byte larger.
        assert ours.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) in (rcvbuf, rcvbuf + 1)
        assert ours.getsockopt(socket.SOL_SOCKET, SO_BUF_LOCK) == locks  # autotuning back
        assert ours.getsockopt(socket.IPPROTO_IP, IP_MINTTL) == 0
        set_repair_direct(ours, REPAIR_OFF)
        # Dropped at the zero window, the bytes come back with the peer's retransmission.
        assert recv_exactly(ours, 17) == b"during the freeze"
        bulk = random.Random(5).randbytes(4 * 1024 * 1024)
        writer = threading.Thread(target=peer.sendall, args=(bulk,), daemon=True)
        writer.start()
        assert_same_stream(recv_exactly(ours, len(bulk)), bulk, "the thawed socket")
        writer.join(IO_SECONDS)

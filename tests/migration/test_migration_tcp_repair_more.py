"""TCP_REPAIR of an IPv6 socket and of half-closed sockets, on real loopback connections.

The same steps as the product (``tcp_repair``): freeze, dump, silent close with a
catcher in place, restore on a new socket, continue. Needs CAP_NET_ADMIN in the
private namespace, like ``test_migration_tcp_repair``.
"""

from __future__ import annotations

import socket
import time

from tests.support.tcp_repair import (
    IO_SECONDS,
    TCP_STATE_ESTABLISHED,
    connected_pair,
    freeze,
    recv_exactly,
    tcp_state,
)
from vhostnet.migration.tcp_freeze import attach_drop_filter, shut_out_peer
from vhostnet.migration.tcp_repair import (
    REPAIR_OFF,
    REPAIR_ON,
    TCP_CLOSE_WAIT,
    TCP_FIN_WAIT1,
    TCP_FIN_WAIT2,
    SocketDump,
    dump_socket,
    new_restore_socket,
    restore_in_repair,
    send_unsent,
    set_repair_direct,
)

TCP_STATE_TIME_WAIT = 6


def move(ours: socket.socket) -> tuple[socket.socket, SocketDump]:
    """Freeze ``ours``, dump it, close it silently behind a catcher, restore it elsewhere."""
    freeze(ours)
    dump = SocketDump.from_record(dump_socket(ours).to_record())
    local = ours.getsockname()[:2]
    catcher = socket.socket(ours.family)
    attach_drop_filter(catcher)
    set_repair_direct(catcher, REPAIR_ON)
    catcher.bind(local)
    catcher.listen(1)
    ours.close()  # repair mode: neither FIN nor RST
    restored = new_restore_socket(dump.family)
    set_repair_direct(restored, REPAIR_ON)
    restore_in_repair(restored, dump, wait_for_tuple=1.0)
    catcher.close()
    set_repair_direct(restored, REPAIR_OFF)
    send_unsent(restored, dump)
    restored.settimeout(IO_SECONDS)
    assert restored.getsockname()[:2] == local
    return restored, dump


def wait_for_state(sock: socket.socket, states: set[int]) -> int:
    for _ in range(200):
        state = tcp_state(sock)
        if state in states:
            return state
        time.sleep(0.02)
    return tcp_state(sock)


def test_an_ipv6_connection_moves_with_data_both_ways() -> None:
    with connected_pair(host="::1") as (listener, peer, ours):
        peer.sendall(b"queued for us " * 1000)
        ours.sendall(b"to the peer")
        time.sleep(0.1)
        shut_out_peer(ours)  # the IPv6 freeze sets the minimum hop count too
        restored, dump = move(ours)
        assert dump.family == socket.AF_INET6 and dump.local[0] == "::1"
        assert recv_exactly(restored, 14000) == b"queued for us " * 1000
        assert recv_exactly(peer, 11) == b"to the peer"
        restored.sendall(b"after")
        peer.sendall(b"more")
        assert recv_exactly(peer, 5) == b"after" and recv_exactly(restored, 4) == b"more"
        assert tcp_state(peer) == TCP_STATE_ESTABLISHED
        restored.close()


def test_a_socket_that_sent_its_fin_moves_and_still_receives() -> None:
    with connected_pair(host="::1") as (listener, peer, ours):
        ours.sendall(b"last words")
        ours.shutdown(socket.SHUT_WR)
        assert recv_exactly(peer, 10) == b"last words" and peer.recv(1) == b""  # EOF seen
        assert wait_for_state(ours, {TCP_FIN_WAIT2}) == TCP_FIN_WAIT2
        restored, dump = move(ours)
        assert dump.fin_sent and not dump.fin_received and not dump.send_queue
        # Our FIN is in flight again: the peer acknowledges the duplicate.
        assert wait_for_state(restored, {TCP_FIN_WAIT2}) == TCP_FIN_WAIT2
        peer.sendall(b"still coming")
        assert recv_exactly(restored, 12) == b"still coming"
        peer.close()
        assert restored.recv(1) == b""  # the peer's FIN ends it cleanly
        restored.close()


def test_a_socket_with_unacknowledged_data_and_fin_moves() -> None:
    with connected_pair() as (listener, peer, ours):
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        freeze(ours)  # nothing the peer acknowledges reaches us: data and FIN stay in flight
        set_repair_direct(ours, REPAIR_OFF)
        ours.sendall(b"x" * 3000)
        ours.shutdown(socket.SHUT_WR)
        assert tcp_state(ours) == TCP_FIN_WAIT1
        restored, dump = move(ours)
        assert dump.fin_sent and dump.send_queue == b"x" * 3000
        assert recv_exactly(peer, 3000) == b"x" * 3000 and peer.recv(1) == b""
        peer.sendall(b"reply")
        assert recv_exactly(restored, 5) == b"reply"
        restored.close()


def test_a_socket_that_received_the_peers_fin_moves_and_still_sends() -> None:
    with connected_pair() as (listener, peer, ours):
        peer.sendall(b"bye")
        peer.shutdown(socket.SHUT_WR)
        assert wait_for_state(ours, {TCP_CLOSE_WAIT}) == TCP_CLOSE_WAIT
        restored, dump = move(ours)
        assert dump.fin_received and not dump.fin_sent
        assert recv_exactly(restored, 3) == b"bye"  # the unread bytes came along
        restored.sendall(b"answer after the move")
        assert recv_exactly(peer, 21) == b"answer after the move"
        restored.shutdown(socket.SHUT_WR)
        assert peer.recv(1) == b""  # our FIN reaches the peer: it ends as it would have
        restored.close()

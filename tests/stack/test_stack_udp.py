"""UDP NAT core: flow create / reuse / expire, limits, inbound forwards, port unreachable."""

from __future__ import annotations

import errno

from tests.support.frames import GATEWAY_IP, GUEST_IP, checksum, guest_udp_frame, parse_udp_frame
from tests.support.stack import next_timer, poll_timers
from vhostnet.network import build_stack
from vhostnet.stack.config import PortForward, StackConfig
from vhostnet.stack.stack import NetworkStack
from vhostnet.stack.udp_nat import UdpBindPeer, UdpClose, UdpOpen, UdpSend

REMOTE = bytes([192, 0, 2, 10])


def make_stack(**kwargs) -> NetworkStack:
    return build_stack(StackConfig(udp_idle_timeout=30.0, **kwargs))


def test_flow_created_then_reused_then_expired() -> None:
    stack = make_stack()
    nat = stack.udp_nat
    stack.receive_frame(guest_udp_frame(4000, REMOTE, 9, b"one"), now=0.0)
    stack.receive_frame(guest_udp_frame(4000, REMOTE, 9, b"two"), now=10.0)
    assert list(nat.commands) == [UdpOpen(1, "192.0.2.10", 9), UdpSend(1, b"one"), UdpSend(1, b"two")]
    nat.commands.clear()
    assert stack.counters()["udp.flows"] == 1
    assert next_timer(stack) == 40.0
    poll_timers(stack, 39.9)
    assert nat.flow_count() == 1
    poll_timers(stack, 40.0)
    assert list(nat.commands) == [UdpClose(1)]
    assert stack.counters()["udp.flows"] == 0
    assert next_timer(stack) is None
    nat.commands.clear()
    stack.receive_frame(guest_udp_frame(4000, REMOTE, 9, b"three"), now=50.0)
    assert nat.commands[0] == UdpOpen(2, "192.0.2.10", 9)


def test_activity_stamped_elsewhere_defers_expiry_and_counts_in_exports() -> None:
    """The fast path's kernel stamps its flows' datagrams (``seen_elsewhere``): expiry and
    migration go by the later of that stamp and the flows' own activity."""
    stack = make_stack()
    nat = stack.udp_nat
    seen = {}
    nat.seen_elsewhere = lambda flow_id: seen.get(flow_id, -1.0)
    stack.receive_frame(guest_udp_frame(4000, REMOTE, 9, b"one"), now=0.0)   # flow 1
    stack.receive_frame(guest_udp_frame(4001, REMOTE, 9, b"two"), now=5.0)   # flow 2
    seen[1] = 20.0  # flow 1 active on the fast path at 20 (flow 2's 5 is now the oldest)
    assert nat.export_flows(25.0)[0]["idle"] == 5.0
    poll_timers(stack, 35.0)  # flow 2 expires; flow 1 is alive till 50
    assert nat.flow_count() == 1 and nat.flow(1) is not None
    assert next_timer(stack) == 50.0
    poll_timers(stack, 49.9)
    assert nat.flow_count() == 1
    poll_timers(stack, 50.0)
    assert nat.flow_count() == 0
    assert stack.counters()["udp.flows_expired"] == 2


def test_different_ports_are_different_flows() -> None:
    stack = make_stack()
    stack.receive_frame(guest_udp_frame(4000, REMOTE, 9, b"a"), now=0.0)
    stack.receive_frame(guest_udp_frame(4001, REMOTE, 9, b"b"), now=0.0)
    stack.receive_frame(guest_udp_frame(4000, GATEWAY_IP, 9, b"c"), now=0.0)
    opens = [c for c in stack.udp_nat.commands if isinstance(c, UdpOpen)]
    assert opens == [UdpOpen(1, "192.0.2.10", 9), UdpOpen(2, "192.0.2.10", 9), UdpOpen(3, "127.0.0.1", 9)]


def test_reply_comes_back_from_original_destination() -> None:
    stack = make_stack()
    stack.receive_frame(guest_udp_frame(4000, GATEWAY_IP, 7, b"ping"), now=0.0)
    stack.udp_nat.on_host_datagram(1, b"pong", now=1.0)
    (frame,) = stack.frames_to_guest
    assert parse_udp_frame(frame) == (GATEWAY_IP, 7, GUEST_IP, 4000, b"pong")


def test_unroutable_destinations_dropped() -> None:
    stack = make_stack(map_host_loopback=None)
    stack.receive_frame(guest_udp_frame(4000, GATEWAY_IP, 7, b"x"), now=0.0)
    stack.receive_frame(guest_udp_frame(4000, bytes([10, 0, 2, 255]), 7, b"x"), now=0.0)
    assert not stack.udp_nat.commands
    assert stack.counters()["udp.drop.no_route"] == 2


def test_flow_limit() -> None:
    stack = make_stack(flow_limit=2)
    for port in (1, 2, 3):
        stack.receive_frame(guest_udp_frame(4000 + port, REMOTE, 9, b"x"), now=0.0)
    assert stack.counters()["udp.drop.flow_limit"] == 1
    assert stack.udp_nat.flow_count() == 2


def test_connection_refused_becomes_port_unreachable() -> None:
    stack = make_stack()
    frame = guest_udp_frame(4000, REMOTE, 9, b"0123456789")
    stack.receive_frame(frame, now=0.0)
    stack.udp_nat.on_host_error(1, errno.ECONNREFUSED, now=0.1)
    (reply,) = stack.frames_to_guest
    ip = reply[14:]
    assert checksum(ip[:20]) == 0
    assert (ip[9], ip[12:16], ip[16:20]) == (1, REMOTE, GUEST_IP)
    message = ip[20:]
    assert message[:2] == b"\x03\x03" and checksum(message) == 0
    original_ip = frame[14:]
    assert message[8:] == original_ip[:20] + original_ip[20:28]


def test_other_errors_only_counted() -> None:
    stack = make_stack()
    stack.receive_frame(guest_udp_frame(4000, REMOTE, 9, b"x"), now=0.0)
    stack.udp_nat.on_host_error(1, errno.ENETUNREACH, now=0.1)
    assert not stack.frames_to_guest
    assert stack.counters()["udp.host_error"] == 1


def test_inbound_forward_from_loopback_appears_from_gateway() -> None:
    forward = PortForward("127.0.0.1", 5555, 5000)
    stack = make_stack(udp_forwards=[forward])
    stack.receive_frame(guest_udp_frame(68, GATEWAY_IP, 9999, b""), now=0.0)  # learn the guest
    stack.frames_to_guest.clear()
    stack.udp_nat.commands.clear()
    stack.udp_nat.on_forward_datagram(forward, "127.0.0.1", 40000, b"hello", now=1.0)
    (frame,) = stack.frames_to_guest
    assert parse_udp_frame(frame) == (GATEWAY_IP, 40000, GUEST_IP, 5000, b"hello")
    assert list(stack.udp_nat.commands) == [UdpBindPeer(2, forward, "127.0.0.1", 40000)]
    stack.udp_nat.commands.clear()
    # The guest's reply uses the same flow, back to the peer.
    stack.receive_frame(guest_udp_frame(5000, GATEWAY_IP, 40000, b"reply"), now=2.0)
    assert list(stack.udp_nat.commands) == [UdpSend(2, b"reply")]


def test_inbound_forward_from_other_host_keeps_its_address() -> None:
    forward = PortForward("0.0.0.0", 5555, 5000)
    stack = make_stack(udp_forwards=[forward])
    stack.receive_frame(guest_udp_frame(68, GATEWAY_IP, 9999, b""), now=0.0)
    stack.frames_to_guest.clear()
    stack.udp_nat.on_forward_datagram(forward, "192.0.2.44", 1234, b"hi", now=1.0)
    stack.udp_nat.on_forward_datagram(forward, "2001:db8::1", 1234, b"hi", now=1.0)
    (frame,) = stack.frames_to_guest
    assert parse_udp_frame(frame)[:2] == (bytes([192, 0, 2, 44]), 1234)
    assert stack.counters()["udp6.drop.no_guest_address"] == 1


def test_udp_disabled_keeps_services() -> None:
    stack = make_stack(udp=False)
    assert stack.udp_nat is None
    stack.receive_frame(guest_udp_frame(4000, REMOTE, 9, b"x"), now=0.0)
    assert stack.counters()["udp.drop.disabled"] == 1

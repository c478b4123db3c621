"""DNS forwarder (sans-IO): id remapping, retries, SERVFAIL, malformed queries, bounds."""

from __future__ import annotations

import struct

import pytest

from tests.support.dns import QUESTION, answer_to, query
from tests.support.frames import DNS_IP, GUEST_IP, guest_udp_frame, parse_udp_frame
from tests.support.stack import next_timer, poll_timers
from vhostnet.network import build_stack
from vhostnet.stack import dns
from vhostnet.stack.config import StackConfig
from vhostnet.stack.dns import DnsQuery
from vhostnet.stack.stack import NetworkStack

UPSTREAMS = [("127.0.0.1", 5301), ("127.0.0.2", 5302)]


def make_stack(upstreams=UPSTREAMS) -> tuple[NetworkStack, dns.DnsForwarder]:
    stack = build_stack(StackConfig(dns_upstream=list(upstreams)))
    assert stack.dns is not None
    return stack, stack.dns


def test_query_forwarded_with_new_id_and_answer_restored() -> None:
    stack, forwarder = make_stack()
    stack.receive_frame(guest_udp_frame(33000, DNS_IP, 53, query(0x1234)), now=0.0)
    (command,) = forwarder.commands
    assert (command.upstream_index, command.host, command.port) == (0, "127.0.0.1", 5301)
    assert command.data[2:] == query()[2:]
    forwarder.on_upstream_reply(0, answer_to(command.data), now=0.1)
    (frame,) = stack.frames_to_guest
    src, sport, dst, dport, payload = parse_udp_frame(frame)
    assert (src, sport, dst, dport) == (DNS_IP, 53, GUEST_IP, 33000)
    assert payload == b"\x12\x34" + answer_to(command.data)[2:]
    assert forwarder.pending_count == 0 and next_timer(stack) is None


def test_two_guest_queries_with_same_id_get_distinct_upstream_ids() -> None:
    stack, forwarder = make_stack()
    stack.receive_frame(guest_udp_frame(33000, DNS_IP, 53, query(7)), now=0.0)
    stack.receive_frame(guest_udp_frame(33001, DNS_IP, 53, query(7)), now=0.0)
    first, second = forwarder.commands
    assert first.data[:2] != second.data[:2]
    forwarder.on_upstream_reply(0, answer_to(second.data), now=0.1)
    (frame,) = stack.frames_to_guest
    assert parse_udp_frame(frame)[3] == 33001


def test_timeout_tries_next_upstream_then_servfail() -> None:
    stack, forwarder = make_stack()
    stack.receive_frame(guest_udp_frame(33000, DNS_IP, 53, query(0xABCD)), now=0.0)
    first = forwarder.commands.popleft()
    assert next_timer(stack) == pytest.approx(2.0)
    poll_timers(stack, 1.9)
    assert not forwarder.commands
    poll_timers(stack, 2.0)
    second = forwarder.commands.popleft()
    assert second == DnsQuery(1, "127.0.0.2", 5302, first.data)
    # A late answer from the first upstream is no longer accepted.
    forwarder.on_upstream_reply(0, answer_to(first.data), now=2.5)
    assert not stack.frames_to_guest
    poll_timers(stack, 4.0)
    (frame,) = stack.frames_to_guest
    payload = parse_udp_frame(frame)[4]
    query_id, flags, qdcount, ancount = struct.unpack("!HHHH", payload[:8])
    assert (query_id, flags & 0x000F, bool(flags & 0x8000), bool(flags & 0x0100)) == (0xABCD, 2, True, True)
    assert (qdcount, ancount) == (1, 0)
    assert payload[12:] == QUESTION
    assert stack.counters()["dns.servfail"] == 1


def test_overall_deadline_caps_retries() -> None:
    stack, forwarder = make_stack(UPSTREAMS + [("127.0.0.3", 53)] * 3)
    stack.receive_frame(guest_udp_frame(33000, DNS_IP, 53, query()), now=0.0)
    for now in (2.0, 4.0, 5.0):
        poll_timers(stack, now)
    assert len(forwarder.commands) == 3  # first try plus two retries before the 5 s cap
    assert len(stack.frames_to_guest) == 1  # SERVFAIL


def test_refused_upstream_moves_on_immediately() -> None:
    stack, forwarder = make_stack()
    stack.receive_frame(guest_udp_frame(33000, DNS_IP, 53, query()), now=0.0)
    forwarder.commands.clear()
    forwarder.on_upstream_error(0, now=0.1)
    assert forwarder.commands.popleft().upstream_index == 1


def test_no_upstream_gives_servfail_at_once() -> None:
    stack, _ = make_stack([])
    stack.receive_frame(guest_udp_frame(33000, DNS_IP, 53, query(5)), now=0.0)
    (frame,) = stack.frames_to_guest
    assert parse_udp_frame(frame)[4][:2] == b"\x00\x05"


@pytest.mark.parametrize(("payload", "counter"), [(b"\x00" * 11, "dns.drop.short"),
                                                  (query(flags=0x8180), "dns.drop.not_query")])
def test_malformed_queries_dropped(payload: bytes, counter: str) -> None:
    stack, forwarder = make_stack()
    stack.receive_frame(guest_udp_frame(33000, DNS_IP, 53, payload), now=0.0)
    assert not forwarder.commands and not stack.frames_to_guest
    assert stack.counters()[counter] == 1


def test_bad_and_unexpected_replies_dropped() -> None:
    stack, forwarder = make_stack()
    stack.receive_frame(guest_udp_frame(33000, DNS_IP, 53, query()), now=0.0)
    sent = forwarder.commands.popleft()
    forwarder.on_upstream_reply(0, b"\x00" * 5, now=0.1)
    forwarder.on_upstream_reply(0, sent.data, now=0.1)  # QR clear: not an answer
    forwarder.on_upstream_reply(1, answer_to(sent.data), now=0.1)  # wrong upstream
    assert not stack.frames_to_guest
    assert stack.counters()["dns.drop.bad_reply"] == 2
    assert stack.counters()["dns.drop.unexpected_reply"] == 1


def test_outstanding_queries_are_bounded() -> None:
    stack, forwarder = make_stack()
    for port in range(dns.MAX_PENDING + 3):
        stack.receive_frame(guest_udp_frame(20000 + port, DNS_IP, 53, query(port)), now=0.0)
    assert forwarder.pending_count == dns.MAX_PENDING
    assert stack.counters()["dns.drop.too_many_pending"] == 3
    assert len({c.data[:2] for c in forwarder.commands}) == dns.MAX_PENDING


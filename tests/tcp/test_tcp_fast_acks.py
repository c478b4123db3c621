"""The guest's ACKs of established flows taken by the TCP fast path (ext/tcp_fast.pyx) while
host data goes straight into its RX ring: real engine, glue, ring kernel and loopback sockets.

An ACK the engine would only take (an ack between the one it last took and what it sent, a
non-zero window, no duplicate) never reaches the engine frame by frame: C keeps the newest
ack and window of the batch and the engine takes them in one call per flow
(``TcpEngine.on_acked_elsewhere``). Everything else (duplicate ACKs, which the engine counts
for fast retransmission, old or unsent acks, a zero window, SYN/FIN/RST, SACK, another
sequence number) goes the Python way as before, with every later frame of the flow in the
batch. Both families.
"""

from __future__ import annotations

import os
import socket
import time

import pytest

from tests.support.direct_rx import Guest, connected, continuous, settle
from tests.support.loop import run
from vhostnet.network import Network
from vhostnet.tcp.flow import Flow
from vhostnet.wire.tcp import ACK, FIN, RST, SYN

FAMILIES = pytest.mark.parametrize("family", [4, 6])
SACK_BLOCK = bytes([1, 1, 5, 10]) + bytes(8)  # two NOPs and one (empty) SACK block


class EngineCalls:
    """Counts the engine's per-segment entries and records its per-flow ACK entries (the real
    methods still run): ``acks`` the (wire ack, raw window) of each, ``streamed`` how many came
    as a streaming round (``on_streamed_elsewhere``: relative ack, scaled window), ``read_rounds``
    how many rounds came after the host socket turned readable (the same entry, no ack)."""

    def __init__(self, network: Network) -> None:
        engine = network.tcp
        self.segments = 0
        self.streamed = 0
        self.read_rounds = 0
        self.acks: list[tuple[int, int]] = []
        for name in ("handle_segment",):  # (the stack's path and the parsed one both end there)
            setattr(engine, name, self._counting(getattr(engine, name)))
        acked = engine.on_acked_elsewhere
        streamed = engine.on_streamed_elsewhere

        def on_acked_elsewhere(flow_id: int, ack: int, window: int, now: float) -> None:
            self.acks.append((ack, window))
            acked(flow_id, ack, window, now)

        def on_streamed_elsewhere(flow_id: int, ack: int | None, window: int, *rest) -> None:
            if ack is None:  # no ACK: the round after the host socket turned readable
                self.read_rounds += 1
            else:
                flow = engine.flows_by_id[flow_id]
                self.acks.append((flow.send_seq(ack), window >> flow.snd_wscale))
                self.streamed += 1
            streamed(flow_id, ack, window, *rest)
        engine.on_acked_elsewhere = on_acked_elsewhere
        engine.on_streamed_elsewhere = on_streamed_elsewhere

    def _counting(self, method):
        def counted(*args, **kwargs):
            self.segments += 1
            return method(*args, **kwargs)
        return counted


def the_flow(network: Network) -> Flow:
    return next(iter(network.tcp.flows.values()))


def counter(network: Network, name: str) -> int:
    return network.counters().get(name, 0)


def fallbacks(network: Network) -> dict[str, int]:
    prefix = "tcp.fast_fallback."
    return {k[len(prefix):]: v for k, v in network.counters().items() if k.startswith(prefix)}


def ack_frame(guest: Guest, received: int, window: int | None = None, **kwargs) -> bytes:
    """The guest's ACK of the first ``received`` bytes of the host's stream."""
    return guest.frame(ACK, (guest.peer_isn + 1 + received) & 0xFFFFFFFF, window, **kwargs)


async def in_flight(loop, ram, family: int, size: int, **kwargs):
    """(network, guest, peer, data): ``size`` host bytes reached the guest, none acknowledged."""
    network, guest, peer = await connected(loop, ram, family, **kwargs)
    guest.rx.post(60, 2048)
    # The mirror is brought up to date now, as a TX batch in between would: the ack limit
    # must follow the data sent after it.
    network.tcp_fast.refresh()
    data = os.urandom(size)
    peer.sendall(data)
    await guest.receive(size, ack=False)
    flow = the_flow(network)
    assert flow.snd_max - flow.snd_una == size and bytes(guest.stream) == data
    return network, guest, peer, data


@FAMILIES
@pytest.mark.parametrize("way", ["direct", "queued"])  # host data into the ring, or by Python
def test_many_acks_in_one_batch_make_one_engine_update_with_the_newest(ram, family, way) -> None:
    async def scenario(loop) -> None:
        network, guest, peer, data = await in_flight(loop, ram, family, 40_000,
                                                     attach=way == "direct")
        try:
            calls = EngineCalls(network)
            before = network.counters()
            ip_rx = "ipv6.rx" if family == 6 else "ipv4.rx"
            # Ten ACKs, each further and with another window; the newest: all, window 65525.
            guest.send_batch([ack_frame(guest, 4000 * k, 65535 - k) for k in range(1, 11)])
            flow = the_flow(network)
            assert calls.segments == 0, "an ACK went to the engine frame by frame"
            assert calls.acks == [((guest.peer_isn + 1 + 40_000) & 0xFFFFFFFF, 65525)]
            assert flow.snd_una == flow.snd_max == 1 + 40_000 and flow.snd_wnd == 65525
            assert flow.rto_at is None and flow.dup_acks == 0
            after = network.counters()
            assert after["tcp.fast_acks"] - before.get("tcp.fast_acks", 0) == 10
            assert after.get("tcp6.fast_acks", 0) == (10 if family == 6 else 0)
            assert after["tcp.segments_in"] - before["tcp.segments_in"] == 10
            assert after[ip_rx] - before[ip_rx] == 10 and after["eth.rx"] - before["eth.rx"] == 10
            assert not fallbacks(network)
            # The engine discarded what was acknowledged: the next bytes follow on, direct.
            more = os.urandom(30_000)
            peer.sendall(more)
            await guest.receive(len(data) + len(more))
            assert bytes(guest.stream) == data + more
            continuous(guest.segments, guest.peer_isn + 1, data + more)
            assert all(s.direct == (way == "direct") for s in guest.segments if s.payload)
            assert calls.segments == 0 and not fallbacks(network)
        finally:
            peer.close()
            network.close()
    run(scenario)


@FAMILIES
def test_duplicate_acks_still_reach_the_engine_for_fast_retransmission(ram, family) -> None:
    async def scenario(loop) -> None:
        network, guest, peer, data = await in_flight(loop, ram, family, 4000)
        try:
            calls = EngineCalls(network)
            first = [s for s in guest.segments if s.payload]
            assert len(first) == 3
            mss = len(first[0].payload)
            # The first segment acknowledged (taken in C), then three duplicates in the same
            # batch: the first duplicate and what follows go to the engine, in order.
            duplicate = ack_frame(guest, mss)
            guest.send_batch([duplicate] * 4)
            assert fallbacks(network) == {"dup_ack": 1, "after_fallback": 2}
            assert calls.acks == [((guest.peer_isn + 1 + mss) & 0xFFFFFFFF, guest.window)]
            assert calls.segments == 3
            assert counter(network, "tcp.fast_retransmits") == 1
            again = [s for s in guest.collect() if s.payload]
            assert again and again[0].direct and again[0].seq == first[1].seq
            continuous(guest.segments, guest.peer_isn + 1, data)
            # A new window with the same ack is no duplicate (taken in C, not counted).
            guest.send_batch([ack_frame(guest, mss, guest.window - 1)])
            assert calls.segments == 3 and the_flow(network).dup_acks == 0
            # Nothing in flight: repeated ACKs are no duplicates either; taken in C.
            guest.send_batch([ack_frame(guest, len(data))])
            guest.send_batch([ack_frame(guest, len(data))] * 3)
            flow = the_flow(network)
            assert flow.snd_una == flow.snd_max and flow.dup_acks == 0
            assert calls.segments == 3 and counter(network, "tcp.fast_retransmits") == 1
            assert counter(network, "tcp.fast_acks") == 1 + 1 + 1 + 3
        finally:
            peer.close()
            network.close()
    run(scenario)


@FAMILIES
def test_a_window_opening_from_zero_in_c_resumes_sending(ram, family) -> None:
    async def scenario(loop) -> None:
        network, guest, peer, data = await in_flight(loop, ram, family, 3000, window=3000)
        try:
            calls = EngineCalls(network)
            rest = os.urandom(7000)
            peer.sendall(rest)
            # All acknowledged, window closed: the engine must see that one itself.
            guest.send_batch([ack_frame(guest, 3000, 0)])
            assert fallbacks(network) == {"zero_window": 1} and calls.segments == 1
            await settle(lambda: False, rounds=20)
            assert not guest.collect(), "sent into a closed window"
            assert the_flow(network).snd_wnd == 0
            # The same again (as it answers a window probe): the engine's business too.
            guest.send_batch([ack_frame(guest, 3000, 0)])
            assert fallbacks(network) == {"zero_window": 2} and calls.segments == 2
            # The window opens again (same ack): taken in C, the engine sends the next 3000.
            guest.send_batch([ack_frame(guest, 3000, 3000)])
            assert calls.segments == 2 and calls.acks[-1][1] == 3000
            await settle(lambda: len(guest.collect()) > 0 or len(guest.stream) >= 6000)
            guest.collect()
            assert len(guest.stream) == 6000
            await guest.receive(10_000)
            assert bytes(guest.stream) == data + rest
            continuous(guest.segments, guest.peer_isn + 1, data + rest)
            assert calls.segments == 2
        finally:
            peer.close()
            network.close()
    run(scenario)


ODD_CASES = {  # name: (the frame, given guest and the bytes in flight; its fallback reason)
    "unsent": (lambda g, n: ack_frame(g, n + 1), "ack_unsent"),
    "old": (lambda g, n: ack_frame(g, -1), "ack_old"),
    "seq": (lambda g, n: ack_frame(g, n // 2, seq_offset=1), "out_of_order"),
    "sack": (lambda g, n: ack_frame(g, n // 2, options=SACK_BLOCK), "sack"),
    "zero": (lambda g, n: ack_frame(g, n // 2, 0), "zero_window"),
    "fin": (lambda g, n: g.frame(ACK | FIN, (g.peer_isn + 1 + n // 2) & 0xFFFFFFFF), "flags"),
    "syn": (lambda g, n: g.frame(SYN | ACK, (g.peer_isn + 1) & 0xFFFFFFFF), "flags"),
    "rst": (lambda g, n: g.frame(RST | ACK, (g.peer_isn + 1) & 0xFFFFFFFF), "flags"),
}


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("case", list(ODD_CASES))
def test_acks_the_engine_must_see_go_the_python_way_in_order(ram, family, case) -> None:
    async def scenario(loop) -> None:
        network, guest, peer, data = await in_flight(loop, ram, family, 4000)
        try:
            calls = EngineCalls(network)
            make, reason = ODD_CASES[case]
            # One ACK taken in C first, then the odd frame, then one that C would take alone.
            guest.send_batch([ack_frame(guest, 1000), make(guest, len(data)),
                              ack_frame(guest, 2000)])
            assert fallbacks(network) == {reason: 1, "after_fallback": 1}
            assert calls.acks == [((guest.peer_isn + 1 + 1000) & 0xFFFFFFFF, guest.window)]
            assert calls.segments == 2  # the odd frame and the one after it, in that order
            flow = network.tcp.flows_by_id.get(1)
            if case == "unsent":
                assert counter(network, "tcp.drop.ack_unsent") == 1
            if case == "rst":
                assert flow is None  # inside the window: the engine reset the flow
            elif case == "syn":
                assert flow.snd_una == 1 + 2000
            elif case != "fin":
                assert flow.snd_una == 1 + 2000 and flow.snd_wnd == guest.window
                network.tcp_fast.refresh()
                assert network.tcp_fast.flows == 1  # still registered, taking ACKs again
                guest.send_batch([ack_frame(guest, 4000)])
                assert calls.segments == 2 and flow.snd_una == 1 + 4000
        finally:
            peer.close()
            network.close()
    run(scenario)


@FAMILIES
def test_retransmission_after_acks_taken_in_c_starts_at_the_newest_ack(ram, family) -> None:
    async def scenario(loop) -> None:
        network, guest, peer, data = await in_flight(loop, ram, family, 6000)
        try:
            calls = EngineCalls(network)
            first = [s for s in guest.segments if s.payload]
            acked = len(first[0].payload) + len(first[1].payload)
            guest.send_batch([ack_frame(guest, len(first[0].payload)), ack_frame(guest, acked)])
            assert calls.segments == 0 and the_flow(network).snd_una == 1 + acked
            # No more ACKs: the retransmission timer rewinds to the first unacknowledged byte.
            network.tcp.poll_timers(time.monotonic() + 5)
            network.flush()
            again = [s for s in guest.collect() if s.payload]
            assert counter(network, "tcp.retransmits") == 1
            assert again and again[0].seq == first[2].seq and again[0].payload == first[2].payload
            continuous(guest.segments, guest.peer_isn + 1, data)
            more = os.urandom(20_000)
            peer.sendall(more)
            await guest.receive(len(data) + len(more))
            assert bytes(guest.stream) == data + more
            continuous(guest.segments, guest.peer_isn + 1, data + more)
            assert calls.segments == 0
            peer.shutdown(socket.SHUT_WR)
            await settle(lambda: any(s.flags & FIN for s in guest.collect()))
        finally:
            peer.close()
            network.close()
    run(scenario)

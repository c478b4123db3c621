"""A download's guest ACKs as one round without commands (``TcpFastPath.stream_round``): the ACK
batch of a simply streaming flow discards what it acknowledged and peeks the window's next
bytes straight into the RX ring in one kernel call (``DirectPeeker.run(discard=...)``), and the
engine records both in one call (``TcpEngine.on_streamed_elsewhere``); the same round, without
an ack, when the flow's host socket turns readable (no ``on_readable`` nor Peek command). Real
engine, glue, ring kernel and loopback sockets; every byte the guest sees is checked against
what the host sent.

What is not simple streaming takes the engine's way and must stay exact: a retransmission
pending (a lost ACK, the RTO rewound ``snd_nxt``), a closed or shrunk window, the host's FIN.
"""

from __future__ import annotations

import os
import socket
import sys
import time

import pytest

from tests.support.direct_rx import connected, continuous, settle
from tests.support.loop import run
from tests.tcp.test_tcp_fast_acks import EngineCalls, ack_frame, counter, the_flow
from vhostnet.virtqueue import FrameBatch
from vhostnet.wire.tcp import ACK, FIN

FAMILIES = pytest.mark.parametrize("family", [4, 6])
# Python calls (functions and builtins) of vhostnet one ACK batch of a streaming flow may cost
# in the median, the whole receive_batch and flush included (the tests' own code, spies and
# ring wrapper, not counted; the ring's ``direct_rx_done`` is, as a device's without its
# watchdog on). The engine's way, Discard and Peek commands: about 70; the streaming round
# as first written: 37; with the device's ring kept, the flow's cut cached and the round's
# calls written out: 13.
MAX_CALLS_PER_ACK_BATCH = 15
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def calls_to_receive(network, frames: list[bytes], batch: FrameBatch) -> int:
    """The Python calls ``frames`` cost as one TX batch (receive_batch, then flush), in
    ``batch`` (reused, as a device reuses its TX batch)."""
    batch.clear()
    for frame in frames:
        assert batch.append(frame)
    now = time.monotonic()
    calls = 0

    def count(frame, event, arg) -> None:
        nonlocal calls
        # (``frame``: the callee's for a call, the caller's for a builtin's c_call)
        if event in ("call", "c_call") and not frame.f_code.co_filename.startswith(TESTS):
            calls += 1
    sys.setprofile(count)
    try:
        network.receive_batch(batch, len(frames), now)
        network.flush()
    finally:
        sys.setprofile(None)
    return calls  # (receive_batch and flush included)


async def streaming(loop, ram, family: int, size: int, window: int):
    """(network, guest, peer, data): ``size`` host bytes queued, the first window in the ring."""
    network, guest, peer = await connected(loop, ram, family, window=window)
    guest.rx.post(60, 2048)
    data = os.urandom(size)
    peer.sendall(data)
    await settle(lambda: len(guest.collect()) and len(guest.stream) >= window)
    assert len(guest.stream) == window
    return network, guest, peer, data


@FAMILIES
def test_an_ack_batch_of_a_streaming_flow_is_one_round_of_few_python_calls(ram, family) -> None:
    async def scenario(loop) -> None:
        window = 8 * 1460
        network, guest, peer, data = await streaming(loop, ram, family, 200_000, window)
        try:
            calls = EngineCalls(network)
            costs: list[int] = []
            batch = FrameBatch(4, 1 << 16)
            acked = 0
            for _ in range(200):
                if len(guest.stream) >= len(data):
                    break
                # Three ACKs in one batch (the guest acks every other segment); the newest
                # acknowledges all: its bytes leave the socket, the next window goes out.
                received = len(guest.stream)
                if received == acked:  # nothing new yet (the same ACK again is a duplicate)
                    await settle(lambda: guest.collect(), rounds=1)
                    continue
                frames = [ack_frame(guest, acked + (received - acked) * k // 3) for k in (1, 2, 3)]
                acked = received
                costs.append(calls_to_receive(network, frames, batch))
                guest.collect()
                guest.rx.post(len(guest.rx.free), guest.rx.ring_posted)
                await settle(lambda: True, rounds=1)
            assert bytes(guest.stream) == data
            continuous(guest.segments, guest.peer_isn + 1, data)
            assert all(s.direct for s in guest.segments if s.payload)
            assert calls.segments == 0 and calls.streamed >= len(data) // window - 1
            median = sorted(costs)[len(costs) // 2]
            print(f"{median} Python calls per ACK batch (median)")
            assert median <= MAX_CALLS_PER_ACK_BATCH, f"{median} Python calls per ACK batch"
            flow = the_flow(network)
            assert flow.snd_nxt == flow.snd_max == 1 + len(data)
            guest.ack()
            assert flow.snd_una == flow.snd_max and flow.rto_at is None
            assert network.tcp_host.open_sockets == 1
        finally:
            peer.close()
            network.close()
    run(scenario)


@FAMILIES
def test_a_lost_ack_and_its_retransmission_take_the_engines_way_then_streaming_resumes(
        ram, family) -> None:
    async def scenario(loop) -> None:
        window = 6 * 1460
        network, guest, peer, data = await streaming(loop, ram, family, 100_000, window)
        try:
            calls = EngineCalls(network)
            first = [s for s in guest.segments if s.payload]
            flow = the_flow(network)
            # The guest acknowledges nothing new and shrinks its window to two segments; the
            # ACK of the window it then sends is lost: the RTO rewinds snd_nxt and the first
            # two segments go again (the data is still in the host socket), no more.
            guest.send_batch([ack_frame(guest, 0, 2 * 1460)])
            assert calls.streamed == 0 and flow.snd_wnd == 2 * 1460
            network.tcp.poll_timers(time.monotonic() + 5)
            network.flush()
            again = [s for s in guest.collect() if s.payload]
            assert counter(network, "tcp.retransmits") == 1
            assert again[0].seq == first[0].seq
            assert b"".join(s.payload for s in again) == data[:2 * 1460]
            assert flow.snd_nxt == 1 + 2 * 1460 < flow.snd_max == 1 + window
            # The ACK of half the first window, the window open again: a retransmission is
            # under way, so the engine takes it (snd_nxt rewound), not the streaming round.
            guest.send_batch([ack_frame(guest, window // 2, window)])
            assert calls.streamed == 0 and flow.snd_una == 1 + window // 2
            assert calls.acks[-1][0] == (guest.peer_isn + 1 + window // 2) & 0xFFFFFFFF
            streamed = calls.streamed
            await guest.receive(len(data))
            assert bytes(guest.stream) == data
            continuous(guest.segments, guest.peer_isn + 1, data)
            assert calls.streamed > streamed, "streaming did not resume after the retransmission"
            assert flow.snd_una == flow.snd_nxt == flow.snd_max == 1 + len(data)
        finally:
            peer.close()
            network.close()
    run(scenario)


@FAMILIES
def test_a_shrinking_then_closed_window_while_streaming(ram, family) -> None:
    async def scenario(loop) -> None:
        window = 6 * 1460
        network, guest, peer, data = await streaming(loop, ram, family, 60_000, window)
        try:
            calls = EngineCalls(network)
            flow = the_flow(network)
            # Half acknowledged, the window shrunk to less than what is still in flight:
            # the acknowledged bytes go, nothing new may (streamed: discard only).
            half = window // 2
            guest.send_batch([ack_frame(guest, half, half - 100)])
            assert calls.streamed == 1 and flow.snd_una == 1 + half
            await settle(lambda: False, rounds=10)
            assert not [s for s in guest.collect() if s.payload], "sent past the window"
            # All acknowledged with a closed window: the engine's (persist timer), no data.
            guest.send_batch([ack_frame(guest, window, 0)])
            assert calls.segments == 1 and flow.snd_una == 1 + window and flow.snd_wnd == 0
            assert flow.rto_at is not None  # the persist timer probes the closed window
            await settle(lambda: False, rounds=10)
            assert not [s for s in guest.collect() if s.payload], "sent into a closed window"
            # It opens again: the rest streams, exact.
            guest.send_batch([ack_frame(guest, window, window)])
            await guest.receive(len(data))
            assert bytes(guest.stream) == data
            continuous(guest.segments, guest.peer_isn + 1, data)
            assert calls.streamed > 2 and calls.segments == 1
        finally:
            peer.close()
            network.close()
    run(scenario)


@FAMILIES
def test_the_hosts_fin_while_streaming_follows_the_last_byte(ram, family) -> None:
    async def scenario(loop) -> None:
        window = 6 * 1460
        network, guest, peer, data = await streaming(loop, ram, family, 50_000, window)
        try:
            calls = EngineCalls(network)
            peer.shutdown(socket.SHUT_WR)  # while most of the data still waits for the window
            for _ in range(400):
                await settle(lambda: False, rounds=1)
                guest.collect()
                if any(s.flags & FIN for s in guest.segments):
                    break
                guest.ack()
                guest.rx.post(len(guest.rx.free), guest.rx.ring_posted)
            fins = [s for s in guest.segments if s.flags & FIN]
            assert len(fins) == 1 and fins[0].seq == (guest.peer_isn + 1 + len(data)) & 0xFFFFFFFF
            assert bytes(guest.stream) == data
            continuous(guest.segments, guest.peer_isn + 1, data)
            assert calls.streamed > 0
            flow = the_flow(network)
            assert flow.fin_sent and flow.host_eof
            # The guest acknowledges the FIN and closes too: the flow ends, its socket closed.
            guest.send(guest.frame(ACK | FIN, (guest.peer_isn + 2 + len(data)) & 0xFFFFFFFF))
            assert not network.tcp.flows and network.tcp_host.open_sockets == 0
        finally:
            peer.close()
            network.close()
    run(scenario)


@FAMILIES
def test_a_ring_without_room_for_the_window_leaves_the_rest_to_the_python_way(ram, family) -> None:
    async def scenario(loop) -> None:
        window = 6 * 1460
        network, guest, peer = await connected(loop, ram, family, window=window)
        try:
            guest.rx.post(8, 2048)  # the first window, and two buffers more
            data = os.urandom(40_000)
            peer.sendall(data)
            await settle(lambda: len(guest.collect()) and len(guest.stream) >= window)
            assert len(guest.stream) == window
            calls = EngineCalls(network)
            # The guest's ACK opens the next window; the ring has room for two frames only:
            # two go straight in, the rest of the window through the frame queue, in order.
            guest.send_batch([ack_frame(guest, window)])
            assert calls.streamed == 1 and guest.rx.frames_written == 8
            assert network.frames_to_guest, "the rest of the window did not go the Python way"
            guest.collect()
            assert len(guest.stream) == 2 * window
            await guest.receive(len(data))
            assert bytes(guest.stream) == data
            continuous(guest.segments, guest.peer_isn + 1, data)
        finally:
            peer.close()
            network.close()
    run(scenario)


@FAMILIES
def test_the_devices_ring_is_asked_for_again_only_when_its_rings_changed(ram, family) -> None:
    async def scenario(loop) -> None:
        window = 8 * 1460
        network, guest, peer, data = await streaming(loop, ram, family, 200_000, window)
        try:
            calls = EngineCalls(network)
            rx = guest.rx
            asked: list[object] = []
            done: list[int] = []
            direct_rx, direct_rx_done = rx.direct_rx, rx.direct_rx_done

            def asking(flow=None):
                asked.append(flow)
                return direct_rx(flow)

            def finishing(frames: int) -> None:
                done.append(frames)
                direct_rx_done(frames)
            rx.direct_rx, rx.direct_rx_done = asking, finishing
            # Streaming: the handle the first window's peek got serves every round.
            await guest.receive(70_000)
            assert calls.streamed > 2 and not asked and done
            # The device's rings changed (its generation moved): asked once more, then kept.
            rx.direct_rx_generation += 1
            await guest.receive(140_000)
            assert len(asked) == 1
            # Its watchdog on: a clean write only counts its frames, no direct_rx_done.
            rx.direct_rx_quiet = True
            done.clear()
            written = rx.frames_written
            await guest.receive(len(data))
            assert not done and rx.frames_written > written
            assert len(asked) == 1
            assert bytes(guest.stream) == data
            continuous(guest.segments, guest.peer_isn + 1, data)
            assert rx.frames_written == len([s for s in guest.segments if s.direct])
        finally:
            peer.close()
            network.close()
    run(scenario)


@FAMILIES
def test_the_segment_cut_follows_the_guests_offloads_while_streaming(ram, family) -> None:
    async def scenario(loop) -> None:
        network, guest, peer = await connected(loop, ram, family, mrg=True, offloads="tso")
        try:
            calls = EngineCalls(network)
            guest.rx.post(48, 4096)
            data = os.urandom(200_000)
            peer.sendall(data)
            await guest.receive(80_000)
            assert calls.streamed > 0
            assert any(len(s.payload) > guest.mss for s in guest.segments if s.direct)
            assert counter(network, "tcp.gso_segments_out") > 0
            # The guest's driver takes large segments no more: every later one is cut by MSS.
            network.set_guest_offloads(True, False, False)
            guest.collect()
            before = len(guest.segments)
            streamed = calls.streamed
            await guest.receive(len(data))
            later = [s for s in guest.segments[before:] if s.payload]
            assert later and all(len(s.payload) <= guest.mss for s in later)
            assert calls.streamed > streamed
            assert bytes(guest.stream) == data
            continuous(guest.segments, guest.peer_isn + 1, data)
        finally:
            peer.close()
            network.close()
    run(scenario)


@FAMILIES
def test_a_readable_socket_while_streaming_is_one_round_without_a_peek_command(
        ram, family) -> None:
    async def scenario(loop) -> None:
        network, guest, peer = await connected(loop, ram, family)
        try:
            guest.rx.post(60, 2048)
            sent = bytearray()
            first = os.urandom(3000)  # the engine's way first (the glue learns SO_PEEK_OFF)
            peer.sendall(first)
            sent += first
            await guest.receive(len(sent))
            calls = EngineCalls(network)
            engine = network.tcp
            readable: list[int] = []
            on_readable = engine.on_readable

            def counting(flow_id: int, now: float) -> None:
                readable.append(flow_id)
                on_readable(flow_id, now)
            engine.on_readable = counting
            # The host writes in bursts the guest's window takes whole: each drains the socket,
            # the next turns it readable, and that is one round straight into the ring.
            for _ in range(12):
                burst = os.urandom(7000)
                peer.sendall(burst)
                sent += burst
                await guest.receive(len(sent))
            assert calls.read_rounds >= 6, calls.read_rounds
            assert not readable, "the engine's on_readable and Peek ran for a streaming flow"
            assert calls.segments == 0
            assert bytes(guest.stream) == bytes(sent)
            continuous(guest.segments, guest.peer_isn + 1, bytes(sent))
            assert all(s.direct for s in guest.segments if s.payload)
            flow = the_flow(network)
            guest.ack()
            assert flow.snd_una == flow.snd_nxt == flow.snd_max == 1 + len(sent)
            assert flow.rto_at is None and not flow.peek_pending
        finally:
            peer.close()
            network.close()
    run(scenario)

"""The assembler's seams for the layers above it: hooks, the TX sink, one timer list."""

from __future__ import annotations

import asyncio
import time

from tests.support.frames import GATEWAY_MAC, GUEST_IP, GUEST_MAC, eth, guest_udp_frame, ipv4
from vhostnet.network import Network
from vhostnet.stack.config import StackConfig
from vhostnet.virtqueue import FrameBatch

REMOTE = bytes([192, 0, 2, 10])


def test_hooks_run_on_device_start_and_close() -> None:
    loop = asyncio.new_event_loop()
    network = Network(StackConfig(), loop)
    seen: list[object] = []
    network.add_device_started_hook(seen.append)
    network.add_close_hook(lambda: seen.append("closed"))
    try:
        network.device_started(12.5)
        assert seen == [12.5]
    finally:
        network.close()
        loop.close()
    assert seen == [12.5, "closed"]


def test_a_tx_sink_takes_guest_batches_instead_of_the_stack() -> None:
    loop = asyncio.new_event_loop()
    network = Network(StackConfig(), loop)
    taken: list[int] = []
    try:
        batch = FrameBatch(4, 1 << 16)
        for _ in range(3):
            assert batch.append(guest_udp_frame(4000, REMOTE, 9, b"x"))
        assert "guest.tx_to_sink" not in network.counters()
        network.set_tx_sink(lambda _batch, count, _now: taken.append(count))
        network.receive_batch(batch, 3, 1.0)
        assert taken == [3]
        counters = network.counters()
        assert counters["guest.tx_to_sink"] == 3 and counters.get("eth.rx", 0) == 0
    finally:
        network.close()
        loop.close()


def test_one_timer_list_covers_the_stack_engines_and_tcp() -> None:
    loop = asyncio.new_event_loop()
    network = Network(StackConfig(udp_idle_timeout=30.0), loop)
    try:
        assert network.next_timer() is None
        network.stack.receive_frame(guest_udp_frame(4000, REMOTE, 9, b"x"), 0.0)
        assert network.next_timer() == 30.0
        network.poll_timers(30.0)
        assert network.stack.udp_nat.flow_count() == 0
    finally:
        network.close()
        loop.close()


def test_the_reassemblers_timeouts_are_on_the_one_timer_list() -> None:
    loop = asyncio.new_event_loop()
    # No periodic Router Advertisement: the reassembler's is then the only deadline.
    network = Network(StackConfig(ra=False), loop)
    try:
        first_half = ipv4(GUEST_IP, REMOTE, 17, bytes(1480), flags_fragment=0x2000)
        network.stack.receive_frame(eth(GATEWAY_MAC, GUEST_MAC, 0x0800, first_half), 5.0)
        assert network.next_timer() == 35.0
        network.poll_timers(35.0)
        assert network.counters()["frag.drop.timeout"] == 1
        assert network.next_timer() is None
    finally:
        network.close()
        loop.close()


def test_an_engine_brings_the_timer_forward_for_a_delayed_ack() -> None:
    loop = asyncio.new_event_loop()
    network = Network(StackConfig(), loop)
    polled: list[float] = []
    network.poll_timers = polled.append  # type: ignore[method-assign]
    try:
        # Nothing due: the timer ticks after a second; the TCP engine's wake-up hook (an
        # ACK owed 20 ms from now) brings it forward.
        network.tcp._wakeup(time.monotonic() + 0.02)  # noqa: SLF001
        loop.run_until_complete(asyncio.sleep(0.3))
        assert len(polled) == 1
    finally:
        network.close()
        loop.close()

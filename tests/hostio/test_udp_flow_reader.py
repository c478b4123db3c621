"""A registered flow's socket is read by the fast path's C reader (ext/udp_reader.pxi): the loop
calls it, and the host's datagrams go straight into the RX ring with no Python frame between
the loop and the device's completion (``direct_rx_done``); whatever it cannot do goes to the
Python reader, and pausing for a backlogged guest keeps the C reader for when reading resumes.
Real sockets on loopback, the real ring kernel (see test_udp_direct_rx.py, whose ``Flow`` this
reuses).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from tests.hostio.test_udp_direct_rx import Flow, expected, queued_frames
from tests.support.direct_rx import settle
from tests.support.loop import run
from vhostnet.guest_queue import GUEST_BACKLOG_HIGH

VHOSTNET = str(Path(__file__).resolve().parents[2] / "vhostnet")


def record_completion_callers(flow: Flow) -> list[str]:
    """The file of the Python frame that calls the device's ``direct_rx_done``, per call."""
    callers: list[str] = []
    done = flow.rx.direct_rx_done

    def recording(frames: int) -> None:
        callers.append(sys._getframe(1).f_code.co_filename)
        done(frames)
    flow.rx.direct_rx_done = recording  # type: ignore[method-assign]
    return callers


def test_a_reply_goes_into_the_ring_with_no_python_frame_of_vhostnet_on_the_way(ram) -> None:
    async def scenario(loop) -> None:
        flow = Flow(loop, ram, 4)
        try:
            await flow.open()
            flow.rx.post(16, 2048)
            callers = record_completion_callers(flow)
            for payload in (b"one", b"two", b"three"):
                await flow.answer([payload])
            assert flow.direct_frames() == [expected(4, flow.port, p)
                                            for p in (b"one", b"two", b"three")]
            assert callers, "the device was never told of the direct writes"
            # Called by the C reader, so the frame above is the event loop's, not vhostnet's
            # (the Python reader calls it from vhostnet/hostio/udp_fast.py).
            assert not [c for c in callers if c.startswith(VHOSTNET)], callers
        finally:
            flow.close()
    run(scenario)


def test_a_paused_flow_resumes_with_the_c_reader(ram) -> None:
    """Frames waiting for the guest past the backlog mark: the flow's socket is not read
    (paused, the datagram waits in its buffer); once the queue drains it is read again, by
    the C reader, and nothing is lost or reordered."""
    async def scenario(loop) -> None:
        flow = Flow(loop, ram, 4)
        try:
            await flow.open()
            flow.rx.post(16, 2048)
            glue = flow.network.udp_glue
            queue = flow.network.frames_to_guest
            for _ in range(GUEST_BACKLOG_HIGH + 1):
                queue.append(b"backlog")
            flow.host.sendto(b"waits", flow.flow)
            await settle(lambda: glue.paused_sockets == 1)
            assert glue.paused_sockets == 1
            assert flow.network.counters().get("udp.rx_host", 0) == 0
            queue.clear()  # (drained: the readers are resumed)
            assert glue.paused_sockets == 0
            callers = record_completion_callers(flow)
            await settle(lambda: flow.network.counters().get("udp.rx_host", 0) == 1)
            flow.sent = 1
            await flow.answer([b"after"])
            assert flow.direct_frames() == [expected(4, flow.port, p) for p in (b"waits", b"after")]
            assert callers and not [c for c in callers if c.startswith(VHOSTNET)], callers
        finally:
            flow.close()
    run(scenario)


def test_frames_waiting_for_the_guest_send_the_c_reader_to_the_python_one(ram) -> None:
    """Nothing may pass frames already queued: the C reader leaves the read to Python, which
    queues the datagram behind them."""
    async def scenario(loop) -> None:
        flow = Flow(loop, ram, 4)
        try:
            await flow.open()
            flow.rx.post(16, 2048)
            flow.network.frames_to_guest.append(b"first")
            await flow.answer([b"second"])
            assert flow.direct_frames() == []
            assert queued_frames(flow.network) == [b"first", expected(4, flow.port, b"second")]
        finally:
            flow.close()
    run(scenario)


def test_a_closed_flow_leaves_no_reader_behind(ram) -> None:
    async def scenario(loop) -> None:
        flow = Flow(loop, ram, 4)
        try:
            await flow.open()
            nat = flow.network.stack.udp_nat
            assert flow.network.udp_glue.open_sockets == 1
            nat.poll_timers(loop.time() + nat.config.udp_idle_timeout + 1)
            flow.network.flush()
            assert flow.network.udp_glue.open_sockets == 0
            await asyncio.sleep(0.01)  # (a reader left on a closed fd would raise here)
        finally:
            flow.close()
    run(scenario)

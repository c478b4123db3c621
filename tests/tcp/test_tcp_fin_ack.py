"""The ACK of the guest's FIN toward the guest: owed like an ACK of data, so a host peer that
closes soon after gives the guest one FIN+ACK segment instead of an ACK and a FIN; never later
than the ACK delay; at once when our FIN is already out, delays are off, or the guest sends
its FIN again."""

from __future__ import annotations

import pytest

from tests.support.tcp import make_engine
from tests.tcp.test_tcp_engine import GUEST_ISN, OUR_ISN, drain, open_flow, seg
from vhostnet.tcp.flow import Close, ShutdownWrite, TcpTimeouts
from vhostnet.wire.tcp import ACK, FIN

DELAY = TcpTimeouts().ack_delay


def guest_fin(engine, now: float) -> None:
    seg(engine, now, seq=GUEST_ISN + 1, ack=OUR_ISN + 1, flags=ACK | FIN)


def test_host_close_within_the_delay_sends_one_fin_that_acks_the_guests_fin() -> None:
    engine, output = make_engine()
    flow = open_flow(engine, output)
    guest_fin(engine, 1.0)
    assert drain(engine) == [ShutdownWrite(flow.flow_id)]
    assert output.take() == []  # no pure ACK frame yet
    assert engine.next_timer() == pytest.approx(1.0 + DELAY)
    engine.on_host_eof(flow.flow_id, 1.0 + DELAY / 2)
    (fin,) = output.take()
    assert fin.flags == FIN | ACK and fin.ack == GUEST_ISN + 2 and fin.seq == OUR_ISN + 1
    assert flow.ack_owed_at is None
    engine.poll_timers(1.0 + 2 * DELAY)
    assert output.take() == []  # nothing left owed
    seg(engine, 1.0 + DELAY, seq=GUEST_ISN + 2, ack=OUR_ISN + 2)
    assert drain(engine) == [Close(flow.flow_id, False)]
    assert engine.flows == {}
    assert engine.counters()["tcp.fin_acks_delayed"] == 1


def test_the_fins_ack_goes_alone_at_the_deadline() -> None:
    engine, output = make_engine()
    flow = open_flow(engine, output)
    wakeups = []
    engine.set_wakeup(wakeups.append)
    guest_fin(engine, 1.0)
    assert wakeups == [pytest.approx(1.0 + DELAY)]  # the integrator is asked to poll in time
    engine.poll_timers(1.0 + DELAY / 2)
    assert output.take() == []
    engine.poll_timers(1.0 + DELAY)
    (ack,) = output.take()
    assert ack.flags == ACK and ack.ack == GUEST_ISN + 2
    engine.on_host_eof(flow.flow_id, 2.0)
    (fin,) = output.take()
    assert fin.flags == FIN | ACK and fin.ack == GUEST_ISN + 2


def test_a_retransmitted_fin_is_answered_at_once() -> None:
    engine, output = make_engine()
    open_flow(engine, output)
    guest_fin(engine, 1.0)
    assert output.take() == []
    guest_fin(engine, 1.001)  # the guest sends it again (as after a lost ACK)
    (ack,) = output.take()
    assert ack.flags == ACK and ack.ack == GUEST_ISN + 2


def test_the_guests_fin_after_ours_is_acked_at_once() -> None:
    engine, output = make_engine()
    flow = open_flow(engine, output)
    engine.on_host_eof(flow.flow_id, 1.0)
    (fin,) = output.take()
    assert fin.flags == FIN | ACK
    seg(engine, 1.01, seq=GUEST_ISN + 1, ack=OUR_ISN + 2, flags=ACK | FIN)
    (ack,) = output.take()
    assert ack.flags == ACK and ack.ack == GUEST_ISN + 2
    assert engine.flows == {}


def test_no_delay_when_ack_delay_is_off() -> None:
    engine, output = make_engine(timeouts=TcpTimeouts(ack_delay=0.0))
    open_flow(engine, output)
    guest_fin(engine, 1.0)
    (ack,) = output.take()
    assert ack.flags == ACK and ack.ack == GUEST_ISN + 2

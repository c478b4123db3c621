"""Timers fire at their deadlines although the engine does not recompute a flow's deadlines
after each event (tcp/timers.py): each case first lets the flow's heap entry move out to its
far idle deadline (``next_timer`` resolves it), the worst case, then has an event set a
nearer deadline and checks that ``next_timer`` says it and ``poll_timers`` runs it then."""

from __future__ import annotations

import pytest

from tests.support.tcp import make_engine
from tests.tcp.test_tcp_engine import GUEST_ISN, OUR_ISN, drain, open_flow, seg
from vhostnet.tcp.engine import TcpEngine
from vhostnet.tcp.flow import Close, Connect, Peek, ShutdownWrite, TcpTimeouts
from vhostnet.wire.tcp import ACK, FIN, RST, SYN

IDLE = TcpTimeouts().idle
DELAY = TcpTimeouts().ack_delay


def settle(engine: TcpEngine, deadline: float) -> None:
    """The flow's entry resolved to its real earliest deadline, ``deadline``."""
    assert engine.next_timer() == pytest.approx(deadline)


def fires_at(engine: TcpEngine, deadline: float) -> None:
    """Nothing runs just before ``deadline``; the caller polls at it and sees what runs.
    (``next_timer`` is not asked first: it recomputes the deadline of the entry at the head
    of the heap, which would hide an entry left too late.)"""
    before = engine.counters()
    engine.poll_timers(deadline - 0.001)
    assert engine.counters() == before


def test_rto_of_data_sent_after_the_entry_went_far() -> None:
    engine, output = make_engine()
    flow = open_flow(engine, output)
    engine.on_readable(flow.flow_id, 4.0)
    drain(engine)
    settle(engine, 4.0 + IDLE)
    engine.on_peeked(flow.flow_id, 0, b"r" * 100, 5.0)
    output.take()
    fires_at(engine, 6.0)
    engine.poll_timers(6.0)
    assert drain(engine) == [Peek(flow.flow_id, 0, 64000)]  # rewound: sent again
    assert engine.counters()["tcp.retransmits"] == 1


def test_rto_brought_earlier_by_an_ack_after_a_backoff() -> None:
    engine, output = make_engine()
    flow = open_flow(engine, output)
    engine.on_readable(flow.flow_id, 5.0)
    drain(engine)
    engine.on_peeked(flow.flow_id, 0, b"r" * 3000, 5.0)
    output.take()
    engine.poll_timers(6.0)  # RTO: backed off to 2 s
    drain(engine)
    engine.on_peeked(flow.flow_id, 0, b"r" * 3000, 6.0)
    output.take()
    settle(engine, 8.0)
    # Part acknowledged: the RTO restarts at its initial second, before the backed-off one.
    seg(engine, 6.5, seq=GUEST_ISN + 1, ack=OUR_ISN + 1461, window=64000)
    drain(engine)
    fires_at(engine, 7.5)
    engine.poll_timers(7.5)
    assert drain(engine) == [Peek(flow.flow_id, 0, 64000)]  # from the first unacknowledged


def test_syn_ack_rto_after_a_slow_connect() -> None:
    engine, output = make_engine()
    seg(engine, flags=SYN, seq=GUEST_ISN, mss=1460, window=64000)
    (connect,) = drain(engine)
    assert isinstance(connect, Connect)
    settle(engine, TcpTimeouts().syn)
    engine.on_connected(connect.flow_id, 3.0)
    assert output.take()[0].flags == SYN | ACK
    fires_at(engine, 4.0)
    engine.poll_timers(4.0)
    assert output.take()[0].flags == SYN | ACK  # sent again


def test_delayed_ack_and_fin_timer_after_the_guest_fin() -> None:
    engine, output = make_engine()
    flow = open_flow(engine, output)
    settle(engine, IDLE)
    seg(engine, 5.0, seq=GUEST_ISN + 1, ack=OUR_ISN + 1, flags=ACK | FIN)
    assert drain(engine) == [ShutdownWrite(flow.flow_id)]
    assert output.take() == []  # the FIN's ACK is owed
    fires_at(engine, 5.0 + DELAY)
    engine.poll_timers(5.0 + DELAY)
    assert output.take()[0].ack == GUEST_ISN + 2
    fires_at(engine, 5.0 + TcpTimeouts().fin)  # the host never closes
    engine.poll_timers(5.0 + TcpTimeouts().fin)
    assert output.take()[0].flags & RST
    assert drain(engine) == [Close(flow.flow_id, True)]


def test_delayed_ack_of_data() -> None:
    engine, output = make_engine()
    flow = open_flow(engine, output, space=1 << 20)  # room: the ACK may wait
    settle(engine, IDLE)
    seg(engine, 5.0, seq=GUEST_ISN + 1, ack=OUR_ISN + 1, payload=b"ping")
    drain(engine)
    engine.on_sent(flow.flow_id, 4, 5.0)
    assert output.take() == []
    fires_at(engine, 5.0 + DELAY)
    engine.poll_timers(5.0 + DELAY)
    assert output.take()[0].ack == GUEST_ISN + 5


def test_rto_of_our_fin_after_host_eof() -> None:
    engine, output = make_engine()
    flow = open_flow(engine, output)
    settle(engine, IDLE)
    engine.on_host_eof(flow.flow_id, 5.0)
    assert output.take()[0].flags == FIN | ACK
    fires_at(engine, 6.0)
    engine.poll_timers(6.0)
    assert output.take()[0].flags == FIN | ACK  # sent again


def test_idle_timer_restarts_with_each_segment() -> None:
    engine, output = make_engine(timeouts=TcpTimeouts(idle=30.0))
    flow = open_flow(engine, output)
    settle(engine, 30.0)
    seg(engine, 20.0, seq=GUEST_ISN + 1, ack=OUR_ISN + 1, window=64000)
    engine.poll_timers(30.0)  # the old deadline: the flow lives on
    assert flow.flow_id in engine.flows_by_id and output.take() == []
    fires_at(engine, 50.0)
    engine.poll_timers(50.0)
    assert output.take()[0].flags & RST
    assert drain(engine) == [Close(flow.flow_id, True)]


def test_an_event_looks_ahead_without_computing_deadlines() -> None:
    """The entry of an active flow comes due within the look-ahead, not at its idle deadline:
    one wake-up per look-ahead, which finds nothing to run and requeues the real deadline."""
    # (And next_timer still says the real deadline: it resolves the entry at the head.)
    engine, output = make_engine()
    flow = open_flow(engine, output)
    settle(engine, IDLE)
    seg(engine, 5.0, seq=GUEST_ISN + 1, ack=OUR_ISN + 1, window=64000)
    assert flow.scheduled_at == pytest.approx(5.0 + engine.look_ahead)
    engine.poll_timers(5.0 + engine.look_ahead)
    assert output.take() == [] and flow.scheduled_at == pytest.approx(5.0 + IDLE)
    seg(engine, 7.0, seq=GUEST_ISN + 1, ack=OUR_ISN + 1, window=64000)
    assert engine.next_timer() == pytest.approx(7.0 + IDLE)


def test_persist_timer_of_a_zero_window() -> None:
    engine, output = make_engine()
    flow = open_flow(engine, output)
    seg(engine, 1.0, seq=GUEST_ISN + 1, ack=OUR_ISN + 1, window=0)
    settle(engine, 1.0 + IDLE)
    engine.on_readable(flow.flow_id, 5.0)
    assert drain(engine) == []
    fires_at(engine, 6.0)
    engine.poll_timers(6.0)
    (probe,) = output.take()
    assert probe.flags == ACK and probe.seq == OUR_ISN  # one below snd_una: forces an ACK

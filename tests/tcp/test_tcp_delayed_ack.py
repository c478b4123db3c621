"""Delayed ACK toward the guest: on a request/response flow the reply carries the ACK of the
guest's request (no pure ACK frame), an owed ACK goes out when the delay runs out, bulk data
and partial writes are acknowledged at once."""

from __future__ import annotations

import pytest

from tests.support.tcp import GATEWAY, make_engine
from tests.tcp.test_tcp_engine import GUEST_ISN, OUR_ISN, drain, open_flow, seg
from vhostnet.stack.config import PortForward
from vhostnet.tcp.engine import TcpEngine
from vhostnet.tcp.flow import Flow, Peek, Send, TcpTimeouts
from vhostnet.wire.tcp import ACK, PSH, SYN

DELAY = TcpTimeouts().ack_delay


def request(engine: TcpEngine, flow: Flow, payload: bytes, now: float) -> None:
    """The guest's data at ``rcv_nxt``, written whole to the host socket."""
    seg(engine, now, seq=GUEST_ISN + flow.rcv_nxt, ack=OUR_ISN + flow.snd_una,
        flags=ACK | PSH, payload=payload, window=64000)
    (send,) = [c for c in drain(engine) if isinstance(c, Send)]
    engine.on_sent(flow.flow_id, len(send.data), now)


def reply(engine: TcpEngine, flow: Flow, payload: bytes, now: float) -> None:
    """Host data for the guest (peeked and sent), then the guest's ACK of it."""
    engine.on_readable(flow.flow_id, now)
    (peek,) = [c for c in drain(engine) if isinstance(c, Peek)]
    engine.on_peeked(flow.flow_id, peek.offset, payload, now)


def interactive_flow(engine: TcpEngine, output) -> Flow:
    """An established flow the guest opened, after one request/response exchange (the reply
    carried the ACK of the request: such a flow starts interactive)."""
    flow = open_flow(engine, output, space=1 << 20)
    request(engine, flow, b"ping", 1.0)
    assert output.take() == []
    reply(engine, flow, b"pong", 1.0001)
    (data,) = output.take()
    assert data.payload == b"pong" and data.ack == GUEST_ISN + 5
    seg(engine, 1.0002, seq=GUEST_ISN + 5, ack=OUR_ISN + 5, window=64000)
    drain(engine)
    assert flow.interactive
    return flow


def test_the_reply_carries_the_ack_and_no_pure_ack_is_sent() -> None:
    engine, output = make_engine()
    flow = interactive_flow(engine, output)
    request(engine, flow, b"again", 2.0)
    assert output.take() == []  # no pure ACK frame for the request
    assert flow.ack_owed_at == pytest.approx(2.0 + DELAY)
    reply(engine, flow, b"answer", 2.0001)
    (data,) = output.take()
    assert data.payload == b"answer" and data.ack == GUEST_ISN + 10  # the ACK rides on it
    assert flow.ack_owed_at is None
    engine.poll_timers(2.0 + 2 * DELAY)
    assert output.take() == []  # nothing was left owed
    counters = engine.counters()
    assert counters["tcp.acks_on_replies"] == 2 and "tcp.delayed_acks" not in counters


def test_an_owed_ack_goes_out_after_the_delay_when_no_reply_comes() -> None:
    engine, output = make_engine()
    flow = interactive_flow(engine, output)
    request(engine, flow, b"no answer", 2.0)
    assert output.take() == []
    assert engine.next_timer() == pytest.approx(2.0 + DELAY)
    engine.poll_timers(2.0 + DELAY / 2)
    assert output.take() == []
    engine.poll_timers(2.0 + DELAY)
    (ack,) = output.take()
    assert ack.flags == ACK and not ack.payload and ack.ack == GUEST_ISN + 14
    assert engine.counters()["tcp.delayed_acks"] == 1
    # No reply came: the flow's next data is acknowledged at once again (a guest may be
    # holding small writes back for our ACK: Nagle).
    assert not flow.interactive
    request(engine, flow, b"more", 2.1)
    (ack,) = output.take()
    assert ack.ack == GUEST_ISN + 18


def test_the_engine_asks_for_an_earlier_wakeup_once_per_owed_ack() -> None:
    engine, output = make_engine()
    flow = interactive_flow(engine, output)
    engine.poll_timers(1.5)  # a tick of the integrator's: no wake-up of the exchange is due
    wakeups: list[float] = []
    engine.set_wakeup(wakeups.append)
    request(engine, flow, b"a", 2.0)
    assert wakeups == [pytest.approx(2.0 + DELAY)]
    request(engine, flow, b"b", 2.001)  # still owed from the first: same deadline
    assert wakeups == [pytest.approx(2.0 + DELAY)]
    assert flow.ack_owed_at == pytest.approx(2.0 + DELAY)
    reply(engine, flow, b"c", 2.002)
    request(engine, flow, b"d", 2.003)  # the wake-up asked for comes first: not again
    assert len(wakeups) == 1
    reply(engine, flow, b"f", 2.004)
    engine.poll_timers(2.0 + DELAY)  # that wake-up came
    assert [s.payload for s in output.take()] == [b"c", b"f"]  # and no pure ACK
    request(engine, flow, b"e", 2.011)
    assert wakeups[1] == pytest.approx(2.011 + DELAY)


def test_bulk_data_is_acknowledged_at_once() -> None:
    engine, output = make_engine()
    flow = interactive_flow(engine, output)
    request(engine, flow, b"x" * 1000, 2.0)
    assert output.take() == []
    request(engine, flow, b"y" * 1920, 2.0001)  # two full-sized segments not yet acked
    (ack,) = output.take()
    assert ack.ack == GUEST_ISN + 5 + 2920 and flow.ack_owed_at is None


def test_at_a_large_mtu_one_tso_frame_of_bulk_is_acknowledged_at_once() -> None:
    """At MTU 65520 two full-sized segments are 131 KB, two of the guest's 64 KiB TSO frames;
    the bulk threshold is capped so that each such frame is acknowledged without the delay."""
    engine, output = make_engine(mtu=65520)
    flow = interactive_flow(engine, output)
    request(engine, flow, b"x" * 30000, 2.0)
    assert output.take() == []  # below the cap: still owed for a reply
    request(engine, flow, b"y" * 3000, 2.0001)  # 33,000 unacknowledged: past 32 KiB
    (ack,) = output.take()
    assert ack.ack == GUEST_ISN + 5 + 33000 and flow.ack_owed_at is None
    request(engine, flow, b"z" * 65000, 2.0002)  # one TSO frame alone
    (ack,) = output.take()
    assert ack.ack == GUEST_ISN + 5 + 98000


def test_a_partial_write_is_acknowledged_at_once() -> None:
    engine, output = make_engine()
    flow = interactive_flow(engine, output)
    seg(engine, 2.0, seq=GUEST_ISN + 5, ack=OUR_ISN + 5, payload=b"0123456789", window=64000)
    drain(engine)
    engine.on_sent(flow.flow_id, 4, 2.0)
    (ack,) = output.take()
    assert ack.ack == GUEST_ISN + 9


def test_a_low_window_is_advertised_at_once() -> None:
    engine, output = make_engine()
    flow = interactive_flow(engine, output)
    flow.host_space = 1000
    request(engine, flow, b"tight", 2.0)
    assert len(output.take()) == 1


def test_no_delay_when_configured_off() -> None:
    engine, output = make_engine(timeouts=TcpTimeouts(ack_delay=0.0))
    flow = open_flow(engine, output)
    for now in (1.0, 2.0):
        request(engine, flow, b"ping", now)
        assert len(output.take()) == 1
        reply(engine, flow, b"pong", now)
        output.take()
        seg(engine, now, seq=GUEST_ISN + flow.rcv_nxt, ack=OUR_ISN + flow.snd_max,
            window=64000)
        drain(engine)


def test_a_flow_the_guest_opened_owes_the_ack_of_its_first_request() -> None:
    engine, output = make_engine()
    flow = open_flow(engine, output, space=1 << 20)
    assert flow.interactive  # a client's first data is most likely a request
    request(engine, flow, b"GET /", 1.0)
    assert output.take() == []
    engine.poll_timers(1.0 + DELAY)  # no answer in time: the ACK alone, then at once again
    (ack,) = output.take()
    assert ack.flags == ACK and ack.ack == GUEST_ISN + 6
    assert not flow.interactive
    request(engine, flow, b"more", 1.1)
    (ack,) = output.take()
    assert ack.ack == GUEST_ISN + 10


def test_a_forwarded_flow_acknowledges_its_first_data_at_once() -> None:
    """Toward a guest server nothing says a reply follows: its first data gets its ACK."""
    engine, output = make_engine(forwards=[PortForward("127.0.0.1", 18080, 8080)])
    flow_id = engine.on_accepted("127.0.0.1", 55555, 8080, 0.0)
    output.take()
    seg(engine, src_port=8080, dst_port=55555, dst=GATEWAY, flags=SYN | ACK, seq=900,
        ack=OUR_ISN + 1)
    output.take()
    flow = engine.flows_by_id[flow_id]
    assert not flow.interactive
    seg(engine, 0.1, src_port=8080, dst_port=55555, dst=GATEWAY, seq=901, ack=OUR_ISN + 1,
        flags=ACK | PSH, payload=b"hello")
    (send,) = drain(engine)
    engine.on_sent(flow_id, len(send.data), 0.1)
    (ack,) = output.take()
    assert ack.flags == ACK and ack.ack == 906

"""Sans-IO TCP translator: hand-built guest segments in, segments and host commands out."""

from __future__ import annotations

import errno
import random

import pytest

from tests.support.tcp import (
    GATEWAY,
    GUEST_IP,
    REMOTE_IP,
    guest_segment,
    make_engine,
)
from vhostnet.stack.config import PortForward
from vhostnet.tcp.engine import TcpEngine
from vhostnet.tcp.flow import (
    SEQ_MOD,
    Close,
    Connect,
    Discard,
    Flow,
    Peek,
    Phase,
    Send,
    ShutdownWrite,
    TcpTimeouts,
    seq_diff,
)
from vhostnet.tcp.sender import PEEK_BUDGET
from vhostnet.wire.tcp import ACK, FIN, PSH, RST, SYN

GPORT = 40000
RPORT = 80
GUEST_ISN = 1000
OUR_ISN = 5000  # make_engine's isn_source


def seg(engine: TcpEngine, now: float = 0.0, **kwargs) -> None:
    kwargs.setdefault("src_port", GPORT)
    kwargs.setdefault("dst_port", RPORT)
    guest_segment(engine, now, **kwargs)


def drain(engine: TcpEngine) -> list:
    commands = list(engine.commands)
    engine.commands.clear()
    return commands


def open_flow(engine: TcpEngine, output, *, wscale: int | None = None, space: int = 65535) -> Flow:
    """Guest SYN, host connect succeeds, SYN-ACK, guest ACK: an established flow."""
    seg(engine, flags=SYN, seq=GUEST_ISN, mss=1460, wscale=wscale, window=64000)
    (connect,) = drain(engine)
    engine.on_connected(connect.flow_id, 0.0, send_space=space)
    (syn_ack,) = output.take()
    assert syn_ack.flags == SYN | ACK
    seg(engine, seq=GUEST_ISN + 1, ack=OUR_ISN + 1, window=64000)
    assert output.take() == []
    flow = engine.flows_by_id[connect.flow_id]
    assert flow.state_name == "established"
    return flow


def test_syn_ack_only_after_host_connect_succeeded() -> None:
    engine, output = make_engine()
    seg(engine, flags=SYN, seq=GUEST_ISN, mss=1400, window=64000)
    assert output.take() == []  # nothing until the host side is connected
    (connect,) = drain(engine)
    assert connect == Connect(connect.flow_id, "93.184.216.34", 80)
    seg(engine, flags=SYN, seq=GUEST_ISN, mss=1400)  # guest retransmits its SYN meanwhile
    assert output.take() == []
    engine.on_connected(connect.flow_id, 0.5)
    (syn_ack,) = output.take()
    assert (syn_ack.seq, syn_ack.ack, syn_ack.flags) == (OUR_ISN, GUEST_ISN + 1, SYN | ACK)
    assert syn_ack.mss == 1460  # mtu - 40
    assert syn_ack.wscale is None  # the guest offered no scaling
    assert (syn_ack.src_port, syn_ack.dst_port) == (RPORT, GPORT)
    seg(engine, seq=GUEST_ISN + 1, ack=OUR_ISN + 1)
    assert engine.flows_by_id[connect.flow_id].state_name == "established"
    assert engine.counters()["tcp.flows_open"] == 1


@pytest.mark.parametrize("code", [errno.ECONNREFUSED, errno.ENETUNREACH, errno.ETIMEDOUT])
def test_connect_failure_resets_the_guest(code: int) -> None:
    engine, output = make_engine()
    seg(engine, flags=SYN, seq=GUEST_ISN)
    (connect,) = drain(engine)
    engine.on_connect_failed(connect.flow_id, code, 1.0)
    (rst,) = output.take()
    assert rst.flags == RST | ACK and rst.ack == GUEST_ISN + 1
    assert drain(engine) == [Close(connect.flow_id, True)]
    assert engine.flows == {}
    assert engine.counters()["tcp.rst_sent"] == 1


def test_syn_timer_resets_when_connect_hangs() -> None:
    engine, output = make_engine()
    seg(engine, flags=SYN, seq=GUEST_ISN)
    (connect,) = drain(engine)
    assert engine.next_timer() == pytest.approx(10.0)
    engine.poll_timers(9.9)
    assert output.take() == []
    engine.poll_timers(10.0)
    (rst,) = output.take()
    assert rst.flags & RST
    assert drain(engine) == [Close(connect.flow_id, True)]
    assert engine.flows == {} and engine.next_timer() is None


def test_unreachable_destination_gets_rst_without_connect() -> None:
    engine, output = make_engine()
    seg(engine, flags=SYN, seq=GUEST_ISN, dst=bytes([127, 0, 0, 1]))
    (rst,) = output.take()
    assert rst.flags == RST | ACK and rst.ack == GUEST_ISN + 1
    assert drain(engine) == [] and engine.flows == {}


def test_guest_data_acked_only_as_far_as_the_host_took_it() -> None:
    engine, output = make_engine()
    flow = open_flow(engine, output)
    seg(engine, seq=GUEST_ISN + 1, ack=OUR_ISN + 1, flags=ACK | PSH, payload=b"0123456789")
    seg(engine, seq=GUEST_ISN + 11, ack=OUR_ISN + 1, flags=ACK | PSH, payload=b"abcdef")
    (send,) = drain(engine)  # one Send carries both segments
    assert isinstance(send, Send) and bytes(send.data) == b"0123456789abcdef"
    assert output.take() == []  # no ACK before the host socket accepted the data
    engine.on_sent(flow.flow_id, 4, 0.1)  # partial write
    (ack,) = output.take()
    assert ack.ack == GUEST_ISN + 5 and ack.seq == OUR_ISN + 1
    assert engine.counters()["tcp.partial_writes"] == 1
    # The guest resends from the acknowledged point; it all goes through this time.
    seg(engine, seq=GUEST_ISN + 5, ack=OUR_ISN + 1, payload=b"456789abcdef")
    (send,) = drain(engine)
    assert bytes(send.data) == b"456789abcdef"
    engine.on_sent(flow.flow_id, 12, 0.2)
    assert output.take()[0].ack == GUEST_ISN + 17
    assert engine.counters()["tcp.bytes_to_host"] == 16


def test_overlapping_retransmission_is_trimmed() -> None:
    engine, output = make_engine()
    flow = open_flow(engine, output)
    seg(engine, seq=GUEST_ISN + 1, ack=OUR_ISN + 1, payload=b"abcd")
    seg(engine, seq=GUEST_ISN + 3, ack=OUR_ISN + 1, payload=b"cdef")  # overlaps by two
    (send,) = drain(engine)
    assert bytes(send.data) == b"abcdef"
    engine.on_sent(flow.flow_id, 6, 0.1)
    output.take()
    seg(engine, seq=GUEST_ISN + 1, ack=OUR_ISN + 1, payload=b"abcd")  # entirely old
    assert drain(engine) == []
    assert output.take()[0].ack == GUEST_ISN + 7


def test_out_of_order_segment_gets_duplicate_ack_and_is_not_buffered() -> None:
    engine, output = make_engine()
    open_flow(engine, output)
    seg(engine, seq=GUEST_ISN + 101, ack=OUR_ISN + 1, payload=b"x" * 50)
    (dup,) = output.take()
    assert dup.ack == GUEST_ISN + 1 and dup.flags == ACK
    assert drain(engine) == []
    assert engine.counters()["tcp.out_of_order"] == 1


def test_host_data_peeked_segmented_and_discarded_on_ack() -> None:
    engine, output = make_engine()
    flow = open_flow(engine, output)
    engine.on_readable(flow.flow_id, 1.0)
    (peek,) = drain(engine)
    assert peek == Peek(flow.flow_id, 0, 64000)  # the guest's window
    data = bytes(range(256)) * 12  # 3072 bytes
    engine.on_peeked(flow.flow_id, 0, data, 1.0)
    segments = output.take()
    assert [(s.seq, len(s.payload)) for s in segments] == [
        (OUR_ISN + 1, 1460),
        (OUR_ISN + 1461, 1460),
        (OUR_ISN + 2921, 152),
    ]
    assert b"".join(s.payload for s in segments) == data
    assert segments[-1].flags == ACK | PSH and segments[0].ack == GUEST_ISN + 1
    assert drain(engine) == []  # short peek: wait for on_readable
    seg(engine, seq=GUEST_ISN + 1, ack=OUR_ISN + 1461, window=64000)
    assert drain(engine) == [Discard(flow.flow_id, 1460)]
    seg(engine, seq=GUEST_ISN + 1, ack=OUR_ISN + 3073, window=64000)
    assert drain(engine) == [Discard(flow.flow_id, 1612)]
    assert engine.counters()["tcp.bytes_to_guest"] == 3072


def test_peek_respects_window_and_continues_when_it_opens() -> None:
    engine, output = make_engine()
    flow = open_flow(engine, output)
    seg(engine, seq=GUEST_ISN + 1, ack=OUR_ISN + 1, window=2000)
    engine.on_readable(flow.flow_id, 1.0)
    (peek,) = drain(engine)
    assert peek.length == 2000
    engine.on_peeked(flow.flow_id, 0, b"a" * 2000, 1.0)  # full: the socket may hold more
    assert len(output.take()) == 2 and drain(engine) == []
    seg(engine, seq=GUEST_ISN + 1, ack=OUR_ISN + 1001, window=2000)
    assert drain(engine) == [Discard(flow.flow_id, 1000), Peek(flow.flow_id, 1000, 1000)]


def test_one_peek_asks_for_the_whole_window_and_a_python_read_is_budgeted() -> None:
    # The direct RX path fills the guest's whole window in one call; the glue reads
    # PEEK_BUDGET at a time of what it peeks itself, and only a read short of that budget
    # means the socket ran dry.
    engine, output = make_engine()
    flow = open_flow(engine, output, wscale=7)
    seg(engine, seq=GUEST_ISN + 1, ack=OUR_ISN + 1, window=8192)  # 1 MiB
    engine.on_readable(flow.flow_id, 1.0)
    assert drain(engine) == [Peek(flow.flow_id, 0, 1 << 20)]
    engine.on_peeked(flow.flow_id, 0, b"b" * PEEK_BUDGET, 1.0)  # the budget: not dry
    output.take()
    assert drain(engine) == [Peek(flow.flow_id, PEEK_BUDGET, (1 << 20) - PEEK_BUDGET)]
    engine.on_peeked(flow.flow_id, PEEK_BUDGET, b"b" * 1000, 1.0)  # short of it: dry
    output.take()
    assert drain(engine) == [] and not flow.host_readable


def test_retransmission_timeout_rewinds_and_repeeks_with_backoff() -> None:
    engine, output = make_engine()
    flow = open_flow(engine, output)
    engine.on_readable(flow.flow_id, 1.0)
    drain(engine)
    engine.on_peeked(flow.flow_id, 0, b"q" * 3000, 1.0)
    output.take()
    seg(engine, 1.2, seq=GUEST_ISN + 1, ack=OUR_ISN + 1461, window=64000)  # first segment acked
    drain(engine)
    assert engine.next_timer() == pytest.approx(2.2)
    engine.poll_timers(2.2)
    assert drain(engine) == [Peek(flow.flow_id, 0, 64000)]  # from snd_una again
    engine.on_peeked(flow.flow_id, 0, b"q" * 1540, 2.2)
    resent = output.take()
    assert [s.seq for s in resent] == [OUR_ISN + 1461, OUR_ISN + 2921]
    assert engine.counters()["tcp.retransmits"] == 1
    assert engine.next_timer() == pytest.approx(4.2)  # RTO doubled


def test_three_duplicate_acks_trigger_fast_retransmit() -> None:
    engine, output = make_engine()
    flow = open_flow(engine, output)
    engine.on_readable(flow.flow_id, 1.0)
    drain(engine)
    engine.on_peeked(flow.flow_id, 0, b"z" * 4380, 1.0)
    output.take()
    for _ in range(2):
        seg(engine, seq=GUEST_ISN + 1, ack=OUR_ISN + 1, window=64000)
    assert drain(engine) == []
    seg(engine, seq=GUEST_ISN + 1, ack=OUR_ISN + 1, window=64000)
    assert drain(engine) == [Peek(flow.flow_id, 0, 64000)]
    assert engine.counters()["tcp.fast_retransmits"] == 1


def test_retransmissions_give_up_with_rst() -> None:
    engine, output = make_engine(timeouts=TcpTimeouts(max_retries=2, idle=1e6))
    flow = open_flow(engine, output)
    engine.on_readable(flow.flow_id, 0.0)
    drain(engine)
    engine.on_peeked(flow.flow_id, 0, b"r" * 10, 0.0)
    output.take()
    now = 0.0
    for _ in range(3):
        now = engine.next_timer()
        engine.poll_timers(now)
        for command in drain(engine):
            if isinstance(command, Peek):
                engine.on_peeked(flow.flow_id, command.offset, b"r" * 10, now)
    assert output.sent[-1][2].flags & RST
    assert engine.flows == {}
    assert engine.counters()["tcp.retransmit_giveups"] == 1


def test_window_scaling_negotiated_and_applied_both_ways() -> None:
    engine, output = make_engine()
    seg(engine, flags=SYN, seq=GUEST_ISN, wscale=2, window=64000)
    (connect,) = drain(engine)
    engine.on_connected(connect.flow_id, 0.0, send_space=1_000_000)
    (syn_ack,) = output.take()
    assert syn_ack.wscale == 7 and syn_ack.window == 0xFFFF  # SYN windows are never scaled
    seg(engine, seq=GUEST_ISN + 1, ack=OUR_ISN + 1, window=1000)  # 1000 << 2 bytes
    engine.on_readable(connect.flow_id, 0.0)
    (peek,) = drain(engine)
    assert peek.length == 4000
    engine.on_peeked(connect.flow_id, 0, b"w" * 100, 0.0)
    (data,) = output.take()
    assert data.window == 1_000_000 >> 7


def test_guest_fin_after_data_then_host_eof_closes_cleanly() -> None:
    engine, output = make_engine()
    flow = open_flow(engine, output)
    seg(engine, seq=GUEST_ISN + 1, ack=OUR_ISN + 1, flags=ACK | FIN, payload=b"bye")
    (send,) = drain(engine)
    assert bytes(send.data) == b"bye"
    engine.on_sent(flow.flow_id, 3, 0.1)
    assert drain(engine) == [ShutdownWrite(flow.flow_id)]  # only after the data went out
    assert output.take() == []  # the FIN's ACK is owed for our FIN to carry ...
    engine.poll_timers(0.1 + TcpTimeouts().ack_delay)
    (ack,) = output.take()  # ... and goes alone when the host stays open past the delay
    assert ack.ack == GUEST_ISN + 5  # data plus FIN
    assert flow.state_name == "close_wait"
    engine.on_host_eof(flow.flow_id, 0.2)
    (fin,) = output.take()
    assert fin.flags == FIN | ACK and fin.seq == OUR_ISN + 1
    seg(engine, seq=GUEST_ISN + 5, ack=OUR_ISN + 2)
    assert drain(engine) == [Close(flow.flow_id, False)]
    assert engine.flows == {}
    # The guest did not see our last ACK in time and sends its FIN again: it
    # gets the final ACK, not a reset, while the closed connection is remembered.
    seg(engine, 1.0, seq=GUEST_ISN + 4, ack=OUR_ISN + 2, flags=ACK | FIN)
    (again,) = output.take()
    assert again.flags == ACK and again.seq == OUR_ISN + 2 and again.ack == GUEST_ISN + 5
    assert engine.counters().get("tcp.rst_sent", 0) == 0
    assert engine.counters()["tcp.closed_straggler_acked"] == 1
    # Long after (TIME_WAIT is over), the same straggler is a stranger: reset.
    seg(engine, 100.0, seq=GUEST_ISN + 4, ack=OUR_ISN + 2, flags=ACK | FIN)
    (reset,) = output.take()
    assert reset.flags & RST and engine.counters()["tcp.rst_stray"] == 1


def test_new_syn_takes_over_a_recently_closed_tuple() -> None:
    engine, output = make_engine()
    flow = open_flow(engine, output)
    engine.recently_closed.remember(flow.key, OUR_ISN + 2, GUEST_ISN + 5, 0.0)
    engine.flows.clear()
    engine.flows_by_id.clear()
    drain(engine)
    seg(engine, 1.0, flags=SYN, seq=GUEST_ISN + 100000, mss=1460, window=64000)
    (connect,) = drain(engine)
    assert isinstance(connect, Connect)
    assert len(engine.recently_closed) == 0


def test_recently_closed_is_bounded() -> None:
    from vhostnet.tcp.closed import RecentlyClosed

    closed = RecentlyClosed(linger=10.0, limit=3)
    for port in range(5):
        closed.remember((b"a", port, b"b", 80), port, port, float(port))
    assert len(closed) == 3
    assert closed.final_numbers((b"a", 0, b"b", 80), 4.0) is None  # evicted, oldest first
    assert closed.final_numbers((b"a", 4, b"b", 80), 4.0) == (4, 4)
    assert closed.final_numbers((b"a", 4, b"b", 80), 14.5) is None  # expired


def test_host_eof_fin_waits_for_data_ack_then_half_close_keeps_upload_open() -> None:
    engine, output = make_engine()
    flow = open_flow(engine, output)
    engine.on_readable(flow.flow_id, 0.0)
    drain(engine)
    engine.on_peeked(flow.flow_id, 0, b"data", 0.0)
    output.take()
    engine.on_host_eof(flow.flow_id, 0.0)
    assert output.take() == []  # "data" not yet acknowledged
    seg(engine, seq=GUEST_ISN + 1, ack=OUR_ISN + 5)
    assert drain(engine) == [Discard(flow.flow_id, 4)]
    (fin,) = output.take()
    assert fin.flags == FIN | ACK and fin.seq == OUR_ISN + 5
    seg(engine, seq=GUEST_ISN + 1, ack=OUR_ISN + 6)
    assert flow.state_name == "fin_wait_2"
    # Half-closed: the guest keeps sending, the host keeps receiving.
    seg(engine, seq=GUEST_ISN + 1, ack=OUR_ISN + 6, payload=b"more")
    (send,) = drain(engine)
    engine.on_sent(flow.flow_id, 4, 0.3)
    assert output.take()[0].ack == GUEST_ISN + 5
    seg(engine, seq=GUEST_ISN + 5, ack=OUR_ISN + 6, flags=ACK | FIN)
    assert drain(engine) == [ShutdownWrite(flow.flow_id), Close(flow.flow_id, False)]
    assert output.take()[0].ack == GUEST_ISN + 6
    assert engine.flows == {}


def test_guest_rst_aborts_host_socket_and_out_of_window_rst_is_ignored() -> None:
    engine, output = make_engine()
    flow = open_flow(engine, output)
    seg(engine, seq=GUEST_ISN + 1 + 10_000_000, flags=RST)
    assert engine.flows and engine.counters()["tcp.drop.rst_out_of_window"] == 1
    seg(engine, seq=GUEST_ISN + 1, flags=RST)
    assert drain(engine) == [Close(flow.flow_id, True)]
    assert engine.flows == {} and output.take() == []


def test_host_reset_sends_rst_to_guest() -> None:
    engine, output = make_engine()
    flow = open_flow(engine, output)
    engine.on_host_error(flow.flow_id, errno.ECONNRESET, 1.0)
    (rst,) = output.take()
    assert rst.flags == RST | ACK and rst.seq == OUR_ISN + 1
    assert drain(engine) == [Close(flow.flow_id, True)]


def test_flow_limit_refuses_new_syns_only() -> None:
    engine, output = make_engine(flow_limit=2)
    flow = open_flow(engine, output)
    seg(engine, src_port=40001, flags=SYN, seq=7)
    drain(engine)
    seg(engine, src_port=40002, flags=SYN, seq=9)
    (rst,) = output.take()
    assert rst.flags == RST | ACK and rst.dst_port == 40002
    assert drain(engine) == [] and len(engine.flows) == 2
    assert engine.counters()["tcp.drop.flow_limit"] == 1
    seg(engine, seq=GUEST_ISN + 1, ack=OUR_ISN + 1, payload=b"still fine")
    assert isinstance(drain(engine)[0], Send) and flow.flow_id in engine.flows_by_id


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (SYN | FIN, "flags_syn_fin"),
        (SYN | RST, "flags_syn_rst"),
        (0, "flags_no_ack"),
        (FIN, "flags_no_ack"),
    ],
)
def test_impossible_flags_dropped_and_counted(flags: int, reason: str) -> None:
    engine, output = make_engine()
    seg(engine, flags=flags, seq=1)
    assert output.take() == [] and drain(engine) == [] and engine.flows == {}
    assert engine.counters()[f"tcp.drop.{reason}"] == 1


def test_bad_checksum_dropped_and_counted() -> None:
    engine, output = make_engine()
    seg(engine, flags=SYN, seq=1, corrupt=True)
    assert output.take() == [] and drain(engine) == []
    assert engine.counters()["tcp.drop.bad_checksum"] == 1


def test_segment_without_flow_gets_rst() -> None:
    engine, output = make_engine()
    seg(engine, seq=77, ack=12345, payload=b"stale")
    (rst,) = output.take()
    assert rst.flags == RST and rst.seq == 12345
    seg(engine, seq=77, flags=RST)  # never answer a RST
    assert output.take() == []


def test_inbound_forward_handshake_from_gateway_address() -> None:
    engine, output = make_engine(forwards=[PortForward("127.0.0.1", 18080, 8080)])
    flow_id = engine.on_accepted("127.0.0.1", 55555, 8080, 0.0)
    assert flow_id is not None
    ((src, dst, syn),) = output.sent
    output.sent.clear()
    assert (src, dst) == (GATEWAY, GUEST_IP)
    assert (syn.src_port, syn.dst_port, syn.flags, syn.seq) == (55555, 8080, SYN, OUR_ISN)
    assert syn.mss == 1460 and syn.wscale == 7
    seg(
        engine,
        src_port=8080,
        dst_port=55555,
        dst=GATEWAY,
        flags=SYN | ACK,
        seq=900,
        ack=OUR_ISN + 1,
        wscale=3,
    )
    (ack,) = output.take()
    assert (ack.flags, ack.seq, ack.ack) == (ACK, OUR_ISN + 1, 901)
    flow = engine.flows_by_id[flow_id]
    assert flow.state_name == "established" and flow.snd_wscale == 3
    seg(engine, src_port=8080, dst_port=55555, dst=GATEWAY, seq=901, ack=OUR_ISN + 1, payload=b"hi")
    assert [type(c) for c in drain(engine)] == [Send]
    seg(engine, src_port=8080, dst_port=55555, dst=GATEWAY, seq=903, flags=RST)
    assert drain(engine) == [Close(flow_id, True)]


def test_inbound_syn_retransmitted_then_given_up() -> None:
    engine, output = make_engine(timeouts=TcpTimeouts(syn=5.0))
    flow_id = engine.on_accepted("192.0.2.7", 1234, 22, 0.0)
    src, _, syn = output.sent[0]
    assert src == bytes([192, 0, 2, 7])  # a non-loopback peer keeps its address
    output.take()
    engine.poll_timers(1.0)
    assert output.take()[0].flags == SYN
    engine.poll_timers(5.0)
    assert output.take()[0].flags & RST
    assert drain(engine) == [Close(flow_id, True)]


def test_zero_window_is_probed() -> None:
    engine, output = make_engine()
    flow = open_flow(engine, output)
    seg(engine, seq=GUEST_ISN + 1, ack=OUR_ISN + 1, window=0)
    engine.on_readable(flow.flow_id, 1.0)
    assert drain(engine) == []
    engine.poll_timers(engine.next_timer())
    (probe,) = output.take()
    assert probe.flags == ACK and probe.seq == OUR_ISN  # one below snd_una: forces an ACK
    seg(engine, seq=GUEST_ISN + 1, ack=OUR_ISN + 1, window=500)
    assert drain(engine) == [Peek(flow.flow_id, 0, 500)]


def test_idle_flow_is_reset() -> None:
    engine, output = make_engine(timeouts=TcpTimeouts(idle=30.0))
    flow = open_flow(engine, output)
    engine.poll_timers(29.0)
    assert engine.flows
    engine.poll_timers(30.0)
    assert output.take()[0].flags & RST
    assert drain(engine) == [Close(flow.flow_id, True)]


def test_remote_address_is_what_the_guest_dialled() -> None:
    engine, output = make_engine()
    open_flow(engine, output)
    flow = next(iter(engine.flows.values()))
    assert (flow.guest_ip, flow.remote_ip) == (GUEST_IP, REMOTE_IP)


def test_wire_numbers_map_back_to_relative_ones_across_the_wrap() -> None:
    # send_rel/recv_rel are written out (every guest ACK and segment): they answer what
    # seq_diff against send_seq/recv_seq answers, on both sides of 2**32 and of the point.
    rng = random.Random(5)
    for _ in range(2000):
        flow = Flow(1, bytes(4), 1, bytes(4), 2, False, Phase.ESTABLISHED)
        flow.iss, flow.irs = rng.getrandbits(32), rng.getrandbits(32)
        flow.snd_una, flow.rcv_nxt = rng.randrange(1 << 34), rng.randrange(1 << 34)
        delta = rng.randrange(-(1 << 31), 1 << 31)
        wire = (flow.iss + flow.snd_una + delta) % SEQ_MOD
        assert flow.send_rel(wire) == flow.snd_una + delta
        assert flow.send_rel(wire) == flow.snd_una + seq_diff(wire, flow.send_seq(flow.snd_una))
        wire = (flow.irs + flow.rcv_nxt + delta) % SEQ_MOD
        assert flow.recv_rel(wire) == flow.rcv_nxt + delta

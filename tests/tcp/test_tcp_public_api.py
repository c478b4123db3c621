"""The TCP package's public face for the fast path and migration: change tracking,
bytes written elsewhere, and a flow dumped and restored with the same wire numbers."""

from __future__ import annotations

from tests.support.tcp import GUEST_IP, REMOTE_IP, make_engine
from vhostnet.tcp.flow import Phase, Send
from vhostnet.tcp.handover import dump_flow, restore_flow, resume_host_io
from vhostnet.wire.tcp import ACK

KEY = (GUEST_IP, 40000, REMOTE_IP, 80)


def restored(engine, now: float = 0.0, to_host: bytes = b""):
    return restore_flow(engine, KEY, inbound=False, snd_una=1000, snd_max=1500, rcv_nxt=7000,
                        snd_wnd=65535, snd_wscale=7, rcv_wscale=7, mss=1460, to_host=to_host,
                        host_space=4096, now=now)


def test_changes_are_recorded_only_once_tracking_started() -> None:
    engine, _ = make_engine()
    flow = engine.add_flow(KEY, inbound=False, phase=Phase.ESTABLISHED)
    engine.table.touch(flow.flow_id)
    assert engine.table.take_changed() == set()  # nobody asked: nothing kept
    engine.table.track_changes()
    engine.on_host_eof(flow.flow_id, 1.0)
    assert engine.table.take_changed() == {flow.flow_id}
    assert engine.table.take_changed() == set()


def test_restored_flow_keeps_wire_numbers_and_arms_its_timer() -> None:
    engine, output = make_engine()
    flow = restored(engine, now=10.0)
    assert engine.flows[KEY] is flow and flow.host_space == 4096
    dump = dump_flow(flow)
    assert (dump["snd_una"], dump["snd_max"], dump["rcv_nxt"]) == (1000, 1500, 7000)
    assert dump["phase"] == "ESTABLISHED" and dump["to_host"] == ""
    assert engine.next_timer() == 10.0 + engine.timeouts.rto_initial  # data in flight
    assert output.take() == []


def test_resume_host_io_writes_pending_bytes_and_peeks() -> None:
    engine, _ = make_engine()
    flow = restored(engine, to_host=b"abc")
    resume_host_io(engine, flow.flow_id, 1.0)
    assert list(engine.commands)[0] == Send(flow.flow_id, bytearray(b"abc"))
    assert flow.send_queued and flow.host_readable


def test_bytes_written_elsewhere_are_acknowledged_like_a_send() -> None:
    engine, output = make_engine()
    flow = restored(engine)
    engine.on_written_elsewhere(flow.flow_id, 100, 2.0, send_space=5000)
    assert flow.rcv_nxt == flow.rcv_queued == 101 and flow.host_space == 5000
    (ack,) = output.take()
    assert ack.flags == ACK and ack.ack == 7100
    assert engine.counters()["tcp.bytes_to_host"] == 100

"""The TCP engine's timer heap (tcp/timers.py): one live entry per flow, pushed only when the
flow's earliest deadline becomes earlier; an entry whose flow's timers moved later is requeued."""

from __future__ import annotations

from vhostnet.tcp.flow import Flow, Phase
from vhostnet.tcp.timers import FlowTimers

GUEST = bytes([10, 0, 2, 15])
REMOTE = bytes([10, 0, 2, 2])


def timers_with_flow() -> tuple[FlowTimers, Flow]:
    flow = Flow(1, GUEST, 40000, REMOTE, 80, False, Phase.ESTABLISHED)
    return FlowTimers({flow.flow_id: flow}), flow


def test_an_earlier_deadline_of_any_timer_is_pushed() -> None:
    timers, flow = timers_with_flow()
    flow.idle_at = 100.0
    timers.schedule(flow)
    assert timers.next_deadline() == 100.0
    for name in ("rto_at", "ack_owed_at", "syn_at", "fin_at"):
        deadline = timers.next_deadline() - 10.0
        setattr(flow, name, deadline)
        timers.schedule(flow)
        assert flow.scheduled_at == deadline
        assert timers.next_deadline() == deadline


def test_a_later_deadline_pushes_nothing_until_the_entry_comes_due() -> None:
    timers, flow = timers_with_flow()
    flow.idle_at = 100.0
    timers.schedule(flow)
    flow.idle_at = 200.0  # the idle timer restarted (every segment does that)
    timers.schedule(flow)
    assert flow.scheduled_at == 100.0  # no second entry
    assert timers.next_deadline() == 200.0  # the stale entry was requeued at the real one
    assert not list(timers.due(150.0))
    assert list(timers.due(200.0)) == [flow]


def test_a_disarmed_timer_leaves_the_next_one_as_the_deadline() -> None:
    timers, flow = timers_with_flow()
    flow.idle_at = 100.0
    flow.rto_at = 5.0
    timers.schedule(flow)
    assert timers.next_deadline() == 5.0
    flow.rto_at = None  # everything acknowledged
    assert timers.next_deadline() == 100.0
    flow.idle_at = None
    assert timers.next_deadline() is None


def test_a_gone_flow_is_neither_scheduled_nor_due() -> None:
    flow = Flow(1, GUEST, 40000, REMOTE, 80, False, Phase.ESTABLISHED)
    flows = {flow.flow_id: flow}
    timers = FlowTimers(flows)
    flow.idle_at = 100.0
    timers.schedule(flow)
    flows.clear()
    assert timers.next_deadline() is None
    assert not list(timers.due(1000.0))


def test_look_by_pushes_only_an_earlier_entry_and_requeues_the_real_deadline() -> None:
    timers, flow = timers_with_flow()
    flow.idle_at = 100.0
    timers.look_by(flow, 5.0)
    timers.look_by(flow, 7.0)  # later than the entry: nothing
    assert flow.scheduled_at == 5.0
    assert list(timers.due(5.0)) == [flow]  # looked at: the caller finds nothing due ...
    timers.schedule(flow)  # ... and requeues the real deadline
    assert flow.scheduled_at == 100.0 and timers.next_deadline() == 100.0
    timers.look_by(flow, 6.0)
    assert timers.next_deadline() == 100.0  # resolved at the head, without being due

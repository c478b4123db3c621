"""The engine's per-event counts kept as plain integers (tcp/tally.py): every one reaches the
counters under its own name, exactly once, whenever they are read."""

from __future__ import annotations

from vhostnet.stack.counters import Counters
from vhostnet.tcp.tally import NAMES, EventCounts


def test_each_count_reaches_its_counter_exactly_once() -> None:
    stats = Counters()
    counts = EventCounts(stats)
    stats.inc("tcp.segments_in", 10)  # counted the Counters way as well
    for index, attribute in enumerate(NAMES, start=1):
        setattr(counts, attribute, index)
    expected = {name: index for index, name in enumerate(NAMES.values(), start=1)}
    expected["tcp.segments_in"] += 10
    assert stats.snapshot() == expected
    assert stats.snapshot() == expected  # taken once: not added again
    counts.bytes_to_guest += 5
    assert stats.get("tcp.bytes_to_guest") == expected["tcp.bytes_to_guest"] + 5


def test_counts_never_made_leave_no_name() -> None:
    stats = Counters()
    EventCounts(stats)
    assert stats.snapshot() == {}


def test_names_are_the_engine_counter_names() -> None:
    assert all(name.startswith(("tcp.", "tcp6.")) for name in NAMES.values())
    assert len(set(NAMES.values())) == len(NAMES)

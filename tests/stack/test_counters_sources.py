"""Counts a per-event path keeps as plain integers (``Counters.add_source``): added exactly
once, whenever the counters are read, and never as a name with a zero value."""

from __future__ import annotations

from vhostnet.stack.counters import Counters


class Tally:
    def __init__(self) -> None:
        self.events = 0

    def counts(self) -> dict[str, int]:
        events, self.events = self.events, 0
        return {"x.events": events} if events else {}


def test_counts_kept_elsewhere_are_added_once_when_read() -> None:
    stats = Counters()
    tally = Tally()
    stats.add_source(tally.counts)
    stats.inc("x.events", 2)
    tally.events += 3
    assert stats.get("x.events") == 5
    assert stats.get("x.events") == 5  # taken once, not again
    tally.events += 1
    assert stats.snapshot() == {"x.events": 6}


def test_a_source_with_nothing_adds_no_name() -> None:
    stats = Counters()
    stats.add_source(Tally().counts)
    assert stats.snapshot() == {}
    assert stats.get("x.events") == 0

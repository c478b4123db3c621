"""The timers of a sans-IO stack's own engines, asked as ``Network`` asks them (one list)."""

from __future__ import annotations

from vhostnet.stack.stack import NetworkStack


def _engines(stack: NetworkStack) -> list:
    return [e for e in (stack.icmp, stack.dns, stack.udp_nat, stack.fragments) if e is not None]


def next_timer(stack: NetworkStack) -> float | None:
    """The earliest deadline of the stack's ICMP, DNS, UDP NAT and reassembly engines, or None."""
    deadlines = [d for e in _engines(stack) if (d := e.next_timer()) is not None]
    return min(deadlines) if deadlines else None


def poll_timers(stack: NetworkStack, now: float) -> None:
    """Run the timers of the stack's ICMP, DNS, UDP NAT and reassembly engines due at ``now``."""
    for engine in _engines(stack):
        engine.poll_timers(now)

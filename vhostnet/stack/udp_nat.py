"""UDP NAT (placeholder until the real one lands)."""

from __future__ import annotations


class UdpNat:
    def __init__(self, config, counters, send_ipv4, send_udp, guest_ip) -> None:
        self.counters = counters

    def handle_datagram(self, packet, datagram, now) -> None:
        self.counters.inc("udp.drop.no_nat_yet")

    def poll_timers(self, now: float) -> None:
        pass

    def next_timer(self) -> float | None:
        return None

    def flow_count(self) -> int:
        return 0

"""DNS forwarder (placeholder until the real one lands)."""

from __future__ import annotations


class DnsForwarder:
    def __init__(self, config, counters, send_udp) -> None:
        self.commands = []

    def accepts(self, dst_ip: bytes, dst_port: int) -> bool:
        return False

    def handle_udp(self, src_ip, src_port, dst_ip, dst_port, payload, now) -> None:
        pass

    def poll_timers(self, now: float) -> None:
        pass

    def next_timer(self) -> float | None:
        return None

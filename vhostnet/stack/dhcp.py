"""DHCPv4 server (placeholder until the real one lands in the next commit)."""

from __future__ import annotations


class DhcpServer:
    def __init__(self, config, counters, send_udp) -> None:
        self.counters = counters

    def accepts(self, dst_ip: bytes, dst_port: int) -> bool:
        return False

    def handle_udp(self, src_ip, src_port, dst_ip, dst_port, payload, now) -> None:
        pass

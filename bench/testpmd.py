"""VM-less cases: DPDK's ``dpdk-testpmd`` as the vhost-user front-end (virtio-user), no guest.

``txonly``: testpmd sends UDP frames of a fixed size from the guest's address to
the gateway (which the back-end maps to the host's 127.0.0.1) at a host UDP
sink's port as fast as it can; the figure is what the sink received per second,
not what testpmd handed to the ring. ``rxonly``: a host sender floods the
forwarded UDP port toward the guest; testpmd never transmits, so the back-end
never learns its MAC and must send to the broadcast address (as passt does);
the figure is what testpmd counted. testpmd busy-polls a core, so on a small
machine it competes with the back-end and the host side: both back-ends see
the same.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from bench.hostside import UdpSender, UdpSink
from bench.output import Row
from bench.runner import HOST_UDP_FWD, Backend, BenchError

TESTPMD = "dpdk-testpmd"
TESTPMD_CASE = "testpmd"
SIZES = (64, 1500)  # Ethernet frame lengths (testpmd --txpkts; no FCS)
UDP_FRAME_OVERHEAD = 42  # Ethernet + IPv4 + UDP headers
GUEST_IP, GATEWAY_IP = "10.0.2.15", "10.0.2.2"
# testpmd's own source port 9 (discard): passt delivered none of those datagrams in a
# trial; a port of the ephemeral range works for both back-ends.
TX_SOURCE_PORT = 40000
WARMUP = 1.0  # after testpmd's port is up, before the measured interval
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
STATS_BLOCK = "Port statistics ===="  # printed every second (--stats-period 1) once forwarding
STATS_PERIOD = 1.0
PERIODIC_RX = re.compile(re.escape(STATS_BLOCK) + r".*?RX-packets:\s*(\d+)", re.DOTALL)
FORWARD_STATS = re.compile(
    r"Forward statistics for port 0.*?RX-packets:\s*(\d+).*?TX-packets:\s*(\d+)", re.DOTALL)


def testpmd_missing() -> str | None:
    """Why the testpmd cases cannot run here, or None."""
    if shutil.which(TESTPMD) is None:
        return f"{TESTPMD} not installed (Debian package dpdk-dev)"
    return None


def testpmd_argv(socket_path: str, mode: str, size: int, gateway_mac: str, sink_port: int,
                 prefix: str) -> list[str]:
    """testpmd on ``socket_path`` without hugepages or PCI, one queue, ``mode`` txonly|rxonly."""
    return [TESTPMD, "--no-huge", "--no-pci", "-m", "512", "--file-prefix", prefix,
            "--log-level", "lib.eal:error",
            "--vdev", f"net_virtio_user0,path={socket_path},queues=1,queue_size=256", "--",
            f"--forward-mode={mode}", f"--txpkts={size}", f"--eth-peer=0,{gateway_mac}",
            f"--tx-ip={GUEST_IP},{GATEWAY_IP}", f"--tx-udp={TX_SOURCE_PORT},{sink_port}",
            "--total-num-mbufs=8192", "--stats-period", "1"]


def parse_forward_stats(text: str) -> tuple[int, int]:
    """(RX-packets, TX-packets) from testpmd's final "Forward statistics for port 0" block."""
    found = FORWARD_STATS.findall(text)
    if not found:
        raise BenchError("testpmd printed no forward statistics for port 0")
    rx, tx = found[-1]
    return int(rx), int(tx)


class Testpmd:
    """One testpmd run on a back-end's socket; its output goes to a log file."""

    def __init__(self, backend: Backend, mode: str, size: int, gateway_mac: str,
                 sink_port: int) -> None:
        self.log_path = Path(backend.dir) / f"testpmd-{mode}-{size}.log"
        argv = testpmd_argv(backend.socket, mode, size, gateway_mac, sink_port,
                            f"vnbench{os.getpid()}{mode}{size}")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while STATS_BLOCK not in self.output():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"testpmd did not start on {backend.name}: "
                                 f"{self.output().strip()[-300:]}")
            time.sleep(0.1)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> tuple[int, int]:
        """SIGINT (testpmd then prints its totals); (RX-packets, TX-packets)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return parse_forward_stats(self.output())


def testpmd_rows(template: str, name: str, gateway_mac: str, duration: float) -> list[Row]:
    """One round of every testpmd case on a fresh back-end: txonly then rxonly per size
    (at least 2 s each: rxonly is read from testpmd's once-a-second statistics)."""
    duration = max(duration, 2.0)
    rows = []
    backend = Backend(template, 1500, name)
    sink = UdpSink()
    sink.start()
    try:
        for mode in ("txonly", "rxonly"):
            for size in SIZES:
                rows.append(_round(backend, sink, mode, size, gateway_mac, duration))
    finally:
        sink.stop()
        backend.close()
    if sink.error is not None:
        raise BenchError(f"host side failed: {sink.error}")
    return rows


def _round(backend: Backend, sink: UdpSink, mode: str, size: int, gateway_mac: str,
           duration: float) -> Row:
    case = f"testpmd-{'tx' if mode == 'txonly' else 'rx'}-{size}B"
    row = Row(case, "pps", [], backend=backend.name)
    testpmd = Testpmd(backend, mode, size, gateway_mac, sink.port)
    sender = None
    try:
        if mode == "rxonly":
            sender = UdpSender(HOST_UDP_FWD, size - UDP_FRAME_OVERHEAD, duration + 10 * WARMUP)
            sender.start()
        time.sleep(WARMUP)
        sink.take()
        before, start = backend.usage(), time.monotonic()
        blocks_before, rx_before = parse_periodic_rx(testpmd.output())
        time.sleep(duration)
        seconds = time.monotonic() - start
        after = backend.usage()
        if sender is None:
            received = sink.take()[0]
        else:  # what testpmd counted between two of its periodic prints, a second apart
            blocks, rx_now = parse_periodic_rx(testpmd.output())
            received = rx_now - rx_before
            seconds = max(1, blocks - blocks_before) * STATS_PERIOD
    finally:
        if sender is not None:
            sender.stop()
        rx, tx = testpmd.stop()
    row.rounds.append(received / seconds)
    if before is not None and after is not None:
        row.extra.update(before.per_unit(after, received, "pkt"))
    row.extra.update(testpmd_rx=rx, testpmd_tx=tx)
    if sender is not None:
        row.extra["host_sent"] = sender.sent
    return row


def parse_periodic_rx(text: str) -> tuple[int, int]:
    """(periodic statistics blocks printed whole so far, RX-packets in the latest one)."""
    found = PERIODIC_RX.findall(text)
    return len(found), int(found[-1]) if found else 0

"""The benchmark cases. Each yields table rows: rounds of one figure plus a baseline from the same run.

Figures come from the guest process (frames completed, bytes acknowledged,
latencies) and are cross-checked with what the host side saw and with
vhostnet's own counters, recorded in each row's ``extra``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from bench.guest_net import bulk_block
from bench.hostside import TcpEcho, TcpSender, TcpSink, UdpSender, UdpSink
from bench.output import Progress, Row
from bench.runner import (
    GUEST_TCP_PORT,
    HOST_TCP_FWD,
    HOST_UDP_FWD,
    Backend,
    BenchError,
    LineProcess,
    Usage,
    guest_process,
)

ALL_CASES = ("ring", "udp-tx", "udp-rx", "udp-rr", "tcp-tx", "tcp-rx", "tcp-rr", "tcp-crr")
UDP_RR_PAYLOAD = 64  # the request and the echoed response
RING_SIZES = (64, 1500)
# Both virtqueue formats; a back-end without packed rings (passt) gets split rows only.
RING_FORMATS = ("split", "packed")
UDP_SIZES = (64, 1400)
TCP_MTUS = (1500, 65520)
# tcp-rx: the host sends this block repeated; the benchmark guest checks every byte against it.
TCP_RX_SEED, TCP_RX_BLOCK = 7, 1460
SETTLE = 0.1  # after a round, for datagrams still in flight to land


@dataclass
class Settings:
    cases: tuple[str, ...] = ALL_CASES
    rounds: int = 3
    duration: float = 1.0
    progress: Progress = field(default_factory=Progress)
    offload: bool = True  # the guest negotiates checksum and segmentation offloads


@dataclass
class Baselines:
    """Loopback figures, measured once per run and shared by the cases that need them."""

    client: LineProcess
    settings: Settings
    cache: dict[str, list[float]] = field(default_factory=dict)

    def get(self, key: str, measure: Callable[[], float]) -> list[float]:
        if key not in self.cache:
            values = []
            for i in range(self.settings.rounds):
                self.settings.progress.update(f"baseline {key}: round {i + 1}/{self.settings.rounds}")
                values.append(measure())
            self.cache[key] = values
        return self.cache[key]


def memcpy_mpps(size: int, duration: float, batch: int = 256) -> float:
    """Frames per second numpy copies when moving ``batch`` frames of ``size`` bytes at a time (in M)."""
    src = np.ones(batch * (size + 12), dtype=np.uint8)
    dst = np.empty_like(src)
    copies = 0
    start = time.perf_counter()
    stop = start + duration
    while True:
        for _ in range(64):
            np.copyto(dst, src)
        copies += 64
        if time.perf_counter() >= stop:
            break
    return copies * batch / (time.perf_counter() - start) / 1e6


def _delta(after: dict[str, int], before: dict[str, int], key: str) -> int | None:
    if key not in after:
        return None
    return after[key] - before.get(key, 0)


def ring_rows(template: str, name: str, s: Settings, baselines: Baselines) -> list[Row]:
    rows = []
    for ring_format in RING_FORMATS:
        backend = Backend(template, 1500, name)
        try:
            try:
                guest = guest_process(backend.socket, 1500, arp=False, ring_format=ring_format)
            except BenchError as error:  # reported; the other format still runs
                s.progress.update(f"ring [{name}]: no {ring_format} rings ({error})")
                continue
            try:
                rows += _ring_format_rows(guest, backend, ring_format, name, s, baselines)
            finally:
                guest.close()
        finally:
            backend.close()
    return rows


def _ring_format_rows(guest: LineProcess, backend: Backend, ring_format: str, name: str,
                      s: Settings, baselines: Baselines) -> list[Row]:
    rows = []
    for size in RING_SIZES:
        row = Row(f"ring-{ring_format}-{size}B", "Mpps", [], backend=name,
                  baseline_unit="memcpy Mpps")
        ns, cpu_ns, frames, counted = [], [], 0, 0
        for i in range(s.rounds):
            s.progress.update(f"ring {ring_format} {size}B [{name}] round {i + 1}/{s.rounds}")
            before = backend.counters()
            cpu_before = backend.cpu_seconds()
            r = guest.request("ring", size=size, duration=s.duration)
            cpu_after = backend.cpu_seconds()
            after = backend.counters()
            if cpu_before is not None and cpu_after is not None:
                # The back-end's own CPU per frame, apart from the time it
                # sleeps waiting for the guest's kicks.
                cpu_ns.append(1e9 * (cpu_after - cpu_before) / max(1, r["frames"]))
            row.rounds.append(r["frames"] / r["seconds"] / 1e6)
            ns.append(1e9 * r["seconds"] / max(1, r["frames"]))
            frames += r["frames"]
            counted += _delta(after, before, "guest.tx_to_sink") or 0
        row.baseline = baselines.get(f"memcpy-{size}B", lambda n=size: memcpy_mpps(n, s.duration))
        row.extra["ns_per_frame"] = float(np.median(ns))
        if cpu_ns:
            row.extra["cpu_ns_per_frame"] = float(np.median(cpu_ns))
        row.extra["guest_frames"] = frames
        row.extra["vhostnet_frames"] = counted
        rows.append(row)
    return rows


def nat_rows(template: str, name: str, mtu: int, s: Settings, baselines: Baselines) -> list[Row]:
    """udp-*, tcp-rr, tcp-crr at MTU 1500 and tcp-tx/rx at every MTU in TCP_MTUS."""
    backend = Backend(template, mtu, name)
    rows: list[Row] = []
    workers = []
    try:
        guest = guest_process(backend.socket, mtu, offload=s.offload)
        try:
            if mtu == 1500:
                if "udp-tx" in s.cases or "udp-rx" in s.cases:
                    sink = UdpSink()
                    sink.start()
                    workers.append(sink)
                    rows += _udp(guest, backend, name, s, baselines, sink)
                if "udp-rr" in s.cases:
                    udp_echo = UdpSink(echo=True)
                    udp_echo.start()
                    workers.append(udp_echo)
                    rows.append(_udp_rr(guest, backend, name, s, baselines, udp_echo))
                if "tcp-rr" in s.cases or "tcp-crr" in s.cases:
                    echo = TcpEcho()
                    echo.start()
                    workers.append(echo)
                    rows += _rr(guest, backend, name, s, baselines, echo)
            if "tcp-tx" in s.cases or "tcp-rx" in s.cases:
                tcp_sink = TcpSink()
                tcp_sink.start()
                workers.append(tcp_sink)
                rows += _tcp_bulk(guest, backend, name, mtu, s, baselines, tcp_sink)
        finally:
            guest.close()
    finally:
        for worker in workers:
            worker.stop()
        backend.close()
    for worker in workers:
        if worker.error is not None:
            raise BenchError(f"host side failed: {worker.error}")
    return rows


def _udp(guest: LineProcess, backend: Backend, name: str, s: Settings, baselines: Baselines,
         sink: UdpSink) -> list[Row]:
    rows = []

    def loopback_pps(size: int) -> float:
        sink.take()
        r = baselines.client.request("udp_tx", payload=size, port=sink.port, duration=s.duration)
        time.sleep(SETTLE)
        return sink.take()[0] / r["seconds"]

    for size in UDP_SIZES:
        base = baselines.get(f"loopback-udp-{size}B", lambda n=size: loopback_pps(n))
        if "udp-tx" in s.cases:
            row = Row(f"udp-tx-{size}B", "pps", [], base, "loopback pps", backend=name)
            gbits, sent, counted, received = [], 0, 0, 0
            for i in range(s.rounds):
                s.progress.update(f"udp-tx {size}B [{name}] round {i + 1}/{s.rounds}")
                before = backend.counters()
                sink.take()
                r = guest.request("udp_tx", payload=size, port=sink.port, duration=s.duration)
                time.sleep(SETTLE)
                packets, nbytes = sink.take()
                after = backend.counters()
                row.rounds.append(packets / r["seconds"])
                gbits.append(nbytes * 8 / r["seconds"] / 1e9)
                sent += r["frames"]
                received += packets
                counted += _delta(after, before, "device.tx.frames") or 0
            row.extra.update(gbit_s=float(np.median(gbits)), guest_frames=sent,
                             vhostnet_frames=counted, host_received=received)
            rows.append(row)
        if "udp-rx" in s.cases:
            row = Row(f"udp-rx-{size}B", "pps", [], base, "loopback pps", backend=name)
            gbits, received, sent = [], 0, 0
            for i in range(s.rounds):
                s.progress.update(f"udp-rx {size}B [{name}] round {i + 1}/{s.rounds}")
                sender = UdpSender(HOST_UDP_FWD, size, s.duration + 5.0)
                sender.start()
                try:
                    r = guest.request("udp_rx", duration=s.duration)
                finally:
                    sender.stop()
                seconds = max(r["seconds"], 1e-9)
                row.rounds.append(r["frames"] / seconds)
                gbits.append((r["bytes"] - r["frames"] * 42) * 8 / seconds / 1e9)
                received += r["frames"]
                sent += sender.sent
            row.extra.update(gbit_s=float(np.median(gbits)), host_sent=sent, guest_frames=received)
            rows.append(row)
    return rows


def _udp_rr(guest: LineProcess, backend: Backend, name: str, s: Settings,
            baselines: Baselines, echo: UdpSink) -> Row:
    """64-byte UDP request/response with the host's echo server: p50 latency per round, p99,
    transactions per second, and the back-end's CPU and wake-ups per transaction."""
    p99_base: list[float] = []

    def loopback_p50() -> float:
        r = baselines.client.request("udp_rr", port=echo.port, duration=s.duration,
                                     payload=UDP_RR_PAYLOAD)
        p99_base.append(r["p99_us"])
        return r["p50_us"]

    base = baselines.get("loopback-udp-rr", loopback_p50)
    row = Row(f"udp-rr-{UDP_RR_PAYLOAD}B", "p50 us", [], base, "loopback p50 us", backend=name)
    p99, rates, count = [], [], 0
    cost = Usage(0.0, 0)
    for i in range(s.rounds):
        s.progress.update(f"udp-rr [{name}] round {i + 1}/{s.rounds}")
        before = backend.usage()
        r = guest.request("udp_rr", port=echo.port, duration=s.duration, payload=UDP_RR_PAYLOAD)
        after = backend.usage()
        if before is not None and after is not None:
            cost = Usage(cost.cpu_s + after.cpu_s - before.cpu_s,
                         cost.wakeups + after.wakeups - before.wakeups)
        row.rounds.append(r["p50_us"])
        p99.append(r["p99_us"])
        rates.append(r["count"] / max(r["seconds"], 1e-9))
        count += r["count"]
    row.extra.update(p99_us=float(np.median(p99)), transactions=count,
                     txn_per_s=float(np.median(rates)))
    row.extra.update(Usage(0.0, 0).per_unit(cost, count, "txn"))
    if p99_base:
        row.extra["loopback_p99_us"] = float(np.median(p99_base))
    return row


def _rr(guest: LineProcess, backend: Backend, name: str, s: Settings, baselines: Baselines,
        echo: TcpEcho) -> list[Row]:
    rows = []
    if "tcp-rr" in s.cases:
        p99_base: list[float] = []

        def loopback_p50() -> float:
            r = baselines.client.request("tcp_rr", port=echo.port, duration=s.duration)
            p99_base.append(r["p99_us"])
            return r["p50_us"]

        base = baselines.get("loopback-tcp-rr", loopback_p50)
        row = Row("tcp-rr", "p50 us", [], base, "loopback p50 us", backend=name)
        p99, count = [], 0
        cost = Usage(0.0, 0)
        for i in range(s.rounds):
            s.progress.update(f"tcp-rr [{name}] round {i + 1}/{s.rounds}")
            before = backend.usage()
            r = guest.request("tcp_rr", port=echo.port, duration=s.duration)
            after = backend.usage()
            if before is not None and after is not None:
                cost = Usage(cost.cpu_s + after.cpu_s - before.cpu_s,
                             cost.wakeups + after.wakeups - before.wakeups)
            row.rounds.append(r["p50_us"])
            p99.append(r["p99_us"])
            count += r["count"]
        row.extra.update(p99_us=float(np.median(p99)), transactions=count)
        row.extra.update(Usage(0.0, 0).per_unit(cost, count, "txn"))
        if p99_base:
            row.extra["loopback_p99_us"] = float(np.median(p99_base))
        rows.append(row)
    if "tcp-crr" in s.cases:
        def loopback_crr() -> float:
            r = baselines.client.request("tcp_crr", port=echo.port, duration=s.duration)
            return r["count"] / r["seconds"]

        base = baselines.get("loopback-tcp-crr", loopback_crr)
        row = Row("tcp-crr", "conn/s", [], base, "loopback conn/s", backend=name)
        total = 0
        cost = Usage(0.0, 0)
        for i in range(s.rounds):
            s.progress.update(f"tcp-crr [{name}] round {i + 1}/{s.rounds}")
            before = backend.usage()
            r = guest.request("tcp_crr", port=echo.port, duration=s.duration)
            after = backend.usage()
            if before is not None and after is not None:
                cost = Usage(cost.cpu_s + after.cpu_s - before.cpu_s,
                             cost.wakeups + after.wakeups - before.wakeups)
            row.rounds.append(r["count"] / r["seconds"])
            total += r["count"]
        row.extra["connections"] = total
        row.extra.update(Usage(0.0, 0).per_unit(cost, total, "conn"))
        rows.append(row)
    return rows


def _sink_result(sink: TcpSink, index: int, timeout: float = 10.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while len(sink.results) <= index:
        if time.monotonic() > deadline:
            raise BenchError("the TCP sink never saw the connection end")
        time.sleep(0.01)
    return sink.results[index]


def loopback_tcp(baselines: Baselines, sink: TcpSink) -> list[float]:
    """Host-to-host TCP over loopback into ``sink``, Gbit/s per round (measured once a run)."""

    def loopback_gbits() -> float:
        index = len(sink.results)
        r = baselines.client.request("tcp_tx", port=sink.port,
                                     duration=baselines.settings.duration)
        got = _sink_result(sink, index)
        if got["sha256"] != r["sha256"]:
            raise BenchError("loopback TCP baseline delivered different bytes")
        return r["bytes"] * 8 / r["seconds"] / 1e9

    return baselines.get("loopback-tcp", loopback_gbits)


def _tcp_bulk(guest: LineProcess, backend: Backend, name: str, mtu: int, s: Settings,
              baselines: Baselines, sink: TcpSink) -> list[Row]:
    rows = []
    megabytes = 0.0
    first: Usage | None = None

    def start_cost() -> None:
        nonlocal megabytes, first
        megabytes, first = 0.0, backend.usage()

    def add_cost(row: Row, moved: int) -> None:
        """The back-end's CPU time and wake-ups per MB moved, over the case's rounds."""
        nonlocal megabytes
        megabytes += moved / 1e6
        last = backend.usage()
        if first is not None and last is not None:
            row.extra.update(first.per_unit(last, megabytes, "MB"))

    base = loopback_tcp(baselines, sink)
    if "tcp-tx" in s.cases:
        row = Row(f"tcp-tx-mtu{mtu}", "Gbit/s", [], base, "loopback Gbit/s", backend=name)
        exact = True
        start_cost()
        for i in range(s.rounds):
            s.progress.update(f"tcp-tx MTU {mtu} [{name}] round {i + 1}/{s.rounds}")
            index = len(sink.results)
            r = guest.request("tcp_tx", port=sink.port, duration=s.duration)
            got = _sink_result(sink, index)
            exact = exact and got["sha256"] == r["sha256"] and got["bytes"] == r["bytes"]
            row.rounds.append(r["bytes"] * 8 / r["seconds"] / 1e9)
            add_cost(row, r["bytes"])
        row.extra["exact_bytes"] = exact
        rows.append(row)
    if "tcp-rx" in s.cases:
        row = Row(f"tcp-rx-mtu{mtu}", "Gbit/s", [], base, "loopback Gbit/s", backend=name)
        exact = True
        block = bulk_block(TCP_RX_SEED, TCP_RX_BLOCK)
        start_cost()
        for i in range(s.rounds):
            s.progress.update(f"tcp-rx MTU {mtu} [{name}] round {i + 1}/{s.rounds}")
            guest.send("tcp_rx", port=GUEST_TCP_PORT, seed=TCP_RX_SEED, block_len=TCP_RX_BLOCK)
            sender = TcpSender(HOST_TCP_FWD, s.duration, block)
            sender.start()
            try:
                r = guest.read(s.duration + 60.0)
            finally:
                sender.stop(15.0)
            if "error" in r or sender.error is not None:
                raise BenchError(f"tcp-rx failed: {r.get('error') or sender.error}")
            exact = exact and r["bytes"] == sender.sent and r["intact"]
            row.rounds.append(r["bytes"] * 8 / max(r["seconds"], 1e-9) / 1e9)
            add_cost(row, r["bytes"])
        row.extra["exact_bytes"] = exact
        rows.append(row)
    return rows

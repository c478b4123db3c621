"""Endurance cases, not in the default list: ``soak`` (many short flows) and ``churn``
(many front-ends), with vhostnet's memory and fd count sampled from /proc.

``soak``: the benchmark guest opens and closes TCP connections to a host echo
(connect, 1-byte request and answer, close) and sends one datagram from each
of many new UDP source ports to a host UDP echo, at an even pace over the
given seconds; vhostnet runs with a short UDP idle timeout so the UDP flows
close by expiry. vhostnet's RSS and fd count are sampled every second; the
figures are the start, the peak and the end (after the flows closed).
``churn``: front-ends connect, negotiate (features, memory table, rings,
DRIVER_OK) and disconnect, one after another; RSS at the start and at the end.
Each row's figure is the end value; start and peak are in its extras. No figure is
judged here: they are printed, and the README says what to expect.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

from bench.hostside import TcpEcho, UdpSink
from bench.output import Row
from bench.runner import Backend, BenchError, guest_process, vhostnet_template

SOAK_CASES = ("soak", "churn")
SAMPLE_SECONDS = 1.0
DRAIN_SECONDS = 30.0  # at most, for the flows to close after the last one
CHURN_RETRIES = 200  # a front-end refused while the previous one is still being closed


@dataclass
class SoakSettings:
    seconds: float = 600.0
    tcp_flows: int = 10_000
    udp_flows: int = 20_000
    udp_idle_timeout: float = 2.0
    churn_cycles: int = 10_000


def footprint(pid: int) -> tuple[float, int]:
    """(RSS in MiB, open fds) of process ``pid``, from /proc."""
    with open(f"/proc/{pid}/status") as status:
        rss_kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def _open_flows(counters: dict[str, int]) -> tuple[int, int]:
    return counters.get("tcp.flows_open", 0), counters.get("udp.flows", 0)


def soak_rows(soak: SoakSettings, progress=None) -> list[Row]:
    backend = Backend(f"{vhostnet_template()} --udp-idle-timeout {soak.udp_idle_timeout}",
                      1500, "vhostnet")
    echo, udp_echo = TcpEcho(), UdpSink(echo=True)
    workers = [echo, udp_echo]
    for worker in workers:
        worker.start()
    try:
        guest = guest_process(backend.socket, 1500)
        try:
            rss, fds = [], []
            start = footprint(backend.proc.pid)
            peak_flows = (0, 0)
            done = {"tcp": 0, "tcp_failed": 0, "udp": 0, "udp_replies": 0}
            slices = max(1, math.ceil(soak.seconds / SAMPLE_SECONDS))
            began = time.monotonic()
            for index in range(slices):
                if progress is not None:
                    progress.update(f"soak: {done['tcp']} TCP, {done['udp']} UDP flows, "
                                    f"{index}/{slices} s")
                share = (index + 1) / slices
                reply = guest.request("soak", tcp_port=echo.port, udp_port=udp_echo.port,
                                      tcp_count=round(soak.tcp_flows * share) - done["tcp"],
                                      udp_count=round(soak.udp_flows * share) - done["udp"],
                                      duration=SAMPLE_SECONDS)
                if "error" in reply:
                    raise BenchError(f"soak guest failed: {reply['error']}")
                for key in done:
                    done[key] += reply[key]
                sample = footprint(backend.proc.pid)
                rss.append(sample[0])
                fds.append(sample[1])
                flows = _open_flows(backend.counters())
                peak_flows = (max(peak_flows[0], flows[0]), max(peak_flows[1], flows[1]))
            elapsed = time.monotonic() - began
            deadline = time.monotonic() + DRAIN_SECONDS
            while any(_open_flows(backend.counters())) and time.monotonic() < deadline:
                time.sleep(SAMPLE_SECONDS)
            end = footprint(backend.proc.pid)
            end_flows = _open_flows(backend.counters())
        finally:
            guest.close()
    finally:
        for worker in workers:
            worker.stop()
        backend.close()
    common = {"tcp_flows": done["tcp"], "tcp_failed": done["tcp_failed"], "udp_flows": done["udp"],
              "udp_replies": done["udp_replies"], "seconds": round(elapsed, 1),
              "peak_tcp_open": peak_flows[0], "peak_udp_open": peak_flows[1],
              "end_tcp_open": end_flows[0], "end_udp_open": end_flows[1]}
    return [
        Row("soak-rss", "MiB", [end[0]],
            extra={"start": start[0], "peak": max(rss, default=start[0]), "end": end[0],
                   **common,
                   # Growth with the flow count (a leak) or a plateau (allocator high water).
                   "rss_every_minute": [round(v, 1) for v in rss[::60]]}),
        Row("soak-fds", "fds", [end[1]],
            extra={"start": start[1], "peak": max(fds, default=start[1]), "end": end[1]}),
    ]


def churn_rows(soak: SoakSettings, progress=None) -> list[Row]:
    from testkit.frontend import Frontend, ProtocolError

    backend = Backend(vhostnet_template(), 1500, "vhostnet")
    try:
        before = footprint(backend.proc.pid)
        start = end = before
        retries = 0
        began = time.monotonic()
        for cycle in range(soak.churn_cycles):
            if progress is not None and cycle % 100 == 0:
                progress.update(f"churn: {cycle}/{soak.churn_cycles} front-ends")
            for _ in range(CHURN_RETRIES):
                try:
                    with Frontend(backend.socket) as frontend:
                        frontend.connect()
                        frontend.start()
                    break
                except (OSError, ProtocolError):
                    retries += 1  # the previous front-end is still being closed
                    time.sleep(0.005)
            else:
                raise BenchError(f"churn: front-end {cycle} was refused {CHURN_RETRIES} times")
            if cycle == 0:
                start = footprint(backend.proc.pid)  # after the first: lazy imports are done
        elapsed = time.monotonic() - began
        time.sleep(SAMPLE_SECONDS)  # the last disconnect is handled
        end = footprint(backend.proc.pid)
    finally:
        backend.close()
    return [Row("churn-rss", "MiB", [end[0]],
                extra={"before_first": before[0], "start": start[0], "end": end[0],
                       "end_vs_start": end[0] / start[0], "fds_start": start[1],
                       "fds_end": end[1], "cycles": soak.churn_cycles, "retries": retries,
                       "seconds": round(elapsed, 1)})]

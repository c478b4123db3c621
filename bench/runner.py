"""Processes of a benchmark run: the back-end under test, the guest, the loopback baseline client.

The back-end is started from a command template (``{socket}``, ``{control}``,
``{mtu}``, ``{tcp_fwd}``, ``{udp_fwd}``), so a different vhost-user back-end
can be measured with the same cases (``--compare``). Child processes speak
one JSON object per line; every read has a deadline.
"""

from __future__ import annotations

import json
import os
import select
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

# Host ports forwarded into the guest: TCP 40001 -> guest 5001, UDP 40002 -> guest 5002.
HOST_TCP_FWD, GUEST_TCP_PORT = 40001, 5001
HOST_UDP_FWD, GUEST_UDP_PORT = 40002, 5002
START_TIMEOUT = 10.0
REPLY_TIMEOUT = 120.0


def vhostnet_template(discard_tx: bool = False) -> str:
    """The command that starts vhostnet itself for a case."""
    cmd = (f"{shlex.quote(sys.executable)} -m vhostnet -f --socket {{socket}} --control {{control}} "
           "-m {mtu} -t {tcp_fwd} -u {udp_fwd} --dns-upstream 127.0.0.1 -q")
    return cmd + (" --discard-tx" if discard_tx else "")


class BenchError(Exception):
    """A benchmark cannot go on; the message is one sentence for the user."""


class LineProcess:
    """A child process driven by JSON lines on its stdin/stdout."""

    def __init__(self, argv: list[str], what: str) -> None:
        self.what = what
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        ready = self.read(START_TIMEOUT)
        if not ready.get("ready"):
            self.close()
            raise BenchError(f"{what} did not start: {ready}")

    def read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise BenchError(f"{self.what} did not answer within {timeout:.0f} s")
        line = self.proc.stdout.readline()
        if not line:
            raise BenchError(f"{self.what} exited (status {self.proc.wait(5)})")
        return json.loads(line)

    def send(self, op: str, **args: Any) -> None:
        """Send one command without waiting (the reply is read later with ``read``)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()

    def request(self, op: str, timeout: float = REPLY_TIMEOUT, **args: Any) -> dict[str, Any]:
        """Send one command; the reply, or BenchError."""
        self.send(op, **args)
        reply = self.read(timeout)
        if "error" in reply:
            raise BenchError(f"{self.what}: {op} failed: {reply['error']}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)


def guest_process(socket_path: str, mtu: int, arp: bool = True, offload: bool = False,
                  ring_format: str = "split") -> LineProcess:
    """The benchmark guest for a back-end at ``socket_path`` (buffers sized for ``mtu``).

    With ``offload`` it negotiates checksum and TCP segmentation offloads, as a Linux
    guest does, and its buffers take 64 KiB segments whatever the MTU. ``ring_format``:
    "split" or "packed" virtqueues (packed needs a back-end offering RING_PACKED).
    """
    buf = 2048 if mtu <= 1500 and not offload else 67584
    argv = [sys.executable, "-m", "bench.guest", socket_path, "256", str(buf), str(mtu - 40),
            "arp" if arp else "noarp", "offload" if offload else "plain", ring_format]
    return LineProcess(argv, "the benchmark guest")


def loopback_process() -> LineProcess:
    return LineProcess([sys.executable, "-m", "bench.loopback"], "the loopback client")


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it is still there after 5 s; nothing if it already ended."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def serve_json_lines(call: Callable[[str, dict[str, Any]], dict[str, Any]],
                     errors: tuple[type[Exception], ...] = ()) -> None:
    """The child's side of a ``LineProcess``: say ready, then answer one request per line.

    ``call(op, arguments)`` answers a request; an exception of a type in
    ``errors`` becomes ``{"error": ...}``. Ends at ``quit`` or end of input.
    """
    out = sys.stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        if op == "quit":
            break
        try:
            reply = call(op, request)
        except errors as exc:
            reply = {"error": str(exc)}
        out.write(json.dumps(reply) + "\n")
        out.flush()


def latency_reply(latencies: list[float], seconds: float) -> dict[str, Any]:
    """A request/response op's reply: transactions, seconds and p50/p99 in microseconds
    (``latencies`` in seconds; an empty list gives zeros)."""
    lat = np.array(latencies or [0.0]) * 1e6
    return {"count": len(latencies), "seconds": seconds,
            "p50_us": float(np.percentile(lat, 50)), "p99_us": float(np.percentile(lat, 99))}


def process_cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` from /proc/PID/stat; None where that is unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # The command name (field 2) may hold spaces: count fields after its ')'.
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # fields 14 and 15 of the whole line


def process_wakeups(pid: int) -> int | None:
    """Voluntary + involuntary context switches of every thread of ``pid`` so far: how often
    it slept and was woken (or was preempted); None where /proc is unreadable."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/status") as status:
                for line in status:
                    key, _, value = line.partition(":")
                    if key in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
                        total += int(value)
    except (OSError, ValueError):
        return None
    return total


@dataclass(frozen=True)
class Usage:
    """A back-end process's CPU time (user + system) and wake-ups (context switches) so far."""

    cpu_s: float
    wakeups: int

    @classmethod
    def of(cls, pid: int) -> Usage | None:
        cpu, wakeups = process_cpu_seconds(pid), process_wakeups(pid)
        return None if cpu is None or wakeups is None else cls(cpu, wakeups)

    def per_unit(self, later: Usage, units: float, unit: str) -> dict[str, float]:
        """The back-end's cost from this snapshot to ``later`` per ``unit`` (e.g. ``pkt``, ``MB``):
        ``cpu_us_per_<unit>`` and ``wakeups_per_<unit>``, for the row's extras."""
        if units <= 0:
            return {}
        return {f"cpu_us_per_{unit}": 1e6 * (later.cpu_s - self.cpu_s) / units,
                f"wakeups_per_{unit}": (later.wakeups - self.wakeups) / units}


class Backend:
    """One back-end process on a fresh socket in a private temporary folder.

    Its stderr goes to a file there (passt says the same few lines at every start, and the
    bench starts a back-end per case and round), shown only when the process failed.
    """

    def __init__(self, template: str, mtu: int, name: str) -> None:
        self.name = name
        self.dir = tempfile.mkdtemp(prefix="vhostnet-bench-")
        self.socket = os.path.join(self.dir, "vhost.sock")
        self.control = os.path.join(self.dir, "control.sock")
        command = template.format(socket=self.socket, control=self.control, mtu=mtu,
                                  tcp_fwd=f"{HOST_TCP_FWD}:{GUEST_TCP_PORT}",
                                  udp_fwd=f"{HOST_UDP_FWD}:{GUEST_UDP_PORT}")
        self.log = os.path.join(self.dir, "stderr.log")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(shlex.split(command), stdin=subprocess.DEVNULL,
                                         stderr=log)
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                said = self.log_text().strip()
                self.close()
                raise BenchError(f"back-end {name!r} did not create its socket: {command}"
                                 + (f"; it said: {said}" if said else ""))
            time.sleep(0.02)

    def log_text(self, limit: int = 4000) -> str:
        """The end of what the back-end wrote to stderr so far."""
        try:
            with open(self.log, "rb") as log:
                log.seek(max(0, os.path.getsize(self.log) - limit))
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def counters(self) -> dict[str, int]:
        """vhostnet's counters through its control socket ({} for a back-end without one)."""
        if not os.path.exists(self.control):
            return {}
        from vhostnet.control import control_request

        try:
            return control_request(self.control, "stats").get("counters", {})
        except OSError:
            return {}

    def cpu_seconds(self) -> float | None:
        """User + system CPU time the back-end process has used so far (Linux /proc)."""
        return process_cpu_seconds(self.proc.pid)

    def usage(self) -> Usage | None:
        return Usage.of(self.proc.pid)

    def close(self) -> None:
        ended = self.proc.poll()  # before we stop it: did it end by itself, failing?
        stop_process(self.proc)
        if ended:
            print(f"bench: back-end {self.name!r} exited with status {ended}:\n"
                  f"{self.log_text()}", file=sys.stderr, flush=True)
        shutil.rmtree(self.dir, ignore_errors=True)  # passt leaves SOCKET.repair beside it

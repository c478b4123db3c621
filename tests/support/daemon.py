"""A vhostnet process started as QEMU would find it, and what tests send it."""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from testkit.frontend import Frontend
from tests.support.frames import GATEWAY_IP, GUEST_IP, GUEST_MAC, arp_request
from vhostnet.control import control_request
from vhostnet.wire.checksum import internet_checksum

REPO = Path(__file__).resolve().parents[2]


NOBODY = 65534


@contextlib.contextmanager
def nobody_tmp_dir() -> Iterator[Path]:
    """A fresh folder in /tmp that nobody owns and can reach. Started as root, vhostnet runs
    as nobody: it removes its socket and pid files at exit only where nobody may (as passt,
    it leaves them to the launcher otherwise), which pytest's 0700 tmp_path is not."""
    path = Path(tempfile.mkdtemp(prefix="vhn-nobody-", dir="/tmp"))
    os.chown(path, NOBODY, NOBODY)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class VhostnetProcess:
    def __init__(self, tmp: Path, *args: str) -> None:
        self.socket_path = str(tmp / "vn.sock")
        self.control_path = str(tmp / "vn.ctl")
        self.log_path = tmp / "vn.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        # A dead upstream port keeps the DNS forwarder off the machine's resolver.
        command = [sys.executable, "-m", "vhostnet", "-f", "--socket", self.socket_path,
                   "--control", self.control_path, "--dns-upstream", "127.0.0.1:9", *args]
        self.process = subprocess.Popen(command, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not (os.path.exists(self.socket_path) and os.path.exists(self.control_path)):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vhostnet did not start:\n{self.log_path.read_text()}")
            time.sleep(0.05)
        # The control socket's file exists before vhostnet has finished starting (the
        # server, the repair probe and the signal handlers come after it): a test that
        # counts the process's fds must start from the settled count, so wait for the
        # first answer, which comes only once the event loop serves requests.
        while True:
            try:
                control_request(self.control_path, "stats")
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"vhostnet did not answer:\n{self.log_path.read_text()}") from None
                time.sleep(0.05)

    def stats(self) -> dict[str, int]:
        return control_request(self.control_path, "stats")["counters"]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        code = self.process.wait(timeout=10)
        self.log.close()
        return code

def echo_request(dst_mac: bytes, payload: bytes, seq: int) -> bytes:
    icmp = bytearray(struct.pack("!BBHHH", 8, 0, 0, 0x4242, seq) + payload)
    icmp[2:4] = internet_checksum(icmp).to_bytes(2, "big")
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), seq, 0x4000, 64, 1,
                                   0, GUEST_IP, GATEWAY_IP))
    header[10:12] = internet_checksum(header).to_bytes(2, "big")
    return dst_mac + GUEST_MAC + b"\x08\x00" + bytes(header) + bytes(icmp)


def gateway_mac(frontend: Frontend) -> bytes:
    frontend.send_frame(arp_request(GATEWAY_IP))
    replies = frontend.receive_frames(timeout=5)
    assert len(replies) == 1, replies
    reply = replies[0]
    assert reply[12:14] == b"\x08\x06" and reply[20:22] == b"\x00\x02"
    assert reply[0:6] == GUEST_MAC
    assert reply[28:32] == GATEWAY_IP
    return reply[22:28]

def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vhostnet", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=30)

"""A guest that downloads over one TCP connection and echoes a forwarded one, and the host
side's reading and writing on them: what the tests of connections held across an event
(a live migration, a restart of vhostnet) share."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.guestlib import GATEWAY, static_ipv4
from tests.e2e.hostservers import LOOPBACK

GUEST_ECHO_PORT = 5001
PING_COUNT = 400
IO_SECONDS = 60.0


def guest_script(http_port: int) -> str:
    """Ping the gateway, echo on GUEST_ECHO_PORT (`nc -e cat`), download /big from the host
    and print its sha256 (RESULT download_sha256, nc_rc, done)."""
    return static_ipv4() + f"""
ping -c {PING_COUNT} -i 0.5 -W 2 {GATEWAY} > /dev/console 2>&1 &
ping_pid=$!
timeout 900 nc -l -p {GUEST_ECHO_PORT} -e cat &
nc_pid=$!
sleep 1
echo FORWARD-READY
wget -q -O - http://{GATEWAY}:{http_port}/big | sha256sum > /tmp/sum
echo "RESULT download_sha256=$(cut -d' ' -f1 /tmp/sum)"
wait $nc_pid
echo "RESULT nc_rc=$?"
kill $ping_pid
echo RESULT done=yes
"""


def receive(conn: socket.socket, still_wanted: Callable[[bytearray], int]) -> bytes:
    """Read while ``still_wanted(data)`` (bytes to ask for, 0: done) asks for more, until
    EOF or IO_SECONDS; the caller compares what arrived."""
    data = bytearray()
    deadline = time.monotonic() + IO_SECONDS
    while (wanted := still_wanted(data)) > 0 and time.monotonic() < deadline:
        try:
            chunk = conn.recv(wanted)
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


def echo_line(conn: socket.socket, line: bytes) -> bytes:
    conn.sendall(line)
    return receive(conn, lambda data: 0 if data.endswith(b"\n") else 4096)


def read_exactly(conn: socket.socket, size: int) -> bytes:
    return receive(conn, lambda data: size - len(data))


def open_forward(port: int, greeting: bytes) -> socket.socket:
    """Connect to the forwarded port until ``greeting`` (a line) echoes; the guest's nc may
    need a moment (bounded retries)."""
    for _ in range(30):
        conn = socket.create_connection((LOOPBACK, port), timeout=IO_SECONDS)
        try:
            if echo_line(conn, greeting) == greeting:
                return conn
        except OSError:
            pass
        conn.close()
        time.sleep(1)
    pytest.fail("the forwarded connection into the guest never echoed")


def wait_until(condition: Callable[[], object], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def start_destination(guest: Callable[..., Any], version: str, script: str, socket_path: Path,
                      tmp_path: Path, memory_mb: int) -> Any:
    """Start the destination QEMU on ``socket_path`` waiting for an incoming migration
    (QEMU 7.2 also stopped: its vhostnet state moves through the control sockets before
    ``cont``); started while the source boots, it costs the test no time."""
    extra = ("-incoming", "defer") if version == "10.0" else ("-S", "-incoming", "defer")
    return guest(version, script, socket_path=socket_path, qmp_path=tmp_path / "dst.qmp",
                 memory_mb=memory_mb, extra_args=extra)


def start_migration(source: Any, destination: Any, tmp_path: Path) -> None:
    """Start migrating ``source`` into ``destination`` (``start_destination``) over a UNIX
    socket."""
    uri = f"unix:{tmp_path / 'migration.sock'}"
    destination.qmp("migrate-incoming", uri=uri)
    source.qmp("migrate", uri=uri)

"""Ports forwarded into a real guest: -t (20 MB each way, sha256 checked) and -u (both ways).

One boot per QEMU version. The guest listens with busybox nc on two TCP ports
and with a tiny UDP responder (udpecho.c, compiled here: the guest's busybox
nc has no UDP mode) on one UDP port; the host reaches all three through
vhostnet's listening sockets on 127.0.0.1.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import time
from pathlib import Path

import pytest

from tests.e2e.guestlib import GATEWAY, compile_guest_tool, static_ipv4
from tests.e2e.hostservers import LOOPBACK, free_port, generated_bytes, sha256_hex
from vhostnet.control import control_request

pytestmark = pytest.mark.e2e

BULK_BYTES = 20 * 1024 * 1024
BULK_SEED = 4242
GUEST_TCP_IN = 5001  # the host sends, the guest receives
GUEST_TCP_OUT = 5002  # the guest sends, the host receives
GUEST_UDP = 5003
UDP_ROUNDS = 2
GUEST_MEMORY_MB = 384
SOCKET_TIMEOUT = 120.0
CONNECT_ATTEMPTS = 20


def build_udpecho(into: Path) -> bytes:
    """Compile udpecho.c (freestanding, static); skip if there is no C compiler."""
    return compile_guest_tool(Path(__file__).with_name("udpecho.c"), into)


def guest_script(udpecho: bytes) -> str:
    encoded = base64.encodebytes(udpecho).decode()
    return static_ipv4() + f"""
base64 -d > /tmp/udpecho <<'B64'
{encoded}B64
chmod +x /tmp/udpecho
dd if=/dev/urandom of=/tmp/out bs=1048576 count={BULK_BYTES // 1048576} 2>/dev/null
echo "RESULT out_sha256=$(sha256sum /tmp/out | cut -d' ' -f1)"
timeout 300 nc -l -p {GUEST_TCP_IN} > /tmp/in &
in_pid=$!
timeout 300 nc -l -p {GUEST_TCP_OUT} < /tmp/out &
out_pid=$!
/tmp/udpecho {GUEST_UDP} {UDP_ROUNDS} > /tmp/udp.out &
udp_pid=$!
sleep 1
echo FORWARDS-READY
wait $udp_pid
echo "RESULT udp_rc=$?"
cat /tmp/udp.out
wait $in_pid
echo "RESULT in_rc=$?"
echo "RESULT in_size=$(wc -c < /tmp/in)"
echo "RESULT in_sha256=$(sha256sum /tmp/in | cut -d' ' -f1)"
wait $out_pid
echo "RESULT out_rc=$?"
"""


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection((LOOPBACK, port), timeout=SOCKET_TIMEOUT)
    sock.settimeout(SOCKET_TIMEOUT)
    return sock


def send_bulk(port: int, data: bytes) -> float:
    """Send ``data`` to the forwarded port, half-close, wait for the guest's close; seconds taken."""
    started = time.monotonic()
    with _connect(port) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass
    return time.monotonic() - started


def receive_bulk(port: int, limit: int) -> tuple[bytes, float]:
    """Read from the forwarded port until EOF (or ``limit`` bytes); (data, seconds)."""
    started = time.monotonic()
    chunks, size = [], 0
    with _connect(port) as sock:
        while size < limit:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    return b"".join(chunks), time.monotonic() - started


def udp_exchange(port: int, payload: bytes) -> tuple[bytes, tuple[str, int]]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10)
        sock.sendto(payload, (LOOPBACK, port))
        return sock.recvfrom(4096)


@pytest.mark.slow
def test_tcp_and_udp_forwards(vhostnet, guest, qemu_version, tmp_path, e2e_tmp):
    udpecho = build_udpecho(tmp_path)
    host_in, host_out = free_port(), free_port()
    host_udp = free_port(socket.SOCK_DGRAM)
    control = str(e2e_tmp / "control.sock")
    server = vhostnet("--control", control, "-t", f"{host_in}:{GUEST_TCP_IN}", "-t", f"{host_out}:{GUEST_TCP_OUT}",
                      "-u", f"{host_udp}:{GUEST_UDP}")
    machine = guest(qemu_version, guest_script(udpecho), socket_path=server.socket_path,
                    memory_mb=GUEST_MEMORY_MB)
    machine.wait_for("FORWARDS-READY", timeout=300)

    replies = [udp_exchange(host_udp, f"datagram {n}".encode()) for n in range(UDP_ROUNDS)]
    upload = generated_bytes(BULK_BYTES, BULK_SEED)
    in_seconds = send_bulk(host_in, upload)
    received, out_seconds = receive_bulk(host_out, BULK_BYTES + 1)
    stats = control_request(control, "stats")["counters"]
    machine.wait_exit(timeout=300)
    results = machine.results()
    output = machine.output()

    assert "VHOSTNET-TEST-END" in output, output[-3000:]
    for n, (reply, source) in enumerate(replies):
        assert reply == f"pong datagram {n}".encode()
        assert source == (LOOPBACK, host_udp), "the answer must come from the forwarded port"
        assert f"udpecho got datagram {n}" in output
    assert results["udp_rc"] == "0"

    assert results["in_rc"] == "0"
    assert results["in_size"] == str(BULK_BYTES)
    assert results["in_sha256"] == sha256_hex(upload)
    assert len(received) == BULK_BYTES
    assert hashlib.sha256(received).hexdigest() == results["out_sha256"]
    assert results["out_rc"] == "0"
    # The Linux guest negotiated the offloads: 64 KiB segments cross the rings both ways.
    assert stats.get("vq1.tx_gso_frames", 0) > 0, "the guest sent no TSO frame"
    assert stats.get("vq0.rx_gso_frames", 0) > 0 and stats.get("tcp.gso_segments_out", 0) > 0
    print(f"\nQEMU {qemu_version}: forward host->guest {BULK_BYTES / in_seconds / 1e6:.2f} MB/s, "
          f"guest->host {BULK_BYTES / out_seconds / 1e6:.2f} MB/s (gateway {GATEWAY} as peer); "
          + ", ".join(f"{k}={v}" for k, v in sorted(stats.items())
                      if (k.startswith("tcp.") and ("retrans" in k or "partial" in k or "order" in k or "segments" in k))
                      or k.endswith("gso_frames")))
    assert server.running()

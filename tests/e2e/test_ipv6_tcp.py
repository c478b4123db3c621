"""TCP over IPv6 in a real guest (QEMU 7.2 and 10.0): the guest gets its address by SLAAC (fec0::/64)
and reaches the host's ::1 through the gateway fec0::2.

One boot: a 20 MiB download from an HTTP server bound on ::1 (busybox wget with an IPv6
URL), a 20 MiB upload to a sink on ::1 (nc), both sha256-checked, the upload's data
segments written by the C fast path (``tcp6.fast_segments``); an IPv4 and an IPv6
download at once (dual stack); then ``-t`` forwards (no address: both families) that a
host client on ::1 uses both ways, and that an IPv4 client on 127.0.0.1 uses too.
"""

from __future__ import annotations

import hashlib
import socket
import time

import pytest

from tests.e2e.guestlib import GATEWAY, static_ipv4
from tests.e2e.hostservers import (
    LOOPBACK6,
    HttpFileServer,
    TcpSink,
    free_port,
    generated_bytes,
    sha256_hex,
)
from tests.e2e.test_ipv6 import WAIT_FOR_SLAAC
from vhostnet.control import control_request

pytestmark = pytest.mark.e2e

GATEWAY6 = "fec0::2"
BULK_BYTES = 20 * 1024 * 1024
FORWARD_BYTES = 4 * 1024 * 1024
GUEST_IN, GUEST_OUT, GUEST_IN4 = 7001, 7002, 7003
GUEST_MEMORY_MB = 512
SOCKET_TIMEOUT = 120


def guest_script(http6: int, http4: int, sink6: int) -> str:
    uptime = "$(cut -d' ' -f1 /proc/uptime)"
    return static_ipv4() + WAIT_FOR_SLAAC + f"""
t0={uptime}
timeout 300 wget -q -O /tmp/d6 'http://[{GATEWAY6}]:{http6}/bulk.bin'
echo "RESULT wget6_rc=$?"
t1={uptime}
echo "RESULT download6_seconds=$(echo "$t1 $t0 - p" | dc)"
echo "RESULT download6_sha256=$(sha256sum /tmp/d6 | cut -d' ' -f1)"
rm -f /tmp/d6

dd if=/dev/urandom of=/tmp/up bs=1048576 count={BULK_BYTES // 1048576} 2>/dev/null
echo "RESULT upload6_sha256=$(sha256sum /tmp/up | cut -d' ' -f1)"
timeout 300 nc {GATEWAY6} {sink6} < /tmp/up > /tmp/up.reply
echo "RESULT upload6_rc=$?"
echo "RESULT upload6_reply=$(cat /tmp/up.reply)"
rm -f /tmp/up

# Dual stack at once: the same file over IPv4 and IPv6 in parallel.
timeout 300 wget -q -O /tmp/p4 http://{GATEWAY}:{http4}/bulk.bin &
p4=$!
timeout 300 wget -q -O /tmp/p6 'http://[{GATEWAY6}]:{http6}/bulk.bin' &
p6=$!
wait $p4; echo "RESULT parallel4_rc=$?"
wait $p6; echo "RESULT parallel6_rc=$?"
echo "RESULT parallel4_sha256=$(sha256sum /tmp/p4 | cut -d' ' -f1)"
echo "RESULT parallel6_sha256=$(sha256sum /tmp/p6 | cut -d' ' -f1)"
rm -f /tmp/p4 /tmp/p6

dd if=/dev/urandom of=/tmp/out bs=1048576 count={FORWARD_BYTES // 1048576} 2>/dev/null
echo "RESULT out_sha256=$(sha256sum /tmp/out | cut -d' ' -f1)"
timeout 300 nc -l -p {GUEST_IN} > /tmp/in &
in_pid=$!
timeout 300 nc -l -p {GUEST_OUT} < /tmp/out &
out_pid=$!
timeout 300 nc -l -p {GUEST_IN4} > /tmp/in4 &
in4_pid=$!
sleep 1
echo FORWARDS-READY
wait $in_pid
echo "RESULT in_rc=$?"
echo "RESULT in_sha256=$(sha256sum /tmp/in | cut -d' ' -f1)"
wait $out_pid
echo "RESULT out_rc=$?"
wait $in4_pid
echo "RESULT in4_sha256=$(sha256sum /tmp/in4 | cut -d' ' -f1)"
"""


def _connect(address: str, port: int) -> socket.socket:
    for _ in range(50):  # the guest's nc may need a moment to listen
        try:
            sock = socket.create_connection((address, port), timeout=SOCKET_TIMEOUT)
        except ConnectionRefusedError:
            time.sleep(0.2)
            continue
        sock.settimeout(SOCKET_TIMEOUT)
        return sock
    raise AssertionError(f"nothing listens on [{address}]:{port}")


def send_bulk(address: str, port: int, data: bytes) -> None:
    with _connect(address, port) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass


def receive_bulk(address: str, port: int, limit: int) -> bytes:
    chunks, size = [], 0
    with _connect(address, port) as sock:
        while size < limit:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    return b"".join(chunks)


def test_ipv6_download_upload_dual_stack_and_forward(vhostnet, guest, qemu_version, e2e_tmp):
    download = generated_bytes(BULK_BYTES, 61)
    host_in, host_out, host_in4 = free_port(), free_port(), free_port()
    with (HttpFileServer("bulk.bin", download, host=LOOPBACK6) as http6,
          HttpFileServer("bulk.bin", download) as http4,
          TcpSink(host=LOOPBACK6) as sink6):
        control = str(e2e_tmp / "control.sock")
        server = vhostnet("--control", control, "-t", f"{host_in}:{GUEST_IN}",
                          "-t", f"{host_out}:{GUEST_OUT}", "-t", f"{host_in4}:{GUEST_IN4}")
        machine = guest(qemu_version, guest_script(http6.port, http4.port, sink6.port),
                        socket_path=server.socket_path, memory_mb=GUEST_MEMORY_MB)
        machine.wait_for("FORWARDS-READY", timeout=900)
        # Before the forwards: the guest's only IPv6 data so far are the upload and two
        # HTTP requests (one segment each).
        stats = control_request(control, "stats")["counters"]
        upload = generated_bytes(FORWARD_BYTES, 62)
        send_bulk(LOOPBACK6, host_in, upload)
        received = receive_bulk(LOOPBACK6, host_out, FORWARD_BYTES + 1)
        upload4 = generated_bytes(100_000, 63)
        send_bulk("127.0.0.1", host_in4, upload4)  # a forward without address: IPv4 too
        machine.wait_exit(timeout=300)
    results = machine.results()
    output = machine.output()
    assert "VHOSTNET-TEST-END" in output, output[-3000:]
    assert results["slaac"] == "ok", output[-3000:]

    assert results["wget6_rc"] == "0", output[-3000:]
    assert results["download6_sha256"] == sha256_hex(download)
    assert results["upload6_rc"] == "0"
    assert [t.size for t in sink6.transfers] == [BULK_BYTES]
    assert sink6.transfers[0].sha256 == results["upload6_sha256"] == results["upload6_reply"]
    fast = {name: stats.get(name, 0) for name in ("tcp.fast_segments", "tcp6.fast_segments",
                                                  "tcp.fast_bytes")}
    print("\nTCP fast path before the forwards:", fast)
    assert fast["tcp6.fast_segments"] > 2, stats  # the upload went through the C fast path
    assert fast["tcp.fast_segments"] >= fast["tcp6.fast_segments"]
    assert fast["tcp.fast_bytes"] > BULK_BYTES // 2, stats  # most of it, not a stray segment

    assert results["parallel4_rc"] == results["parallel6_rc"] == "0"
    assert results["parallel4_sha256"] == results["parallel6_sha256"] == sha256_hex(download)

    assert results["in_rc"] == "0" and results["in_sha256"] == sha256_hex(upload)
    assert results["out_rc"] == "0"
    assert hashlib.sha256(received).hexdigest() == results["out_sha256"]
    assert results["in4_sha256"] == sha256_hex(upload4)
    seconds = float(results["download6_seconds"])
    print(f"\nQEMU {qemu_version}: IPv6 download {BULK_BYTES / seconds / 1e6:.2f} MB/s ({seconds} s)")

"""A guest behind vhostnet started as root: it serves as nobody, with no capability,
under the seccomp filter, and the guest still gets DHCP, DNS through the forwarder to
a stub, a 20 MiB download with its sha256, and ping answers (issue 15, item 4)."""

from __future__ import annotations

import pytest

from tests.e2e.test_nat_services import (
    BULK_BYTES,
    BULK_SEED,
    GUEST_MEMORY_MB,
    TEST_NAME,
    TEST_NAME_ADDRESS,
    DnsServer,
    HttpFileServer,
    TcpSink,
    free_port,
    generated_bytes,
    guest_script,
    sha256_hex,
)
from vhostnet import sandbox

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NOBODY = "65534"


def test_a_guest_downloads_through_a_sandboxed_vhostnet(vhostnet, guest, kit):
    if kit.qemu10 is None:
        print(f"QEMU 10.0 unavailable: {kit.qemu10_reason}")
    version = "10.0" if kit.qemu10 is not None else "7.2"
    download = generated_bytes(BULK_BYTES, BULK_SEED)
    with (DnsServer({TEST_NAME: TEST_NAME_ADDRESS}) as dns,
          HttpFileServer("bulk.bin", download) as http, TcpSink() as sink):
        server = vhostnet("--dns-upstream", f"127.0.0.1:{dns.port}")
        machine = guest(version, guest_script(http.port, sink.port, free_port()),
                        socket_path=server.socket_path, memory_mb=GUEST_MEMORY_MB)
        during = sandbox.status(server.pid)  # while the guest boots and transfers
        machine.wait_exit(600)
        results = machine.results()
    assert during["Uid"].split() == [NOBODY] * 4 and during["Gid"].split() == [NOBODY] * 4
    assert int(during["CapEff"], 16) == 0 and int(during["CapPrm"], 16) == 0
    assert during["NoNewPrivs"] == "1" and during["Seccomp"] == "2"
    assert results["dns_udp"] == TEST_NAME_ADDRESS
    assert TEST_NAME in dns.udp_queries
    assert results["wget_rc"] == "0"
    assert results["download_sha256"] == sha256_hex(download)
    assert results["ping_gateway"] == "ok", results
    log = server.log_text()
    assert "seccomp filter:" in log and "running as uid 65534" in log
    assert "Operation not permitted" not in log, log[-3000:]

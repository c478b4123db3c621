"""A guest on vhostnet reaches the gateway: the whole data path, both directions."""

from __future__ import annotations

import pytest

from tests.e2e.guestlib import GATEWAY, ping_check, static_ipv4

pytestmark = pytest.mark.e2e

PING_SCRIPT = static_ipv4() + ping_check(GATEWAY, count=3)


def test_ping_gateway(vhostnet, run_guest, qemu_version):
    server = vhostnet()
    run = run_guest(qemu_version, PING_SCRIPT, socket_path=server.socket_path)
    run.check_completed()
    assert run.results["link"] == "up", "virtio_net did not create eth0"
    assert run.results["ping"] == "ok", run.output
    assert run.results["ping_loss"] == "0"
    assert server.running(), "vhostnet should still be serving after the guest left"

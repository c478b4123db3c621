"""vhostnet is killed and started again under a running guest: traffic resumes.

QEMU runs with chardev reconnect, so it dials the socket again and replays the
whole setup (features, memory table, rings from the last known indexes).
Once replies have resumed, the test types a line on the console that ends the
ping (its count only bounds a slow host).
"""

from __future__ import annotations

import re
import signal

import pytest

from tests.e2e.guestlib import (
    GATEWAY,
    PING_REPLY,
    STOP_PING_LINE,
    ping_replies,
    ping_until_stopped,
    static_ipv4,
)

pytestmark = pytest.mark.e2e

PING_COUNT = 60
PING_INTERVAL = 0.5
REPLIES_BEFORE_KILL = 3

RESTART_SCRIPT = static_ipv4() + ping_until_stopped(GATEWAY, PING_COUNT, PING_INTERVAL)


def test_replies_resume_after_vhostnet_restart(vhostnet, guest, qemu_version):
    server = vhostnet()
    machine = guest(qemu_version, RESTART_SCRIPT, socket_path=server.socket_path,
                    reconnect=True, console_input=True)
    reply = re.compile(PING_REPLY.format(target=re.escape(GATEWAY)), re.MULTILINE)

    # Boot (~10 s under TCG) and wait for a few replies through the first server.
    offset = machine.wait_for("VHOSTNET-TEST-BEGIN", timeout=120).end()
    for _ in range(REPLIES_BEFORE_KILL):
        offset = machine.wait_for(reply, timeout=60, start=offset).end()

    server.kill(signal.SIGKILL)
    killed_at = len(machine.output())
    server.restart()

    # The ping keeps running for up to PING_COUNT * PING_INTERVAL = 30 s.
    machine.wait_for(reply, timeout=60, start=killed_at)
    machine.type_line(STOP_PING_LINE)
    machine.wait_exit(timeout=120)

    output = machine.output()
    before = ping_replies(output[:killed_at], GATEWAY)
    after = ping_replies(output[killed_at:], GATEWAY)
    assert len(before) >= REPLIES_BEFORE_KILL
    assert len(after) > 0, "no echo reply after vhostnet was restarted"
    assert min(after) > max(before), "replies after the restart must be new sequence numbers"
    assert machine.results().get("ping_done") == "yes"
    assert machine.results().get("ping_rc") == "0"
    assert server.running()

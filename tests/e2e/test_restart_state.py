"""vhostnet --state-file: SIGTERM and start again under a running guest, connections kept.

A QEMU 10.0 guest (vhost-user chardev with reconnect-ms=1000) pings the gateway,
downloads 50 MB over one HTTP connection from a paced host server (held
part-way until vhostnet is back, so the connection certainly spans the
restart) and echoes an inbound forwarded connection (`-t` to `nc -l -e cat`).
Before the SIGTERM the test pushes 1 MB through the echo without reading, so
echoed bytes wait unsent in vhostnet's host socket. vhostnet saves its state
and exits; the same command line starts it again, it restores the state and
QEMU reconnects. Then the whole 1 MB comes back, the echo still answers, the
download's sha256 matches on one connection, and the counters say both
connections were restored, none reset. A second case runs vhostnet without
CAP_NET_ADMIN, switching TCP_REPAIR through `vhostnet repair`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.e2e.guestlib import GATEWAY, PING_REPLY, REPO_ROOT, ping_replies
from tests.e2e.held_connections import (
    GUEST_ECHO_PORT,
    IO_SECONDS,
    echo_line,
    guest_script,
    open_forward,
    read_exactly,
    wait_until,
)
from tests.e2e.hostservers import LOOPBACK, PacedHttpServer, free_port, generated_bytes, sha256_hex
from vhostnet.control import control_request

pytestmark = pytest.mark.e2e

DOWNLOAD_BYTES = 50 * 1024 * 1024
DOWNLOAD_SECONDS = 20.0
HOLD_FRACTION = 0.7  # the server waits here until vhostnet is back
RESTART_AFTER_BYTES = 8 * 1024 * 1024
ECHO_BACKLOG_BYTES = 1024 * 1024
BACKLOG_IN_SOCKET = 512 * 1024
GUEST_MEMORY_MB = 384
GUEST_DONE_SECONDS = 600.0
REPLY = re.compile(PING_REPLY.format(target=re.escape(GATEWAY)), re.MULTILINE)


def start_repair_helper(socket_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """`vhostnet repair` on vhostnet's default repair socket (it retries connecting)."""
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "vhostnet", "repair",
                                 f"{socket_path}.repair"], cwd=REPO_ROOT,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)


@pytest.mark.parametrize("repair", ["direct", "vhostnet repair"])
def test_connections_survive_a_restart_with_the_state_file(vhostnet, guest, kit, tmp_path,
                                                           repair: str) -> None:
    if kit.qemu10 is None:
        pytest.fail(f"QEMU 10.0 is needed for reconnect-ms: {kit.qemu10_reason}")
    wrapper: tuple[str, ...] = ()
    # Started as root, vhostnet keeps no capability unless told: direct TCP_REPAIR needs it.
    direct = ("--keep-cap-net-admin",) if repair == "direct" else ()
    if repair != "direct":
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            reason = "setpriv (util-linux) is needed to start vhostnet without CAP_NET_ADMIN"
            print(reason)
            pytest.skip(reason)
        wrapper = (setpriv, "--bounding-set=-net_admin", "--inh-caps=-net_admin", "--")
    data = generated_bytes(DOWNLOAD_BYTES, seed=2027)
    server = PacedHttpServer("big", data, DOWNLOAD_SECONDS, int(DOWNLOAD_BYTES * HOLD_FRACTION))
    helpers: list[subprocess.Popen[bytes]] = []
    state, control = tmp_path / "vhostnet.state", tmp_path / "vhostnet.ctl"
    forward_port = free_port()
    net = vhostnet(*direct, "--state-file", str(state), "--control", str(control),
                   "-t", f"{LOOPBACK}/{forward_port}:{GUEST_ECHO_PORT}", wrapper=wrapper)

    def counters() -> dict[str, int]:
        return control_request(str(control), "stats")["counters"]

    def helper_for_this_start() -> None:
        if repair != "direct":
            helpers.append(start_repair_helper(net.socket_path, tmp_path / "helper.log"))
            wait_until(lambda: "repair helper connected" in net.log_text(), 30,
                       "the repair helper to connect")

    try:
        helper_for_this_start()
        machine = guest("10.0", guest_script(server.port), socket_path=net.socket_path,
                        memory_mb=GUEST_MEMORY_MB, reconnect=True)
        offset = machine.wait_for("FORWARD-READY", timeout=180).end()
        for _ in range(3):
            offset = machine.wait_for(REPLY, timeout=60, start=offset).end()
        forward = open_forward(forward_port, b"before restart\n")
        backlog = generated_bytes(ECHO_BACKLOG_BYTES, seed=8)
        pusher = threading.Thread(target=forward.sendall, args=(backlog,), daemon=True)
        pusher.start()
        wait_until(lambda: server.sent >= RESTART_AFTER_BYTES, 300, "the download to start")
        wait_until(lambda: counters().get("tcp.bytes_to_host", 0) >= BACKLOG_IN_SOCKET, 120,
                   "the echoed bytes to reach vhostnet's host socket")

        assert net.stop() == 0  # SIGTERM: state saved, connections frozen and released
        stopped_at = len(machine.output())
        assert state.exists(), net.log_tail()
        assert "state saved to" in net.log_text()
        assert server.sent < DOWNLOAD_BYTES, "the download ended before the restart"
        net.restart()
        helper_for_this_start()
        # Restored, then emptied (kept: vhostnet, now nobody, writes it at the next SIGTERM).
        wait_until(lambda: state.stat().st_size == 0, 60, "the state to be restored")

        server.release()
        echoed = read_exactly(forward, len(backlog))
        pusher.join(IO_SECONDS)
        assert echoed == backlog, f"{len(echoed)} of {len(backlog)} pushed bytes came back"
        assert echo_line(forward, b"after restart\n") == b"after restart\n"
        forward.close()
        machine.wait_exit(GUEST_DONE_SECONDS)
        results = machine.results()
        after = counters()
        print("TCP counters after the restart:",
              {k: v for k, v in after.items() if k.startswith("tcp.")})
        assert results.get("done") == "yes", results
        assert results.get("download_sha256") == sha256_hex(data), "download corrupted"
        assert server.requests == 1, "the download did not stay on one connection"
        output = machine.output()
        before_replies = ping_replies(output[:stopped_at], GATEWAY)
        after_replies = ping_replies(output[stopped_at:], GATEWAY)
        assert after_replies and min(after_replies) > max(before_replies), "the ping stopped"
        assert after.get("tcp.migration_restored", 0) >= 2, after
        assert after.get("tcp.migration_reset", 0) == 0, after
        assert state.stat().st_size == 0 and not Path(f"{state}.bad").exists()
    finally:
        server.close()
        for process in helpers:
            if process.poll() is None:
                process.terminate()
            process.wait(timeout=10)

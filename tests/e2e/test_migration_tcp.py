"""TCP connections that live through a live migration (TCP_REPAIR), two QEMUs, two vhostnets.

The guest pings the gateway, downloads 50 MB over one HTTP connection from a
paced host server (held part-way until the migration completed, so the
connection certainly spans it), and holds an inbound forwarded connection
(`-t` to `nc -l -e cat` in the guest: an echo). Before the migration the test
pushes 1 MB through the echo and reads none of it back, so the echoed bytes
back up into vhostnet's host socket, never sent. After the migration the ping
goes on, the download's sha256 matches, the whole 1 MB comes back, the
forwarded connection still echoes, and the destination's counters say the
connections were restored, not reset, with unsent bytes in a send queue. QEMU 10.0 moves vhostnet's state with DEVICE_STATE, QEMU 7.2
through the control sockets (save-state, release, load-state). Two variants
run both vhostnets without CAP_NET_ADMIN, with a TCP_REPAIR helper on each
vhostnet's default repair socket (SOCKET.repair): `vhostnet repair`, and passt's
own passt-repair (Debian trixie) as KubeVirt and libvirt use it.
"""

from __future__ import annotations

import base64
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.guestlib import (
    GATEWAY,
    PING_REPLY,
    REPO_ROOT,
    destination_diagnosis,
    ping_replies,
)
from tests.e2e.held_connections import (
    GUEST_ECHO_PORT,
    IO_SECONDS,
    echo_line,
    guest_script,
    open_forward,
    read_exactly,
    start_destination,
    start_migration,
    wait_until,
)
from tests.e2e.hostservers import LOOPBACK, PacedHttpServer, free_port, generated_bytes, sha256_hex
from tests.support.daemon import nobody_tmp_dir
from tests.support.qmp import wait_migrated
from vhostnet.control import control_request

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DOWNLOAD_BYTES = 50 * 1024 * 1024
DOWNLOAD_SECONDS = 20.0
HOLD_FRACTION = 0.7  # the server waits here until the migration is over
MIGRATE_AFTER_BYTES = 8 * 1024 * 1024
ECHO_BACKLOG_BYTES = 1024 * 1024
# More than the test's own receive window takes, so some must wait in vhostnet.
BACKLOG_IN_SOCKET = 512 * 1024
GUEST_MEMORY_MB = 384
GUEST_DONE_SECONDS = 600.0
REPLY = re.compile(PING_REPLY.format(target=re.escape(GATEWAY)), re.MULTILINE)


class Scenario:
    """Everything one migration test needs; the steps differ only in how the state moves."""

    def __init__(self, vhostnet, guest, tmp_path: Path, version: str,
                 wrapper: tuple[str, ...] = (),
                 helper: Callable[[Path], list[str]] | None = None) -> None:
        """``helper(repair_socket)``: the command of a TCP_REPAIR helper to start for
        each vhostnet, on its default repair socket."""
        self.tmp_path, self.version = tmp_path, version
        self.data = generated_bytes(DOWNLOAD_BYTES, seed=2026)
        self.server = PacedHttpServer("big", self.data, DOWNLOAD_SECONDS,
                                      int(DOWNLOAD_BYTES * HOLD_FRACTION))
        self.forward_port = free_port()
        self.backlog = generated_bytes(ECHO_BACKLOG_BYTES, seed=7)
        self.backlog_pusher: threading.Thread | None = None
        self.controls = (tmp_path / "src.ctl", tmp_path / "dst.ctl")
        self.helper_processes: list[subprocess.Popen[bytes]] = []
        common: tuple[str, ...] = ("-t", f"{LOOPBACK}/{self.forward_port}:{GUEST_ECHO_PORT}")
        if helper is None:
            # Started as root, vhostnet keeps no capability unless told: direct TCP_REPAIR.
            common = ("--keep-cap-net-admin", *common)
        source_args = ("--control", str(self.controls[0]), *common)
        dest_args = ("--control", str(self.controls[1]), "--incoming", *common)
        self.source_net = vhostnet(*source_args, wrapper=wrapper)
        self.dest_net = vhostnet(*dest_args, wrapper=wrapper)
        if helper is not None:
            for net in (self.source_net, self.dest_net):
                self.start_helper(helper, Path(f"{net.socket_path}.repair"))
        self.script = guest_script(self.server.port)
        self.source = guest(version, self.script, socket_path=self.source_net.socket_path,
                            qmp_path=tmp_path / "src.qmp", memory_mb=GUEST_MEMORY_MB)
        self.destination = start_destination(guest, version, self.script,
                                             self.dest_net.socket_path, tmp_path,
                                             GUEST_MEMORY_MB)

    def start_helper(self, helper: Callable[[Path], list[str]], path: Path) -> None:
        # passt-repair gives up at once on a path that does not exist yet.
        wait_until(path.exists, 30, f"vhostnet to create {path}")
        log = open(self.tmp_path / f"{path.name}.log", "wb")
        self.helper_processes.append(subprocess.Popen(
            helper(path), cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            start_new_session=True))

    def before_migration(self) -> socket.socket:
        offset = self.source.wait_for("FORWARD-READY", timeout=180).end()
        for _ in range(3):
            offset = self.source.wait_for(REPLY, timeout=60, start=offset).end()
        forward = open_forward(self.forward_port, b"before migration\n")
        # Pushed from a thread: with nothing read back, the echo may stop taking
        # bytes before all are in (sendall would then wait for the read after the
        # migration).
        self.backlog_pusher = threading.Thread(target=forward.sendall, args=(self.backlog,),
                                               daemon=True)
        self.backlog_pusher.start()
        wait_until(lambda: self.server.sent >= MIGRATE_AFTER_BYTES, 300, "the download to start")
        # Part of the echo must sit in vhostnet's host socket, unsent, when it freezes.
        wait_until(lambda: self.source_counter("tcp.bytes_to_host") >= BACKLOG_IN_SOCKET, 120,
                   "the echoed bytes to reach vhostnet's host socket")
        start_migration(self.source, self.destination, self.tmp_path)
        return forward

    def source_counter(self, name: str) -> int:
        return control_request(str(self.controls[0]), "stats")["counters"].get(name, 0)

    def report_figures(self) -> None:
        info = self.source.qmp("query-migrate")
        state = re.findall(r"device state: saving (\d+) bytes", self.source_net.log_text())
        print(f"QEMU {self.version}: migration total {info.get('total-time')} ms, downtime "
              f"{info.get('downtime')} ms, vhostnet state {state or 'via control socket'} bytes")

    def read_backlog(self, forward: socket.socket) -> None:
        echoed = read_exactly(forward, len(self.backlog))
        assert self.backlog_pusher is not None
        self.backlog_pusher.join(IO_SECONDS)
        assert echoed == self.backlog, (f"{len(echoed)} of the {len(self.backlog)} pushed bytes "
                                        f"came back, equal: {echoed == self.backlog[:len(echoed)]}")

    def after_migration(self, forward: socket.socket) -> dict[str, int]:
        assert self.server.sent < DOWNLOAD_BYTES, "the download ended before the migration"
        self.server.release()
        self.read_backlog(forward)
        echoed = echo_line(forward, b"after migration\n")
        assert echoed == b"after migration\n", self.diagnosis(echoed)
        forward.close()
        assert self.destination is not None
        self.destination.wait_exit(GUEST_DONE_SECONDS)
        results = self.destination.results()
        counters = control_request(str(self.controls[1]), "stats")["counters"]
        print("destination TCP counters:", {k: v for k, v in counters.items() if k.startswith("tcp.")})
        assert results.get("done") == "yes", results
        assert results.get("download_sha256") == sha256_hex(self.data), "download corrupted"
        assert self.server.requests == 1, "the download did not stay on one connection"
        before = ping_replies(self.source.output(), GATEWAY)
        after = ping_replies(self.destination.output(), GATEWAY)
        assert before and after and min(after) > max(before), "the ping did not continue"
        assert counters.get("tcp.migration_restored") == 2, counters
        assert counters.get("tcp.migration_reset", 0) == 0, counters
        assert counters.get("tcp.migration_unsent_bytes", 0) > 0, counters
        assert "released 2 frozen TCP connection(s)" in self.source_net.log_text()
        return counters

    def diagnosis(self, echoed: bytes) -> str:
        """What the destination looked like when the forwarded connection went quiet."""
        lines = [f"the forwarded connection answered {echoed!r} after the migration"]
        if self.destination is not None:
            lines.append(destination_diagnosis(self.destination, self.controls[1]))
        return "\n".join(lines)

    def close(self) -> None:
        self.server.close()
        for process in self.helper_processes:
            if process.poll() is None:
                process.terminate()
            process.wait(timeout=10)


@pytest.fixture
def scenario_factory(vhostnet, guest, tmp_path):
    made: list[Scenario] = []

    def make(version: str, **kwargs) -> Scenario:
        made.append(Scenario(vhostnet, guest, tmp_path, version, **kwargs))
        return made[-1]

    yield make
    for scenario in made:
        scenario.close()


def migrate_qemu10(scenario: Scenario) -> dict[str, int]:
    forward = scenario.before_migration()
    wait_migrated(scenario.source)
    scenario.report_figures()
    return scenario.after_migration(forward)


def test_tcp_connections_survive_qemu10_migration(scenario_factory, kit):
    if kit.qemu10 is None:
        pytest.fail(f"QEMU 10.0 is needed for DEVICE_STATE: {kit.qemu10_reason}")
    scenario = scenario_factory("10.0")
    migrate_qemu10(scenario)
    assert "TCP_REPAIR available" in scenario.dest_net.log_text()


def test_tcp_connections_survive_qemu72_migration_with_control_sockets(scenario_factory):
    scenario = scenario_factory("7.2")
    forward = scenario.before_migration()
    wait_migrated(scenario.source)
    source_ctl, dest_ctl = (str(path) for path in scenario.controls)
    # Inline: vhostnet, as nobody under seccomp, creates no file.
    saved = control_request(source_ctl, "save-state", timeout=30)
    assert saved["ok"], saved
    scenario.report_figures()
    print(f"state file: {saved['bytes']} bytes")
    released = control_request(source_ctl, "release")
    assert released == {"ok": True, "released": 2}, released
    # Too big to travel inline (a request line is at most 64 KiB): the destination reads
    # it from a file nobody, its user, may read.
    with nobody_tmp_dir() as folder:
        state = folder / "state.bin"
        state.write_bytes(base64.b64decode(saved["state"]))
        state.chmod(0o644)
        loaded = control_request(dest_ctl, "load-state", file=str(state), timeout=30)
    assert loaded["ok"] and loaded["loaded"]["tcp_restored"] == 2, loaded
    assert scenario.destination is not None
    scenario.destination.qmp("cont")
    scenario.after_migration(forward)


def vhostnet_repair(path: Path) -> list[str]:
    return [sys.executable, "-m", "vhostnet", "repair", str(path)]


@pytest.mark.parametrize("helper_name", ["vhostnet repair", "passt-repair"])
def test_tcp_connections_survive_through_the_repair_helper(scenario_factory, kit, request,
                                                           helper_name: str):
    if kit.qemu10 is None:
        pytest.fail(f"QEMU 10.0 is needed for DEVICE_STATE: {kit.qemu10_reason}")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        reason = "setpriv (util-linux) is needed to start vhostnet without CAP_NET_ADMIN"
        print(reason)
        pytest.skip(reason)
    helper = (request.getfixturevalue("passt_repair").command if helper_name == "passt-repair"
              else vhostnet_repair)
    wrapper = (setpriv, "--bounding-set=-net_admin", "--inh-caps=-net_admin", "--")
    scenario = scenario_factory("10.0", wrapper=wrapper,
                                helper=lambda path: list(map(str, helper(path))))
    for net in (scenario.source_net, scenario.dest_net):
        wait_until(lambda net=net: "repair helper connected" in net.log_text(), 30,
                   "the repair helper to connect")
        assert "no CAP_NET_ADMIN" in net.log_text()
    migrate_qemu10(scenario)
    # Each side lets its helper go once its part is over, as passt does: passt-repair
    # (which KubeVirt starts for every migration) ends.
    for process in scenario.helper_processes:
        assert process.wait(timeout=30) == 0, f"{helper_name} did not end after the migration"


def test_abandoned_migration_leaves_the_connections_on_the_source_qemu72(scenario_factory):
    """save-state froze the connections; the migration is given up: resume, cont, all goes on."""
    scenario = scenario_factory("7.2")
    forward = scenario.before_migration()
    wait_migrated(scenario.source)
    source_ctl = str(scenario.controls[0])
    saved = control_request(source_ctl, "save-state")  # inline: nobody creates no file
    assert saved["ok"], saved
    assert control_request(source_ctl, "resume") == {"ok": True, "resumed": 2}
    assert scenario.destination is not None
    scenario.destination.kill()
    scenario.source.qmp("cont")
    scenario.server.release()
    scenario.read_backlog(forward)
    assert echo_line(forward, b"after abandoning\n") == b"after abandoning\n"
    forward.close()
    scenario.source.wait_exit(GUEST_DONE_SECONDS)
    results = scenario.source.results()
    assert results.get("download_sha256") == sha256_hex(scenario.data), "download corrupted"
    assert scenario.server.requests == 1
    counters = control_request(source_ctl, "stats")["counters"]
    assert counters.get("tcp.migration_thawed") == 2, counters
    assert counters.get("tcp.migration_released", 0) == 0, counters
